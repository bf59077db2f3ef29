"""``scaleq why`` prints the estimated start when the server gives one (an estimator fills ``estimated_start`` and
``estimate`` in the answer of ``GET /jobs/{id}/why``), and says it is not known otherwise."""

from __future__ import annotations

import time

from scaleq.cli.why import estimate_text


def test_an_estimate_is_said_with_its_time_and_basis() -> None:
    now = 1_800_000_000.0
    answer = {"estimated_start": now + 90, "estimate_basis": "3 jobs ahead at 30 s each on 1 worker"}
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now + 90))
    assert estimate_text(answer, now) == f"in about 1m30s ({stamp}): 3 jobs ahead at 30 s each on 1 worker"
    late = estimate_text({"estimated_start": now - 5, "estimate_basis": None}, now)
    assert late is not None and late.startswith("any moment now (")


def test_no_estimate_is_none() -> None:
    assert estimate_text({"estimated_start": None, "estimate_basis": None}) is None
    assert estimate_text({}) is None
