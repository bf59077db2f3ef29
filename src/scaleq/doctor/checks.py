"""The checks' shared vocabulary: a :class:`Check` ``(hop, name, ok, detail, fix)`` and the helpers that name hops
and durations.

The checks are data, so the CLI prints them as a table, scripts read them as JSON and the dashboard shows them; the
server sends them over HTTP and ``scaleq doctor`` reads them back (:meth:`Check.from_dict`). No check ever raises: one
that cannot run becomes a failed check that says why, and one that needs something missing (a server that does not
answer) is reported as *not checked* (``checked=False``) with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

#: Said by the server's store check and by doctor when the server answers 503 (its store is down).
FIX_STORE_DOWN = (
    "the server cannot reach its database: for SQLite check the file's disk and permissions, for PostgreSQL that it "
    "is up and the store URL ([store] url) is right; the server answers 503 until it is back"
)


@dataclass(frozen=True)
class Check:
    """One hop's check: ``ok`` or not, what was seen, and how to fix it. ``checked=False``: it could not run."""

    hop: str
    name: str
    ok: bool
    detail: str
    fix: str = ""
    checked: bool = True

    @property
    def status(self) -> str:
        return "ok" if self.ok else "failed" if self.checked else "not checked"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Check:
        return cls(
            hop=str(data["hop"]),
            name=str(data["name"]),
            ok=bool(data["ok"]),
            detail=str(data.get("detail", "")),
            fix=str(data.get("fix", "")),
            checked=bool(data.get("checked", True)),
        )


def not_checked(hop: str, name: str, reason: str) -> Check:
    return Check(hop, name, False, f"not checked: {reason}", "", checked=False)


def all_ok(checks: Iterable[Check]) -> bool:
    return all(c.ok for c in checks)


def summary(checks: Sequence[Check]) -> str:
    failed = [c for c in checks if c.checked and not c.ok]
    skipped = [c for c in checks if not c.checked]
    if not failed and not skipped:
        return f"all {len(checks)} checks passed"
    parts = [f"{len(failed)} of {len(checks)} checks failed"]
    if skipped:
        parts.append(f"{len(skipped)} not checked")
    return ", ".join(parts)


def secs(seconds: float) -> str:
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def error_text(exc: BaseException) -> str:
    """An exception in words, for a check's detail."""
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def group_hop(name: str) -> str:
    return f"group {name}"


def queue_hop(name: str) -> str:
    return f"queue {name}"
