"""The exports' fixed text: files under ``templates/``, copied as they are or filled in, and written out.

Text that is not Python lives in files of the package, as the store's SQL does: ``templates/terraform/`` holds the
Terraform module's files, ``templates/k8s/`` the manifests' README. A file is one of two kinds:

- copied byte for byte (``main.tf``, ``collector.yaml``, …): what it says does not depend on the grid;
- filled in (``*.tmpl``) with :class:`string.Template`, placeholders written ``@{name}``. Not ``$``: ``$``/``${…}``
  is Terraform's and the shell's own syntax in these very files. A value goes in as it is and is never read again
  as template text, and the placeholders must be exactly the values given — a missing or unused one is an error,
  not an empty string or a silent leftover.

Where a line is optional, the template holds its placeholder alone on a line and the value is the whole line with
its newline, or nothing.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from string import Template


class _Template(Template):
    delimiter = "@"


def text(path: str) -> str:
    """The text of ``templates/<path>``, as it is."""
    return resources.files(__package__).joinpath("templates", path).read_text(encoding="utf-8")


def placeholders(path: str) -> list[str]:
    """The names of the ``@{name}`` placeholders of ``templates/<path>``, in order of first appearance."""
    return _Template(text(path)).get_identifiers()


def render(path: str, **values: object) -> str:
    """``templates/<path>`` with its ``@{name}`` placeholders filled in from ``values``."""
    template = _Template(text(path))
    wanted = set(template.get_identifiers())
    if wanted != set(values):  # a template and its caller out of step: a bug, which any export shows
        raise ValueError(f"template {path}: placeholders {sorted(wanted)}, values {sorted(values)}")
    return template.substitute(values)


def write(out: Path, files: dict[str, str]) -> list[Path]:
    """Write ``files`` (name → text) into ``out`` (created if missing); return their paths, in the given order."""
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for name, content in files.items():
        path = out / name
        path.write_text(content)
        written.append(path)
    return written
