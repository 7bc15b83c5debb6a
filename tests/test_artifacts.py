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
from pytest_allreduce.config import load_config
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
    """nccl everywhere; flashinfer fusion twice as fast up to 32 rows in bfloat16; a failed
    custom_ar that would be fastest; an unavailable mscclpp."""
    store = ResultStore("cuda")
    store.machine = {
        "device_type": "cuda",
        "device_name": DEVICE_NAME,
        "device_count": 8,
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
        "custom_ar": ("custom_allreduce", 20, False),
        "flashinfer_fusion_one_shot": ("flashinfer_fusion", 40, True),
        "mscclpp": (None, 60, False),
    }
    for name, (btype, simplicity, fused) in backends.items():
        store.declare(VariantInfo(name, btype, fused, simplicity))
        available = name != "mscclpp"
        reason = "" if available else "rank 1: mscclpp not installed"
        store.record_availability(Availability(name, WS, available, reason))
    seed = 0
    for dtype in dtypes:
        for bs in SIZES:
            for name in ("nccl", "custom_ar", "flashinfer_fusion_one_shot"):
                case = Target(name, WS, HIDDEN, dtype).at(bs)
                numerics = "failed" if name == "custom_ar" else "passed"
                store.record_verdict(case, Verdict("numerics", numerics, "exact sum"))
                store.record_verdict(case, Verdict("graph", "passed", "replay"))
                fused = 50.0 if name == "custom_ar" else 100.0
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


def test_config_comes_from_bfloat16_with_ascending_keys(tmp_path, store, selections) -> None:
    artifacts.write_artifacts(store, selections, tmp_path, DEVICE_NAME)
    path = tmp_path / "tp2" / f"allreduce_config_hidden=4096,device={DEV}.json"
    raw = json.loads(path.read_text())
    assert list(raw) == ["1", "2", "32", "128", "504"]
    assert raw["1"] == {
        "backend_type": "flashinfer_fusion",
        "use_residual_rmsnorm_fusion": True,
        "backend_name": "flashinfer_fusion_one_shot",
    }
    assert raw["504"] == {
        "backend_type": "nccl",
        "use_residual_rmsnorm_fusion": False,
        "backend_name": "nccl",
    }
    assert load_config(path).device == "cuda"
    evidence = json.loads(path.with_name(path.name.replace("config", "evidence")).read_text())
    assert evidence["config"]["dtype"] == "bfloat16"
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
    assert {e.backend_name for e in load_config(path).values()} == {"nccl"}


def test_evidence_holds_samples_verdicts_availability_and_reasons(
    tmp_path, store, selections
) -> None:
    artifacts.write_artifacts(store, selections, tmp_path, DEVICE_NAME)
    evidence = json.loads(
        (tmp_path / "tp2" / f"allreduce_evidence_hidden=4096,device={DEV}.json").read_text()
    )
    assert evidence["machine"]["device_name"] == DEVICE_NAME
    avail = {row["backend"]: row for row in evidence["availability"]}
    assert avail["mscclpp"]["status"] == "skipped"
    assert avail["mscclpp"]["reason"] == "rank 1: mscclpp not installed"
    assert avail["nccl"]["status"] == "ran"
    bf16 = evidence["dtypes"]["bfloat16"]
    nccl_32 = bf16["backends"]["nccl"]["batch_sizes"]["32"]
    assert len(nccl_32["latency"]["fused"]["samples_us"]) == 30
    assert nccl_32["latency"]["allreduce"]["median_us"] > 0
    assert nccl_32["verdicts"]["numerics"]["outcome"] == "passed"
    custom = bf16["backends"]["custom_ar"]["batch_sizes"]["32"]
    assert custom["verdicts"]["numerics"]["outcome"] == "failed"
    assert custom["eligible"] is False
    choice = bf16["selection"]["choices"]["32"]
    assert choice["backend_name"] == "flashinfer_fusion_one_shot"
    assert choice["beaten"] == ["nccl"]
    assert choice["comparisons"][0]["p_value"] < 0.01
    assert "numerics failed" in bf16["selection"]["excluded"]["32"]["custom_ar"]


def test_report_marks_the_chosen_backend(tmp_path, store, selections) -> None:
    artifacts.write_artifacts(store, selections, tmp_path, DEVICE_NAME)
    report = (
        tmp_path / "tp2" / f"allreduce_report_hidden=4096,dtype=bfloat16,device={DEV}.md"
    ).read_text()
    assert "mscclpp" in report and "rank 1: mscclpp not installed" in report
    section = report.split("### Batch size 32")[1].split("###")[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "---" not in line]
    chosen_rows = [line for line in rows[1:] if line.endswith("| chosen |")]
    assert len(chosen_rows) == 1
    assert "**flashinfer_fusion_one_shot**" in chosen_rows[0]
    header = [cell.strip() for cell in rows[0].split("|")]
    column = next(i for i, cell in enumerate(header) if cell.startswith("speedup vs fastest"))
    speedup = chosen_rows[0].split("|")[column].strip()
    bandwidth = header.index("algbw / busbw (GB/s)")
    algbw, busbw = (float(x) for x in chosen_rows[0].split("|")[bandwidth].split("/"))
    assert busbw == pytest.approx(algbw, rel=0.01)  # 2(n-1)/n is 1 at world size 2
    assert float(speedup.rstrip("x")) == pytest.approx(2.0, rel=0.03)
    custom_row = next(line for line in section.splitlines() if line.startswith("| custom_ar"))
    assert "failed" in custom_row
    large = report.split("### Batch size 504")[1]
    assert "| **nccl** |" in large
    float16 = (
        tmp_path / "tp2" / f"allreduce_report_hidden=4096,dtype=float16,device={DEV}.md"
    ).read_text()
    assert "emitted from the bfloat16 selection" in float16


def test_plot_is_a_png_naming_the_chosen_backends(tmp_path, store, selections) -> None:
    artifacts.write_artifacts(store, selections, tmp_path, DEVICE_NAME)
    png = (
        tmp_path / "tp2" / f"allreduce_latency_hidden=4096,dtype=bfloat16,device={DEV}.png"
    ).read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n")
    assert b"1=flashinfer_fusion_one_shot" in png
    assert b"504=nccl" in png


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
    # 2 dtypes x 5 sizes x 3 backends x 2 jobs
    assert len(doc["benchmarks"]) == 60
    bench = next(
        b
        for b in doc["benchmarks"]
        if b["params"]
        == {
            "backend": "nccl",
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
    assert len(loaded) == 60
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
