"""Named SQL queries loaded from ``queries/<dialect>.sql`` (blocks introduced by ``-- name: NAME``).

Queries are written with ``:name`` parameters in both dialects; for PostgreSQL they are turned into psycopg's
``%(name)s`` (``::type`` casts are left alone).
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files

_NAME = re.compile(r"^--\s*name:\s*(\w+)\s*$", re.MULTILINE)
_PARAM = re.compile(r"(?<![:\w]):(\w+)")


@cache
def load(dialect: str) -> dict[str, str]:
    text = (files("scaleq.store") / "queries" / f"{dialect}.sql").read_text()
    parts = _NAME.split(text)
    queries = {name: body.strip() for name, body in zip(parts[1::2], parts[2::2], strict=True)}
    if dialect == "postgres":
        queries = {name: _PARAM.sub(r"%(\1)s", q.replace("%", "%%")) for name, q in queries.items()}
    return queries
