"""Disqualification (a failed check anywhere removes a variant from its whole config) and the
sizes a config routes to each key (checked at session end)."""

from __future__ import annotations

import itertools

import pytest

from pytest_allreduce import selection as sel
from pytest_allreduce.backend import Limits
from pytest_allreduce.config import AllreduceConfig, ConfigEntry
from pytest_allreduce.model import Availability, GroupKey, Latency, Target, VariantInfo, Verdict
from pytest_allreduce.results import ResultStore
from pytest_allreduce.routing import WIDE_GAP, sizes_to_check

KEY = GroupKey(2, 4096, "bfloat16")


def target(name: str) -> Target:
    return Target(name, KEY.world_size, KEY.hidden, KEY.dtype)


def store_with(limits: Limits | None = None) -> ResultStore:
    store = ResultStore("cpu")
    for name, simplicity in (("gloo", 0), ("cpu_shm", 10)):
        store.declare(VariantInfo(name, name, False, simplicity))
        declared = (limits or Limits("cpu", ("bfloat16",))).as_dict()
        store.record_availability(Availability(name, 2, True, "", declared))
    return store


def passed_and_timed(store: ResultStore, name: str, sizes: list[int], median: float) -> None:
    for bs in sizes:
        case = target(name).at(bs)
        store.record_verdict(case, Verdict("numerics", "passed", "", f"t[{name}-{bs}]"))
        samples = [median * (1 + 0.001 * i) for i in range(20)]
        store.record_latency(Latency(case, "fused", samples, 1, "wall_clock", bs * 8192))


@pytest.mark.parametrize("suite", ["numerics", "limits", "stress", "accuracy", "latency"])
def test_a_failure_at_one_size_in_any_suite_disqualifies_every_size(suite: str) -> None:
    store = store_with()
    passed_and_timed(store, "gloo", [1, 8, 64], 100)
    passed_and_timed(store, "cpu_shm", [1, 8, 64], 50)  # faster everywhere
    assert {sel.select(store, KEY).winner(bs) for bs in (1, 8, 64)} == {"cpu_shm"}
    failing = target("cpu_shm").at(256)
    store.record_verdict(failing, Verdict(suite, "failed", "boom", "t[cpu_shm-256]"))
    chosen = sel.select(store, KEY)
    assert {chosen.winner(bs) for bs in (1, 8, 64)} == {"gloo"}
    why = chosen.excluded(8)["cpu_shm"]
    assert f"{suite} failed at 256 rows (t[cpu_shm-256])" in why
    assert not store.eligible(target("cpu_shm").at(8))
    assert store.disqualified() == {failing.target: store.disqualification(failing.target)}


def test_the_old_rule_would_have_kept_it_where_it_passed() -> None:
    store = store_with()
    passed_and_timed(store, "cpu_shm", [1, 8], 50)
    store.record_verdict(
        target("cpu_shm").at(8),
        Verdict("stress", "failed", "call 129 wrong", "t[stress]"),
    )
    case = target("cpu_shm").at(1)
    old_rule = all(store.suite_outcome(case, s) == "passed" for s in store.required_suites())
    assert old_rule and not store.eligible(case)


def test_a_failure_outside_the_declared_limits_disqualifies_nothing() -> None:
    store = store_with(Limits("cpu", ("bfloat16",), max_rows=64))
    passed_and_timed(store, "cpu_shm", [1, 8, 64], 50)
    outside = target("cpu_shm").at(65)
    store.record_verdict(outside, Verdict("numerics", "failed", "refused", "t[65]"))
    assert store.disqualification(outside.target) is None
    assert store.eligible(target("cpu_shm").at(8))
    inside = target("cpu_shm").at(64)
    store.record_verdict(inside, Verdict("limits", "failed", "not refused", "t[64]"))
    assert store.disqualification(inside.target) is not None


# ---- routed sizes ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "keys, end",
    [([1, 2, 32, 40, 48, 504], 504), ([1, 64, 1008, 2016, 2048], 8192), ([8, 9, 10], 9), ([5], 40)],
)
@pytest.mark.parametrize("alternate", [False, True])
def test_sizes_to_check_are_routed_as_the_consumer_looks_them_up(keys, end, alternate) -> None:
    winners = {k: ("gloo", "cpu_shm")[i % 2] if alternate else "gloo" for i, k in enumerate(keys)}
    entry = ConfigEntry("gloo", False, "gloo")
    config = AllreduceConfig(dict.fromkeys(keys, entry))
    points = sizes_to_check(winners, end)
    sizes = [rows for rows, _ in points]
    assert sizes == sorted(set(sizes)) and set(keys) <= set(sizes)
    for rows, key in points:
        assert config.lookup_key(rows) == key
    for low, high in itertools.pairwise(keys):
        if high - low < 2:
            continue
        switch = (low + high) // 2
        assert config.lookup_key(switch) == low and config.lookup_key(switch + 1) == high
        if winners[low] != winners[high] or high - low > WIDE_GAP:
            assert {switch, switch + 1} <= set(sizes)  # each winner at its edge
        else:
            assert {switch, switch + 1} & set(sizes) == {switch | 1}  # one odd size
        if high - low > WIDE_GAP:  # and odd sizes inside wide gaps
            assert any(low < s < high and s % 2 and s not in (switch, switch + 1) for s in sizes)
    if end > keys[-1]:
        assert end in sizes and keys[-1] + 1 in sizes
    assert max(sizes) == max(end, keys[-1])


@pytest.mark.parametrize(
    "keys, measured, end",
    [([1], [1, 32, 64], 64), ([1, 504], [1, 2, *range(32, 505, 8), 1008, 2016], 2016)],
)
def test_wide_gaps_between_measured_sizes_are_sampled_inside_one_keys_range(
    keys, measured, end
) -> None:
    """A band of sizes between two measured sizes, inside the range one key serves, is
    unmeasured ground: each wide gap gets sizes checked in both of its halves."""
    points = sizes_to_check(dict.fromkeys(keys, "gloo"), end, measured)
    sizes = {rows for rows, _ in points}
    for low, high in itertools.pairwise(sorted(measured)):
        if high - low > WIDE_GAP:
            middle = (low + high) / 2
            assert any(low < s < middle for s in sizes) and any(middle < s < high for s in sizes)
