"""The layers, as far as import-linter cannot see them: what a low module loads when it is imported, and no module
importing another module's private names. The layers themselves are the import-linter contract in pyproject.toml
(``lint-imports``, run by scripts/test)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

import scaleq

PACKAGE = Path(scaleq.__file__).parent
ROOT = PACKAGE.parent.parent


def loaded_by(module: str) -> set[str]:
    """The modules a fresh interpreter has loaded after importing ``module`` alone."""
    code = f"import json, sys; import {module}; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(done.stdout))


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        # reading a grid file (the CLI, the simulator, tests) loads no HTTP or metrics library, nor the scaling code
        ("scaleq.grid", ("httpx", "prometheus_client", "scaleq.scaling")),
        # the checks' vocabulary is shared by the server and the CLI: it loads neither's side
        ("scaleq.doctor.checks", ("httpx", "scaleq.client", "scaleq.doctor.remote", "scaleq.server")),
    ],
)
def test_a_low_module_loads_nothing_above_it(module: str, forbidden: tuple[str, ...]) -> None:
    loaded = loaded_by(module)
    assert module in loaded
    heavy = sorted(m for m in loaded if any(m == f or m.startswith(f + ".") for f in forbidden))
    assert heavy == []


def private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def private_imports(source: str, module: str, where: str) -> list[str]:
    """``from scaleq.x import _name`` outside ``scaleq.x``, and imports of a private module (``scaleq.x._y``) outside
    its parent package, in the source of ``module``."""
    found = []
    for node in ast.walk(ast.parse(source, where)):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and (node.module or "").startswith("scaleq"):
            targets = [node.module or ""]
            if targets[0] != module:
                found += [f"{where}:{node.lineno}: {targets[0]} import {a.name}" for a in node.names if private(a.name)]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names if a.name.startswith("scaleq")]
        else:
            continue
        for target in targets:
            parts = target.split(".")
            for i in range(1, len(parts)):
                parent = ".".join(parts[:i])
                if private(parts[i]) and module != parent and not module.startswith(parent + "."):
                    found.append(f"{where}:{node.lineno}: imports private module {target}")
                    break
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    files = sorted(PACKAGE.rglob("*.py")) + sorted((ROOT / "bench").rglob("*.py"))
    assert len(files) > 50  # the package and the benchmarks were found
    found = []
    for path in files:
        rel = path.relative_to(ROOT)
        parts = rel.with_suffix("").parts[1:] if rel.parts[0] == "src" else rel.with_suffix("").parts
        module = ".".join(p for p in parts if p != "__init__")
        found += private_imports(path.read_text(), module, str(rel))
    assert found == []


def test_the_private_import_check_sees_one() -> None:
    """The check above would catch the two kinds of import it forbids (and allows a module its own names)."""
    source = "from scaleq.cli.scale import _load\nimport scaleq.store._rows\nfrom scaleq.cli.grid import _own\n"
    found = private_imports(source, "scaleq.cli.grid", "m.py")
    assert [f.split(": ", 1)[1] for f in found] == [
        "scaleq.cli.scale import _load",
        "imports private module scaleq.store._rows",
    ]
