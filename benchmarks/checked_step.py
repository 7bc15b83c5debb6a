"""What one checked step of the stress and graph suites costs on one device, now and as
another version of `pytest_allreduce/checks.py` had it (issue 13, item 5).

The step is `checks.CheckedCall.call_and_check`: input change, poison, the job, the check on
the device. Here the job runs on one rank with a stand-in allreduce (a copy: the sum over
one rank), so what is timed is the step's own work around the collective, the part the
change to the step touched; the composed fused job runs the engine's add + RMSNorm after
it, as for every unfused backend. Per version, job and size: the mean time of a call over
`--calls` eager calls (launched from the host, numbered) and over as many replays of one
captured step, after a warm-up.

    python benchmarks/checked_step.py [--then OLD_checks.py,...] [--rows 1,128,504,4032]
        [--calls 2000] [--device cuda] [--out DIR]

Prints one table; writes checked-step.json to --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path
from types import ModuleType, SimpleNamespace
from typing import Any

import torch

from pytest_allreduce import checks

JOBS = ("allreduce", "fused")


class OneRankSum:
    """The allreduce over one rank: the input itself."""

    fused = False

    def all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(inp)

    def capture(self) -> Any:
        from contextlib import nullcontext

        return nullcontext()


def load_checks(path: str) -> ModuleType:
    """Another version of checks.py, as a module of this package (its relative imports
    resolve against today's modules, which must still offer what it uses)."""
    name = f"pytest_allreduce.checks_{Path(path).stem}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"--then: cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def step_of(module: ModuleType, ctx: Any, work: Any, rows: int, job: str, calls: int) -> Any:
    try:
        return module.CheckedCall(ctx, work, rows, job, seed=61, calls=calls)
    except TypeError:  # versions before per-call slots took no `calls`
        return module.CheckedCall(ctx, work, rows, job, seed=61)


def timed(device: torch.device, fn: Any, n: int) -> float:
    """Mean microseconds per call of fn(i) over n calls, the device drained at both ends."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    began = time.perf_counter()
    for i in range(n):
        fn(i)
    sync()
    return (time.perf_counter() - began) / n * 1e6


def measure(module: ModuleType, device: torch.device, rows: int, job: str, calls: int) -> dict:
    ctx = SimpleNamespace(rank=0, world_size=1, device=device)
    work = SimpleNamespace(target=SimpleNamespace(hidden=4096, dtype="bfloat16"))
    work.dtype = torch.bfloat16
    backend = OneRankSum()
    step = step_of(module, ctx, work, rows, job, calls)
    for i in range(min(calls, 50)):  # warm-up: kernels load, the allocator fills
        step.call_and_check(backend, i)
    eager = timed(device, lambda i: step.call_and_check(backend, i), calls)
    problems = step.problems("eager", calls)
    result = {"eager_us": eager, "graph_us": None, "problems": problems}
    if device.type == "cuda":
        step = step_of(module, ctx, work, rows, job, 0)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step.call_and_check(backend)
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            step.call_and_check(backend)
        for _ in range(20):
            graph.replay()
        result["graph_us"] = timed(device, lambda i: graph.replay(), calls)
        result["problems"] += step.problems("graph", calls + 21)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--then", default="", help="older checks.py files to compare with")
    parser.add_argument("--rows", default="1,128,504,4032")
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    device = torch.device(args.device)
    versions = {"now": checks}
    for path in filter(None, args.then.split(",")):
        versions[Path(path).stem] = load_checks(path)
    rows_list = [int(r) for r in args.rows.split(",")]
    found = []
    print(f"{'version':16} {'job':10} {'rows':>5} {'eager us/call':>14} {'graph us/replay':>16}")
    for job in JOBS:
        for rows in rows_list:
            for name, module in versions.items():
                got = measure(module, device, rows, job, args.calls)
                graph = f"{got['graph_us']:16.1f}" if got["graph_us"] is not None else ""
                print(f"{name:16} {job:10} {rows:5d} {got['eager_us']:14.1f} {graph}")
                if got["problems"]:
                    print("   problems:", got["problems"])
                found.append({"version": name, "job": job, "rows": rows, **got})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "calls": args.calls,
        "steps": found,
    }
    (out / "checked-step.json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
