"""Token roles and the scopes each grants (kept apart from auth.py so the CLI can name roles without FastAPI)."""

ROLES = ("admin", "submit", "worker", "read")
SCOPES: dict[str, set[str]] = {
    "admin": {"admin", "jobs:read", "jobs:write", "worker", "view"},
    "submit": {"jobs:read", "jobs:write", "view"},
    "worker": {"worker", "view"},
    "read": {"jobs:read", "view"},
}
