"""The baseline gate: save, compare by the rule, refuse foreign or malformed baselines."""

from __future__ import annotations

import json

import numpy as np
import pytest

from pytest_allreduce import gate, stats
from pytest_allreduce.model import Latency, Target
from pytest_allreduce.results import ResultStore

DEVICE_NAME = "NVIDIA H100 80GB HBM3"


def noisy(median: float, seed: int, n: int = 30, rel: float = 0.02) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(median * (1.0 + rng.normal(0.0, rel, n)))


def make_store(
    scale: float = 1.0,
    seed: int = 0,
    device_name: str = DEVICE_NAME,
    world_size: int = 2,
    rel: float = 0.02,
    sizes: tuple[int, ...] = (1, 32, 256),
) -> ResultStore:
    store = ResultStore("cuda")
    store.machine = {"device_type": "cuda", "device_name": device_name}
    for i, (backend, base) in enumerate((("nccl", 40.0), ("custom_ar", 20.0))):
        for j, bs in enumerate(sizes):
            case = Target(backend, world_size, 4096, "bfloat16").at(bs)
            for k, job in enumerate(("allreduce", "fused")):
                samples = noisy(base * scale, seed + 100 * i + 10 * j + k, rel=rel)
                store.record_latency(Latency(case, job, samples, 10, "cuda_graph", bs * 8192))
    return store


def test_save_baseline_holds_fingerprint_medians_and_samples(tmp_path) -> None:
    store = make_store()
    path = gate.save_baseline(store, tmp_path / "base" / "h100.json")
    doc = json.loads(path.read_text())
    assert doc["device_name"] == "NVIDIA_H100_80GB_HBM3"
    assert doc["world_sizes"] == [2]
    assert doc["machine"] == store.machine
    assert len(doc["entries"]) == 2 * 3 * 2
    entry = doc["entries"][0]
    assert set(entry) == {
        "backend",
        "world_size",
        "hidden",
        "dtype",
        "batch_size",
        "job",
        "median_us",
        "samples_us",
    }
    assert entry["median_us"] == pytest.approx(float(np.median(entry["samples_us"])))
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]


def test_same_data_passes(tmp_path) -> None:
    store = make_store()
    path = gate.save_baseline(store, tmp_path / "b.json")
    report = gate.check_baseline(store, path)
    assert report.passed
    assert report.compared == 12
    assert report.notes == []


def test_thirty_percent_slower_with_separable_samples_fails(tmp_path) -> None:
    path = gate.save_baseline(make_store(seed=0), tmp_path / "b.json")
    report = gate.check_baseline(make_store(scale=1.3, seed=500), path)
    assert not report.passed
    assert len(report.regressions) == 12
    worst = report.regressions[0]
    assert worst.change == pytest.approx(0.3, abs=0.03)
    assert worst.p_value < stats.P_VALUE_MAX
    assert "REGRESSION" in report.summary()
    assert "custom_ar tp2 hidden=4096 bfloat16 bs=1 allreduce" in str(worst)


def test_noise_does_not_fail(tmp_path) -> None:
    path = gate.save_baseline(make_store(seed=0, rel=0.1), tmp_path / "b.json")
    for seed in (1000, 2000, 3000):
        report = gate.check_baseline(make_store(seed=seed, rel=0.1), path)
        assert report.passed, report.summary()


def test_large_median_change_within_noise_is_a_note(tmp_path) -> None:
    base = make_store(sizes=(32,))
    path = gate.save_baseline(base, tmp_path / "b.json")
    current = make_store(sizes=(32,))
    case = Target("nccl", 2, 4096, "bfloat16").at(32)
    # median 15% higher, but only 3 samples spread across the baseline's range: no evidence
    current.record_latency(Latency(case, "fused", [30.0, 46.0, 60.0], 10, "cuda_graph", 1))
    report = gate.check_baseline(current, path)
    assert report.passed
    assert any("within noise" in n for n in report.notes)


def test_small_significant_slowdown_passes(tmp_path) -> None:
    path = gate.save_baseline(make_store(rel=0.002), tmp_path / "b.json")
    report = gate.check_baseline(make_store(scale=1.05, seed=7, rel=0.002), path)
    assert report.passed


def test_missing_keys_are_notes_not_failures(tmp_path) -> None:
    path = gate.save_baseline(make_store(sizes=(1, 32)), tmp_path / "b.json")
    report = gate.check_baseline(make_store(sizes=(32, 256)), path)
    assert report.passed
    assert report.compared == 4
    assert sum("not in the baseline" in n for n in report.notes) == 4
    assert sum("not measured now" in n for n in report.notes) == 4


def test_other_device_is_a_clear_error(tmp_path) -> None:
    path = gate.save_baseline(make_store(device_name="NVIDIA H200"), tmp_path / "b.json")
    with pytest.raises(gate.BaselineError) as err:
        gate.check_baseline(make_store(), path)
    assert "NVIDIA_H200" in str(err.value) and "NVIDIA_H100_80GB_HBM3" in str(err.value)


def test_world_size_mismatch_is_a_clear_error(tmp_path) -> None:
    path = gate.save_baseline(make_store(world_size=8), tmp_path / "b.json")
    with pytest.raises(gate.BaselineError, match=r"world size\(s\) 8.*world size\(s\) 2"):
        gate.check_baseline(make_store(world_size=2), path)


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("{not json", "invalid JSON"),
        ("[]", "top level"),
        ('{"format": "other"}', "'format'"),
        (None, "entries[0].batch_size"),
        (None, "samples_us"),
    ],
)
def test_malformed_baseline_names_file_and_problem(tmp_path, content, problem) -> None:
    path = tmp_path / "bad.json"
    if content is None:
        doc = json.loads(gate.save_baseline(make_store(), tmp_path / "good.json").read_text())
        if problem == "samples_us":
            doc["entries"][0]["samples_us"] = []
        else:
            doc["entries"][0]["batch_size"] = "32"
        content = json.dumps(doc)
    path.write_text(content)
    with pytest.raises(gate.BaselineError) as err:
        gate.check_baseline(make_store(), path)
    assert str(path) in str(err.value)
    assert problem in str(err.value)
    assert isinstance(err.value, ValueError)


def test_unreadable_baseline_is_a_baseline_error(tmp_path) -> None:
    with pytest.raises(gate.BaselineError, match=r"missing\.json: no such file"):
        gate.check_baseline(make_store(), tmp_path / "missing.json")


def test_run_to_run_drift_of_microsecond_ops_is_not_a_regression(tmp_path) -> None:
    """20% slower but only 0.8 us: below the absolute floor (seen between two runs on H200)."""

    def tiny(scale: float, seed: int) -> ResultStore:
        store = ResultStore("cuda")
        store.machine = {"device_type": "cuda", "device_name": DEVICE_NAME}
        case = Target("flashinfer_trtllm", 2, 4096, "bfloat16").at(1)
        store.record_latency(
            Latency(case, "allreduce", noisy(4.0 * scale, seed), 50, "cuda_graph", 8192)
        )
        return store

    path = gate.save_baseline(tiny(1.0, 1), tmp_path / "b.json")
    drifted = gate.check_baseline(tiny(1.2, 2), path)
    assert drifted.passed, drifted.summary()
    doubled = gate.check_baseline(tiny(2.0, 3), path)
    assert [r.key[0] for r in doubled.regressions] == ["flashinfer_trtllm"]
