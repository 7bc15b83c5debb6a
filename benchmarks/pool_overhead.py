"""Figures for the closing note: what the rank pool costs per test on the CPU.

Prints
1. the pool's per-test dispatch overhead for a trivial distributed test (one 1-element
   gloo allreduce), measured (a) directly on one 2-rank pool and (b) through pytest with the
   `allreduce_session` fixture, per-test call times taken from a JUnit XML report;
2. the cost of a fresh process group per test (what PyTorch's per-test spawn pays): start a
   2-rank pool, run the trivial function once, close it;
3. the wall time of the README's main command, `python -m pytest suites/`, on this machine;
and a Markdown table of the figures with the machine they were taken on.

    python benchmarks/pool_overhead.py [--tests N] [--fresh N] [--main-runs N] [--skip-main]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import textwrap
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from pytest_allreduce.pool import RankPool

REPO = Path(__file__).resolve().parent.parent
RANK_MODULE = "overhead_ranks"


def trivial_allreduce(ctx: Any) -> float:
    """The trivial distributed test: one allreduce of a 1-element tensor on the CPU group."""
    t = torch.ones(1)
    dist.all_reduce(t, group=ctx.cpu_group)
    return float(t.item())


@dataclass
class Stats:
    n: int
    p10: float
    median: float
    p90: float

    @classmethod
    def of(cls, seconds: list[float]) -> Stats:
        a = np.asarray(seconds, dtype=np.float64)
        p10, med, p90 = np.percentile(a, [10, 50, 90])
        return cls(len(a), float(p10), float(med), float(p90))

    def ms(self) -> str:
        return (
            f"median {self.median * 1e3:.3f} ms "
            f"(p10 {self.p10 * 1e3:.3f}, p90 {self.p90 * 1e3:.3f}; n={self.n})"
        )


# ---- 1a: direct ------------------------------------------------------------------------------


def measure_direct(n_tests: int, warmup: int = 10) -> Stats:
    pool = RankPool(2, "cpu", 60.0).start()
    try:
        for _ in range(warmup):
            pool.run(trivial_allreduce)
        times = []
        for _ in range(n_tests):
            t0 = time.perf_counter()
            result = pool.run(trivial_allreduce)
            times.append(time.perf_counter() - t0)
            assert result == [2.0, 2.0], result
    finally:
        pool.close()
    return Stats.of(times)


# ---- 1b: through pytest ----------------------------------------------------------------------

RANK_MODULE_SOURCE = '''\
"""Rank functions for the generated tests; imported by the ranks by module name."""

import torch
import torch.distributed as dist


def trivial_allreduce(ctx):
    t = torch.ones(1)
    dist.all_reduce(t, group=ctx.cpu_group)
    return float(t.item())


def module_file(ctx):
    return __file__
'''

# The rootdir conftest: pytest (prepend import mode) inserts its directory into sys.path,
# which the spawned ranks inherit, so they can import the rank module. It also writes each
# test's call-phase duration unrounded (JUnit XML rounds to 1 ms, --durations to 10 ms).
CONFTEST_SOURCE = '''\
"""Rootdir conftest: puts this directory on sys.path; records call durations."""

import json
import os


def pytest_runtest_logreport(report):
    if report.when == "call":
        with open(os.environ["POOL_OVERHEAD_DURATIONS"], "a") as f:
            f.write(json.dumps([report.nodeid, report.duration]) + "\\n")
'''


def test_file_source(n_tests: int) -> str:
    head = textwrap.dedent(
        f"""\
        import sys
        from pathlib import Path

        import pytest

        from {RANK_MODULE} import module_file, trivial_allreduce

        HERE = str(Path(__file__).resolve().parent)


        def test_000_warmup_and_sys_path(allreduce_session):
            # Starts the pool (not measured) and checks how the ranks find the rank module.
            assert HERE in sys.path, sys.path
            files = allreduce_session.engine.call(2, module_file)
            assert [str(Path(f).resolve().parent) for f in files] == [HERE, HERE], files


        @pytest.mark.parametrize("i", range({n_tests}))
        def test_trivial(allreduce_session, i):
            assert allreduce_session.engine.call(2, trivial_allreduce) == [2.0, 2.0]
        """
    )
    return head


@dataclass
class PytestResult:
    calls: Stats  # from the conftest's unrounded call durations
    junit_calls: Stats  # from the JUnit XML testcase times (1 ms resolution)
    warmup_call_s: float
    wall_s: float
    summary: str
    durations_lines: int


def summary_line(output: str) -> str:
    lines = [ln.strip() for ln in output.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if re.search(r"\b(passed|failed|error|errors|skipped|no tests ran)\b", ln) and " in " in ln:
            return ln.strip("= ")
    return lines[-1] if lines else "(no output)"


def measure_pytest(n_tests: int) -> PytestResult:
    with tempfile.TemporaryDirectory(prefix="pool-overhead-") as tmp:
        root = Path(tmp).resolve()
        (root / f"{RANK_MODULE}.py").write_text(RANK_MODULE_SOURCE)
        (root / "conftest.py").write_text(CONFTEST_SOURCE)
        (root / "test_overhead.py").write_text(test_file_source(n_tests))
        junit = root / "junit.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--durations=0",
            f"--rootdir={root}",
            f"--junitxml={junit}",
            "-o",
            "junit_duration_report=call",  # the test's call phase only, not fixture set-up
            f"--allreduce-output-dir={root / 'results'}",
            "test_overhead.py",
        ]
        durations_file = root / "durations.jsonl"
        env = {**os.environ, "POOL_OVERHEAD_DURATIONS": str(durations_file)}
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        output = proc.stdout + proc.stderr
        if proc.returncode != 0:
            print(output)
            raise SystemExit(f"generated pytest run failed with exit status {proc.returncode}")
        times: dict[str, float] = {}
        for case in ET.parse(junit).getroot().iter("testcase"):
            times[case.attrib["name"]] = float(case.attrib["time"])
        warmup = times.pop("test_000_warmup_and_sys_path")
        if len(times) != n_tests:
            raise SystemExit(f"expected {n_tests} trivial tests in {junit}, found {len(times)}")
        precise = dict(json.loads(line) for line in durations_file.read_text().splitlines())
        precise_calls = [d for nodeid, d in precise.items() if "test_trivial" in nodeid]
        if len(precise_calls) != n_tests:
            raise SystemExit(f"expected {n_tests} call durations, found {len(precise_calls)}")
        # --durations prints to 10 ms and hides calls under 5 ms: a cross-check only.
        durations_lines = len(re.findall(r"^\s*[\d.]+s call\s+test_overhead", output, re.M))
        return PytestResult(
            Stats.of(precise_calls),
            Stats.of(list(times.values())),
            warmup,
            wall,
            summary_line(output),
            durations_lines,
        )


# ---- 2: a fresh process group per test -------------------------------------------------------


@dataclass
class FreshResult:
    total: Stats
    start: Stats
    close: Stats


def measure_fresh(cycles: int) -> FreshResult:
    totals, starts, closes = [], [], []
    for _ in range(cycles):
        t0 = time.perf_counter()
        pool = RankPool(2, "cpu", 60.0).start()
        t1 = time.perf_counter()
        try:
            assert pool.run(trivial_allreduce) == [2.0, 2.0]
        finally:
            t2 = time.perf_counter()
            pool.close()
        t3 = time.perf_counter()
        totals.append(t3 - t0)
        starts.append(t1 - t0)
        closes.append(t3 - t2)
    return FreshResult(Stats.of(totals), Stats.of(starts), Stats.of(closes))


# ---- 3: the README's main command ------------------------------------------------------------


def measure_main(runs: int) -> list[tuple[float, str, int]]:
    results = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory(prefix="pool-overhead-main-") as out:
            cmd = [sys.executable, "-m", "pytest", "suites/", f"--allreduce-output-dir={out}"]
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            wall = time.perf_counter() - t0
        results.append((wall, summary_line(proc.stdout + proc.stderr), proc.returncode))
    return results


# ---- machine ---------------------------------------------------------------------------------


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def other_pytest_processes() -> int:
    """Processes other than this one whose command line mentions pytest (run this script
    when it reports none: the figures are only meaningful on an otherwise idle machine)."""
    count = 0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        count += b"pytest" in cmdline
    return count


def load_note() -> str:
    one, five, fifteen = os.getloadavg()
    return (
        f"load average {one:.2f}, {five:.2f}, {fifteen:.2f};"
        f" other pytest processes: {other_pytest_processes()}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=200, help="trivial tests (default 200)")
    parser.add_argument("--fresh", type=int, default=10, help="fresh-pool cycles (default 10)")
    parser.add_argument("--main-runs", type=int, default=1, help="runs of pytest suites/")
    parser.add_argument("--skip-main", action="store_true", help="skip pytest suites/")
    args = parser.parse_args()

    nproc = os.cpu_count() or 0
    machine = f"{nproc} CPUs ({cpu_model()}), torch {torch.__version__}, Python "
    machine += platform.python_version()
    print(f"machine: {machine}")
    print(f"before: {load_note()}")

    print(f"\n[1a] direct: {args.tests} x pool.run(trivial_allreduce), 2-rank gloo pool")
    direct = measure_direct(args.tests)
    print(f"     per call: {direct.ms()}")

    print(f"\n[1b] pytest: {args.tests} tests of allreduce_session.engine.call(2, ...)")
    via_pytest = measure_pytest(args.tests)
    print(f"     per test (call phase, unrounded): {via_pytest.calls.ms()}")
    print(f"     per test (junitxml, call phase, 1 ms resolution): {via_pytest.junit_calls.ms()}")
    print(
        f"     warm-up test (pool start + fingerprint): {via_pytest.warmup_call_s * 1e3:.1f} ms;"
        f" ranks imported {RANK_MODULE} from the temp dir on sys.path: yes"
    )
    print(
        f"     pytest wall {via_pytest.wall_s:.2f} s, {via_pytest.summary};"
        f" --durations listed {via_pytest.durations_lines} call lines (>= 5 ms)"
    )

    print(f"\n[2] fresh process group per test: {args.fresh} x (start + 1 trivial run + close)")
    fresh = measure_fresh(args.fresh)
    print(f"     per cycle: {fresh.total.ms()}")
    print(f"     of which start: {fresh.start.ms()}")
    print(f"     of which close: {fresh.close.ms()}")

    main_results: list[tuple[float, str, int]] = []
    if not args.skip_main:
        print(f"\n[3] python -m pytest suites/ in {REPO} ({args.main_runs} run(s))")
        main_results = measure_main(args.main_runs)
        for i, (wall, summary, rc) in enumerate(main_results, 1):
            print(f"     run {i}: {wall:.1f} s, exit status {rc}: {summary}")
    print(f"\nafter: {load_note()}")

    ratio = fresh.total.median / direct.median
    rows = [
        ("pool dispatch, direct (median, p10-p90)", direct),
        ("pool dispatch, through pytest, call phase (median, p10-p90)", via_pytest.calls),
        ("same, JUnit XML times (1 ms resolution)", via_pytest.junit_calls),
        ("fresh process group per test (median, p10-p90)", fresh.total),
    ]
    print("\n| figure | value |")
    print("|---|---|")
    for label, s in rows:
        value = f"{s.median * 1e3:.2f} ms ({s.p10 * 1e3:.2f}-{s.p90 * 1e3:.2f}), n={s.n}"
        print(f"| {label} | {value} |")
    print(f"| fresh group / pooled dispatch (medians) | {ratio:.0f}x |")
    for i, (wall, summary, _) in enumerate(main_results, 1):
        print(f"| `python -m pytest suites/` wall, run {i} | {wall:.1f} s ({summary}) |")
    print(f"| machine | {nproc} CPUs, {cpu_model()}, torch {torch.__version__} |")


if __name__ == "__main__":
    main()
