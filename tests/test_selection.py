"""Selection: the rule on raw samples, candidates, ties, exclusions and bisection."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pytest_allreduce import selection as sel
from pytest_allreduce import stats
from pytest_allreduce.artifacts.config import write_config
from pytest_allreduce.config import AllreduceConfig, ConfigError, config_path
from pytest_allreduce.model import Availability, GroupKey, Latency, Target, VariantInfo, Verdict
from pytest_allreduce.results import ResultStore

WS, HIDDEN, DTYPE = 2, 4096, "bfloat16"
KEY = GroupKey(WS, HIDDEN, DTYPE)


def noisy(median: float, seed: int, n: int = 30, rel: float = 0.01) -> list[float]:
    """n samples around `median` with relative noise `rel` (deterministic)."""
    rng = np.random.default_rng(seed)
    return list(median * (1.0 + rng.normal(0.0, rel, n)))


def add_backend(
    store: ResultStore,
    name: str,
    btype: str | None,
    simplicity: int,
    fused: bool = False,
    available: bool = True,
    reason: str = "",
) -> None:
    store.declare(VariantInfo(name, btype, fused, simplicity))
    store.record_availability(Availability(name, WS, available, reason))


def measure(
    store: ResultStore,
    name: str,
    bs: int,
    samples: list[float] | None,
    outcomes: dict[str, str] | None = None,
) -> None:
    """Record verdicts (all required suites passed unless told) and fused samples."""
    case = Target(name, WS, HIDDEN, DTYPE).at(bs)
    if outcomes is None:
        outcomes = dict.fromkeys(store.required_suites(), "passed")
    for suite, outcome in outcomes.items():
        store.record_verdict(case, Verdict(suite, outcome, detail=f"{suite} {outcome}"))
    if samples is not None:
        store.record_latency(Latency(case, "fused", samples, 10, "cuda_graph", bs * HIDDEN * 2))


def gpu_store() -> ResultStore:
    store = ResultStore("cuda")
    add_backend(store, "nccl", "nccl", 0)
    add_backend(store, "custom_ar", "custom_allreduce", 20)
    add_backend(store, "torch_symm_mem_two_shot", "torch_symm_mem", 30)
    add_backend(store, "flashinfer_fusion_one_shot", "flashinfer_fusion", 40, fused=True)
    return store


# ---- the rule on raw samples ---------------------------------------------------------------


def test_rule_clear_twenty_percent_gain_beats() -> None:
    cmp = sel.compare_samples(noisy(80, 1), noisy(100, 2))
    assert cmp.beats
    assert cmp.p_value < stats.P_VALUE_MAX
    assert cmp.gain == pytest.approx(0.2, abs=0.01)


def test_rule_significant_but_small_gain_does_not_beat() -> None:
    # 2% faster with tight samples: real, but below the 3% worth switching for.
    cmp = sel.compare_samples(noisy(98, 3, rel=0.002), noisy(100, 4, rel=0.002))
    assert cmp.p_value < stats.P_VALUE_MAX
    assert not cmp.beats


def test_rule_large_gain_without_significance_does_not_beat() -> None:
    challenger = [60.0, 70.0, 80.0, 90.0, 94.0, 94.0, 110.0, 120.0, 130.0, 140.0]
    reference = [99.0, 100.0, 101.0, 100.0, 99.5, 100.5, 100.2, 99.8, 100.1, 99.9]
    cmp = sel.compare_samples(challenger, reference)
    assert cmp.gain > sel.MIN_GAIN
    assert cmp.p_value >= stats.P_VALUE_MAX
    assert not cmp.beats


def test_rule_identical_samples_never_beat() -> None:
    cmp = sel.compare_samples([5.0] * 20, [5.0] * 20)
    assert not cmp.beats
    assert cmp.p_value == 1.0


def test_rule_refuses_empty_samples() -> None:
    with pytest.raises(ValueError):
        sel.compare_samples([], [1.0])


# ---- choices -------------------------------------------------------------------------------


def test_default_kept_when_challenger_within_noise() -> None:
    store = gpu_store()
    measure(store, "nccl", 32, noisy(100, 10))
    measure(store, "custom_ar", 32, noisy(99, 11))
    choice = sel.select(store, KEY).choices[32]
    assert choice.backend_name == "nccl"
    assert choice.default == "nccl" and choice.default_is_standard
    assert "kept" in choice.reason
    assert set(choice.medians_us) == {"nccl", "custom_ar"}
    assert not choice.use_residual_rmsnorm_fusion


def test_clearly_faster_challenger_wins_with_evidence() -> None:
    store = gpu_store()
    measure(store, "nccl", 32, noisy(100, 10))
    measure(store, "flashinfer_fusion_one_shot", 32, noisy(80, 12))
    choice = sel.select(store, KEY).choices[32]
    assert choice.backend_name == "flashinfer_fusion_one_shot"
    assert choice.backend_type == "flashinfer_fusion"
    assert choice.use_residual_rmsnorm_fusion
    assert choice.beaten == ("nccl",)
    assert choice.median_us == pytest.approx(80, rel=0.02)
    (cmp,) = choice.comparisons
    assert cmp.beats and cmp.reference == "nccl"
    assert "p=" in choice.reason and "nccl" in choice.reason
    evidence = choice.to_json()
    json.dumps(evidence)
    assert evidence["comparisons"][0]["p_value"] < stats.P_VALUE_MAX


def test_faster_but_noisy_challenger_does_not_win() -> None:
    store = gpu_store()
    measure(store, "nccl", 32, noisy(100, 10))
    wide = np.array(noisy(1.0, 13, n=8, rel=0.3))
    measure(store, "custom_ar", 32, list(wide * 94.0 / np.median(wide)))  # median 6% lower
    choice = sel.select(store, KEY).choices[32]
    assert choice.medians_us["custom_ar"] < choice.medians_us["nccl"]
    assert choice.backend_name == "nccl"


def test_tie_goes_to_the_simpler_challenger() -> None:
    store = gpu_store()
    measure(store, "nccl", 64, noisy(100, 20))
    measure(store, "custom_ar", 64, noisy(85, 21))
    measure(store, "flashinfer_fusion_one_shot", 64, noisy(84, 22))
    choice = sel.select(store, KEY).choices[64]
    assert choice.backend_name == "custom_ar"
    assert choice.tied == ("flashinfer_fusion_one_shot",)
    assert "tie" in choice.reason


def test_fastest_wins_when_it_beats_the_simpler_challengers() -> None:
    store = gpu_store()
    measure(store, "nccl", 64, noisy(100, 20))
    measure(store, "custom_ar", 64, noisy(85, 21))
    measure(store, "torch_symm_mem_two_shot", 64, noisy(84, 23))
    measure(store, "flashinfer_fusion_one_shot", 64, noisy(70, 22))
    choice = sel.select(store, KEY).choices[64]
    assert choice.backend_name == "flashinfer_fusion_one_shot"
    assert set(choice.beaten) == {"nccl", "custom_ar", "torch_symm_mem_two_shot"}
    assert choice.tied == ()


def test_failed_or_uneligible_backends_never_win() -> None:
    store = gpu_store()
    measure(store, "nccl", 8, noisy(100, 30))
    measure(store, "custom_ar", 8, noisy(50, 31), {"numerics": "failed", "graph": "passed"})
    measure(store, "torch_symm_mem_two_shot", 8, noisy(50, 32), {"numerics": "passed"})
    measure(
        store,
        "flashinfer_fusion_one_shot",
        8,
        noisy(50, 33),
        {"numerics": "passed", "graph": "skipped"},
    )
    result = sel.select(store, KEY)
    choice = result.choices[8]
    assert choice.backend_name == "nccl"
    assert set(choice.medians_us) == {"nccl"}
    excluded = result.excluded[8]
    assert "numerics failed" in excluded["custom_ar"]
    assert "graph not run" in excluded["torch_symm_mem_two_shot"]
    assert "graph skipped" in excluded["flashinfer_fusion_one_shot"]


def test_unavailable_backend_is_excluded_with_its_reason() -> None:
    store = gpu_store()
    add_backend(store, "quick_ar", "custom_allreduce", 25, available=False, reason="rank 1: ROCm")
    measure(store, "nccl", 8, noisy(100, 30))
    measure(store, "quick_ar", 8, noisy(50, 34))
    result = sel.select(store, KEY)
    assert result.choices[8].backend_name == "nccl"
    assert result.excluded[8]["quick_ar"] == "unavailable: rank 1: ROCm"


def test_non_loadable_types_never_appear() -> None:
    store = gpu_store()
    add_backend(store, "mscclpp", None, 35)
    add_backend(store, "gloo", "gloo", 1)  # a CPU type cannot go into a GPU config
    measure(store, "nccl", 16, noisy(100, 40))
    measure(store, "mscclpp", 16, noisy(40, 41))
    measure(store, "gloo", 16, noisy(40, 42))
    result = sel.select(store, KEY)
    choice = result.choices[16]
    assert choice.backend_name == "nccl"
    assert "mscclpp" not in choice.medians_us and "gloo" not in choice.medians_us
    assert "cannot be loaded" in result.excluded[16]["mscclpp"]
    assert "cannot be loaded" in result.excluded[16]["gloo"]


def test_without_the_standard_default_the_simplest_candidate_is_the_reference() -> None:
    store = gpu_store()
    measure(store, "nccl", 128, noisy(100, 50), {"numerics": "failed", "graph": "passed"})
    measure(store, "custom_ar", 128, noisy(90, 51))
    measure(store, "torch_symm_mem_two_shot", 128, noisy(89, 52))
    choice = sel.select(store, KEY).choices[128]
    assert choice.default == "custom_ar" and not choice.default_is_standard
    assert choice.backend_name == "custom_ar"  # 1% is within noise


def test_no_candidates_means_no_entry_with_a_reason() -> None:
    store = gpu_store()
    measure(store, "nccl", 4, noisy(100, 60))
    measure(store, "nccl", 512, noisy(100, 61), {"numerics": "failed", "graph": "passed"})
    measure(store, "custom_ar", 4, noisy(100, 62))
    result = sel.select(store, KEY)
    assert 512 not in result.choices
    assert "numerics failed" in result.no_winner[512]
    # A failure at one size disqualifies the backend at every size of the config.
    assert "disqualified" in result.excluded[4]["nccl"]
    assert list(result.to_config()) == [4]
    assert result.choices[4].backend_name == "custom_ar"


def test_gating_suite_that_never_ran_leaves_no_winner() -> None:
    store = gpu_store()
    measure(store, "nccl", 4, noisy(100, 60), {"numerics": "passed"})
    result = sel.select(store, KEY)
    assert not result.choices
    assert "graph" in result.no_winner[4]
    with pytest.raises(ConfigError):
        result.to_config()


def test_cpu_default_is_gloo_and_cpu_shm_may_win() -> None:
    store = ResultStore("cpu")
    add_backend(store, "gloo", "gloo", 0)
    add_backend(store, "cpu_shm", "cpu_shm", 10)
    add_backend(store, "nccl", "nccl", 0)  # a GPU type on the CPU is not loadable
    measure(store, "gloo", 1, noisy(100, 70))
    measure(store, "cpu_shm", 1, noisy(30, 71))
    measure(store, "gloo", 256, noisy(100, 72))
    measure(store, "cpu_shm", 256, noisy(101, 73))
    measure(store, "nccl", 256, noisy(10, 74))
    result = sel.select(store, KEY)
    assert result.choices[1].backend_name == "cpu_shm"
    assert result.choices[256].backend_name == "gloo"
    assert "nccl" in result.excluded[256]


def test_backend_not_measured_at_a_size_is_excluded_as_such() -> None:
    store = gpu_store()
    measure(store, "nccl", 2, noisy(100, 80))
    measure(store, "nccl", 4096, noisy(100, 81))
    measure(store, "custom_ar", 2, noisy(100, 82))
    result = sel.select(store, KEY)
    assert result.excluded[4096]["custom_ar"] == "not checked or measured at this size"


def test_missing_fused_latency_is_excluded() -> None:
    store = gpu_store()
    measure(store, "nccl", 2, noisy(100, 80))
    measure(store, "custom_ar", 2, None)
    result = sel.select(store, KEY)
    assert "no 'fused' latency" in result.excluded[2]["custom_ar"]


def test_fusion_flag_only_for_fused_flashinfer_type() -> None:
    assert sel.fusion_flag(True, "flashinfer_fusion")
    assert not sel.fusion_flag(False, "flashinfer_fusion")
    assert not sel.fusion_flag(True, "cpu_shm")


# ---- config --------------------------------------------------------------------------------


def test_config_written_with_ascending_keys_and_exact_fields(tmp_path) -> None:
    store = gpu_store()
    for i, bs in enumerate([504, 2, 40, 1, 32]):
        measure(store, "nccl", bs, noisy(100, 90 + i))
        fi_median = 60 if bs <= 32 else 100
        measure(store, "flashinfer_fusion_one_shot", bs, noisy(fi_median, 100 + i))
    config = sel.select(store, KEY).to_config()
    assert isinstance(config, AllreduceConfig)
    path = config_path(tmp_path, WS, HIDDEN, "NVIDIA H200")
    write_config(path, config, "cuda")
    assert path.name == "allreduce_config_hidden=4096,device=NVIDIA_H200.json"
    raw = json.loads(path.read_text())
    assert list(raw) == ["1", "2", "32", "40", "504"]
    for key, value in raw.items():
        assert list(value) == ["backend_type", "use_residual_rmsnorm_fusion", "backend_name"]
        fused = int(key) <= 32
        assert value == {
            "backend_type": "flashinfer_fusion" if fused else "nccl",
            "use_residual_rmsnorm_fusion": fused,
            "backend_name": "flashinfer_fusion_one_shot" if fused else "nccl",
        }


# ---- bisection -----------------------------------------------------------------------------


def _fake_selection(winners: dict[int, str | None]) -> sel.Selection:
    result = sel.Selection(KEY, "cuda")
    for bs, name in winners.items():
        if name is None:
            result.no_winner[bs] = "none"
            continue
        result.choices[bs] = sel.Choice(
            batch_size=bs,
            backend_name=name,
            backend_type="nccl",
            use_residual_rmsnorm_fusion=False,
            median_us=1.0,
            reason="test",
            default="nccl",
            default_is_standard=True,
            medians_us={name: 1.0},
        )
    return result


def test_bisection_points_between_differing_winners() -> None:
    winners = {1: "a", 2: "a", 32: "b", 40: "b", 48: "a", 49: "b", 56: None, 64: None}
    assert sel.bisection_points(_fake_selection(winners)) == [17, 44, 52]


def test_bisection_points_none_when_settled() -> None:
    assert sel.bisection_points(_fake_selection({1: "a", 2: "b", 3: "a"})) == []
    assert sel.bisection_points(_fake_selection({1: "a", 500: "a"})) == []
    assert sel.bisection_points(_fake_selection({})) == []


def test_bisection_loop_converges_to_adjacent_crossovers() -> None:
    """The engine's loop: measure the points, re-select, repeat until none are left."""

    def truth(bs: int) -> str:
        return "fi" if bs <= 100 else ("symm" if bs <= 300 else "nccl")

    measured = {1, 2, 32, 504}
    for _ in range(50):
        points = sel.bisection_points(_fake_selection({bs: truth(bs) for bs in measured}))
        if not points:
            break
        assert not set(points) & measured
        measured |= set(points)
    else:
        pytest.fail("bisection did not converge")
    assert {100, 101, 300, 301} <= measured
    assert len(measured) < 30
