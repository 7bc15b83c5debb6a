"""Why raw pynccl's per-op time grows with the ops per graph: one script, several launches.

Issue 13 measured raw ncclAllReduce captured back to back (the plugin's pynccl backend) at
10.6 us per op with 10 ops per graph and 59.2 us with 1000 (8 KiB, 2 x H200, NCCL 2.28.9),
the same excess at 1 MiB and 16 MiB, while torch's NCCL stays flat and nccl-tests -G takes
6.8 us. The leading hypothesis (pytest_allreduce/nccl_env.py): NCCL's graph-mixing support
adds an event-record node per captured call, on the critical path of back-to-back calls.

Each launch is a fresh 2-rank pool with its own environment (NCCL reads its parameters once
per process, CUDA its connection count once per context):
  default         NCCL's defaults (the plugin's own graph-mixing default switched off)
  mixing_off      NCCL_GRAPH_MIXING_SUPPORT=0 (the plugin's default)
  connections_32  CUDA_DEVICE_MAX_CONNECTIONS=32, mixing on: graph branches sharing queues
  register_off    NCCL_GRAPH_REGISTER=0, mixing on (not run unless asked: --launches)
Inside a launch, at each size and op count, these are timed interleaved with the plugin's own
timing (ranks aligned on the device, pytest_allreduce.timing), and with the old method (host
barrier, then CUDA events around one replay) in brackets:
  torch_nccl             the plugin's nccl backend: copy, then dist.all_reduce in place
  pynccl                 the plugin's pynccl backend: ncclAllReduce out of place, capture stream
  pynccl_inplace         send buffer = receive buffer
  pynccl_side_stream     each call on a side stream forked from and joined to the capture
                         stream, as torch launches its collectives
  pynccl_kernel_between  a one-element kernel captured between consecutive calls
Also recorded: the host time of one graph launch, each graph's nodes by type per captured op
(10 and 50 ops, 8 KiB), and every NCCL parameter NCCL read from the environment
(NCCL_DEBUG=INFO, NCCL_DEBUG_SUBSYS=ENV), which proves whether the setting took.

Reading it: graph mixing is the cause when pynccl grows with the op count under `default`
and is flat (1000/10 within 3%) under `mixing_off`, with about one EVENT_RECORD node per op
under `default` and none under `mixing_off`. If pynccl_side_stream or pynccl_kernel_between
is flat under `default` too, the extra node costs only when nothing overlaps it. If the host
launch time per op grows like the GPU time, the host's graph submission is the bottleneck.

    python benchmarks/pynccl_probe.py [--out DIR] [--launches default,mixing_off,...]
    python benchmarks/pynccl_probe.py --device cpu --sizes 8K --ops 2,4   # the plumbing only

Writes pynccl-probe.json to --out (default $OUT, else the current directory). About two
minutes on 2 x H200 with the defaults; --budget-s stops starting new work past its bound.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import glob
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pytest_allreduce.context import RankContext
from pytest_allreduce.nccl_env import GRAPH_MIXING_SWITCH, NCCL_GRAPH_MIXING
from pytest_allreduce.pool import RankFailure, RankPool
from pytest_allreduce.timing import CudaClock, TimingPlan, WallClock, run_rounds

HIDDEN = 4096
DTYPE = torch.bfloat16
ROW_BYTES = HIDDEN * 2
# Every launch starts from these unset, then sets its own.
LAUNCH_VARIABLES = (
    NCCL_GRAPH_MIXING,
    GRAPH_MIXING_SWITCH,
    "CUDA_DEVICE_MAX_CONNECTIONS",
    "NCCL_GRAPH_REGISTER",
)
LAUNCHES: dict[str, dict[str, str]] = {
    "default": {GRAPH_MIXING_SWITCH: "1"},
    "mixing_off": {NCCL_GRAPH_MIXING: "0"},
    "connections_32": {GRAPH_MIXING_SWITCH: "1", "CUDA_DEVICE_MAX_CONNECTIONS": "32"},
    "register_off": {GRAPH_MIXING_SWITCH: "1", "NCCL_GRAPH_REGISTER": "0"},
}
DEFAULT_LAUNCHES = "default,mixing_off,connections_32"
NODE_COUNT_OPS = (10, 50)
# cudaGraphNodeType (CUDA runtime API).
NODE_TYPES = {
    0: "KERNEL",
    1: "MEMCPY",
    2: "MEMSET",
    3: "HOST",
    4: "GRAPH",
    5: "EMPTY",
    6: "WAIT_EVENT",
    7: "EVENT_RECORD",
    8: "EXT_SEMAS_SIGNAL",
    9: "EXT_SEMAS_WAIT",
    10: "MEM_ALLOC",
    11: "MEM_FREE",
    12: "BATCH_MEM_OP",
    13: "CONDITIONAL",
}
ENV_READ = re.compile(r"(NCCL_[A-Z0-9_]+|CUDA_[A-Z0-9_]+) set by environment to (\S+?)\.?$")


# ---- parsing and reading (also run on the CPU by the tests) ----------------------------------


def parse_bytes(text: str) -> int:
    """'8K', '1M', '16M', '4096' -> bytes; ValueError naming the text otherwise."""
    match = re.fullmatch(r"\s*(\d+)\s*([KMG]?)(i?B)?\s*", text, re.I)
    if not match:
        raise ValueError(f"not a byte size: {text!r} (e.g. 8K, 1M, 4096)")
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30}[match.group(2).upper()]
    return int(match.group(1)) * scale


def size_label(nbytes: int) -> str:
    for unit, scale in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    return f"{nbytes} B"


def nccl_env_read(log_text: str) -> dict[str, list[str]]:
    """What NCCL (and CUDA) reported reading from the environment, per variable."""
    found: dict[str, set[str]] = {}
    for line in log_text.splitlines():
        if match := ENV_READ.search(line.strip()):
            found.setdefault(match.group(1), set()).add(match.group(2))
    return {k: sorted(v) for k, v in sorted(found.items())}


def per_op_nodes(types: Counter[str], ops: int) -> dict[str, float]:
    return {t: round(n / ops, 3) for t, n in sorted(types.items())}


def median(values: list[float]) -> float:
    return float(statistics.median(values))


# ---- rank side -------------------------------------------------------------------------------


def _setup(ctx: RankContext, max_rows: int) -> dict[str, Any]:
    """The plugin's own nccl and pynccl backends, set up once per launch."""
    state = ctx.cache.get("probe")
    if state is None:
        from pytest_allreduce.backends.nccl import NcclBackend
        from pytest_allreduce.backends.pynccl import PyncclBackend

        state = {
            "nccl": NcclBackend(ctx, "", HIDDEN, DTYPE, max_rows),
            "pynccl": PyncclBackend(ctx, "", HIDDEN, DTYPE, max_rows),
            "side": torch.cuda.Stream(ctx.device),
        }
        ctx.cache["probe"] = state
    return state


def _variants(ctx: RankContext, rows: int, max_rows: int) -> dict[str, Callable[[], None]]:
    """name -> a function that issues one op on the current stream."""
    inp = torch.randn(rows, HIDDEN, device=ctx.device).to(DTYPE)
    out = torch.empty_like(inp)
    if not ctx.is_cuda:

        def gloo_out_of_place() -> None:
            out.copy_(inp)
            dist.all_reduce(out, group=ctx.cpu_group)

        zeros = torch.zeros_like(inp)
        return {
            "gloo": gloo_out_of_place,
            "gloo_inplace": lambda: dist.all_reduce(zeros, group=ctx.cpu_group),
        }
    state = _setup(ctx, max_rows)
    torch_nccl, py, side = state["nccl"], state["pynccl"], state["side"]
    acc = torch.zeros_like(inp)  # in place: stays zero however many ops run
    scratch = torch.zeros(1, device=ctx.device)

    def pynccl_inplace() -> None:
        stream = torch.cuda.current_stream(ctx.device).cuda_stream
        py.nccl.all_reduce(
            acc.data_ptr(), acc.data_ptr(), acc.numel(), py.nccl_dtype, py.comm, stream
        )

    def pynccl_side_stream() -> None:
        here = torch.cuda.current_stream(ctx.device)
        side.wait_stream(here)
        with torch.cuda.stream(side):
            py._all_reduce(inp, out)
        here.wait_stream(side)

    def pynccl_kernel_between() -> None:
        py._all_reduce(inp, out)
        scratch.add_(1)

    return {
        "torch_nccl": lambda: torch_nccl._all_reduce(inp, out),
        "pynccl": lambda: py._all_reduce(inp, out),
        "pynccl_inplace": pynccl_inplace,
        "pynccl_side_stream": pynccl_side_stream,
        "pynccl_kernel_between": pynccl_kernel_between,
    }


def _capture(step: Callable[[], None], ops: int, keep_graph: bool = False) -> Any:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step()
        step()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph(keep_graph=True) if keep_graph else torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(ops):
            step()
    return graph


def _eager(step: Callable[[], None], ops: int) -> Callable[[], None]:
    def run() -> None:
        for _ in range(ops):
            step()

    return run


def _node_types(graph: Any) -> dict[str, int] | str:
    """The captured graph's nodes by type, through the CUDA runtime torch loaded."""
    from pytest_allreduce.backends._gpu import loaded_library

    try:
        lib = ctypes.CDLL(loaded_library("libcudart.so") or "libcudart.so")
        raw = ctypes.c_void_p(int(graph.raw_cuda_graph()))
        count = ctypes.c_size_t(0)
        if lib.cudaGraphGetNodes(raw, None, ctypes.byref(count)):
            return "cudaGraphGetNodes failed"
        nodes = (ctypes.c_void_p * count.value)()
        if lib.cudaGraphGetNodes(raw, nodes, ctypes.byref(count)):
            return "cudaGraphGetNodes failed"
        types: Counter[str] = Counter()
        for node in nodes[: count.value]:
            kind = ctypes.c_int(-1)
            if lib.cudaGraphNodeGetType(ctypes.c_void_p(node), ctypes.byref(kind)):
                return "cudaGraphNodeGetType failed"
            types[NODE_TYPES.get(kind.value, f"type{kind.value}")] += 1
        return dict(types)
    except Exception as exc:  # a diagnostic: never let it end the probe
        return f"unavailable: {type(exc).__name__}: {exc}"


def _barrier_samples(ctx: RankContext, replay: Callable[[], None], ops: int, n: int) -> list[float]:
    """The old method: host barrier, CUDA events around one replay (skew included)."""
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(n):
        ctx.barrier()
        start.record()
        replay()
        stop.record()
        stop.synchronize()
        samples.append(start.elapsed_time(stop) * 1e3 / ops)
    return samples


def _host_launch_us(replay: Callable[[], None], n: int = 5) -> float:
    times = []
    for _ in range(n):
        torch.cuda.synchronize()
        began = time.perf_counter()
        replay()
        times.append((time.perf_counter() - began) * 1e6)
    torch.cuda.synchronize()
    return median(times)


def probe_size(
    ctx: RankContext,
    nbytes: int,
    ops_list: list[int],
    samples: int,
    barrier_samples: int,
    max_rows: int,
    count_nodes: bool,
) -> list[dict[str, Any]]:
    """Every variant at one size and each op count; rows of the result table (rank 0's copy
    holds the maximum over ranks of every sample)."""
    rows = nbytes // ROW_BYTES
    variants = _variants(ctx, rows, max_rows)
    names = list(variants)
    out: list[dict[str, Any]] = []
    for ops in ops_list:
        if ctx.is_cuda:
            graphs = [_capture(variants[n], ops) for n in names]
            replays = [g.replay for g in graphs]
            clock: Any = CudaClock(ctx, len(names))
        else:
            graphs, replays, clock = [], [_eager(variants[n], ops) for n in names], WallClock(ctx)
        plan = TimingPlan(samples=samples, ops_per_sample=ops, warmup=2, instances=1)
        aligned, late = run_rounds(clock, [[r] for r in replays], plan, ctx.all_gather_object)
        barrier = [
            _barrier_samples(ctx, r, ops, barrier_samples) if ctx.is_cuda else [] for r in replays
        ]
        host = [_host_launch_us(r) if ctx.is_cuda else None for r in replays]
        nodes: list[Any] = [None] * len(names)
        if ctx.is_cuda and count_nodes and ops in NODE_COUNT_OPS:
            for k, name in enumerate(names):
                kept = _capture(variants[name], ops, keep_graph=True)
                found = _node_types(kept)
                nodes[k] = per_op_nodes(Counter(found), ops) if isinstance(found, dict) else found
                del kept
        del graphs
        everyone = ctx.all_gather_object((aligned, barrier, host))
        for k, name in enumerate(names):
            worst = [max(r[0][k][i] for r in everyone) for i in range(samples)]
            worst_barrier = [max(r[1][k][i] for r in everyone) for i in range(len(barrier[k]))]
            hosts = [r[2][k] for r in everyone if r[2][k] is not None]
            out.append(
                {
                    "variant": name,
                    "bytes": nbytes,
                    "ops": ops,
                    "aligned_us": worst,
                    "aligned_median_us": median(worst),
                    "barrier_us": worst_barrier,
                    "barrier_median_us": median(worst_barrier) if worst_barrier else None,
                    "host_launch_us": max(hosts) if hosts else None,
                    "nodes_per_op": nodes[k],
                    "late_rounds": late,
                }
            )
    if ctx.is_cuda:
        torch.cuda.synchronize()
    return out


# ---- orchestration -----------------------------------------------------------------------------


@contextlib.contextmanager
def launch_environment(settings: dict[str, str], log_dir: Path, name: str, cuda: bool):
    """os.environ for one launch's ranks (spawned processes inherit it), restored after."""
    saved = {
        k: os.environ.get(k)
        for k in (*LAUNCH_VARIABLES, "NCCL_DEBUG", "NCCL_DEBUG_SUBSYS", "NCCL_DEBUG_FILE")
    }
    try:
        for k in LAUNCH_VARIABLES:
            os.environ.pop(k, None)
        os.environ.update(settings)
        if cuda:
            os.environ.update(
                NCCL_DEBUG="INFO",
                NCCL_DEBUG_SUBSYS="ENV",
                NCCL_DEBUG_FILE=str(log_dir / f"{name}.%h.%p.nccl.log"),
            )
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_launch(
    name: str, args: argparse.Namespace, log_dir: Path, deadline: float
) -> dict[str, Any]:
    settings = LAUNCHES[name]
    cuda = args.device == "cuda"
    result: dict[str, Any] = {
        "env": settings,
        "device": args.device,
        "rows": [],
        "skipped": [],
        "errors": [],
    }
    max_rows = max(args.sizes) // ROW_BYTES
    with launch_environment(settings, log_dir, name, cuda):
        pool = RankPool(2, args.device, args.timeout).start()
        try:
            for nbytes in args.sizes:
                if time.monotonic() > deadline:
                    result["skipped"].append(f"{size_label(nbytes)}: past --budget-s")
                    continue
                try:
                    result["rows"] += pool.run(
                        probe_size,
                        nbytes,
                        args.ops,
                        args.samples,
                        args.barrier_samples,
                        max_rows,
                        nbytes == min(args.sizes),
                    )[0]
                except RankFailure as failure:
                    result["errors"].append(f"{size_label(nbytes)}: {failure}"[:4000])
                    if pool.broken:
                        break
        finally:
            pool.close()
    logs = "".join(
        Path(p).read_text(errors="replace") for p in glob.glob(str(log_dir / f"{name}.*.nccl.log"))
    )
    result["nccl_env_read"] = nccl_env_read(logs)
    return result


def took(launch: dict[str, Any]) -> str:
    """Whether NCCL read the launch's NCCL settings, as its debug log says."""
    wanted = {k: v for k, v in launch["env"].items() if k.startswith("NCCL_")}
    if launch.get("device") == "cpu":
        return "n/a (no NCCL on the CPU)"
    if not wanted:
        return "n/a (nothing set)"
    read = launch.get("nccl_env_read", {})
    missing = [f"{k}={v}" for k, v in wanted.items() if read.get(k) != [v]]
    return "yes" if not missing else f"NOT CONFIRMED: {', '.join(missing)} not in NCCL's log"


def table(launches: dict[str, dict[str, Any]], ops_list: list[int]) -> list[str]:
    lines = []
    sizes = sorted({r["bytes"] for launch in launches.values() for r in launch["rows"]})
    for nbytes in sizes:
        lines += [
            "",
            f"## {size_label(nbytes)}: per-op median us, aligned on the device [host barrier]",
            "| launch | variant | "
            + " | ".join(f"N={n}" for n in ops_list)
            + f" | N={ops_list[-1]} / N={ops_list[0]} | host launch us per op |",
            "|---|---|" + "---|" * (len(ops_list) + 2),
        ]
        for name, launch in launches.items():
            rows = [r for r in launch["rows"] if r["bytes"] == nbytes]
            for variant in dict.fromkeys(r["variant"] for r in rows):
                by_ops = {r["ops"]: r for r in rows if r["variant"] == variant}
                cells = []
                for n in ops_list:
                    r = by_ops.get(n)
                    if r is None:
                        cells.append("-")
                        continue
                    cell = f"{r['aligned_median_us']:.2f}"
                    if r["barrier_median_us"] is not None:
                        cell += f" [{r['barrier_median_us']:.2f}]"
                    cells.append(cell)
                first, last = by_ops.get(ops_list[0]), by_ops.get(ops_list[-1])
                growth = (
                    f"{last['aligned_median_us'] / first['aligned_median_us']:.3f}"
                    if first and last
                    else "-"
                )
                host = (
                    " / ".join(
                        f"{r['host_launch_us'] / r['ops']:.2f}"
                        for n in ops_list
                        if (r := by_ops.get(n)) and r["host_launch_us"] is not None
                    )
                    or "-"
                )
                lines.append(
                    f"| {name} | {variant} | " + " | ".join(cells) + f" | {growth} | {host} |"
                )
    node_rows = [
        (name, r)
        for name, launch in launches.items()
        for r in launch["rows"]
        if r["nodes_per_op"] is not None
    ]
    if node_rows:
        lines += [
            "",
            "## graph nodes per captured op, by type",
            "| launch | variant | ops | nodes per op |",
            "|---|---|---|---|",
        ]
        for name, r in node_rows:
            nodes = r["nodes_per_op"]
            text = (
                ", ".join(f"{k} {v:g}" for k, v in nodes.items())
                if isinstance(nodes, dict)
                else nodes
            )
            lines.append(f"| {name} | {r['variant']} | {r['ops']} | {text} |")
    lines += [
        "",
        "## NCCL settings read (NCCL_DEBUG_SUBSYS=ENV)",
        "| launch | set | took | read by NCCL |",
        "|---|---|---|---|",
    ]
    for name, launch in launches.items():
        env = ", ".join(f"{k}={v}" for k, v in launch["env"].items())
        read = ", ".join(f"{k}={'/'.join(v)}" for k, v in launch["nccl_env_read"].items()) or "-"
        lines.append(f"| {name} | {env} | {took(launch)} | {read} |")
    return lines


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--sizes", default="8K,1M,16M", help="bytes per rank, comma list")
    parser.add_argument("--ops", default="10,50,200,1000", help="ops per graph, comma list")
    parser.add_argument("--samples", type=int, default=10, help="aligned samples per variant")
    parser.add_argument("--barrier-samples", type=int, default=5)
    parser.add_argument(
        "--launches", default=DEFAULT_LAUNCHES, help=f"comma list of {', '.join(LAUNCHES)}"
    )
    parser.add_argument(
        "--budget-s", type=float, default=150.0, help="start no new size after this many seconds"
    )
    parser.add_argument("--timeout", type=float, default=120.0, help="bound on one rank call")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args(argv)
    try:
        args.sizes = [parse_bytes(s) for s in args.sizes.split(",")]
        args.ops = [int(n) for n in args.ops.split(",")]
    except ValueError as exc:
        parser.error(str(exc))
    if bad := [s for s in args.sizes if s % ROW_BYTES]:
        parser.error(f"sizes must be whole rows of {ROW_BYTES} bytes: {bad}")
    if bad := [n for n in args.launches.split(",") if n not in LAUNCHES]:
        parser.error(f"unknown launch(es) {bad}; known: {', '.join(LAUNCHES)}")
    args.launches = args.launches.split(",")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    began = time.monotonic()
    deadline = began + args.budget_s
    launches: dict[str, dict[str, Any]] = {}
    skipped = []
    with tempfile.TemporaryDirectory(prefix="pynccl-probe-") as logs:
        for name in args.launches:
            if time.monotonic() > deadline:
                skipped.append(name)
                continue
            print(f"launch {name} ({time.monotonic() - began:.0f} s)", flush=True)
            launches[name] = run_launch(name, args, Path(logs), deadline)
    lines = [
        f"# pynccl probe ({args.device}, {time.monotonic() - began:.0f} s)",
        *table(launches, args.ops),
    ]
    problems = [
        f"{name}: {e}"
        for name, launch in launches.items()
        for e in launch["errors"] + launch["skipped"]
    ]
    problems += [f"launch {name}: past --budget-s, not run" for name in skipped]
    lines += ["", *(f"- {p.splitlines()[0]}" for p in problems)]
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "pynccl-probe.json"
    path.write_text(
        json.dumps(
            {
                "args": {
                    k: v if not isinstance(v, Path) else str(v) for k, v in vars(args).items()
                },
                "launches": launches,
                "problems": problems,
            },
            indent=1,
        )
    )
    (args.out / "pynccl-probe.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")
    return 1 if any(launch["errors"] for launch in launches.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
