"""The GPU benchmarks' CPU-testable parts: the all_reduce_perf parser, the report, the probe's
log reading and tables, and both scripts end to end on the CPU (gloo, wall clock).

tests/data/all_reduce_perf_h200x2.txt is written in all_reduce_perf 2.19.6's output format
(`-g 2 -b 8K -e 64M -f 2 -d bfloat16 -n 50 -w 10 -G 20 -c 1`) with the out-of-place times
measured on 2 x H200 (../shared/tools/nccl-tests/README.md); the in-place times and the
bandwidth columns are derived, and one NCCL log line is mixed in as a real run prints them."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLE = Path(__file__).resolve().parent / "data" / "all_reduce_perf_h200x2.txt"
README_OOP_US = [6.76, 7.00, 7.21, 7.27, 7.50, 8.54, 10.99, 15.35, 29.17, 34.25, 46.56,
                 72.63, 127.77, 231.61]  # fmt: skip


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        f"benchmarks_{name}", REPO / "benchmarks" / f"{name}.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[f"benchmarks_{name}"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


vs = _load("vs_nccl_tests")
probe = _load("pynccl_probe")


# ---- vs_nccl_tests -----------------------------------------------------------------------------


def test_parser_reads_every_result_line_of_a_recorded_run() -> None:
    rows = vs.parse_all_reduce_perf(SAMPLE.read_text())
    assert [r.bytes for r in rows] == [8192 << k for k in range(14)]
    assert [r.oop_us for r in rows] == README_OOP_US
    assert all(r.count == r.bytes // 2 and r.type == "bfloat16" for r in rows)
    assert all(r.oop_wrong == 0 and r.ip_wrong == 0 for r in rows)
    assert rows[0].ip_us == 6.71


def test_parser_unchecked_runs_and_extra_columns() -> None:
    line = "        8192          4096  bfloat16     sum      -1    6.80    1.20    1.20    N/A    6.75    1.21    1.21    N/A   1700000000"  # noqa: E501
    (row,) = vs.parse_all_reduce_perf(line)
    assert (row.oop_us, row.oop_wrong, row.ip_us, row.ip_wrong) == (6.80, None, 6.75, None)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("# only a header\n", "no result line"),
        ("8192 4096 bfloat16 sum -1 6.76 1.21\n", "line 1: 7 fields, expected 13"),
        ("#\n8192 4096 bfloat16 sum -1 fast 1.2 1.2 0 6.7 1.2 1.2 0\n", "line 2:"),
    ],
)
def test_parser_names_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ValueError, match="all_reduce_perf output") as info:
        vs.parse_all_reduce_perf(text)
    assert message in str(info.value)


def test_sizes_rows_and_bytes() -> None:
    assert vs.byte_sizes(vs.parse_bytes("8K"), vs.parse_bytes("64M"))[-1] == 64 << 20
    assert len(vs.byte_sizes(8192, 64 << 20)) == 14
    assert vs.rows_for(8192, 4096, "bfloat16") == 1
    assert vs.rows_for(64 << 20, 4096, "bfloat16") == 8192
    with pytest.raises(ValueError, match="whole number"):
        vs.rows_for(4096, 4096, "bfloat16")


def test_report_flags_the_raw_nccl_path_beyond_five_percent() -> None:
    reference = {r.bytes: r for r in vs.parse_all_reduce_perf(SAMPLE.read_text())}
    sizes = [8192, 16384]
    ours = {
        8192: {"pynccl": SimpleNamespace(median_us=7.0), "nccl": SimpleNamespace(median_us=8.5)},
        16384: {"pynccl": SimpleNamespace(median_us=7.7)},
    }
    steady = {8192: {"pynccl": SimpleNamespace(median_us=6.9)}}
    references = {"-G": reference, "-t 2": {8192: reference[8192]}}
    clocks = {"": ours, "launches=20": steady}
    records, lines = vs.report(sizes, references, clocks, ["pynccl", "nccl"], "# title")
    assert records == [
        {
            "bytes": 8192, "nccl_tests_us": 6.76, "pynccl_us": 7.0, "nccl_us": 8.5,
            "nccl_tests_other_us": {"-t 2": 6.76},
            "clocks": {"launches=20": {"pynccl_us": 6.9, "nccl_us": None}},
        },
        {
            "bytes": 16384, "nccl_tests_us": 7.0, "pynccl_us": 7.7, "nccl_us": None,
            "nccl_tests_other_us": {"-t 2": None},
            "clocks": {"launches=20": {"pynccl_us": None, "nccl_us": None}},
        },
    ]  # fmt: skip
    assert "| 8192 | 6.76 | 6.76 | 7.00 | +3.6% | 8.50 | +25.7% | 6.90 | +2.1% | - | - |" in lines
    assert lines[-3:] == [
        "Goal: pynccl [default timing] within 5% of nccl-tests -G at every size: "
        "NOT met at 16384 B (+10.0%).",
        "Goal: pynccl [launches=20] within 5% of nccl-tests -G at every size: met.",
        "Goal: pynccl [default timing] within 5% of nccl-tests -t 2 at every size: met.",
    ]


def test_the_per_process_run_is_mpiexec_with_one_gpu_each_and_becomes_the_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sample = SAMPLE.read_text()
    calls: list[tuple[list[str], dict[str, str], tuple[Path, ...]]] = []

    def fake_run(
        command: list[str],
        settings: dict[str, str],
        drop: tuple[str, ...] = (),
        lib_dirs: tuple[Path, ...] = (),
    ) -> str:
        calls.append((command, settings, lib_dirs))
        # The per-process run reads 10% slower, so that the reference visibly changes.
        if command[0].endswith("mpiexec"):
            return sample.replace("   6.76 ", "   7.44 ")
        return sample

    monkeypatch.setattr(vs, "build_nccl_tests_mpi", lambda home, rebuild: tmp_path / "arp")
    monkeypatch.setattr(vs, "run_nccl_tests", fake_run)
    args = SimpleNamespace(
        mpi_home=tmp_path / "mpi", rebuild=False, sizes=[8192, 16384], dtype="bfloat16",
        iters=50, warmup_iters=10, graph_launches=20,
    )  # fmt: skip
    others: dict = {}
    run: dict = {}
    per_process = vs.run_per_process(args, {"NCCL_X": "1"}, run, others)
    (spread, spread_env, lib), (single, single_env, _) = calls
    assert spread[:6] == [str(tmp_path / "mpi/bin/mpiexec"), "-n", "2", str(tmp_path / "arp"),
                          "-g", "1"]  # fmt: skip
    assert spread[6:] == single[3:] and single[1:3] == ["-g", "2"]
    assert spread_env["NCCL_X"] == single_env["NCCL_X"] == "1"
    assert lib == (tmp_path / "mpi/lib",)
    assert per_process[8192].oop_us == 7.44
    assert others["-G, MPI build, -g 2"][8192].oop_us == 6.76
    assert set(run["nccl_tests_mpi"]) == {"per_process", "one_process"}
    references = {vs.ONE_PROCESS_PER_GPU: per_process, **others}
    ours = {"": {8192: {"pynccl": SimpleNamespace(median_us=7.3)}}}
    records, lines = vs.report([8192], references, ours, ["pynccl"], "# t")
    assert records[0]["nccl_tests_us"] == 7.44
    assert records[0]["nccl_tests_other_us"] == {"-G, MPI build, -g 2": 6.76}
    assert lines[-2:] == [
        f"Goal: pynccl [default timing] within 5% of nccl-tests {vs.ONE_PROCESS_PER_GPU} at "
        "every size: met.",
        "Goal: pynccl [default timing] within 5% of nccl-tests -G, MPI build, -g 2 at every "
        "size: NOT met at 8192 B (+8.0%).",
    ]


def test_vs_nccl_tests_on_the_cpu_writes_the_docs_json(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "vs_nccl_tests.py"), "--device", "cpu",
         "--backends", "gloo,cpu_shm", "--nccl-tests-output", str(SAMPLE),
         "--max-bytes", "16K", "--out", str(tmp_path), "--also-timing", "launches=3,samples=4"],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    records = json.loads((tmp_path / "vs-nccl-tests.json").read_text())
    keys = {"bytes", "nccl_tests_us", "gloo_us", "cpu_shm_us", "clocks"}
    assert [set(r) for r in records] == [keys] * 2
    assert [(r["bytes"], r["nccl_tests_us"]) for r in records] == [(8192, 6.76), (16384, 7.0)]
    assert all(r["gloo_us"] > 0 and r["cpu_shm_us"] > 0 for r in records)
    assert all(r["clocks"]["launches=3,samples=4"]["gloo_us"] > 0 for r in records)
    run = json.loads((tmp_path / "vs-nccl-tests-run.json").read_text())
    # Timed with the latency suite's code: the CPU plan's samples, interleaved, wall clock;
    # the extra plan's samples each cover its 3 launches.
    default, steady = run["ours"]["default"], run["ours"]["launches=3,samples=4"]
    lats = [lat for plan in (default, steady) for per in plan.values() for lat in per.values()]
    assert {lat["clock"] for lat in lats} == {"wall_clock"}
    assert all(len(lat["samples_us"]) == 8 for per in default.values() for lat in per.values())
    assert all(
        (len(lat["samples_us"]), lat["ops_per_sample"]) == (4, 3)
        for per in steady.values()
        for lat in per.values()
    )
    assert (tmp_path / "vs-nccl-tests.md").read_text().count("\n| 8192 |") == 1


# ---- pynccl_probe ------------------------------------------------------------------------------

NCCL_LOG = """\
gpu-host:512:512 [0] NCCL INFO NCCL_DEBUG_SUBSYS set by environment to ENV.
gpu-host:512:530 [0] NCCL INFO NCCL_GRAPH_MIXING_SUPPORT set by environment to 0.
gpu-host:513:531 [1] NCCL INFO NCCL_GRAPH_MIXING_SUPPORT set by environment to 0.
gpu-host:512:512 [0] NCCL INFO NCCL_DEBUG_FILE set by environment to /tmp/p/m.%h.%p.nccl.log.
"""


def test_probe_reads_what_nccl_took_from_the_environment() -> None:
    read = probe.nccl_env_read(NCCL_LOG)
    assert read["NCCL_GRAPH_MIXING_SUPPORT"] == ["0"]
    assert read["NCCL_DEBUG_FILE"] == ["/tmp/p/m.%h.%p.nccl.log"]
    launch = {"env": {"NCCL_GRAPH_MIXING_SUPPORT": "0"}, "nccl_env_read": read}
    assert probe.took(launch) == "yes"
    launch["nccl_env_read"] = {}
    assert probe.took(launch).startswith("NOT CONFIRMED: NCCL_GRAPH_MIXING_SUPPORT=0")


def test_probe_helpers() -> None:
    assert [probe.parse_bytes(s) for s in ("8K", "1M", "16MiB", "4096")] == [
        8192, 1 << 20, 16 << 20, 4096,
    ]  # fmt: skip
    with pytest.raises(ValueError, match="not a byte size"):
        probe.parse_bytes("lots")
    assert probe.size_label(16 << 20) == "16 MiB" and probe.size_label(8192) == "8 KiB"
    nodes = Counter({"KERNEL": 10, "EVENT_RECORD": 10, "WAIT_EVENT": 1})
    assert probe.per_op_nodes(nodes, 10) == {"EVENT_RECORD": 1.0, "KERNEL": 1.0, "WAIT_EVENT": 0.1}


def test_probe_on_the_cpu_runs_every_launch_and_writes_its_table(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pynccl_probe.py"), "--device", "cpu",
         "--sizes", "8K", "--ops", "1,3", "--samples", "3",
         "--launches", "default,mixing_off", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    result = json.loads((tmp_path / "pynccl-probe.json").read_text())
    assert list(result["launches"]) == ["default", "mixing_off"]
    for launch in result["launches"].values():
        assert {(r["variant"], r["ops"]) for r in launch["rows"]} == {
            (v, n) for v in ("gloo", "gloo_inplace") for n in (1, 3)
        }
        assert all(len(r["aligned_us"]) == 3 and r["aligned_median_us"] > 0 for r in launch["rows"])
    table = (tmp_path / "pynccl-probe.md").read_text()
    assert "| default | gloo | " in table and "| N=3 / N=1 |" in table
    assert "| mixing_off | NCCL_GRAPH_MIXING_SUPPORT=0 | n/a (no NCCL on the CPU) |" in table


# ---- timing_invariance -------------------------------------------------------------------------

invariance = _load("timing_invariance")


def test_differencing_cancels_a_per_replay_constant() -> None:
    # 7 us per op plus 40 us per replay (skew, graph head and tail): the estimate is 7.
    per_op = {n: 7.0 + 40.0 / n for n in (10, 50, 200, 1000)}
    estimate, worst, ok = invariance.verdict(per_op)
    assert estimate == pytest.approx(7.0)
    assert worst == pytest.approx(4.0 / 7.0) and not ok
    flat = {10: 7.1, 50: 7.0, 200: 7.05, 1000: 7.02}
    assert invariance.verdict(flat)[2]


def test_timing_invariance_on_the_cpu(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "timing_invariance.py"), "--device", "cpu",
         "--backends", "gloo", "--sizes", "8K", "--ops", "1,2", "--samples", "3",
         "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    # Wall-clock microseconds on a shared CPU are not expected to be flat: only the plumbing.
    assert done.returncode in (0, 1), done.stdout + done.stderr
    record = json.loads((tmp_path / "timing-invariance.json").read_text())
    assert set(record["per_op_median_us"]["gloo"]["8192"]) == {"1", "2"}
    assert "| gloo | 8192 |" in (tmp_path / "timing-invariance.md").read_text()


def test_a_main_timing_plan_fills_the_json_and_the_suites_plan_goes_under_default() -> None:
    reference = {r.bytes: r for r in vs.parse_all_reduce_perf(SAMPLE.read_text())}
    like = {8192: {"pynccl": SimpleNamespace(median_us=6.8)}}
    suite = {8192: {"pynccl": SimpleNamespace(median_us=7.5)}}
    records, lines = vs.report(
        [8192], {"-G": reference}, {"rotate=64M": like, "": suite}, ["pynccl"], "# t"
    )
    assert records == [
        {"bytes": 8192, "nccl_tests_us": 6.76, "pynccl_us": 6.8,
         "clocks": {"default": {"pynccl_us": 7.5}}},
    ]  # fmt: skip
    assert lines[-2:] == [
        "Goal: pynccl [rotate=64M] within 5% of nccl-tests -G at every size: met.",
        "Goal: pynccl [default timing] within 5% of nccl-tests -G at every size: "
        "NOT met at 8192 B (+10.9%).",
    ]
