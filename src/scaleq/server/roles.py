"""Token roles and the scopes each grants (kept apart from auth.py so the CLI can name roles without FastAPI).

- ``view``: queues and ``/metrics`` (every role: a worker reports its queue's length on its own ``/metrics``).
- ``workers:read``: the workers list (a worker token too: cloud providers list their workers with it).
- ``grid:read``: groups, scaling events, demand and health.
- ``jobs:read`` / ``jobs:write``: jobs; ``worker``: the worker protocol; ``admin``: tokens, groups, purge, drain.
"""

ROLES = ("admin", "submit", "worker", "read")
SCOPES: dict[str, set[str]] = {
    "admin": {"admin", "jobs:read", "jobs:write", "worker", "view", "workers:read", "grid:read"},
    "submit": {"jobs:read", "jobs:write", "view", "workers:read", "grid:read"},
    "worker": {"worker", "view", "workers:read"},
    "read": {"jobs:read", "view", "workers:read", "grid:read"},
}
