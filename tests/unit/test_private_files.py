"""The data dir is 0700 and the SQLite database with its -wal and -shm 0600, also when they were looser before."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from scaleq.config import private_dir
from scaleq.store.sqlite import SQLiteStore


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_the_data_dir_is_made_0700_and_a_looser_one_tightened(tmp_path: Path) -> None:
    new = private_dir(tmp_path / "a" / "data")
    assert mode(new) == 0o700
    old = tmp_path / "old"
    old.mkdir(mode=0o755)
    os.chmod(old, 0o755)
    assert mode(private_dir(old)) == 0o700


async def test_the_database_and_its_wal_and_shm_are_0600(tmp_path: Path) -> None:
    path = tmp_path / "db" / "scaleq.db"
    store = SQLiteStore(path)
    await store.open()
    await store.create_token("t1", "x", "admin", "h" * 64, 0.0)  # a write: the -wal and -shm exist now
    files = [path, Path(f"{path}-wal"), Path(f"{path}-shm")]
    assert all(f.exists() for f in files)
    assert [mode(f) for f in files] == [0o600] * 3
    assert mode(path.parent) == 0o700
    await store.close()
    for f in files:  # left world-readable by an older version
        if f.exists():
            os.chmod(f, 0o644)
    store = SQLiteStore(path)
    await store.open()
    assert [mode(f) for f in files if f.exists()] == [0o600] * len([f for f in files if f.exists()])
    await store.close()
