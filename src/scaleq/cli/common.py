"""What every command shares: finding the server, reading the grid file, logging, printing tables or JSON, and
exit codes scripts can trust.

Exit codes: 0 ok, 1 failure (the server said no, a job failed, nothing answered), 2 bad usage or bad input.

Text a job or a client chose (logs, commands, env, errors) never reaches a terminal raw: :func:`sanitize` shows its
control characters (escape sequences that would move the cursor, retitle the window or rewrite the screen) as
``\\x1b``-style escapes. Tables always; logs when written to a terminal, unless ``--raw`` asks for the bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from scaleq import grid as gridmod
from scaleq.client import ApiError, Client, Unreachable, format_detail
from scaleq.config import ConfigError, resolve
from scaleq.providers.base import ProviderError

T = TypeVar("T")
# Off a terminal (pipes, logs), tables get room instead of the 80-column default.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True, width=None if sys.stderr.isatty() else 200)


# C0 controls but tab and newline, DEL, and the C1 controls (a terminal reads 0x9b as ESC [)
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def sanitize(text: str) -> str:
    """``text`` with its control characters (but tab and newline) written as visible ``\\xNN`` escapes."""
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


class Output(StrEnum):
    table = "table"
    json = "json"


ServerOpt = Annotated[
    str | None, typer.Option("--server", envvar="SCALEQ_SERVER", help="Server URL (default: from the data dir).")
]
TokenOpt = Annotated[
    str | None, typer.Option("--token", envvar="SCALEQ_TOKEN", help="API token (default: the data dir's admin token).")
]
DataDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--data-dir", envvar="SCALEQ_DATA_DIR", help="Grid data dir written by 'scaleq up' \\[default: ./.scaleq]."
    ),
]
OutputOpt = Annotated[Output, typer.Option("--output", "-o", help="table for people, json for scripts.")]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {escape(sanitize(message))}", markup=True, highlight=False)
    raise typer.Exit(code)


def bad_input(message: str) -> NoReturn:
    fail(message, 2)


def validation_message(exc: ValidationError, prefix: str = "") -> str:
    lines = []
    for e in exc.errors():
        loc = ".".join(str(p) for p in e["loc"])
        lines.append(f"{prefix}{loc or '(root)'}: {e['msg']}")
    return "\n  ".join(lines)


def load_grid(path: Path) -> gridmod.Grid:
    """The grid file, or exit 2 with its errors (each names the file and the field)."""
    try:
        return gridmod.load(path)
    except gridmod.GridFileError as exc:
        bad_input(str(exc))


def setup_logging(verbose: bool) -> None:
    """Log lines of the long-running commands on stderr; DEBUG with --verbose."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # one line per HTTP request is noise at INFO
    logging.getLogger("httpx").setLevel(logging.DEBUG if verbose else logging.WARNING)


def with_client(
    server: str | None, token: str | None, data_dir: Path | None, fn: Callable[[Client], Awaitable[T]]
) -> T:
    """Run ``fn`` with a client for the resolved server, turning errors into messages and exit codes."""
    try:
        target = resolve(server, token, data_dir)
    except ConfigError as exc:
        fail(str(exc))

    async def go() -> T:
        async with Client(target.server, target.token) as client:
            return await fn(client)

    try:
        return asyncio.run(go())
    except ApiError as exc:
        detail = format_detail(exc.detail)
        if exc.status in (400, 422):
            bad_input(detail)
        if exc.status == 401:
            fail(f"{detail} (check --token / SCALEQ_TOKEN)")
        fail(detail)
    except Unreachable as exc:
        fail(str(exc))
    except ProviderError as exc:
        fail(f"provider: {exc}")
    except KeyboardInterrupt:
        raise typer.Exit(130) from None


def emit_json(data: Any) -> None:
    sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], title: str | None = None) -> None:
    t = Table(title=title, header_style="bold")
    for n, name in enumerate(columns):
        last = n == len(columns) - 1
        t.add_column(name, no_wrap=not last, overflow="fold" if last else "ellipsis")
    for row in rows:
        t.add_row(*(Text("" if v is None else sanitize(str(v))) for v in row))  # user text: no markup, no escapes
    out.print(t)


def ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return ""
    return duration((now or time.time()) - ts) + " ago"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    s = max(0.0, seconds)
    if s < 60:
        return f"{s:.1f}s"
    if s < 3600:
        return f"{int(s // 60)}m{int(s % 60):02d}s"
    return f"{int(s // 3600)}h{int(s % 3600 // 60):02d}m"


def size(n: int | None) -> str:
    if n is None:
        return ""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
