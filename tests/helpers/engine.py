"""The Docker Engine the docker tests run against: the one at ``$DOCKER_HOST``, with the small test image
``scaleq-test/busybox:latest``. Start one with ``eval "$(scripts/docker-engine.sh | tail -n1)"`` (it also builds the
image). Without either the tests fail, never skip: a silently skipped container suite hides regressions."""

from __future__ import annotations

import os

import docker
import pytest

BUSYBOX = "scaleq-test/busybox:latest"


def connect() -> docker.DockerClient:
    """A client of the engine at ``$DOCKER_HOST`` that has :data:`BUSYBOX`; the test fails, naming the fix, if not."""
    if not os.environ.get("DOCKER_HOST"):
        pytest.fail(
            'DOCKER_HOST is not set: start a Docker Engine with eval "$(scripts/docker-engine.sh | tail -n1)" '
            "and run these tests again (they need a real engine and never skip).",
            pytrace=False,
        )
    client = docker.DockerClient.from_env()
    try:
        client.images.get(BUSYBOX)
    except docker.errors.ImageNotFound:
        client.close()
        pytest.fail(f"{BUSYBOX} is missing: run scripts/docker-engine.sh to build it", pytrace=False)
    return client
