"""The latency plot as a user reads it, and the speed-up over the server without a config."""

from __future__ import annotations

import numpy as np
import pytest
from test_artifacts import HIDDEN, WS, build_store, select_all

from pytest_allreduce.artifacts.server_default import gains
from pytest_allreduce.model import Availability, GroupKey, Latency, Target, VariantInfo, Verdict
from pytest_allreduce.results import ResultStore

KEY = GroupKey(WS, HIDDEN, "bfloat16")
FP8 = "flashinfer_fusion_one_shot_fp8"


def _with_unwritable_fastest(store: ResultStore) -> ResultStore:
    """Adds an FP8 variant that no config can name, fastest everywhere and passing."""
    store.declare(VariantInfo(FP8, None, True, 50))
    rng = np.random.default_rng(7)
    for bs in (1, 2, 32, 128, 504):
        case = Target(FP8, WS, HIDDEN, "bfloat16").at(bs)
        store.record_verdict(case, Verdict("numerics", "passed"))
        store.record_verdict(case, Verdict("graph", "passed"))
        samples = list(20.0 * (1 + rng.normal(0, 0.01, 30)))
        store.record_latency(Latency(case, "fused", samples, 10, "cuda_graph", bs * HIDDEN * 2))
    return store


@pytest.fixture
def store() -> ResultStore:
    store = _with_unwritable_fastest(build_store(("bfloat16",)))
    store.machine["compute_capability"] = "9.0"
    return store


def _legend_texts(ax) -> list[str]:
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def test_plot_shows_spread_unwritable_variants_the_choice_and_the_speedup(store) -> None:
    pytest.importorskip("matplotlib")
    from pytest_allreduce.artifacts.plot import latency_figure

    selection = select_all(store)[KEY]
    assert FP8 not in {c.backend_name for c in selection.choices.values()}
    fig = latency_figure(store, KEY, selection, "NVIDIA_H200")
    main, strip, right = fig.axes  # the twin axis is added last
    labels = _legend_texts(main)
    assert f"{FP8} (cannot be written to a config)" in labels
    assert "nccl" in labels and "p10-p90 of the samples" in labels
    assert "speed-up over no config file (right axis)" in labels
    fp8_line = next(line for line in main.get_lines() if line.get_label().startswith(FP8))
    assert fp8_line.get_linestyle() == "--"
    assert next(ln for ln in main.get_lines() if ln.get_label() == "nccl").get_linestyle() == "-"
    # one shaded p10-p90 band per backend drawn
    assert len(main.collections) >= 4
    winners = {c.backend_name for c in selection.choices.values()}
    assert sorted(_legend_texts(strip)) == sorted(f"chosen: {w}" for w in winners)
    # one coloured span per config key, covering the sizes its nearest-key lookup serves
    assert len(strip.patches) == len(selection.batch_sizes)
    assert right.get_ylabel() == "speed-up over no config file (x)"


def test_speedup_is_against_what_the_server_runs_without_a_file(store) -> None:
    selection = select_all(store)[KEY]
    found = {g.batch_size: g for g in gains(store, KEY, selection)}
    # Up to 128 tokens the no-file rule names FlashInfer's fusion, which the fork runs
    # one-shot: the choice (that same variant, at 1..32 rows) gains nothing over it.
    assert found[1].default_variant == "flashinfer_fusion_one_shot"
    assert found[1].speedup == pytest.approx(1.0)
    # Above 128 it names torch symm mem, which declines without multicast (no multimem
    # variant ran here): the nccl path, where SGLang's custom allreduce takes 4 MiB.
    assert found[504].default_variant == "custom_ar"
    chosen = selection.choices[504]
    assert found[504].speedup == pytest.approx(found[504].default_us / chosen.median_us)


def test_speedup_on_the_cpu_is_against_gloo() -> None:
    store = ResultStore("cpu")
    rng = np.random.default_rng(3)
    # Two sizes: a challenger must win over a run of neighbouring sizes (one could be noise).
    for name, btype, median in (("gloo", "gloo", 300.0), ("cpu_shm", "cpu_shm", 100.0)):
        store.declare(VariantInfo(name, btype, False, 0 if name == "gloo" else 10))
        store.record_availability(Availability(name, WS, True))
        for rows in (8, 16):
            case = Target(name, WS, HIDDEN, "bfloat16").at(rows)
            store.record_verdict(case, Verdict("numerics", "passed"))
            samples = list(median * (1 + rng.normal(0, 0.01, 8)))
            store.record_latency(
                Latency(case, "fused", samples, 1, "wall_clock", rows * HIDDEN * 2)
            )
    key = GroupKey(WS, HIDDEN, "bfloat16")
    found = gains(store, key, select_all(store)[key])
    assert [g.default_variant for g in found] == ["gloo", "gloo"]
    assert [g.speedup for g in found] == pytest.approx([3.0, 3.0], rel=0.1)


def test_no_speedup_without_the_gpu_capability() -> None:
    store = build_store(("bfloat16",))
    del store.machine["compute_capability"]
    assert gains(store, KEY, select_all(store)[KEY]) == []
