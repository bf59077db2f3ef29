"""Where a command finds its server: flags, then environment, then the data dir that ``scaleq up`` wrote.

``scaleq up`` writes ``server.json`` (the URL) and ``admin.token`` (mode 0600) into its data dir, so any other
command given the same data dir (``--data-dir`` / ``SCALEQ_DATA_DIR``, default ``./.scaleq``) talks to it with no
set-up; ``--server``/``SCALEQ_SERVER`` and ``--token``/``SCALEQ_TOKEN`` override.

The data dir holds the tokens and the database (job env values among them), so ``scaleq up`` keeps it private:
mode 0700, also when it existed with looser permissions (:func:`private_dir`).
"""

from __future__ import annotations

import json
import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

DEFAULT_DATA_DIR = ".scaleq"
log = logging.getLogger("scaleq.config")


class ConfigError(Exception):
    pass


def data_dir(value: str | Path | None) -> Path:
    return Path(value or os.environ.get("SCALEQ_DATA_DIR") or DEFAULT_DATA_DIR).expanduser().resolve()


def private_dir(directory: Path) -> Path:
    """Make ``directory`` (and missing parents) and keep it to its owner: 0700, tightened if it was looser."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    mode = stat.S_IMODE(directory.stat().st_mode)
    if mode & 0o077:
        os.chmod(directory, 0o700)
        log.warning(
            "data dir %s was mode %o, readable by others: now 0700 (it holds tokens and job env)", directory, mode
        )
    return directory


@dataclass(frozen=True)
class Target:
    server: str
    token: str | None


def write_server_info(directory: Path, url: str, admin_token: str | None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "server.json").write_text(json.dumps({"url": url, "pid": os.getpid()}) + "\n")
    if admin_token is not None:
        path = directory / "admin.token"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(admin_token + "\n")


def read_admin_token(directory: Path) -> str | None:
    path = directory / "admin.token"
    return path.read_text().strip() if path.exists() else None


def resolve(server: str | None, token: str | None, directory: str | Path | None) -> Target:
    d = data_dir(directory)
    server = server or os.environ.get("SCALEQ_SERVER")
    token = token or os.environ.get("SCALEQ_TOKEN")
    if not server:
        info = d / "server.json"
        if not info.exists():
            raise ConfigError(
                f"no server given and none recorded in {d}: start one with 'scaleq up', or pass --server/--token "
                "(or SCALEQ_SERVER/SCALEQ_TOKEN), or --data-dir pointing at a running grid"
            )
        server = json.loads(info.read_text())["url"]
        token = token or read_admin_token(d)
    return Target(server=server, token=token)
