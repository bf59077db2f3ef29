"""The job definition: validation at the edge, canonical form, ids."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from scaleq.jobs import (
    Capabilities,
    JobDefinition,
    RuntimeKind,
    SubmitRequest,
    job_id,
    parse_duration,
    parse_env_pair,
    parse_size,
)


def fields_of(exc: ValidationError) -> set[str]:
    return {".".join(str(p) for p in e["loc"]) for e in exc.errors()}


def test_id_is_stable_across_key_order_and_defaults() -> None:
    a = JobDefinition(command=["echo", "hi"], env={"B": "2", "A": "1"}, tags=["y", "x"])
    b = JobDefinition.model_validate(
        {"tags": ["x", "y", "x"], "env": {"A": "1", "B": "2"}, "command": ["echo", "hi"], "max_duration": 3600}
    )
    assert a.canonical() == b.canonical()
    assert job_id("q", a) == job_id("q", b)
    assert job_id("q", a) != job_id("other", a)
    assert job_id("q", a) != job_id("q", JobDefinition(command=["echo", "ho"]))
    assert len(job_id("q", a)) == 64


def test_runtime_follows_the_image() -> None:
    assert JobDefinition(command=["x"]).runtime == RuntimeKind.process
    assert JobDefinition(command=["x"], image="busybox").runtime == RuntimeKind.docker


@pytest.mark.parametrize(
    "data, field",
    [
        ({}, "command"),
        ({"command": []}, "command"),
        ({"command": [""]}, "command"),
        ({"command": "echo hi"}, "command"),
        ({"command": ["x"], "max_duration": -5}, "max_duration"),
        ({"command": ["x"], "max_duration": "soon"}, "max_duration"),
        ({"command": ["x"], "env": {"1X": "v"}}, "env"),
        ({"command": ["x"], "env": {"X": 1}}, "env.X"),
        ({"command": ["x"], "workdir": "relative"}, "workdir"),
        ({"command": ["x"], "requirements": {"cpus": 0}}, "requirements.cpus"),
        ({"command": ["x"], "requirements": {"memory": "lots"}}, "requirements.memory"),
        ({"command": ["x"], "requirements": {"gpu": 1}}, "requirements.gpu"),
        ({"command": ["x"], "image": "has space"}, "image"),
        ({"command": ["x"], "tags": ["bad tag"]}, "tags"),
        ({"command": ["x"], "network": "bridge"}, "network"),
        ({"command": ["x"], "surprise": 1}, "surprise"),
        ({"command": ["x"], "inputs": [{"path": "../etc", "sha256": "0" * 64, "size": 1}]}, "inputs.0.path"),
    ],
)
def test_bad_definitions_name_their_field(data: dict, field: str) -> None:
    with pytest.raises(ValidationError) as e:
        JobDefinition.model_validate(data)
    assert field in fields_of(e.value)


def test_sizes_and_env_pairs() -> None:
    assert parse_size("512m") == 512 * 1024**2
    assert parse_size("2GiB") == 2 * 1024**3
    assert parse_size(1000) == 1000
    for bad in ("lots", "-1", "0", True):
        with pytest.raises(ValueError):
            parse_size(bad)
    assert parse_env_pair("A=b=c") == ("A", "b=c")
    assert parse_env_pair("A=") == ("A", "")
    for bad in ("NOEQUALS", "=v", "1A=v", "A B=v"):
        with pytest.raises(ValueError):
            parse_env_pair(bad)


def test_capabilities_fit() -> None:
    caps = Capabilities(runtimes=[RuntimeKind.process], cpus=2, memory=1 << 30, tags=["ssd"])
    assert caps.fits(JobDefinition(command=["x"], tags=["ssd"]))
    assert not caps.fits(JobDefinition(command=["x"], image="busybox"))
    assert not caps.fits(JobDefinition(command=["x"], requirements={"cpus": 4}))
    assert not caps.fits(JobDefinition(command=["x"], requirements={"memory": "2g"}))
    assert not caps.fits(JobDefinition(command=["x"], tags=["gpu"]))
    assert not caps.fits(JobDefinition(command=["x"], network="host"))


def test_parse_duration():
    assert [parse_duration(v) for v in ("90", "90s", "15m", "12h", "7d", "2w", "1.5h")] == [
        90,
        90,
        900,
        43200,
        604800,
        1209600,
        5400,
    ]
    for bad in ("", "soon", "-1d", "7x", "1 2d"):
        with pytest.raises(ValueError, match="not a duration"):
            parse_duration(bad)


def test_misfit_says_the_first_unmet_need():
    caps = Capabilities(runtimes=[RuntimeKind.docker], cpus=2, memory=1 << 30, gpus=0, tags=["ssd"])
    image = {"image": "busybox", "command": ["true"]}
    assert caps.misfit(JobDefinition(**image)) is None
    assert caps.misfit(JobDefinition(command=["true"])) == "runs docker jobs, not process"
    assert caps.misfit(JobDefinition(**image, requirements={"cpus": 4})) == "offers cpus 2, the job needs 4"
    assert caps.misfit(JobDefinition(**image, requirements={"gpus": 1})) == "offers gpus 0, the job needs 1"
    assert "memory 1024 MiB, the job needs 2048 MiB" in caps.misfit(
        JobDefinition(**image, requirements={"memory": "2g"})
    )
    assert (
        caps.misfit(JobDefinition(**image, network="host")) == "does not allow the host network, which the job asks for"
    )
    assert caps.misfit(JobDefinition(**image, tags=["ssd", "a100"])) == "lacks the tag a100"


def test_retries_are_checked_at_the_edge_and_are_not_part_of_the_id() -> None:
    d = JobDefinition(command=["x"])
    plain = SubmitRequest(queue="q", definition=d)
    assert (plain.max_attempts, plain.retries, plain.retry_on_exit_codes) == (3, 0, None)  # today's behaviour
    flaky = SubmitRequest(queue="q", definition=d, retries=2, retry_on_exit_codes=[75, 3, 3])
    assert flaky.retry_on_exit_codes == [3, 75]
    assert job_id(plain.queue, plain.definition) == job_id(flaky.queue, flaky.definition)
    for bad, field in [
        ({"retries": -1}, "retries"),
        ({"retries": 101}, "retries"),
        ({"retries": 1, "retry_on_exit_codes": [0]}, "retry_on_exit_codes"),
        ({"retries": 1, "retry_on_exit_codes": []}, "retry_on_exit_codes"),
        ({"retry_on_exit_codes": [3]}, "needs retries of at least 1"),
    ]:
        with pytest.raises(ValidationError, match=field):
            SubmitRequest(queue="q", definition=d, **bad)
