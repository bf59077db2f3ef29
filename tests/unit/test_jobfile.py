"""Job files and flags → one validated definition with its input bytes; errors name file, field, problem."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from scaleq.jobfile import JobInputError, build


def test_file_and_flags_merge(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text("A")
    (tmp_path / "data" / "sub").mkdir()
    (tmp_path / "data" / "sub" / "b.txt").write_text("B")
    (tmp_path / "x.bin").write_bytes(b"\x00\x01")
    job = tmp_path / "job.toml"
    job.write_text(
        'image = "busybox"\ncommand = ["cat"]\ninputs = ["data"]\nenv = { A = "1" }\n[requirements]\nmemory = "64m"\n'
    )
    d, blobs, _ = build(file=job, env=["B=2"], inputs=[str(tmp_path / "x.bin")], cpus=0.5, max_duration=30)
    assert d.image == "busybox" and d.command == ["cat"] and d.max_duration == 30
    assert d.env == {"A": "1", "B": "2"}
    assert d.requirements.cpus == 0.5 and d.requirements.memory == 64 * 1024**2
    assert sorted(i.path for i in d.inputs) == ["data/a.txt", "data/sub/b.txt", "x.bin"]
    assert blobs[hashlib.sha256(b"B").hexdigest()] == b"B"


def test_command_flag_overrides_file(tmp_path: Path) -> None:
    job = tmp_path / "job.json"
    job.write_text('{"command": ["a"]}')
    d, _, _ = build(file=job, command=["b", "c"])
    assert d.command == ["b", "c"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ('command = ["x"]\nrequirments = {}\n', "requirments"),
        ('command = ["x"]\nmax_duration = "x"\n', "max_duration"),
        ('command = ["x"]\nmax_duration = -5\n', "max_duration"),
        ("max_duration = 5\n", "command: missing"),
        ('command = ["x"\n', "not valid TOML"),
        ('command = ["x"]\ninputs = ["nope.txt"]\n', "inputs: nope.txt"),
    ],
)
def test_bad_job_files_name_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text(text)
    with pytest.raises(JobInputError) as e:
        build(file=job)
    assert str(job) in str(e.value) or "inputs" in expected
    assert expected in str(e.value)


def test_bad_flags() -> None:
    with pytest.raises(JobInputError, match="--env"):
        build(command=["x"], env=["NOEQUALS"])
    with pytest.raises(JobInputError, match=r"requirements\.memory"):
        build(command=["x"], memory="lots")
    with pytest.raises(JobInputError, match="command: missing"):
        build()


def test_retry_settings_come_from_the_file_and_are_not_the_definition(tmp_path: Path) -> None:
    job = tmp_path / "job.toml"
    job.write_text('command = ["x"]\nretries = 2\nretry_on_exit_codes = [3]\nmax_attempts = 5\n')
    d, _, retries = build(file=job)
    assert retries == {"retries": 2, "retry_on_exit_codes": [3], "max_attempts": 5}
    plain, _, none = build(command=["x"])
    assert d == plain and none == {}  # the same definition: the same job id


@pytest.mark.parametrize(
    "text, expected",
    [
        ("retries = -1\n", "retries"),
        ("retries = 1\nretry_on_exit_codes = [0]\n", "retry_on_exit_codes: Value error, 0 is not a failing exit code"),
        ("retries = 1\nretry_on_exit_codes = []\n", "retry_on_exit_codes"),
        ('max_attempts = "many"\n', "max_attempts"),
    ],
)
def test_bad_retry_settings_name_file_and_field(tmp_path: Path, text: str, expected: str) -> None:
    job = tmp_path / "job.toml"
    job.write_text('command = ["x"]\n' + text)
    with pytest.raises(JobInputError) as e:
        build(file=job)
    assert str(job) in str(e.value) and expected in str(e.value)
