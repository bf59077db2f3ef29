"""Persistence behind one protocol (:mod:`scaleq.store.base`); ``open_store`` picks the dialect from a URL."""

from __future__ import annotations

from pathlib import Path

from scaleq.store.base import Store


def open_store(url: str, *, durability: str = "normal", migrate: bool = True) -> Store:
    """``sqlite:///path/to/db`` or a plain path → SQLite; ``postgresql://…`` → PostgreSQL. With ``migrate`` (the
    default) the store applies pending schema migrations when it opens."""
    if url.startswith(("postgresql://", "postgres://")):
        from scaleq.store.postgres import PostgresStore

        return PostgresStore(url, durability=durability, migrate=migrate)
    from scaleq.store.sqlite import SQLiteStore

    return SQLiteStore(sqlite_path(url), durability=durability, migrate=migrate)


def sqlite_path(url: str) -> Path | str:
    """The file of a ``sqlite:///…`` URL or plain path (``:memory:`` as it is)."""
    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url.removeprefix("sqlite:")
    return Path(path) if path != ":memory:" else path
