"""A real Prometheus (Debian's, installed by scripts/prometheus.sh) for the tests that scrape or query one, and a
real metrics endpoint for it to scrape: a ``queue_length{queue=…}`` gauge served by prometheus_client.

:func:`prometheus` starts the server on a free port with the caller's configuration and stops it after the block;
readiness is the caller's to await (a server scraping targets on the test's own event loop must be awaited
asynchronously), with :meth:`Prometheus.wait` for plain code.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, Gauge, start_http_server

from tests.helpers.ports import free_port
from tests.helpers.processes import background


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text(errors="replace")[-2000:]

    def check_alive(self, before: str = "") -> None:
        """Fail, with its log, if the process has exited."""
        if self.proc.poll() is not None:
            pytest.fail(f"prometheus exited with {self.proc.returncode}{before}:\n{self.log_tail()}")

    def ready(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.url}/-/ready", timeout=2).status_code == 200
        return False

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 30) -> None:
        """Poll ``check`` until true; fail naming ``what``, with the log, if Prometheus exits or time runs out."""
        deadline = time.monotonic() + timeout
        while not check():
            self.check_alive(f" before {what}")
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus: no {what} within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)


@contextlib.contextmanager
def prometheus(config_text: str, work: Path) -> Iterator[Prometheus]:
    """A real Prometheus with this configuration, its TSDB and log under ``work``."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("the prometheus binary is not on PATH: run scripts/prometheus.sh (Debian's prometheus package)")
    config, log = work / "prometheus.yml", work / "prometheus.log"
    config.write_text(config_text)
    port = free_port()
    argv = [
        binary,
        f"--config.file={config}",
        f"--storage.tsdb.path={work / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
    ]
    with background(argv, log) as proc:
        yield Prometheus(f"http://127.0.0.1:{port}", proc, log)


@dataclass
class Endpoint:
    url: str
    gauge: Gauge


@contextlib.contextmanager
def metrics_endpoint() -> Iterator[Endpoint]:
    """A `queue_length{queue=…}` gauge in its own registry, served over HTTP on 127.0.0.1 by prometheus_client."""
    registry = CollectorRegistry()
    gauge = Gauge("queue_length", "jobs waiting in a queue", ["queue"], registry=registry)
    httpd, thread = start_http_server(0, addr="127.0.0.1", registry=registry)
    try:
        yield Endpoint(f"http://127.0.0.1:{httpd.server_port}/metrics", gauge)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)
