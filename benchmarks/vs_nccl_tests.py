"""nccl-tests' all_reduce_perf -G beside this plugin's own timing, in one run on the GPU machine.

Builds all_reduce_perf (nccl-tests 2.19.6, against the NCCL library torch loads) with the tools
folder's build-on-device.sh, runs

    all_reduce_perf -g 2 -b 8K -e 64M -f 2 -d bfloat16 -n 50 -w 10 -G 20 -c 1

(one process driving both GPUs; per size, 50 ops captured in one graph launched 20 times and
timed with the host clock, so each figure covers 1000 ops), reads its out-of-place times, then
times the plugin's nccl and pynccl backends at the same byte sizes (bfloat16, hidden 4096: 8 KiB
is 1 row, 64 MiB 8192 rows) with the code the latency suite runs (Engine.measure_interleaved,
the bare allreduce job), and writes to --out (default $OUT):

    vs-nccl-tests.md        the table, each backend's difference from nccl-tests, the 5% goal
    vs-nccl-tests.json      [{"bytes", "nccl_tests_us", "pynccl_us", "nccl_us"}, ...]
    vs-nccl-tests-run.json  everything behind it: commands, raw output, samples, fingerprint

nccl_tests_us is nccl-tests under the NCCL settings the plugin's ranks run with
(pytest_allreduce.nccl_env); the table also shows it under NCCL's own defaults.

Without MPI, all_reduce_perf drives both GPUs from one process (-g 2, or threads with -t 2
-g 1), while the plugin, like every tensor-parallel server, runs one process per GPU. With
--mpi-home (an MPI installation: bin/mpiexec, include/mpi.h, lib/libmpi.so; the MPICH wheel
from PyPI, unpacked, is one) all_reduce_perf is also built with MPI and run as

    mpiexec -n 2 all_reduce_perf -g 1 ...    (one process per GPU, the same graphs and clock)

and that run becomes nccl_tests_us, the figure every difference is taken against; the
single-process run stays in the table and in nccl_tests_other_us. The same MPI binary is also
run as one process with -g 2, so that the binary itself is not what differs.

    python benchmarks/vs_nccl_tests.py --tools .tools/nccl-tests
    python benchmarks/vs_nccl_tests.py --device cpu --backends gloo,cpu_shm \\
        --nccl-tests-output recorded.txt --max-bytes 32K    # our side only, on the CPU
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pytest_allreduce.timing import parse_bytes

NCCL_TESTS_HOME = Path("/tmp/nccl-tests")  # where build-on-device.sh builds
ALL_REDUCE_PERF = NCCL_TESTS_HOME / "build" / "all_reduce_perf"
ALL_REDUCE_PERF_MPI = NCCL_TESTS_HOME / "build-mpi" / "all_reduce_perf"
ONE_PROCESS_PER_GPU = "-G, mpiexec -n 2, -g 1"
GOAL = 0.05  # the raw-NCCL path within 5% of nccl-tests -G
RAW_NCCL_BACKEND = "pynccl"
ITEMSIZE = {"bfloat16": 2, "float16": 2, "float32": 4}
NCCL_TESTS_TYPE = {"bfloat16": "bfloat16", "float16": "half", "float32": "float"}


@dataclass(frozen=True)
class NcclTestsRow:
    """One result line of all_reduce_perf: out-of-place and in-place time, wrong counts."""

    bytes: int
    count: int
    type: str
    oop_us: float
    oop_wrong: int | None  # None when not checked (-c 0 prints N/A)
    ip_us: float
    ip_wrong: int | None


def _wrong(text: str) -> int | None:
    return None if text == "N/A" else int(text)


def parse_all_reduce_perf(text: str) -> list[NcclTestsRow]:
    """The result lines of all_reduce_perf's output, in order.

    Header and footer lines start with '#'; log lines (NCCL INFO/WARN, build banners) do not
    start with a number and are skipped. A line that starts with a number is a result line:
    size, count, type, redop, root, then time, algbw, busbw, #wrong out of place and the same
    in place (extra trailing columns, -S or -I, are ignored). ValueError naming the line when
    one is malformed, or when there is none.
    """
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields or line.lstrip().startswith("#") or not fields[0].isdigit():
            continue
        if len(fields) < 13:
            raise ValueError(
                f"all_reduce_perf output line {number}: {len(fields)} fields, expected 13 "
                f"(size count type redop root, then time algbw busbw #wrong twice): {line!r}"
            )
        try:
            rows.append(
                NcclTestsRow(
                    bytes=int(fields[0]),
                    count=int(fields[1]),
                    type=fields[2],
                    oop_us=float(fields[5]),
                    oop_wrong=_wrong(fields[8]),
                    ip_us=float(fields[9]),
                    ip_wrong=_wrong(fields[12]),
                )
            )
        except ValueError as exc:
            raise ValueError(f"all_reduce_perf output line {number}: {exc}: {line!r}") from None
    if not rows:
        raise ValueError("all_reduce_perf output holds no result line")
    return rows


def byte_sizes(smallest: int, largest: int) -> list[int]:
    sizes = []
    size = smallest
    while size <= largest:
        sizes.append(size)
        size *= 2
    return sizes


def rows_for(nbytes: int, hidden: int, dtype: str) -> int:
    row = hidden * ITEMSIZE[dtype]
    if nbytes % row or nbytes < row:
        raise ValueError(f"{nbytes} bytes is not a whole number of {row}-byte rows")
    return nbytes // row


# ---- nccl-tests --------------------------------------------------------------------------------


def build_nccl_tests(tools: Path, rebuild: bool) -> Path:
    if ALL_REDUCE_PERF.is_file() and not rebuild:
        print(f"reusing {ALL_REDUCE_PERF}", flush=True)
        return ALL_REDUCE_PERF
    script = tools / "build-on-device.sh"
    if not script.is_file():
        raise FileNotFoundError(f"{script} not found: --tools must be the nccl-tests tools folder")
    print(f"building nccl-tests with {script} (1-2 min)", flush=True)
    subprocess.run(["bash", str(script), str(tools)], check=True, timeout=600)
    return ALL_REDUCE_PERF


def build_nccl_tests_mpi(mpi_home: Path, rebuild: bool) -> Path:
    """all_reduce_perf alone, built with MPI into its own folder from the source and NCCL
    link that build_nccl_tests left in NCCL_TESTS_HOME."""
    if ALL_REDUCE_PERF_MPI.is_file() and not rebuild:
        print(f"reusing {ALL_REDUCE_PERF_MPI}", flush=True)
        return ALL_REDUCE_PERF_MPI
    for needed in ("bin/mpiexec", "include/mpi.h", "lib/libmpi.so"):
        if not (mpi_home / needed).exists():
            raise FileNotFoundError(f"--mpi-home {mpi_home}: no {needed} there")
    print(f"building nccl-tests' all_reduce_perf with MPI from {mpi_home}", flush=True)
    log = NCCL_TESTS_HOME / "build-mpi.log"
    with log.open("w") as sink:
        done = subprocess.run(
            ["make", "-C", str(NCCL_TESTS_HOME / "src"), "-j16", "MPI=1",
             f"MPI_HOME={mpi_home}", f"NCCL_HOME={NCCL_TESTS_HOME / 'home'}",
             "CUDA_HOME=/usr/local/cuda", "NVCC_GENCODE=-gencode=arch=compute_90,code=sm_90",
             f"BUILDDIR={ALL_REDUCE_PERF_MPI.parent}", str(ALL_REDUCE_PERF_MPI)],
            stdout=sink, stderr=subprocess.STDOUT, timeout=600,
        )  # fmt: skip
    if done.returncode:
        tail = log.read_text().splitlines()[-20:]
        raise RuntimeError("the MPI build of all_reduce_perf failed:\n" + "\n".join(tail))
    return ALL_REDUCE_PERF_MPI


def nccl_tests_command(
    binary: Path, sizes: list[int], dtype: str, args: argparse.Namespace
) -> list[str]:
    return [
        str(binary), "-g", "2", "-b", str(sizes[0]), "-e", str(sizes[-1]), "-f", "2",
        "-d", NCCL_TESTS_TYPE[dtype], "-n", str(args.iters), "-w", str(args.warmup_iters),
        "-G", str(args.graph_launches), "-c", "1",
    ]  # fmt: skip


def run_nccl_tests(
    command: list[str],
    settings: dict[str, str],
    drop: tuple[str, ...] = (),
    lib_dirs: tuple[Path, ...] = (),
) -> str:
    """all_reduce_perf's output, run with `settings` added to and `drop` removed from this
    process's environment, and `lib_dirs` (an MPI's) found before the system's libraries."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(settings)
    lib_dir_file = NCCL_TESTS_HOME / "nccl-lib-dir"
    dirs = [str(d) for d in lib_dirs]
    if lib_dir_file.is_file():
        dirs.insert(0, lib_dir_file.read_text().strip())
    if dirs:
        env["LD_LIBRARY_PATH"] = ":".join([*dirs, env.get("LD_LIBRARY_PATH", "")]).rstrip(":")
    shown = " ".join(f"{k}={v}" for k, v in settings.items())
    print(f"running {shown} {' '.join(command)}", flush=True)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode:
        raise RuntimeError(
            f"all_reduce_perf exited with {done.returncode}:\n{done.stdout[-3000:]}\n"
            f"{done.stderr[-3000:]}"
        )
    return done.stdout


# ---- the plugin's side -----------------------------------------------------------------------


def measure_ours(
    device: str,
    backends: list[str],
    sizes: list[int],
    hidden: int,
    dtype: str,
    timeout: float,
    clocks: list[str],
) -> tuple[dict[str, dict[int, dict[str, Any]]], dict[str, Any], list[str]]:
    """Per timing plan (`clocks`: "" is the plan the latency suite would run, the device's
    default or PYTEST_ALLREDUCE_TIMING; else an override of it such as
    "ops=50,launches=20"), per size: each backend's Latency (bare
    allreduce), timed together as the latency suite times them; every plan at one size
    before the next size, so drift over the run lands on all of them alike. Returns (per plan
    per size {backend: Latency}, the machine fingerprint, problems)."""
    from pytest_allreduce.engine import standalone_engine
    from pytest_allreduce.model import Target
    from pytest_allreduce.timing import TimingPlan

    rows = [rows_for(n, hidden, dtype) for n in sizes]
    engine = standalone_engine(device, backends, 2, hidden, dtype, rows, timeout)
    default = TimingPlan.for_device(engine.plan.device)
    plans = {c: default.overridden(c) if c else default for c in clocks}
    results: dict[str, dict[int, dict[str, Any]]] = {c: {} for c in clocks}
    problems = []
    try:
        for nbytes, r in zip(sizes, rows, strict=True):
            cases = [Target(b, 2, hidden, dtype).at(r) for b in backends]
            for clock, timing_plan in plans.items():
                outcome = engine.measure_interleaved(cases, "allreduce", timing_plan)
                per = {lat.case.target.backend: lat for lat in outcome.latencies}
                results[clock][nbytes] = per
                problems += [
                    f"{nbytes} B {c.target.backend} skipped ({clock or 'default'}): {why}"
                    for c, why in outcome.skipped.items()
                ]
                problems += [
                    f"{nbytes} B {c.target.backend} failed ({clock or 'default'}): {report}"
                    for c, report in outcome.failed.items()
                ]
                medians = ", ".join(f"{b} {lat.median_us:.2f}" for b, lat in per.items())
                print(f"ours {nbytes:>10} B [{clock or 'default'}]: {medians} us", flush=True)
    finally:
        engine.close()
    return results, engine.store.machine, problems


# ---- the table ---------------------------------------------------------------------------------


def relative(ours: float | None, reference: float | None) -> str:
    if ours is None or not reference:
        return "-"
    return f"{(ours - reference) / reference:+.1%}"


def report(
    sizes: list[int],
    references: dict[str, dict[int, NcclTestsRow]],
    ours: dict[str, dict[int, dict[str, Any]]],
    backends: list[str],
    title: str,
) -> tuple[list[dict[str, Any]], list[str]]:
    """(the docs JSON rows, the markdown lines). `references`: the nccl-tests runs by label,
    the first being the one every difference is taken against; `ours`: per timing plan ("" the
    latency suite's), the first one's figures being the JSON's `<backend>_us`, the others'
    going under `clocks` (the suite's as "default")."""
    records = []
    ref_label = next(iter(references))
    main_clock = next(iter(ours))
    heads = ["bytes"] + [f"nccl-tests {label} (us)" for label in references]
    for clock in ours:
        for b in backends:
            suffix = f" [{clock}]" if clock else ""
            heads += [f"{b}{suffix} (us)", f"{b}{suffix} vs nccl-tests"]
    lines = [title, "", "| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    over_goal: dict[str, list[str]] = {clock: [] for clock in ours}
    for nbytes in sizes:
        ref_row = references[ref_label].get(nbytes)
        ref = ref_row.oop_us if ref_row else None
        record: dict[str, Any] = {"bytes": nbytes, "nccl_tests_us": ref}
        cells = [str(nbytes)]
        for label, rows in references.items():
            row = rows.get(nbytes)
            cells.append(f"{row.oop_us:.2f}" if row else "-")
            if label != ref_label:
                record.setdefault("nccl_tests_other_us", {})[label] = row.oop_us if row else None
        for clock, per_size in ours.items():
            for b in backends:
                lat = per_size.get(nbytes, {}).get(b)
                median = round(lat.median_us, 3) if lat is not None else None
                if clock != main_clock:
                    plan_key = clock or "default"
                    record.setdefault("clocks", {}).setdefault(plan_key, {})[f"{b}_us"] = median
                else:
                    record[f"{b}_us"] = median
                cells += [f"{median:.2f}" if median is not None else "-", relative(median, ref)]
                raw = b == RAW_NCCL_BACKEND and median is not None and ref
                if raw and abs(median - ref) / ref > GOAL:
                    over_goal[clock].append(f"{nbytes} B ({relative(median, ref)})")
        records.append(record)
        lines.append("| " + " | ".join(cells) + " |")
    if RAW_NCCL_BACKEND in backends:
        lines.append("")
        for clock, over in over_goal.items():
            lines.append(goal_line(clock, ref_label, over))
        # The default plan against each other nccl-tests run: how the verdict depends on
        # which arrangement of nccl-tests one compares with.
        for label, rows in list(references.items())[1:]:
            over = []
            for nbytes in sizes:
                lat = ours[main_clock].get(nbytes, {}).get(RAW_NCCL_BACKEND)
                row = rows.get(nbytes)
                if lat is not None and row and abs(lat.median_us - row.oop_us) / row.oop_us > GOAL:
                    over.append(f"{nbytes} B ({relative(round(lat.median_us, 3), row.oop_us)})")
            lines.append(goal_line(main_clock, label, over))
    return records, lines


def goal_line(clock: str, label: str, over: list[str]) -> str:
    return (
        f"Goal: {RAW_NCCL_BACKEND} [{clock or 'default timing'}] within {GOAL:.0%} of "
        f"nccl-tests {label} at every size: "
        + ("met." if not over else f"NOT met at {', '.join(over)}.")
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tools", type=Path, help="the nccl-tests tools folder (build script)")
    parser.add_argument(
        "--nccl-tests-output",
        type=Path,
        help="read all_reduce_perf's output from this file instead of running it",
    )
    parser.add_argument("--rebuild", action="store_true", help="build nccl-tests even if built")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--backends", default="pynccl,nccl", help="plugin backends, comma list")
    parser.add_argument("--min-bytes", default="8K")
    parser.add_argument("--max-bytes", default="64M")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(ITEMSIZE))
    parser.add_argument("--iters", type=int, default=50, help="all_reduce_perf -n")
    parser.add_argument("--warmup-iters", type=int, default=10, help="all_reduce_perf -w")
    parser.add_argument("--graph-launches", type=int, default=20, help="all_reduce_perf -G")
    parser.add_argument(
        "--no-defaults-run",
        action="store_true",
        help="skip the second nccl-tests run under NCCL's defaults",
    )
    parser.add_argument(
        "--threads-run",
        action="store_true",
        help="also run nccl-tests with one thread per GPU (-t 2 -g 1), each launching its own",
    )
    parser.add_argument(
        "--nccl-tests-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="also run nccl-tests with this NCCL variable set on top of the ranks' settings "
        "(e.g. NCCL_P2P_DIRECT_DISABLE=1: one process driving both GPUs lets NCCL pass direct "
        "pointers between them, which separate rank processes never get); repeatable, one run "
        "each",
    )
    parser.add_argument(
        "--mpi-home",
        type=Path,
        help="an MPI installation (bin/mpiexec, include/mpi.h, lib/libmpi.so): also build "
        "all_reduce_perf with MPI and run it as one process per GPU (mpiexec -n 2, -g 1), the "
        "reference figure then",
    )
    parser.add_argument(
        "--timing",
        default="",
        metavar="SPEC",
        help="the plan whose figures are the JSON's <backend>_us, as an override of the latency "
        "suite's (PYTEST_ALLREDUCE_TIMING syntax; e.g. nccl-tests' workload: "
        "'ops=50,launches=20,rotate=64M,memory=ncclmem'); the suite's own plan is then timed "
        "too, under clocks.default",
    )
    parser.add_argument(
        "--also-timing",
        action="append",
        default=[],
        metavar="SPEC",
        help="also time our side under this plan override (PYTEST_ALLREDUCE_TIMING syntax, "
        "e.g. 'ops=50,launches=20,samples=8'); repeatable",
    )
    parser.add_argument("--timeout", type=float, default=300.0, help="bound on one rank call")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args(argv)
    if args.tools is None and args.nccl_tests_output is None:
        parser.error("give --tools (build and run nccl-tests) or --nccl-tests-output FILE")
    if args.mpi_home is not None:
        if args.tools is None:
            parser.error("--mpi-home builds nccl-tests: give --tools too")
        args.mpi_home = args.mpi_home.resolve()
        missing = [n for n in ("bin/mpiexec", "include/mpi.h", "lib/libmpi.so")
                   if not (args.mpi_home / n).exists()]  # fmt: skip
        if missing:
            parser.error(f"--mpi-home {args.mpi_home}: no {', '.join(missing)} there")
    try:
        args.sizes = byte_sizes(parse_bytes(args.min_bytes), parse_bytes(args.max_bytes))
        for nbytes in args.sizes:
            rows_for(nbytes, args.hidden, args.dtype)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.sizes:
        parser.error("--min-bytes is above --max-bytes")
    args.backends = [b for b in args.backends.split(",") if b]
    for setting in args.nccl_tests_env:
        name, sep, value = setting.partition("=")
        if not sep or not name.startswith("NCCL_") or not value:
            parser.error(f"--nccl-tests-env {setting!r}: expected NCCL_NAME=VALUE")
    from pytest_allreduce.timing import TimingPlan

    plans = [("--timing", args.timing)] + [("--also-timing", s) for s in args.also_timing]
    for flag, spec in plans:
        if not spec:
            continue
        try:
            TimingPlan.for_device(args.device, {}).overridden(spec)
        except ValueError as exc:
            parser.error(f"{flag} {spec!r}: {exc}")
        if "memory=ncclmem" in spec.replace(" ", "") and args.device != "cuda":
            parser.error(f"{flag} {spec!r}: memory=ncclmem needs --device cuda")
    return args


def run_per_process(
    args: argparse.Namespace,
    settings: dict[str, str],
    run: dict[str, Any],
    others: dict[str, dict[int, NcclTestsRow]],
) -> dict[int, NcclTestsRow]:
    """nccl-tests built with MPI: one process per GPU under mpiexec (returned), and the same
    binary as one process driving both GPUs (added to `others`)."""
    binary = build_nccl_tests_mpi(args.mpi_home, args.rebuild)
    command = nccl_tests_command(binary, args.sizes, args.dtype, args)
    lib = (args.mpi_home / "lib",)
    # mpiexec hands its environment (the ranks' NCCL settings among it) to both processes.
    spread = [str(args.mpi_home / "bin" / "mpiexec"), "-n", "2", command[0], "-g", "1",
              *command[3:]]  # fmt: skip
    # Hydra (MPICH's mpiexec) starts local processes by fork; no ssh to localhost.
    spread_text = run_nccl_tests(spread, {**settings, "HYDRA_LAUNCHER": "fork"}, lib_dirs=lib)
    single_text = run_nccl_tests(command, settings, lib_dirs=lib)
    others["-G, MPI build, -g 2"] = {r.bytes: r for r in parse_all_reduce_perf(single_text)}
    run["nccl_tests_mpi"] = {
        "per_process": {"command": spread, "output": spread_text},
        "one_process": {"command": command, "output": single_text},
    }
    return {r.bytes: r for r in parse_all_reduce_perf(spread_text)}


def main(argv: list[str] | None = None) -> int:
    from pytest_allreduce.nccl_env import NCCL_GRAPH_MIXING, rank_settings

    args = parse_args(argv)
    began = time.monotonic()
    run: dict[str, Any] = {"argv": sys.argv if argv is None else argv}
    others: dict[str, dict[int, NcclTestsRow]] = {}
    per_process: dict[int, NcclTestsRow] | None = None
    if args.nccl_tests_output is not None:
        text = args.nccl_tests_output.read_text()
        run["nccl_tests"] = {"source": str(args.nccl_tests_output), "output": text}
    else:
        binary = build_nccl_tests(args.tools, args.rebuild)
        command = nccl_tests_command(binary, args.sizes, args.dtype, args)
        settings = rank_settings(dict(os.environ))  # what the plugin's ranks add
        text = run_nccl_tests(command, settings)
        run["nccl_tests"] = {"command": command, "settings": settings, "output": text}
        if args.threads_run:
            # One thread per GPU, each launching its own graph, as our ranks do (one process
            # each): shows what the launch arrangement alone changes.
            threaded = [command[0], "-t", "2", "-g", "1", *command[3:]]
            threaded_text = run_nccl_tests(threaded, settings)
            others["-G -t 2 -g 1"] = {r.bytes: r for r in parse_all_reduce_perf(threaded_text)}
            run["nccl_tests_threads"] = {"command": threaded, "output": threaded_text}
        for setting in args.nccl_tests_env:
            name, _, value = setting.partition("=")
            extra_text = run_nccl_tests(command, {**settings, name: value})
            others[f"-G, {setting}"] = {r.bytes: r for r in parse_all_reduce_perf(extra_text)}
            extra_run = {"command": command, "output": extra_text}
            run.setdefault("nccl_tests_env", {})[setting] = extra_run
        if not args.no_defaults_run:
            default_text = run_nccl_tests(command, {}, drop=(NCCL_GRAPH_MIXING,))
            others["-G, NCCL defaults"] = {r.bytes: r for r in parse_all_reduce_perf(default_text)}
            run["nccl_tests_defaults"] = {"command": command, "output": default_text}
        if args.mpi_home is not None:
            per_process = run_per_process(args, settings, run, others)
    reference = {r.bytes: r for r in parse_all_reduce_perf(text)}
    references = {"-G": reference, **others}
    if per_process is not None:
        # One process per GPU is how the plugin's ranks (and servers) run: the like-for-like
        # reference. The single-process run stays beside it.
        references = {ONE_PROCESS_PER_GPU: per_process, **references}
    problems = [
        f"nccl-tests {label} found {r.oop_wrong} wrong elements at {r.bytes} B"
        for label, rows in references.items()
        for r in rows.values()
        if r.oop_wrong
    ]
    # The main plan first (its figures are the JSON's), then the others; the suite's own
    # plan ("") is always among them.
    clocks = list(dict.fromkeys([args.timing, *args.also_timing, ""]))
    ours, machine, our_problems = measure_ours(
        args.device, args.backends, args.sizes, args.hidden, args.dtype, args.timeout, clocks
    )
    problems += our_problems
    device = machine.get("device_name", args.device)
    title = (
        f"# nccl-tests all_reduce_perf -G vs pytest-allreduce ({device} x 2, "
        f"NCCL {machine.get('nccl_version', '?')}, torch {machine.get('torch_version', '?')}, "
        f"{args.dtype}, hidden {args.hidden}, out of place)"
    )
    records, lines = report(args.sizes, references, ours, args.backends, title)
    lines += [f"- problem: {p.splitlines()[0]}" for p in problems]
    lines.append(f"\n({time.monotonic() - began:.0f} s)")
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vs-nccl-tests.json").write_text(json.dumps(records, indent=1) + "\n")
    (args.out / "vs-nccl-tests.md").write_text("\n".join(lines) + "\n")
    run.update(
        machine=machine,
        reference=[asdict(r) for r in next(iter(references.values())).values()],
        reference_run=next(iter(references)),
        ours={
            clock or "default": {
                str(n): {
                    b: {
                        "samples_us": lat.samples_us,
                        "ops_per_sample": lat.ops_per_sample,
                        "clock": lat.clock,
                        "engaged": lat.engaged,
                    }
                    for b, lat in per.items()
                }
                for n, per in per_size.items()
            }
            for clock, per_size in ours.items()
        },
        problems=problems,
    )
    (args.out / "vs-nccl-tests-run.json").write_text(json.dumps(run, indent=1) + "\n")
    print(f"wrote {args.out / 'vs-nccl-tests.json'}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
