"""The grid file: defaults, and errors naming the file, the field and the problem."""

from __future__ import annotations

from pathlib import Path

import pytest

from scaleq import grid


def test_loads_a_grid(tmp_path: Path) -> None:
    f = tmp_path / "grid.toml"
    f.write_text(
        '[[groups]]\nname = "cpu"\nqueue = "work"\nmax_workers = 3\nidle_timeout = 5\n'
        '[groups.resources]\ncpus = 2\nmemory = "1g"\n'
    )
    g = grid.load(f)
    (cpu,) = g.groups
    assert cpu.queue == "work" and cpu.max_workers == 3 and cpu.resources.memory == 1 << 30
    policy = cpu.policy()
    assert policy.max_workers == 3 and policy.idle_timeout == 5
    assert (policy.headroom, policy.lookahead) == (1.2, 30.0)  # the policy's own defaults


def test_spare_settings_reach_the_policy(tmp_path: Path) -> None:
    f = tmp_path / "grid.toml"
    f.write_text('[[groups]]\nname = "vm"\nheadroom = 0.5\nlookahead = 90\ndemand_halflife = 600\n')
    policy = grid.load(f).groups[0].policy()
    assert (policy.headroom, policy.lookahead, policy.demand_halflife) == (0.5, 90, 600)


@pytest.mark.parametrize(
    "text, expected",
    [
        ('[[groups]]\nname = "a"\nmax_workers = -1\n', "groups[0].max_workers"),
        ('[[groups]]\nname = "a"\nmin_workers = 3\nmax_workers = 1\n', "groups[0]"),
        ('[[groups]]\nname = "a"\nprovider = "aws"\n', "groups[0].provider"),
        ('[[groups]]\nname = "a"\nmax_wokers = 1\n', "groups[0].max_wokers"),
        ('[[groups]]\nname = "A B"\n', "groups[0].name"),
        ('[[groups]]\nname = "a"\n[[groups]]\nname = "a"\n', "two groups are named"),
        ('[[groups]]\nname = "a"\nheadroom = -1\n', "groups[0].headroom"),
        ('[[groups]]\nname = "a"\nlookahead = inf\n', "groups[0].lookahead"),
        ('[[groups]]\nname = "a"\nheadroom = 1e308\n', "groups[0].headroom"),
        ('[[groups]]\nname = "a"\nlookahead = 86400\n', "groups[0].lookahead"),
        ('[[groups]]\nname = "a"\ndemand_halflife = 0\n', "groups[0].demand_halflife"),
        (
            '[[groups]]\nname = "a"\nprice_per_hour = "0.10"\n',
            "groups[0].price_per_hour: Input should be a valid number",
        ),
        ('[[groups]]\nname = "a"\nprice_per_hour = -1\n', "groups[0].price_per_hour"),
        ('[[groups]]\nname = "a"\nprice_per_hour = nan\n', "groups[0].price_per_hour"),
        ("[server\n", "line 1"),
    ],
)
def test_bad_grid_files(tmp_path: Path, text: str, expected: str) -> None:
    f = tmp_path / "grid.toml"
    f.write_text(text)
    with pytest.raises(grid.GridFileError) as e:
        grid.load(f)
    assert str(f) in str(e.value) and expected in str(e.value)


def test_a_price_is_a_number_and_changes_no_worker(tmp_path: Path) -> None:
    f = tmp_path / "grid.toml"
    f.write_text('[[groups]]\nname = "a"\nprice_per_hour = 2\n[[groups]]\nname = "b"\nprice_per_hour = 0.35\n')
    a, b = grid.load(f).groups
    assert (a.price_per_hour, b.price_per_hour) == (2.0, 0.35)
    # a new price is not new settings for the workers: no rolling update for it
    assert a.version() == a.model_copy(update={"price_per_hour": None}).version()
    assert a.version() != a.model_copy(update={"slots": 2}).version()


def test_embedded_default() -> None:
    (g,) = grid.embedded_default(cores=4).groups
    assert (g.queue, g.provider, g.min_workers, g.max_workers, g.slots) == ("default", "local", 0, 4, 1)


# -- the version: what a running worker carries, and nothing else ------------------------------------------------------

BASE = {"name": "cpu", "queue": "work", "min_workers": 0, "max_workers": 3}


SCALING_CHANGES = [
    {"min_workers": 1},
    {"max_workers": 30},
    {"idle_timeout": 600},
    {"scale_down_window": 120},
    {"max_step_up": 2},
    {"step_period": 60},
    {"startup_grace": 900},
    {"headroom": 0},
    {"lookahead": 120},
    {"demand_halflife": 60},
    {"signal": {"kind": "promql", "url": "http://prom:9090", "query": "sum(q)"}},
    {"price_per_hour": 0.5},
]


@pytest.mark.parametrize("change", SCALING_CHANGES, ids=lambda c: next(iter(c)))
def test_scaling_settings_do_not_change_the_version(change: dict) -> None:
    old, new = grid.Group(**BASE), grid.Group(**{**BASE, **change})
    assert old.model_dump() != new.model_dump()
    assert new.version() == old.version()


GCP = {"project": "p", "region": "europe-west1"}


@pytest.mark.parametrize(
    "change",
    [
        {"queue": "other"},
        {"slots": 4},  # on the worker's command line (--slots)
        {"runtimes": ["docker"]},
        {"tags": ["gpu"]},
        {"resources": {"cpus": 7, "memory": "2g"}},
        {"image": "example.org/worker:2"},
        {"allow_host_network": True},
        {"env": {"HTTP_PROXY": "http://proxy:3128"}},
        {"provider": "docker"},
        {"provider": "gcp", "image": "w:1", "gcp": GCP},
        {"provider": "kubernetes", "image": "w:1", "kubernetes": {"namespace": "batch"}},
        {"provider": "fly", "image": "w:1", "fly": {"app": "a"}},
    ],
    ids=lambda c: "+".join(c),
)
def test_what_a_worker_carries_changes_the_version(change: dict) -> None:
    old, new = grid.Group(**BASE), grid.Group(**{**BASE, **change})
    assert new.version() != old.version()


@pytest.mark.parametrize(
    "provider, settings, change",
    [
        ("gcp", {"gcp": GCP}, {"gcp": {**GCP, "machine_type": "n2-standard-4"}}),
        ("gcp", {"gcp": GCP}, {"gcp": {**GCP, "spot": True}}),
        ("kubernetes", {}, {"kubernetes": {"service_account": "runner"}}),
        ("fly", {"fly": {"app": "a"}}, {"fly": {"app": "a", "memory_mb": 4096}}),
    ],
)
def test_the_providers_machine_settings_change_the_version(provider: str, settings: dict, change: dict) -> None:
    base = {**BASE, "provider": provider, "image": "w:1", **settings}
    assert grid.Group(**{**base, **change}).version() != grid.Group(**base).version()


def test_every_group_field_is_either_carried_by_the_worker_or_read_by_the_controller() -> None:
    assert grid.WORKER_FIELDS.isdisjoint(grid.SCALING_FIELDS)
    assert grid.WORKER_FIELDS | grid.SCALING_FIELDS == set(grid.Group.model_fields)


def test_every_scaling_field_has_a_case_above() -> None:
    assert {next(iter(c)) for c in SCALING_CHANGES} == grid.SCALING_FIELDS


@pytest.mark.parametrize("change", SCALING_CHANGES, ids=lambda c: next(iter(c)))
def test_scaling_settings_put_nothing_on_the_workers_command_line(change: dict) -> None:
    from scaleq.providers.base import worker_args

    old, new = grid.Group(**BASE), grid.Group(**{**BASE, **change})
    assert worker_args(new, "http://s", "w-1", 300) == worker_args(old, "http://s", "w-1", 300)


def test_slots_are_on_the_workers_command_line_and_in_the_version() -> None:
    from scaleq.providers.base import worker_args

    old, new = grid.Group(**BASE), grid.Group(**{**BASE, "slots": 4})
    assert "4" in worker_args(new, "http://s", "w-1", 300) and "4" not in worker_args(old, "http://s", "w-1", 300)
    assert new.version() != old.version()
