"""Job-arrival traces: seeded generators for typical shapes of load, and a loader for a user's own CSV.

A :class:`Trace` is a sorted tuple of ``(arrival_seconds, duration_seconds)`` plus a ``horizon``: the simulation
runs at least that long (past the last arrival), so that every policy's scale-in is charged over the same span.
Every generator takes a ``seed`` and is deterministic for it.
"""

from __future__ import annotations

import csv
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "DEFAULT_TRACES",
    "Trace",
    "TraceError",
    "bursts",
    "default_traces",
    "diurnal",
    "load_csv",
    "longtail",
    "sparse",
    "steady",
]

TAIL = 1800.0  # seconds simulated after the last arrival, so that every policy has scaled in


class TraceError(ValueError):
    """A trace file that cannot be read; the message names the file, line and column."""


@dataclass(frozen=True)
class Trace:
    name: str
    jobs: tuple[tuple[float, float], ...]  # (arrival, duration), sorted by arrival
    description: str = ""
    horizon: float = 0.0  # simulate at least until here

    @classmethod
    def of(cls, name: str, jobs: list[tuple[float, float]], description: str = "") -> Trace:
        jobs.sort()
        end = max((a for a, _ in jobs), default=0.0)
        return cls(name, tuple(jobs), description, end + TAIL)


def _poisson(rng: random.Random, rate: float, start: float, end: float) -> list[float]:
    out: list[float] = []
    t = start
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            return out
        out.append(t)


def steady(seed: int = 1, rate: float = 1 / 20, mean_duration: float = 90.0, length: float = 7200.0) -> Trace:
    """Poisson arrivals at a constant rate, exponential durations (about rate * mean_duration workers busy)."""
    rng = random.Random(seed)
    jobs = [(t, rng.expovariate(1 / mean_duration)) for t in _poisson(rng, rate, 0.0, length)]
    return Trace.of("steady", jobs, f"Poisson {rate * 60:.0f}/min, exp. durations mean {mean_duration:.0f} s")


def bursts(
    seed: int = 2, every: float = 1500.0, size: tuple[int, int] = (20, 60), median: float = 120.0, length=10800.0
) -> Trace:
    """Batches of jobs submitted together (a script looping over inputs), about every ``every`` s, quiet between."""
    rng = random.Random(seed)
    jobs: list[tuple[float, float]] = []
    t = rng.uniform(0, every / 2)
    while t < length:
        for _ in range(rng.randint(*size)):
            jobs.append((t + rng.uniform(0, 10), rng.lognormvariate(math.log(median), 0.5)))
        t += rng.uniform(0.5 * every, 1.5 * every)
    return Trace.of("bursts", jobs, f"{size[0]}-{size[1]} jobs at once every ~{every / 60:.0f} min")


def diurnal(seed: int = 3, day: float = 10800.0, peak_rate: float = 1 / 5, mean_duration: float = 60.0) -> Trace:
    """A working day compressed into ``day`` seconds: nothing at night, a morning ramp, a peak in the afternoon."""
    rng = random.Random(seed)

    def rate(t: float) -> float:  # 0 before 06:00 and after 22:00, peak around 14:00
        hour = 24 * t / day
        return 0.0 if not 6 <= hour <= 22 else peak_rate * math.sin(math.pi * (hour - 6) / 16) ** 2

    jobs = [  # thinning of a peak-rate Poisson process
        (t, rng.expovariate(1 / mean_duration))
        for t in _poisson(rng, peak_rate, 0.0, day)
        if rng.random() < rate(t) / peak_rate
    ]
    return Trace.of("diurnal", jobs, f"24 h in {day / 3600:.0f} h, peak {peak_rate * 60:.0f}/min")


def longtail(seed: int = 4, rate: float = 1 / 30, median: float = 30.0, sigma: float = 1.5, length=7200.0) -> Trace:
    """Poisson arrivals, lognormal durations: most jobs short, a few run for many minutes."""
    rng = random.Random(seed)
    jobs = [(t, min(rng.lognormvariate(math.log(median), sigma), 3600.0)) for t in _poisson(rng, rate, 0, length)]
    return Trace.of("longtail", jobs, f"Poisson {rate * 60:.0f}/min, lognormal durations median {median:.0f} s")


def sparse(seed: int = 5, every: float = 900.0, duration: float = 300.0, length: float = 14400.0) -> Trace:
    """One job now and then: the case where scaling from and back to zero is all that matters."""
    rng = random.Random(seed)
    jobs = [(t, rng.uniform(0.5, 1.5) * duration) for t in _poisson(rng, 1 / every, 0.0, length)]
    return Trace.of("sparse", jobs, f"one job every ~{every / 60:.0f} min")


DEFAULT_TRACES: dict[str, Callable[..., Trace]] = {
    "steady": steady,
    "bursts": bursts,
    "diurnal": diurnal,
    "longtail": longtail,
    "sparse": sparse,
}


def default_traces(seed: int = 0) -> list[Trace]:
    """The default traces; ``seed`` shifts every generator's seed (0 = the documented ones)."""
    return [gen(seed=i + 1 + seed) for i, gen in enumerate(DEFAULT_TRACES.values())]


COLUMNS = ("arrival_seconds", "duration_seconds")


def load_csv(path: str | Path, name: str | None = None) -> Trace:
    """Load ``arrival_seconds,duration_seconds`` rows (with that header; extra columns are ignored).

    Raises :class:`TraceError` naming the line and column of the first bad value.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise TraceError(f"{path}: cannot read the trace: {e}") from e
    rows = csv.reader(text.splitlines())
    header = next(rows, None)
    while header is not None and not any(cell.strip() for cell in header):
        header = next(rows, None)
    if header is None:
        raise TraceError(f"{path}: empty file; expected a header line 'arrival_seconds,duration_seconds'")
    names = [h.strip().lower() for h in header]
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise TraceError(
            f"{path}:{rows.line_num}: header is missing column {' and '.join(map(repr, missing))}; "
            f"expected 'arrival_seconds,duration_seconds', got {','.join(header)!r}"
        )
    index = {c: names.index(c) for c in COLUMNS}
    jobs: list[tuple[float, float]] = []
    for row in rows:
        if not any(cell.strip() for cell in row):
            continue
        line = rows.line_num
        if len(row) < len(names):
            raise TraceError(f"{path}:{line}: expected {len(names)} columns, got {len(row)}: {','.join(row)!r}")
        values = []
        for column in COLUMNS:
            cell = row[index[column]].strip()
            try:
                value = float(cell)
            except ValueError:
                value = math.nan
            if not math.isfinite(value) or value < 0:
                raise TraceError(
                    f"{path}:{line}: column {index[column] + 1} ({column}): expected a number of seconds >= 0, "
                    f"got {cell!r}"
                )
            values.append(value)
        jobs.append((values[0], values[1]))
    if not jobs:
        raise TraceError(f"{path}: no jobs after the header")
    return Trace.of(name or path.stem, jobs, f"{len(jobs)} jobs from {path.name}")
