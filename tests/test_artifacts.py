"""Artifacts: config, evidence, report, plot and benchmark.json from a hand-built store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.util import find_spec

import numpy as np
import pytest

from pytest_allreduce import artifacts
from pytest_allreduce.artifacts.atomic import atomic_write
from pytest_allreduce.artifacts.config import default_config_dtype
from pytest_allreduce.artifacts.evidence import store_from_evidence
from pytest_allreduce.config import load_config
from pytest_allreduce.coverage import Coverage
from pytest_allreduce.model import Availability, GroupKey, Latency, Target, VariantInfo, Verdict
from pytest_allreduce.results import ResultStore
from pytest_allreduce.selection import Selection, select

WS, HIDDEN = 2, 4096
DEVICE_NAME = "NVIDIA H200"
DEV = "NVIDIA_H200"
SIZES = (1, 2, 32, 128, 504)


def noisy(median: float, seed: int, n: int = 30) -> list[float]:
    rng = np.random.default_rng(seed)
    return list(median * (1.0 + rng.normal(0.0, 0.01, n)))


def build_store(dtypes: tuple[str, ...] = ("float16", "bfloat16")) -> ResultStore:
    """The nccl entry runs custom_ar at these sizes (SGLang's dispatch); flashinfer fusion is
    twice as fast up to 32 rows in bfloat16 and 1.5x slower elsewhere; raw nccl is measured
    but never what a server runs here; a two-shot fusion that would be fastest fails its
    numerics (and is never a consumer's run anyway); mscclpp is unavailable."""
    store = ResultStore("cuda")
    store.machine = {
        "device_type": "cuda",
        "device_name": DEVICE_NAME,
        "device_count": 8,
        "compute_capability": "9.0",
        "multicast_disabled_by": ["NCCL_NVLS_ENABLE=0"],
        "driver_version": "570.1",
        "cuda_version": "12.8",
        "nccl_version": "2.27.3",
        "torch_version": "2.9.0",
        "flashinfer_version": "0.7.2",
        "sgl_kernel_version": "unavailable: not installed",
        "hostname": "gpu-host",
        "topology": "GPU0 X NV18",
    }
    backends = {
        "nccl": ("nccl", 0, False),
        "custom_ar": ("custom_allreduce", 30, False),
        "flashinfer_fusion_one_shot": ("flashinfer_fusion", 40, True),
        "flashinfer_fusion_two_shot": (None, 40, True),
        "mscclpp": (None, 60, False),
    }
    for name, (btype, simplicity, fused) in backends.items():
        store.declare(VariantInfo(name, btype, fused, simplicity))
        available = name != "mscclpp"
        reason = "" if available else "rank 1: mscclpp not installed"
        store.record_availability(Availability(name, WS, available, reason))
    seed = 0
    fused_us = {"nccl": 150.0, "custom_ar": 100.0, "flashinfer_fusion_two_shot": 20.0}
    for dtype in dtypes:
        for bs in SIZES:
            for name in (
                "nccl",
                "custom_ar",
                "flashinfer_fusion_one_shot",
                "flashinfer_fusion_two_shot",
            ):
                case = Target(name, WS, HIDDEN, dtype).at(bs)
                numerics = "failed" if name == "flashinfer_fusion_two_shot" else "passed"
                store.record_verdict(case, Verdict("numerics", numerics, "exact sum", f"n-{name}"))
                store.record_verdict(case, Verdict("graph", "passed", "replay", f"g-{name}"))
                fused = fused_us.get(name, 150.0)
                if name == "flashinfer_fusion_one_shot" and dtype == "bfloat16" and bs <= 32:
                    fused = 50.0
                for job, median in (("fused", fused), ("allreduce", fused * 0.8)):
                    seed += 1
                    store.record_latency(
                        Latency(case, job, noisy(median, seed), 10, "cuda_graph", bs * HIDDEN * 2)
                    )
    return store


@pytest.fixture
def store() -> ResultStore:
    return build_store()


@pytest.fixture
def selections(store: ResultStore) -> dict[GroupKey, Selection]:
    return select_all(store)


def select_all(store: ResultStore) -> dict[GroupKey, Selection]:
    return {key: select(store, key) for key in store.group_keys()}


def test_writes_every_file_with_the_expected_names(tmp_path, store, selections) -> None:
    written = artifacts.write_artifacts(store, selections, tmp_path, DEVICE_NAME)
    tp = tmp_path / "tp2"
    expected = {
        tp / f"allreduce_config_hidden=4096,device={DEV}.json",
        tp / f"allreduce_config_hidden=4096,tp=2,device={DEV}.json",
        tp / f"allreduce_evidence_hidden=4096,device={DEV}.json",
    }
    if find_spec("pytest_benchmark"):
        expected.add(tmp_path / "benchmark.json")
    for dtype in ("float16", "bfloat16"):
        stem = f"hidden=4096,dtype={dtype},device={DEV}"
        expected |= {tp / f"allreduce_report_{stem}.md", tp / f"allreduce_latency_{stem}.png"}
    assert set(written) == expected
    assert artifacts.planned_file_count(selections) == len(expected)
    assert all(p.is_file() for p in expected)
    assert written.notes == [] if find_spec("pytest_benchmark") else len(written.notes) == 1
    # no temporary files left behind
    assert not [p for p in tp.iterdir() if p.name.startswith(".")]


def test_config_comes_from_bfloat16_under_both_names(tmp_path, store, selections) -> None:
    artifacts.write_artifacts(store, selections, tmp_path, DEVICE_NAME)
    path = tmp_path / "tp2" / f"allreduce_config_hidden=4096,device={DEV}.json"
    text = path.read_text()
    assert (
        tmp_path / "tp2" / f"allreduce_config_hidden=4096,tp=2,device={DEV}.json"
    ).read_text() == text
    raw = json.loads(text)
    # The ends and both sides of the change; 2 runs what its neighbours run.
    assert list(raw) == ["1", "32", "128", "504"]
    assert raw["1"] == {
        "backend_type": "flashinfer_fusion",
        "use_residual_rmsnorm_fusion": True,
        "backend_name": "flashinfer_fusion_one_shot",
    }
    # SGLang's "nccl" path takes its own custom allreduce below 8 MiB: that is what runs.
    assert raw["504"] == {
        "backend_type": "nccl",
        "use_residual_rmsnorm_fusion": False,
        "backend_name": "custom_ar",
    }
    assert load_config(path).device == "cuda"
    evidence = json.loads(path.with_name(path.name.replace("config", "evidence")).read_text())
    assert evidence["config"]["dtype"] == "bfloat16"
    assert evidence["config"]["files"] == [
        f"allreduce_config_hidden=4096,device={DEV}.json",
        f"allreduce_config_hidden=4096,tp=2,device={DEV}.json",
    ]
    assert "bfloat16" in evidence["config"]["dtype_rule"]


def test_config_from_first_planned_dtype_without_bfloat16(tmp_path) -> None:
    store = build_store(("float16", "float32"))
    artifacts.write_artifacts(store, select_all(store), tmp_path, DEVICE_NAME)
    evidence = json.loads(
        (tmp_path / "tp2" / f"allreduce_evidence_hidden=4096,device={DEV}.json").read_text()
    )
    assert evidence["config"]["dtype"] == "float16"
    assert default_config_dtype(["float32", "bfloat16"]) == "bfloat16"
    assert default_config_dtype(["float32", "float16"]) == "float32"


def test_config_dtype_override(tmp_path, store, selections) -> None:
    artifacts.write_artifacts(
        store, selections, tmp_path, DEVICE_NAME, config_dtype_for=lambda ws, h: "float16"
    )
    path = tmp_path / "tp2" / f"allreduce_config_hidden=4096,device={DEV}.json"
    config = load_config(path)
    assert {(e.backend_type, e.backend_name) for e in config.values()} == {("nccl", "custom_ar")}


def test_evidence_records_the_consumer_every_entry_and_why(tmp_path, store, selections) -> None:
    artifacts.write_artifacts(store, selections, tmp_path, DEVICE_NAME)
    evidence = json.loads(
        (tmp_path / "tp2" / f"allreduce_evidence_hidden=4096,device={DEV}.json").read_text()
    )
    assert evidence["machine"]["device_name"] == DEVICE_NAME
    assert evidence["coverage"] == {"complete": True, "gaps": []}
    assert evidence["consumer"]["profile"] == "SGLang adaptive allreduce"
    assert evidence["consumer"]["multicast"] is False
    assert evidence["selection_rule"]["noise"]["drift_floor"] > 0
    avail = {row["backend"]: row for row in evidence["availability"]}
    assert avail["mscclpp"]["status"] == "skipped"
    assert avail["mscclpp"]["reason"] == "rank 1: mscclpp not installed"
    assert avail["nccl"]["status"] == "ran"
    bf16 = evidence["dtypes"]["bfloat16"]
    nccl_32 = bf16["backends"]["nccl"]["batch_sizes"]["32"]
    assert len(nccl_32["latency"]["fused"]["samples_us"]) == 30
    assert nccl_32["latency"]["allreduce"]["median_us"] > 0
    assert nccl_32["verdicts"]["numerics"]["outcome"] == "passed"
    two_shot = bf16["backends"]["flashinfer_fusion_two_shot"]["batch_sizes"]["32"]
    assert two_shot["verdicts"]["numerics"]["outcome"] == "failed"
    assert two_shot["eligible"] is False
    selection = bf16["selection"]
    choice = selection["choices"]["32"]
    assert choice["backend_name"] == "flashinfer_fusion_one_shot"
    assert choice["segment"]["accepted"] and choice["segment"]["sizes"] == [1, 2, 32]
    entries = {e["entry"]: e for e in selection["entries"]["32"]}
    assert entries["nccl"]["runs"] == "custom_ar" and entries["nccl"]["eligible"]
    assert "multicast" in entries["torch_symm_mem"]["declined"][0]
    assert {e["runs"] for e in entries.values()} == {"custom_ar", "flashinfer_fusion_one_shot"}


def test_evidence_reloads_into_the_same_selection(tmp_path, store, selections) -> None:
    artifacts.write_artifacts(store, selections, tmp_path, DEVICE_NAME)
    path = tmp_path / "tp2" / f"allreduce_evidence_hidden=4096,device={DEV}.json"
    again = store_from_evidence(json.loads(path.read_text()))
    key = GroupKey(WS, HIDDEN, "bfloat16")
    assert select(again, key).to_config() == selections[key].to_config()


def test_report_says_what_the_server_runs_and_the_speedup_over_no_file(
    tmp_path, store, selections
) -> None:
    artifacts.write_artifacts(store, selections, tmp_path, DEVICE_NAME)
    report = (
        tmp_path / "tp2" / f"allreduce_report_hidden=4096,dtype=bfloat16,device={DEV}.md"
    ).read_text()
    assert "mscclpp" in report and "rank 1: mscclpp not installed" in report
    runs = report.split("## What the server runs per batch size")[1].split("##")[0]
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.split("|")]
        for line in runs.splitlines()
        if line.startswith("| ") and line.split("|")[1].strip().isdigit()
    }
    assert rows["32"][3] == "**flashinfer_fusion (fused)**"
    assert rows["32"][4] == "flashinfer_fusion_one_shot" and rows["32"][5] == "fused"
    assert rows["504"][3] == "**nccl**" and rows["504"][4] == "custom_ar"
    assert rows["504"][5] == "composed"
    # Without a file SGLang runs flashinfer fusion up to 128 rows (150 us here), the
    # symmetric-memory entry above (its NCCL path on this multicast-off host: 100 us).
    assert float(rows["128"][10].rstrip("x")) == pytest.approx(1.5, abs=0.03)
    assert float(rows["504"][10].rstrip("x")) == pytest.approx(1.0, abs=0.03)
    assert rows["2"][2] == "" and rows["128"][2] == "key"
    assert "Speed-up against the consumer's no-file rule" in runs
    section = report.split("### Batch size 32")[1].split("###")[0]
    table = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    header_at = next(i for i, line in enumerate(table) if line.startswith("| variant"))
    header = [cell.strip() for cell in table[header_at].split("|")]
    chosen = [line for line in table[header_at + 1 :] if line.endswith("| yes |")]
    assert len(chosen) == 1 and "**flashinfer_fusion_one_shot**" in chosen[0]
    speedup = chosen[0].split("|")[header.index("speed-up vs standard entry")].strip()
    assert float(speedup.rstrip("x")) == pytest.approx(2.0, rel=0.03)
    bandwidth = header.index("algbw / busbw (GB/s)")
    algbw, busbw = (float(x) for x in chosen[0].split("|")[bandwidth].split("/"))
    assert busbw == pytest.approx(algbw, rel=0.01)  # 2(n-1)/n is 1 at world size 2
    two_shot = next(
        line for line in section.splitlines() if line.startswith("| flashinfer_fusion_two_shot")
    )
    assert "failed" in two_shot
    float16 = (
        tmp_path / "tp2" / f"allreduce_report_hidden=4096,dtype=float16,device={DEV}.md"
    ).read_text()
    assert "emitted from the bfloat16 selection" in float16


def test_a_partial_run_writes_beside_the_complete_config(tmp_path, store, selections) -> None:
    complete = artifacts.write_artifacts(store, selections, tmp_path, DEVICE_NAME)
    before = {p: p.read_bytes() for p in complete if p.parent.name == "tp2"}
    gaps = ("the numerics suite did not run every check at 3 planned case(s)",)
    partial = artifacts.write_artifacts(
        store,
        selections,
        tmp_path,
        DEVICE_NAME,
        coverage={(WS, HIDDEN): Coverage(WS, HIDDEN, gaps)},
    )
    tp = tmp_path / "tp2"
    assert {p.name for p in partial if p.parent == tp} == {
        f"allreduce_config_hidden=4096,device={DEV}.partial.json",
        f"allreduce_config_hidden=4096,tp=2,device={DEV}.partial.json",
        f"allreduce_evidence_hidden=4096,device={DEV}.partial.json",
        f"allreduce_report_hidden=4096,dtype=bfloat16,device={DEV}.partial.md",
        f"allreduce_report_hidden=4096,dtype=float16,device={DEV}.partial.md",
        f"allreduce_latency_hidden=4096,dtype=bfloat16,device={DEV}.partial.png",
        f"allreduce_latency_hidden=4096,dtype=float16,device={DEV}.partial.png",
    }
    assert all(p.read_bytes() == data for p, data in before.items())
    (note,) = partial.notes
    assert "partial" in note and gaps[0] in note
    evidence = json.loads(
        (tp / f"allreduce_evidence_hidden=4096,device={DEV}.partial.json").read_text()
    )
    assert evidence["coverage"] == {"complete": False, "gaps": list(gaps)}
    report = (
        tp / f"allreduce_report_hidden=4096,dtype=bfloat16,device={DEV}.partial.md"
    ).read_text()
    assert "Coverage: PARTIAL" in report


def test_plot_is_a_png_naming_the_chosen_backends(tmp_path, store, selections) -> None:
    artifacts.write_artifacts(store, selections, tmp_path, DEVICE_NAME)
    png = (
        tmp_path / "tp2" / f"allreduce_latency_hidden=4096,dtype=bfloat16,device={DEV}.png"
    ).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert b"1=flashinfer_fusion_one_shot" in png
    assert b"504=custom_ar" in png


def test_missing_matplotlib_skips_the_plot_with_a_note(
    tmp_path, store, selections, monkeypatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    written = artifacts.write_artifacts(store, selections, tmp_path, DEVICE_NAME)
    assert not [p for p in written if p.suffix == ".png"]
    assert len(written.notes) == 2
    assert all("matplotlib" in note for note in written.notes)


def test_second_run_replaces_files_atomically(tmp_path, store, selections) -> None:
    first = artifacts.write_artifacts(store, selections, tmp_path, DEVICE_NAME)
    before = {p: p.stat().st_ino for p in first}
    second = artifacts.write_artifacts(store, selections, tmp_path, DEVICE_NAME)
    assert set(first) == set(second)
    # os.replace of a new file: every path now names a different inode
    assert all(p.stat().st_ino != before[p] for p in second)
    assert not [p for p in (tmp_path / "tp2").iterdir() if p.name.startswith(".")]


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path, monkeypatch) -> None:
    target = tmp_path / "sub" / "file.txt"
    atomic_write(target, "old\n")
    assert target.read_text() == "old\n"
    assert oct(target.stat().st_mode & 0o777) == oct(0o644)

    def boom(src, dst) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, b"new\n")
    assert target.read_text() == "old\n"
    assert [p.name for p in target.parent.iterdir()] == ["file.txt"]


def test_no_winner_means_no_config_and_a_note(tmp_path) -> None:
    store = build_store(("bfloat16",))
    for case in list(store.verdicts):
        store.record_verdict(case, Verdict("graph", "failed", "replay mismatch"))
    written = artifacts.write_artifacts(store, select_all(store), tmp_path, DEVICE_NAME)
    assert not [p for p in written if "allreduce_config" in p.name]
    assert any("config not written" in note for note in written.notes)


# ---- benchmark.json --------------------------------------------------------------------------


def test_benchmark_json_structure(tmp_path, store, selections) -> None:
    pytest.importorskip("pytest_benchmark")
    from pytest_benchmark.stats import Stats

    artifacts.write_artifacts(store, selections, tmp_path, DEVICE_NAME)
    doc = json.loads((tmp_path / "benchmark.json").read_text())
    assert set(doc) == {
        "machine_info",
        "commit_info",
        "benchmarks",
        "datetime",
        "version",
        "pytest_allreduce",
    }
    ours = doc["pytest_allreduce"]
    assert ours["device"] == "cuda" and ours["device_name"] == DEVICE_NAME
    machine = ours["fingerprint"]
    assert machine["driver_version"] == "570.1"
    assert machine["cuda_version"] == "12.8" and machine["nccl_version"] == "2.27.3"
    assert machine["torch_version"] == "2.9.0" and machine["topology"] == "GPU0 X NV18"
    assert {"node", "machine", "python_version", "cpu"} <= set(doc["machine_info"])
    assert {"id", "time", "dirty", "project", "branch"} <= set(doc["commit_info"])
    # 2 dtypes x 5 sizes x 4 backends x 2 jobs
    assert len(doc["benchmarks"]) == 80
    bench = next(
        b
        for b in doc["benchmarks"]
        if b["params"]
        == {
            "backend": "custom_ar",
            "world_size": 2,
            "hidden": 4096,
            "dtype": "bfloat16",
            "batch_size": 504,
            "job": "fused",
        }
    )
    stats = bench["stats"]
    assert set(stats) == {*Stats.fields, "iterations", "data"}
    assert stats["median"] == pytest.approx(100e-6, rel=0.02)  # seconds
    assert stats["rounds"] == 30 and stats["iterations"] == 10
    assert bench["extra_info"]["chosen"] is True
    assert {"group", "name", "fullname", "params", "param", "options"} <= set(bench)
    # Every statistic is pytest-benchmark's own for the samples written (issue 14: the
    # quartiles, IQR and outlier counts of a hand-made file differed from its Stats).
    for record in doc["benchmarks"]:
        theirs = Stats()
        for sample in record["stats"]["data"]:
            theirs.update(sample)
        assert {f: record["stats"][f] for f in Stats.fields} == theirs.as_dict()


def test_benchmark_json_needs_pytest_benchmark(tmp_path, store, selections, monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "pytest_benchmark.stats", None)
    written = artifacts.write_artifacts(store, selections, tmp_path, DEVICE_NAME)
    assert not (tmp_path / "benchmark.json").exists()
    assert written.notes == [
        "benchmark.json not written: pytest-benchmark is not installed (pip install "
        "pytest-benchmark)"
    ]


def test_benchmark_json_loads_with_pytest_benchmark(tmp_path, store, selections) -> None:
    pytest.importorskip("pytest_benchmark")
    from pytest_benchmark.logger import Logger
    from pytest_benchmark.plugin import pytest_benchmark_group_stats
    from pytest_benchmark.storage.file import FileStorage

    artifacts.write_artifacts(store, selections, tmp_path, DEVICE_NAME)
    path = tmp_path / "benchmark.json"
    storage = FileStorage(tmp_path / "storage", logger=Logger(Logger.QUIET))
    loaded = list(storage.load_benchmarks(str(path)))
    assert len(loaded) == 80
    groups = pytest_benchmark_group_stats(config=None, benchmarks=loaded, group_by="group")
    assert len(groups) == 2 * 5 * 2  # one group per dtype, batch size and job

    done = subprocess.run(
        [sys.executable, "-m", "pytest_benchmark", "compare", str(path), "--group-by=group"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert "flashinfer_fusion_one_shot" in done.stdout
