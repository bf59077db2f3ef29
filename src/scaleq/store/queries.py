"""Named SQL queries: ``queries/common.sql`` (written once for both dialects) with ``queries/<dialect>.sql`` (what
differs), in blocks introduced by ``-- name: NAME``.

A name is defined once per dialect: in common.sql or in the dialect's file, never both (an error at load, as is a name
twice in one file), so what a dialect runs is never a silent override. Queries are written with ``:name`` parameters
in both dialects; for PostgreSQL they are turned into psycopg's ``%(name)s`` (``::type`` casts are left alone).
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)
_PARAM = re.compile(r"(?<![:\w]):(\w+)")


def parse(text: str, source: str) -> dict[str, str]:
    """The named blocks of one file; a name twice is an error naming ``source``."""
    parts = _NAME.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        if name in queries:
            raise ValueError(f"{source}: query {name} is defined twice")
        queries[name] = body.strip()
    return queries


@cache
def load(dialect: str) -> dict[str, str]:
    folder = files("scaleq.store") / "queries"
    common = parse((folder / "common.sql").read_text(), "common.sql")
    own = parse((folder / f"{dialect}.sql").read_text(), f"{dialect}.sql")
    if both := sorted(common.keys() & own.keys()):
        raise ValueError(f"{dialect}.sql redefines {', '.join(both)} of common.sql: a name lives in one file")
    queries = {**common, **own}
    if dialect == "postgres":
        queries = {name: _PARAM.sub(r"%(\1)s", q.replace("%", "%%")) for name, q in queries.items()}
    return queries
