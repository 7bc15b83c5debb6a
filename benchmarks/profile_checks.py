"""Where a check's time goes: per check of the table, the wall time of a call through the
engine (as a suite test makes it), of the rank function alone, and the rank function's
profile on rank 0 (issue 13, item 5: the main job's speed).

For each check, backend and size: one call to warm up (set-up, input pools), then `--repeat`
calls through `Engine.run_check` (pool round trip, pickling, outcome), then `--repeat` calls
of the rank function inside the ranks under cProfile. The difference of the first two is what
the pool costs per call; the profile says what the rest is (host syncs show as
`synchronize`/`item`, digests as `digest`, object gathers as `all_gather_object`).

    python benchmarks/profile_checks.py [--device cpu|cuda] [--backends nccl,custom_ar]
        [--sizes 1,256,504] [--checks numerics::exact_sum,graph::graph_replays] [--repeat 5]
        [--top 18] [--sort tottime|cumulative] [--timings allreduce,fused] [--phases]
        [--out DIR]

--timings also profiles the latency suite's work: every named backend timed together at
each size (`timing.measure_interleaved` with the device's plan), rank 0's profile sorted by
cumulative time, so that set-up and captures, the timed rounds and the output checks show
apart. (--checks none leaves the checks out.)

Prints a table of per-call times and, per check, rank 0's profile; writes
profile-checks.json to --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time
from pathlib import Path
from typing import Any

from pytest_allreduce.checktable import CHECKS
from pytest_allreduce.engine import standalone_engine
from pytest_allreduce.model import Target
from pytest_allreduce.timing import TimingPlan, measure_interleaved


def noop(ctx: Any) -> int:
    return ctx.rank


# Functions --phases times (the device drained at both ends of each call, so that its work
# is counted where it was launched): where a check's or a timing's wall time goes.
PHASES: tuple[str, ...] = (
    "pytest_allreduce.checks:CheckedCall.__init__",
    "pytest_allreduce.checks:_capture_steps",
    "pytest_allreduce.checks:_finish",
    "pytest_allreduce.timing:_inputs",
    "pytest_allreduce.timing:_prepare",
    "pytest_allreduce.timing:run_rounds",
    "pytest_allreduce.timing:_output_problems",
)


def phase_timers(ctx: Any) -> dict[str, float]:
    """Wrap PHASES (once per rank process); returns the dict their seconds add up in."""
    import importlib

    totals: dict[str, float] = ctx.cache.setdefault("profile_checks.phases", {})
    if totals:
        return totals
    sync = torch_sync(ctx)
    for spec in PHASES:
        module_name, _, path = spec.partition(":")
        owner: Any = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for part in parents:
            owner = getattr(owner, part)
        inner = getattr(owner, name)

        def timed(*args: Any, _inner: Any = inner, _key: str = path, **kwargs: Any) -> Any:
            sync()
            began = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                sync()
                totals[_key] = totals.get(_key, 0.0) + time.perf_counter() - began

        setattr(owner, name, timed)
        totals.setdefault(path, 0.0)
    return totals


def torch_sync(ctx: Any) -> Any:
    import torch

    return torch.cuda.synchronize if ctx.device.type == "cuda" else (lambda: None)


def phased(ctx: Any, fn: Any, *args: Any) -> dict:
    """fn(ctx, *args) once with PHASES timed: wall and per-phase milliseconds."""
    totals = phase_timers(ctx)
    for key in totals:
        totals[key] = 0.0
    sync = torch_sync(ctx)
    sync()
    began = time.perf_counter()
    fn(ctx, *args)
    sync()
    wall = time.perf_counter() - began
    return {"wall_ms": wall * 1e3, **{k: v * 1e3 for k, v in totals.items() if v}}


def _under_profile(
    ctx: Any, repeat: int, top: int, sort: str, fn: Any, *args: Any
) -> dict[str, Any]:
    """fn(ctx, *args), `repeat` times under cProfile: wall per call and rank 0's profile
    (sorted by `sort`: own time, or cumulative to see the phases)."""
    profiler = cProfile.Profile()
    walls = []
    for _ in range(repeat):
        began = time.perf_counter()
        profiler.enable()
        fn(ctx, *args)
        profiler.disable()
        walls.append(time.perf_counter() - began)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats(sort).print_stats(top)
    return {"walls_s": walls, "profile": text.getvalue() if ctx.rank == 0 else ""}


def profiled(
    ctx: Any, label: str, work: Any, rows: int, repeat: int, top: int, sort: str = "tottime"
) -> dict:
    """The check `label` at `rows`, profiled (`_under_profile`)."""
    check = next(c for c in CHECKS if c.label == label)
    return _under_profile(ctx, repeat, top, sort, check.fn, work, rows, *check.args)


def profiled_timing(ctx: Any, works: list[Any], rows: int, job: str, repeat: int, top: int) -> dict:
    """One interleaved timing of `works` at `rows` with the device's plan, profiled."""
    return _under_profile(ctx, repeat, top, "cumulative", measure_with_plan, works, rows, job)


def measure_with_plan(ctx: Any, works: list[Any], rows: int, job: str) -> Any:
    return measure_interleaved(ctx, works, rows, job, TimingPlan.for_device(ctx.device.type))  # type: ignore[arg-type]


def _phase_text(phases: dict[str, float]) -> str:
    return " ".join(f"{k.rsplit('.', 1)[-1]}={v:.1f}" for k, v in phases.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--backends", default="nccl")
    parser.add_argument("--sizes", default="1,256,504")
    parser.add_argument("--checks", default="")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--top", type=int, default=18)
    parser.add_argument("--timings", default="")
    parser.add_argument("--sort", default="tottime", choices=("tottime", "cumulative"))
    parser.add_argument("--phases", action="store_true", help="also time PHASES per call")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    args = parser.parse_args()
    backends = args.backends.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    wanted = args.checks.split(",") if args.checks else [c.label for c in CHECKS]
    jobs = [j for j in args.timings.split(",") if j]
    checks = [c for c in CHECKS if c.label in wanted and c.sizes != "limits"]
    plan = TimingPlan.for_device(args.device)
    engine = standalone_engine(args.device, backends, 2, 4096, "bfloat16", sizes, 120.0)
    found: list[dict[str, Any]] = []
    try:
        engine.call(2, noop)
        began = time.perf_counter()
        for _ in range(50):
            engine.call(2, noop)
        noop_ms = (time.perf_counter() - began) / 50 * 1e3
        print(f"pool round trip (no-op on every rank): {noop_ms:.2f} ms")
        print(f"{'check':28} {'backend':22} {'rows':>5} {'engine ms':>10} {'rank fn ms':>10}")
        for check in checks:
            if check.needs_graphs and args.device != "cuda":
                continue
            for backend in backends:
                target = Target(backend, 2, 4096, "bfloat16")
                for rows in check.extra_rows if check.sizes == "listed" else sizes:
                    case = target.at(rows)
                    try:
                        engine.run_check(check, case)  # warm: set-up, input pools
                    except Exception as exc:  # a refusal or a failure: say so and go on
                        print(f"{check.label:28} {backend:22} {rows:5d} skipped: {exc}")
                        continue
                    began = time.perf_counter()
                    for _ in range(args.repeat):
                        engine.run_check(check, case)
                    engine_ms = (time.perf_counter() - began) / args.repeat * 1e3
                    work = engine.require(case)
                    ranks = engine.call(
                        2, profiled, check.label, work, rows, args.repeat, args.top, args.sort
                    )
                    rank_ms = max(sum(r["walls_s"]) for r in ranks) / args.repeat * 1e3
                    figures = f"{engine_ms:10.2f} {rank_ms:10.2f}"
                    if args.phases:
                        phases = engine.call(2, phased, check.fn, work, rows, *check.args)[0]
                        figures += "  " + _phase_text(phases)
                    print(f"{check.label:28} {backend:22} {rows:5d} {figures}")
                    found.append(
                        {
                            "check": check.label,
                            "backend": backend,
                            "rows": rows,
                            "engine_ms": engine_ms,
                            "rank_fn_ms": rank_ms,
                            "profile_rank0": ranks[0]["profile"],
                        }
                    )
        for job in jobs:
            for rows in sizes:
                cases = [Target(b, 2, 4096, "bfloat16").at(rows) for b in backends]
                outcome = engine.measure_interleaved(cases, job, plan)  # warm: set-ups
                timed = [lat.case for lat in outcome.latencies]
                works = [engine.require(case) for case in timed]
                ranks = engine.call(2, profiled_timing, works, rows, job, args.repeat, args.top)
                rank_ms = max(sum(r["walls_s"]) for r in ranks) / args.repeat * 1e3
                label = f"timing::{job} x{len(works)}"
                figures = f"{'':>10} {rank_ms:10.2f}"
                if args.phases:
                    phases = engine.call(2, phased, measure_with_plan, works, rows, job)[0]
                    figures += "  " + _phase_text(phases)
                print(f"{label:28} {'(together)':22} {rows:5d} {figures}")
                found.append(
                    {
                        "check": label,
                        "backend": ",".join(c.target.backend for c in timed),
                        "rows": rows,
                        "rank_fn_ms": rank_ms,
                        "profile_rank0": ranks[0]["profile"],
                    }
                )
        for entry in found:
            print(f"\n==== {entry['check']} {entry['backend']} {entry['rows']} rows (rank 0)")
            print(entry["profile_rank0"])
    finally:
        engine.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"pool_round_trip_ms": noop_ms, "device": args.device, "calls": found}
    (out / "profile-checks.json").write_text(json.dumps(payload, indent=1))


if __name__ == "__main__":
    main()
