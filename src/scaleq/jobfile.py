"""Build a job definition from a job file (TOML or JSON) and command-line flags, with the local input bytes.

A job file holds the fields of :class:`scaleq.jobs.JobDefinition`, except that ``inputs`` lists local paths
(relative to the file), and may hold how the job is retried (:class:`scaleq.jobs.Retries`: ``max_attempts``,
``retries``, ``retry_on_exit_codes``), which is not part of the definition (nor of the job's id); flags override the
file. A line of ``submit-many`` is a job file's fields, so each job of an array carries its own retry settings. Every
problem is reported as ``where: field: problem``.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import json
import os
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import ValidationError

from scaleq.jobs import InputFile, JobDefinition, Retries, parse_env_pair


class JobInputError(ValueError):
    """Bad job input; the message names the file or flag, the field and the problem."""


class JobSpec(NamedTuple):
    """What a job file (or a line of one) gives: the validated definition, its input bytes by sha256, and the retry
    settings it names (only those: flags and defaults fill in the rest)."""

    definition: JobDefinition
    blobs: dict[str, bytes]
    retries: dict[str, Any]


def problems(exc: ValidationError) -> str:
    """A validation error as ``field: problem; …``."""
    return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in exc.errors())


def retry_fields(data: dict[str, Any], where: str) -> dict[str, Any]:
    """Take the retry settings out of a job file's fields (they are not the definition's) and check each; how they
    go together is checked with the flags, when the submit request is made."""
    fields = {k: data.pop(k) for k in list(data) if k in Retries.model_fields}
    try:
        Retries.model_validate(fields)
    except ValidationError as exc:
        if any(e["loc"] for e in exc.errors()):
            raise JobInputError(f"{where}: {problems(exc)}") from exc
    return fields


def load_file(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise JobInputError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise JobInputError(f"{path}: not valid TOML: {exc}") from exc
    except json.JSONDecodeError as exc:
        raise JobInputError(f"{path}: not valid JSON: line {exc.lineno} column {exc.colno}: {exc.msg}") from exc
    if not isinstance(data, dict):
        raise JobInputError(f"{path}: a job file holds a table of fields")
    return data


def collect_inputs(
    paths: list[str], base: Path, read: Callable[[Path], bytes] = Path.read_bytes
) -> tuple[list[InputFile], dict[str, bytes]]:
    """Files (and directories, recursively) → input entries under /inputs, and their bytes by sha256."""
    entries: list[InputFile] = []
    blobs: dict[str, bytes] = {}
    for raw in paths:
        p = Path(raw) if Path(raw).is_absolute() else base / raw
        if not p.exists():
            raise JobInputError(f"inputs: {raw}: no such file or directory")
        files = (
            [(p, p.name)]
            if p.is_file()
            else [(f, f"{p.name}/{f.relative_to(p).as_posix()}") for f in sorted(p.rglob("*")) if f.is_file()]
        )
        for f, name in files:
            data = read(f)
            sha = hashlib.sha256(data).hexdigest()
            blobs[sha] = data
            mode = 0o555 if os.access(f, os.X_OK) else 0o444
            entries.append(InputFile(path=name, sha256=sha, size=len(data), mode=mode))
    return entries, blobs


def build(
    *,
    file: Path | None = None,
    command: list[str] | None = None,
    image: str | None = None,
    env: list[str] | None = None,
    max_duration: int | None = None,
    cpus: float | None = None,
    memory: str | None = None,
    gpus: int | None = None,
    inputs: list[str] | None = None,
    tags: list[str] | None = None,
    workdir: str | None = None,
) -> JobSpec:
    """The definition (validated), the bytes of its inputs and the file's retry settings."""
    data: dict[str, Any] = load_file(file) if file else {}
    where = str(file) if file else "job"
    base = file.parent if file else Path.cwd()
    if command:
        data["command"] = command
    if image is not None:
        data["image"] = image
    if workdir is not None:
        data["workdir"] = workdir
    if max_duration is not None:
        data["max_duration"] = max_duration
    if tags:
        data["tags"] = [*data.get("tags", []), *tags]
    if env:
        merged = dict(data.get("env") or {})
        for pair in env:
            try:
                key, value = parse_env_pair(pair)
            except ValueError as exc:
                raise JobInputError(f"--env: {exc}") from exc
            merged[key] = value
        data["env"] = merged
    req = dict(data.get("requirements") or {})
    for key, value in (("cpus", cpus), ("memory", memory), ("gpus", gpus)):
        if value is not None:
            req[key] = value
    if req:
        data["requirements"] = req
    if "command" not in data:
        raise JobInputError(f"{where}: command: missing (give it after '--' or as command = [...] in a job file)")
    return definition_from(data, where, base, inputs)


def definition_from(
    data: dict[str, Any],
    where: str,
    base: Path,
    extra_inputs: list[str] | None = None,
    read: Callable[[Path], bytes] = Path.read_bytes,
) -> JobSpec:
    """A job file's fields (``inputs`` as local paths, relative to ``base``) → the validated definition, the bytes
    of its inputs and its retry settings; problems are reported as ``where: field: problem``."""
    data = dict(data)
    retries = retry_fields(data, where)
    local_inputs = data.pop("inputs", []) or []
    if not isinstance(local_inputs, list) or not all(isinstance(i, str) for i in local_inputs):
        raise JobInputError(f"{where}: inputs: must be a list of local paths")
    try:
        entries, blobs = collect_inputs([*local_inputs, *(extra_inputs or [])], base, read)
    except JobInputError as exc:
        raise JobInputError(f"{where}: {exc}") from exc
    data["inputs"] = [e.model_dump() for e in entries]
    try:
        definition = JobDefinition.model_validate(data)
    except ValidationError as exc:
        raise JobInputError(f"{where}: {problems(exc)}") from exc
    return JobSpec(definition, blobs, retries)


def load_lines(path: Path) -> list[JobSpec]:
    """A JSON Lines file of job definitions (one job file's fields per line, ``inputs`` relative to the file; blank
    lines and lines starting with ``#`` skipped); every line is checked before any is returned."""
    try:
        text = sys.stdin.read() if str(path) == "-" else path.read_text()
    except OSError as exc:
        raise JobInputError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    base = Path.cwd() if str(path) == "-" else path.parent
    read = functools.cache(Path.read_bytes)  # a file many lines name is read (and held) once
    found = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{path}:{n}"
        try:
            data = json.loads(line)
        except json.JSONDecodeError as exc:
            raise JobInputError(f"{where}: not valid JSON: column {exc.colno}: {exc.msg}") from exc
        if not isinstance(data, dict):
            raise JobInputError(f"{where}: a line holds one job: an object of a job file's fields")
        if "command" not in data:
            raise JobInputError(f"{where}: command: missing")
        found.append(definition_from(data, where, base, read=read))
    if not found:
        raise JobInputError(f"{path}: no jobs in it")
    return found


def encode_blobs(blobs: dict[str, bytes]) -> dict[str, str]:
    return {sha: base64.b64encode(data).decode() for sha, data in blobs.items()}
