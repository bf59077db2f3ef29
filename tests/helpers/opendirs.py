"""Temp dirs that every user may enter and write, for tests whose jobs run as another user.

A root worker runs process jobs as ``nobody``; pytest's ``tmp_path`` lies under a 0700 directory of the user
running the tests, which such a job cannot reach. These dirs are made under the system's sticky temp dir, mode 0777,
and hold only the test's own files (gates, pid files, counters): the product's dirs (a data dir, a worker's attempt
dirs) keep their own private modes wherever they are.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def open_dir(prefix: str = "scaleq-test-") -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
