"""A small HCL writer: values as ``terraform fmt`` lays them out, for the defaults of a generated ``variables.tf``.

The output is deterministic (key order is kept) and ``terraform fmt`` leaves it alone, so a generated module can be
checked with ``fmt -check`` and diffed between exports. Strings are escaped so that no Terraform interpolation or
directive (``${`` / ``%{``) survives: a grid's values are data, never expressions.
"""

from __future__ import annotations

import re
from typing import Any

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def hcl_string(s: str) -> str:
    """A quoted HCL string literal: escapes, and no interpolation or directive (``${`` / ``%{``) survives."""
    out = []
    for ch in s:
        if ch == "\\":
            out.append("\\\\")
        elif ch == '"':
            out.append('\\"')
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\r":
            out.append("\\r")
        elif ch == "\t":
            out.append("\\t")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out).replace("${", "$${").replace("%{", "%%{") + '"'


def _key(k: str) -> str:
    return k if _IDENT.match(k) else hcl_string(k)


def _aligned(attrs: list[tuple[str, str]]) -> list[str]:
    """``key = value`` lines as terraform fmt aligns them: the ``=`` of each run of single-line attributes lines up;
    an attribute whose value spans lines stands alone and ends the run."""
    lines: list[str] = []
    run: list[tuple[str, str]] = []

    def flush() -> None:
        if run:
            width = max(len(k) for k, _ in run)
            lines.extend(f"{k.ljust(width)} = {val}" for k, val in run)
            run.clear()

    for k, val in attrs:
        if "\n" in val:
            flush()
            lines.append(f"{k} = {val}")
        else:
            run.append((k, val))
    flush()
    return lines


def hcl_value(v: Any, indent: int = 0) -> str:
    """An HCL expression for a JSON-like value, laid out as ``terraform fmt`` lays it out (objects one attribute a
    line with aligned ``=``; lists of scalars on one line). Key order is kept: the output is deterministic."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() else repr(v)
    if isinstance(v, str):
        return hcl_string(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(hcl_value(x, indent) for x in v) + "]"
    if isinstance(v, dict):
        if not v:
            return "{}"
        pad = " " * (indent + 2)
        keys = [_key(str(k)) for k in v]
        texts = [hcl_value(val, indent + 2) for val in v.values()]
        lines = [f"{pad}{line}" for line in _aligned(list(zip(keys, texts, strict=True)))]
        return "{\n" + "\n".join(lines) + "\n" + " " * indent + "}"
    raise TypeError(f"no HCL for {type(v).__name__}")
