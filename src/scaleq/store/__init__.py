"""Persistence behind one protocol (:mod:`scaleq.store.base`); ``open_store`` picks the dialect from a URL."""

from __future__ import annotations

from pathlib import Path

from scaleq.store.base import Store


def open_store(url: str, *, durability: str = "normal") -> Store:
    """``sqlite:///path/to/db`` or a plain path → SQLite; ``postgresql://…`` → PostgreSQL."""
    if url.startswith(("postgresql://", "postgres://")):
        from scaleq.store.postgres import PostgresStore

        return PostgresStore(url, durability=durability)
    from scaleq.store.sqlite import SQLiteStore

    path = url.removeprefix("sqlite:///") if url.startswith("sqlite:///") else url.removeprefix("sqlite:")
    return SQLiteStore(Path(path) if path != ":memory:" else path, durability=durability)
