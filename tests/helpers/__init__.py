"""Shared test helpers, one module an idea; the names most tests use are re-exported here.

- :mod:`~tests.helpers.server`: a live server on a free port with tokens of each role, a wait for its first
  housekeeping round, long leases for tests that hold them without heartbeats, and a controller running alongside it
  for a block.
- :mod:`~tests.helpers.waiting`: waiting for a condition with a bound (``eventually`` async, ``wait_for`` sync).
- :mod:`~tests.helpers.ports`: a free port on 127.0.0.1.
- :mod:`~tests.helpers.processes`: a service run as a subprocess for a block, its output in a log.
- :mod:`~tests.helpers.prometheus`: a real Prometheus, and a metrics endpoint for it to scrape.
- :mod:`~tests.helpers.engine`: the Docker Engine of the docker tests (the ``engine`` fixture in tests/conftest.py).
- :mod:`~tests.helpers.groups`: a group that scales fast enough for a test.
- :mod:`~tests.helpers.workers`: worker agents for process jobs, run for a block.
- :mod:`~tests.helpers.opendirs`: temp dirs that jobs run as another user (``nobody``) can reach.
- :mod:`~tests.helpers.drivers`: the real controller driven over any provider (workers that never register, a
  quota or rate-limit refusal), the same scenario for every provider's tests.

Fixtures live in the conftest.py at the level that uses them: stores, servers, PostgreSQL and the engine in
tests/conftest.py, ``scaleq up`` grids in tests/acceptance/conftest.py.
"""

from tests.helpers.ports import free_port
from tests.helpers.server import LONG_LEASES, LiveServer, controlling, housekept, make_tokens, serve
from tests.helpers.waiting import eventually, wait_for

__all__ = [
    "LONG_LEASES",
    "LiveServer",
    "controlling",
    "eventually",
    "free_port",
    "housekept",
    "make_tokens",
    "serve",
    "wait_for",
]
