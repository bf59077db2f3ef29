"""Schema migrations: numbered SQL files per dialect, ``migrations/<dialect>/NNNN_name.sql``, applied in order.

A database records the last migration applied (SQLite: ``PRAGMA user_version``; PostgreSQL: table
``scaleq_schema``). The store applies what is pending when it opens (:meth:`scaleq.store.sql.SQLStore.migrate`), one
migration per transaction: the dialect's schema lock is taken (SQLite's single writer, PostgreSQL's advisory lock),
the version read again (another server may have moved it on meanwhile), the next migration run and its number
recorded, and the transaction committed; so a migration is applied whole or not at all, exactly once, however many
servers start together. A database at a higher version than the newest file here is refused: this code does not know
its tables. Migrations are numbered from 1 without gaps; 0001 is the schema as first released, so a database created
before migrations existed (version 1, by the same statements) is simply at 0001.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cache
from importlib.resources import files

from scaleq.store.base import SchemaTooNew

_FILE = re.compile(r"^(\d{4})_(\w+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"


@cache
def load(dialect: str) -> tuple[Migration, ...]:
    """The dialect's migrations in order; a file misnamed, or numbers that do not run 1, 2, 3… is an error."""
    found = []
    for entry in (files("scaleq.store") / "migrations" / dialect).iterdir():
        if not entry.name.endswith(".sql"):
            continue
        match = _FILE.match(entry.name)
        if match is None:
            raise ValueError(f"migrations/{dialect}/{entry.name}: name it NNNN_words.sql")
        found.append(Migration(int(match[1]), match[2], entry.read_text()))
    found.sort(key=lambda m: m.version)
    numbers = [m.version for m in found]
    if numbers != list(range(1, len(found) + 1)):
        raise ValueError(f"migrations/{dialect}: numbered {numbers}, not 1 to {len(found)} without gaps")
    return tuple(found)


def head(dialect: str) -> int:
    """The version a database has once every migration here is applied."""
    return len(load(dialect))


def pending(dialect: str, version: int, where: str) -> list[Migration]:
    """What a database at ``version`` still needs; a database newer than this code is refused."""
    newest = head(dialect)
    if version > newest:
        raise SchemaTooNew(
            f"{where} has scaleq schema version {version}, newer than this scaleq knows (version {newest}): "
            f"upgrade scaleq to the release that migrated it (or newer), or restore the backup taken before that "
            "upgrade; this scaleq will not touch it"
        )
    return list(load(dialect)[version:])
