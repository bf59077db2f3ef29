"""The host-limits check (:func:`scaleq.server.hostlimits.check`): the live fleet against the server's open files and
its accept queue."""

from __future__ import annotations

from scaleq.server.hostlimits import FIX_ACCEPT_QUEUE, FIX_OPEN_FILES, SPARE_FILES, check, workers_within


def test_a_fleet_within_both_limits_passes_and_says_how_much_room_is_left() -> None:
    c = check(1_000, 20_000, 4_096)
    assert (c.hop, c.name, c.ok) == ("server", "host limits", True)
    assert "1000 live workers" in c.detail and f"open files for {workers_within(20_000)}" in c.detail
    assert "accept queue of 4096" in c.detail


def test_a_fleet_past_the_open_file_limit_fails_with_how_to_raise_it() -> None:
    # the soft limit most systems give a process: two connections per worker leave room for ~460
    c = check(600, 1_024, 4_096)
    assert not c.ok and c.fix == FIX_OPEN_FILES
    assert "past this server's open-file limit of 1024" in c.detail
    assert workers_within(1_024) == (1_024 - SPARE_FILES) // 2 == 462


def test_a_fleet_larger_than_the_accept_queue_fails_with_the_sysctl_to_raise() -> None:
    c = check(5_000, 1_048_576, 4_096)
    assert not c.ok and c.fix == FIX_ACCEPT_QUEUE
    assert "more than this server's accept queue of 4096" in c.detail
    assert "net.core.somaxconn" in c.fix
