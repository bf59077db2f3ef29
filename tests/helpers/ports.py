"""A free TCP port on 127.0.0.1: for a service the test starts (PostgreSQL, Prometheus, an OTLP receiver) that must
be told its port, and for an address where nothing listens."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A port the kernel just gave out and took back: nothing listens there until someone binds it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
