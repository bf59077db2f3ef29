"""A throw-away PostgreSQL cluster for the tests (Debian's server binaries, started with initdb + pg_ctl)."""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.ports import free_port


def pg_bin() -> Path:
    found = os.environ.get("SCALEQ_PG_BIN") or (sorted(glob.glob("/usr/lib/postgresql/*/bin")) or [""])[-1]
    if not found or not (Path(found) / "initdb").exists():
        raise RuntimeError("PostgreSQL server binaries not found: run scripts/postgres.sh (scripts/test does)")
    return Path(found)


@dataclass
class Cluster:
    data: Path
    port: int
    bin: Path

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            ["runuser", "-u", "postgres", "--", str(self.bin / "pg_ctl"), "-D", str(self.data / "data"), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def start(self) -> None:
        opts = f"-p {self.port} -k {self.data} -c listen_addresses=127.0.0.1 -c max_connections=200"
        self._ctl("-o", opts, "-l", str(self.data / "log"), "-w", "start")

    def stop(self, mode: str = "fast") -> None:
        self._ctl("-m", mode, "-w", "stop")


def start_cluster() -> Cluster:
    binary = pg_bin()
    data = Path(tempfile.mkdtemp(prefix="scaleq-pg-"))
    shutil.chown(data, "postgres", "postgres")
    subprocess.run(
        [
            "runuser",
            "-u",
            "postgres",
            "--",
            str(binary / "initdb"),
            "-D",
            str(data / "data"),
            "-U",
            "postgres",
            "--auth=trust",
            "-E",
            "UTF8",
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )
    cluster = Cluster(data, free_port(), binary)
    cluster.start()
    return cluster


def reset(url: str) -> None:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DROP SCHEMA public CASCADE")
        conn.execute("CREATE SCHEMA public")
        conn.execute("DROP SEQUENCE IF EXISTS job_seq")
