"""Regret of an emitted config: at each token count, what the consumer runs against the best.

Re-measures a config at its keys and at sizes that are not its keys (by default every key,
the midpoint between each two neighbouring keys, and doubling sizes up to --max-tokens), and
per size prints what the consumer runs there (the config's nearest key, then the consumer
profile's dispatch), the fastest safe entry, and the regret, time of what runs / best - 1;
the same for the consumer's no-file rule and for the standard entry alone ("nccl" on CUDA,
"gloo" on the CPU). Every candidate at one size is timed in one run, interleaved in a rotating
order per round, so drift over the run hits all of them alike. Nothing is checked for
correctness here: the config's own run did that at its keys.

    python benchmarks/regret.py CONFIG [--world-size N] [--hidden H] [--dtype D]
        [--max-tokens N] [--sizes LIST] [--rounds R] [--samples S] [--multicast on|off]
        [--json OUT] [--timeout SECONDS]

CONFIG is a config the plugin wrote (`tp{N}/allreduce_config_hidden={H},...json`); world
size and hidden come from its path unless given. The consumer's server state (capability,
multicast, NVLink) is read from the evidence file beside it when there is one, so the
consumer is modelled as it was when the config was chosen. The same code runs on the CPU
(gloo, cpu_shm) and on CUDA.

Writes (with --json) a list of {"batch_size", "chosen", "best", "regret", ...} with the
no-file rule's and the standard entry's figures under "no_file" and "standard", and prints a
Markdown table with the speed-up against the no-file rule.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pytest_allreduce.config import AllreduceConfig, load_config
from pytest_allreduce.consumer import ConsumerProfile, Entry, Run, Server, profile_for
from pytest_allreduce.context import multicast_disabled_by
from pytest_allreduce.options import MAX_TOKENS_LIMIT, parse_int_list
from pytest_allreduce.registry import BackendRegistry, Variant
from pytest_allreduce.selection import entry_label, standard_type
from pytest_allreduce.serving import IN_CUDA_GRAPH

DEFAULT_ROUNDS = 5


# ---- timing: the one place that calls the engine's timing --------------------------------


def time_candidates(
    pool: Any, works: dict[str, Any], rows: int, rounds: int, samples: int
) -> dict[str, list[float]]:
    """Fused-job samples per variant at `rows`: every candidate timed in one interleaved run
    (`timing.measure_interleaved`: each round times every candidate once, in an order that
    rotates from round to round), `rounds * samples` rounds. A candidate whose outputs were
    wrong while timed gets no samples (the row says it is unavailable)."""
    import dataclasses

    from pytest_allreduce import timing

    device = "cuda" if pool.device_type == "cuda" else "cpu"
    plan = dataclasses.replace(timing.TimingPlan.for_device(device), samples=rounds * samples)
    names = sorted(works)
    result = pool.run(timing.measure_interleaved, [works[n] for n in names], rows, "fused", plan)[0]
    return {
        name: cand.samples_us
        for name, cand in zip(names, result.candidates, strict=True)
        if not cand.problems
    }


# ---- the model of what runs --------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    """What the benchmark measures: the config, its shape and the consumer's server."""

    config: AllreduceConfig
    profile: ConsumerProfile
    server: Server
    sizes: tuple[int, ...]


def _shape_from_path(path: Path) -> tuple[int | None, int | None]:
    hidden = re.search(r"hidden=(\d+)", path.name)
    tp = re.search(r"tp=(\d+)", path.name) or re.fullmatch(r"tp(\d+)", path.parent.name)
    return (int(tp.group(1)) if tp else None, int(hidden.group(1)) if hidden else None)


def _evidence(path: Path) -> dict[str, Any] | None:
    name = re.sub(r",tp=\d+", "", path.name).replace("allreduce_config_", "allreduce_evidence_")
    candidate = path.with_name(name)
    if not candidate.is_file():
        return None
    return json.loads(candidate.read_text())


def default_sizes(keys: tuple[int, ...], max_tokens: int) -> tuple[int, ...]:
    """Every key, the midpoint of each two neighbouring keys, and doubling sizes from 1 up to
    max_tokens (so what lies beyond the largest key is measured too)."""
    sizes = set(keys)
    sizes |= {(a + b) // 2 for a, b in itertools.pairwise(keys) if b - a > 1}
    size = 1
    while size < max_tokens:
        sizes.add(size)
        size *= 2
    sizes.add(max_tokens)
    return tuple(sorted(s for s in sizes if 1 <= s <= max_tokens))


def build_setting(args: argparse.Namespace, fingerprint: dict[str, Any]) -> Setting:
    path = Path(args.config)
    config = load_config(path)
    ws_path, hidden_path = _shape_from_path(path)
    world_size = args.world_size or ws_path
    hidden = args.hidden or hidden_path
    if world_size is None or hidden is None:
        raise SystemExit(f"{path}: give --world-size and --hidden (not found in the path)")
    evidence = _evidence(path)
    state = (evidence or {}).get("consumer") or {}
    dtype = args.dtype or (evidence or {}).get("config", {}).get("dtype") or "bfloat16"
    profile = profile_for(config.device)
    if config.device == "cpu":
        server = Server.cpu(world_size=world_size, dtype=dtype, hidden=hidden)
    else:
        capability = state.get("capability") or [
            int(v) for v in str(fingerprint.get("compute_capability")).split(".")
        ]
        multicast = bool(state.get("multicast", False))
        if args.multicast is not None:
            multicast = args.multicast == "on"
        server = Server.cuda(
            world_size=world_size,
            capability=(int(capability[0]), int(capability[1])),
            multicast=multicast and not multicast_disabled_by(),
            full_nvlink=bool(state.get("full_nvlink", world_size <= 2)),
            dtype=dtype,
            hidden=hidden,
            in_cuda_graph=bool(state.get("in_cuda_graph", IN_CUDA_GRAPH)),
        )
    sizes = (
        parse_int_list(args.sizes, MAX_TOKENS_LIMIT)
        if args.sizes
        else default_sizes(config.batch_sizes, args.max_tokens)
    )
    return Setting(config, profile, server, sizes)


def _availability(pool: Any, variant: Variant, server: Server) -> str | None:
    """Why `variant` cannot be timed here (decided as the engine does), or None."""
    from pytest_allreduce.jobs import vote_availability

    limits = variant.limits(server.world_size)
    if limits.device != server.device:
        return f"a {limits.device} backend"
    if limits.needs_multicast and multicast_disabled_by():
        return "needs NVLink multicast, which is off here"
    if reason := limits.world_size_refusal(server.world_size):
        return reason
    answers = pool.run(vote_availability, variant)[0]
    return "; ".join(f"rank {r}: {a}" for r, a in enumerate(answers) if a) or None


def _work(variant: Variant, server: Server, largest_size: int) -> Any:
    from pytest_allreduce.jobs import Work
    from pytest_allreduce.model import Target

    limit = variant.limits(server.world_size).largest_rows(server.hidden, server.dtype)
    rows = limit if limit is not None else largest_size
    target = Target(variant.name, server.world_size, server.hidden, server.dtype)
    return Work(variant, target, max(rows, 1))


def _median(samples: list[float]) -> float:
    ordered = sorted(samples)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _figure(run: Run, entry: Entry, times: dict[str, float], best: float | None) -> dict[str, Any]:
    us = times.get(run.variant) if run.hazard is None else None
    return {
        "entry": entry_label(entry),
        "runs": run.variant,
        "us": us,
        "regret": us / best - 1 if us is not None and best else None,
        "unsafe": run.hazard,
    }


def measure(setting: Setting, pool: Any, rounds: int, samples: int) -> list[dict[str, Any]]:
    registry = BackendRegistry()
    registry.load_builtins()
    server, profile = setting.server, setting.profile
    refused: dict[str, str | None] = {}
    works: dict[str, Any] = {}
    rows_out = []
    standard = next(e for e in profile.entries if e.backend_type == standard_type(server.device))
    for rows in setting.sizes:
        value = setting.config.lookup(rows)
        chosen = Entry(value.backend_type, value.use_residual_rmsnorm_fusion)
        entries = {*profile.entries, chosen, profile.no_file_entry(rows), standard}
        runs = {e: profile.runs(e, server, rows) for e in entries}
        wanted = {}
        for run in runs.values():
            name = run.variant
            if run.hazard is not None or name in wanted:
                continue
            variant = registry.variant(name)
            if variant is None:
                refused[name] = "not a backend of this installation"
            elif name not in refused:
                refused[name] = _availability(pool, variant, server)
            if refused[name] is None and variant is not None:
                limits = variant.limits(server.world_size)
                if limits.shape_refusal(rows, server.hidden, server.dtype, server.world_size):
                    continue
                works.setdefault(name, _work(variant, server, max(setting.sizes)))
                wanted[name] = works[name]
        found = time_candidates(pool, wanted, rows, rounds, samples) if wanted else {}
        times = {name: _median(s) for name, s in found.items()}
        timed = {e: r for e, r in runs.items() if r.hazard is None and r.variant in times}
        # A tie (entries running the same variant) goes to the standard entry, then the
        # profile's order, as selection breaks ties.
        order = {e: i for i, e in enumerate(profile.entries)}
        best_entry = min(
            timed,
            key=lambda e: (times[timed[e].variant], e != standard, order.get(e, len(order))),
            default=None,
        )
        best = times[timed[best_entry].variant] if best_entry is not None else None
        mine = _figure(runs[chosen], chosen, times, best)
        no_file = _figure(
            runs[profile.no_file_entry(rows)], profile.no_file_entry(rows), times, best
        )
        alone = _figure(runs[standard], standard, times, best)
        for other in (no_file, alone):
            other["speedup"] = (
                other["us"] / mine["us"] if other["us"] is not None and mine["us"] else None
            )
        rows_out.append(
            {
                "batch_size": rows,
                "key": setting.config.lookup_key(rows),
                "is_key": rows in setting.config,
                "chosen": mine["runs"],
                "chosen_entry": mine["entry"],
                "chosen_us": mine["us"],
                "chosen_unsafe": mine["unsafe"],
                "best": timed[best_entry].variant if best_entry is not None else None,
                "best_entry": entry_label(best_entry) if best_entry is not None else None,
                "best_us": best,
                "regret": mine["regret"],
                "no_file": no_file,
                "standard": alone,
                "unavailable": {n: why for n, why in refused.items() if why},
            }
        )
        print(_table_row(rows_out[-1]), flush=True)
    return rows_out


# ---- output ------------------------------------------------------------------------------

HEADER = (
    "| batch size | key | runs (entry -> variant) | us | best | best us | regret "
    "| no-file runs | no-file us | speed-up vs no-file | standard us | speed-up vs standard |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def _us(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _table_row(row: dict[str, Any]) -> str:
    runs = f"{row['chosen_entry']} -> {row['chosen']}"
    if row["chosen_unsafe"]:
        runs += " (UNSAFE)"
    nf, st = row["no_file"], row["standard"]
    return (
        f"| {row['batch_size']} | {row['key']} | {runs} | {_us(row['chosen_us'])} | "
        f"{row['best_entry']} -> {row['best']} | {_us(row['best_us'])} | {_pct(row['regret'])} "
        f"| {nf['entry']} -> {nf['runs']} | {_us(nf['us'])} | {_x(nf.get('speedup'))} "
        f"| {_us(st['us'])} | {_x(st.get('speedup'))} |"
    )


def summary(rows: list[dict[str, Any]]) -> list[str]:
    regrets = [r["regret"] for r in rows if r["regret"] is not None]
    speedups = [r["no_file"]["speedup"] for r in rows if r["no_file"].get("speedup")]
    lines = []
    if regrets:
        worst = max(rows, key=lambda r: r["regret"] if r["regret"] is not None else -1)
        lines.append(
            f"regret over {len(regrets)} sizes: median {sorted(regrets)[len(regrets) // 2]:.1%}, "
            f"largest {worst['regret']:.1%} at {worst['batch_size']}, "
            f"above 2% at {sum(r > 0.02 for r in regrets)} sizes"
        )
    if speedups:
        geo = math.exp(sum(math.log(s) for s in speedups) / len(speedups))
        lines.append(
            f"speed-up against the no-file rule: geometric mean {geo:.2f}x, "
            f"lowest {min(speedups):.2f}x, highest {max(speedups):.2f}x"
        )
    unsafe = [r["batch_size"] for r in rows if r["chosen_unsafe"]]
    if unsafe:
        lines.append(f"UNSAFE: the config makes the consumer run an unsafe call at {unsafe}")
    return lines


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="a config file the plugin wrote")
    parser.add_argument("--world-size", type=int, default=None)
    parser.add_argument("--hidden", type=int, default=None)
    parser.add_argument("--dtype", default=None, help="default: the evidence's config dtype")
    parser.add_argument("--max-tokens", type=int, default=8192)
    parser.add_argument("--sizes", default=None, help="comma list / a:b:step ranges")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--samples", type=int, default=None, help="samples per candidate and round")
    parser.add_argument("--multicast", choices=("on", "off"), default=None)
    parser.add_argument("--json", default=None, help="write the figures here")
    parser.add_argument("--timeout", type=float, default=300.0)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    from pytest_allreduce import fingerprint
    from pytest_allreduce.pool import RankPool
    from pytest_allreduce.timing import TimingPlan

    args = parse_args(argv)
    config = load_config(Path(args.config))
    ws_path, _ = _shape_from_path(Path(args.config))
    world_size = args.world_size or ws_path
    if world_size is None:
        raise SystemExit(f"{args.config}: give --world-size (not found in the path)")
    pool = RankPool(world_size, config.device, args.timeout).start()
    try:
        setting = build_setting(args, pool.run(fingerprint.collect)[0])
        base = TimingPlan.for_device(config.device)
        samples = args.samples or max(1, base.samples // args.rounds)
        print(f"# {args.config}: {setting.profile.name} on {setting.server}", flush=True)
        print(HEADER, flush=True)
        rows = measure(setting, pool, args.rounds, samples)
    finally:
        pool.close()
    for line in summary(rows):
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
