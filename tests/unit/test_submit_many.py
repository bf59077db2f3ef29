"""How ``scaleq submit-many`` cuts a file into requests: inputs read once, their bytes sent once per request."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scaleq.cli import jobs as cli_jobs
from scaleq.jobfile import JobInputError, load_lines


def sweep(tmp_path: Path, lines: list[dict]) -> Path:
    path = tmp_path / "sweep.jsonl"
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return path


def test_a_shared_input_travels_once_per_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "shared.bin").write_bytes(b"x" * 1000)
    found = load_lines(sweep(tmp_path, [{"command": ["cat", str(i)], "inputs": ["shared.bin"]} for i in range(7)]))
    monkeypatch.setattr(cli_jobs, "BATCH", 3)
    batches = cli_jobs._batches("q", found, priority=0, max_attempts=3, rerun=False)
    assert [len(b) for b in batches] == [3, 3, 1]
    for batch in batches:  # the bytes ride with the first job of each request only
        assert [len(r.blobs) for r in batch] == [1] + [0] * (len(batch) - 1)
    assert all(r.definition.inputs[0].path == "shared.bin" for b in batches for r in b)


def test_requests_are_cut_by_bytes_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(4):
        (tmp_path / f"in{i}.bin").write_bytes(bytes([i]) * 600)
    found = load_lines(sweep(tmp_path, [{"command": ["x"], "inputs": [f"in{i}.bin"]} for i in range(4)]))
    monkeypatch.setattr(cli_jobs, "BATCH_BYTES", 1000)
    batches = cli_jobs._batches("q", found, priority=0, max_attempts=3, rerun=False)
    assert [len(b) for b in batches] == [1, 1, 1, 1]
    assert all(len(b[0].blobs) == 1 for b in batches)


def test_each_line_is_checked_and_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('# sweep\n\n{"command": ["true"]}\n{"command": ["true"], "inputs": ["nope.txt"]}\n')
    with pytest.raises(JobInputError, match=r"bad\.jsonl:4: inputs: nope\.txt: no such file"):
        load_lines(path)
    path.write_text("\n# only comments\n")
    with pytest.raises(JobInputError, match="no jobs"):
        load_lines(path)
