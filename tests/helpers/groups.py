"""Groups for the tests that scale: one factory with the settings they share, so that each test names only what
it is about (the provider, its settings, a signal)."""

from __future__ import annotations

from typing import Any

from scaleq.grid import Group
from scaleq.jobs import RuntimeKind

FAST = {
    "queue": "q",
    "provider": "local",
    "min_workers": 0,
    "max_workers": 3,
    "slots": 1,
    "runtimes": [RuntimeKind.process],
    "idle_timeout": 1.0,  # idle workers go within seconds, so a test sees the scale-down
    "scale_down_window": 1.0,
}


def fast_group(name: str = "cpu", **fields: Any) -> Group:
    """A group on queue ``q`` of up to 3 one-slot workers for process jobs that scales down after 1 s idle;
    ``fields`` override or add any group field."""
    return Group.model_validate({**FAST, "name": name, **fields})
