"""Markdown tables from evidence files, for docs/results.

    python tools/evidence_tables.py latency EVIDENCE [--sizes 1,16,128] [--dtype bfloat16]
    python tools/evidence_tables.py repeat EVIDENCE_A EVIDENCE_B
    python tools/evidence_tables.py regret TUNED_EVIDENCE REMEASURED_EVIDENCE
    python tools/evidence_tables.py verdicts EVIDENCE

`latency`: each backend's median beside NCCL's, bare allreduce and the fused job.
`repeat`: the same measurement twice; per batch size the median over backends of
|median_B / median_A - 1|, and the largest.
`regret`: per tuned batch size, the chosen backend against NCCL, against SGLang's rule
without a config file (flashinfer_fusion up to 128 rows, torch_symm_mem above), and against
the fastest loadable backend, all timed in an independent re-measurement.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

JOBS = ("allreduce", "fused")
LOADABLE = {"flashinfer_fusion", "torch_symm_mem", "custom_allreduce", "nccl"}
# SGLang without a config: flashinfer_fusion for rows <= 128, torch_symm_mem above. At world
# size 2 on SM90 its FlashInfer path runs one-shot and its symmetric-memory path two-shot.
DEFAULT_RULE = (128, "flashinfer_fusion_one_shot", "torch_symm_mem_two_shot")


def load(path: str, dtype: str) -> dict[str, Any]:
    return json.loads(Path(path).read_text())["dtypes"][dtype]


def medians(evidence: dict[str, Any], job: str) -> dict[str, dict[int, float]]:
    """backend -> batch size -> median (us) for one job."""
    table: dict[str, dict[int, float]] = {}
    for name, backend in evidence["backends"].items():
        for bs, entry in backend.get("batch_sizes", {}).items():
            lat = (entry.get("latency") or {}).get(job)
            if lat:
                table.setdefault(name, {})[int(bs)] = float(lat["median_us"])
    return table


def latency_table(args: argparse.Namespace) -> str:
    evidence = load(args.evidence, args.dtype)
    out = []
    for job in JOBS:
        table = medians(evidence, job)
        sizes = sorted({bs for row in table.values() for bs in row})
        if args.sizes:
            sizes = [s for s in sizes if s in set(args.sizes)]
        nccl = table.get("nccl", {})
        out.append(f"\n{job} (median us per op; x = NCCL time / backend time)\n")
        out.append("| backend | " + " | ".join(f"bs {s}" for s in sizes) + " |")
        out.append("|---|" + "---|" * len(sizes))
        for name in sorted(table, key=lambda n: (n != "nccl", n)):
            cells = []
            for s in sizes:
                value = table[name].get(s)
                if value is None:
                    cells.append("-")
                elif name == "nccl" or s not in nccl:
                    cells.append(f"{value:.1f}")
                else:
                    cells.append(f"{value:.1f} ({nccl[s] / value:.2f}x)")
            out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def repeat_table(args: argparse.Namespace) -> str:
    first, second = load(args.first, args.dtype), load(args.second, args.dtype)
    out = [
        "| job | batch size | backends | median abs diff | largest abs diff (backend) |",
        "|---|---|---|---|---|",
    ]
    for job in JOBS:
        a, b = medians(first, job), medians(second, job)
        sizes = sorted({bs for row in a.values() for bs in row})
        for s in sizes:
            diffs = {n: abs(b[n][s] / a[n][s] - 1) for n in a if s in a[n] and s in b.get(n, {})}
            if not diffs:
                continue
            worst = max(diffs, key=diffs.__getitem__)
            out.append(
                f"| {job} | {s} | {len(diffs)} | {statistics.median(diffs.values()):.1%} | "
                f"{diffs[worst]:.1%} ({worst}) |"
            )
    return "\n".join(out)


def regret_table(args: argparse.Namespace) -> str:
    tuned = json.loads(Path(args.tuned).read_text())
    choices = tuned["dtypes"][args.dtype]["selection"]["choices"]
    again = load(args.remeasured, args.dtype)
    fused = medians(again, "fused")
    types = {n: b.get("backend_type") for n, b in again["backends"].items()}
    out = [
        "| bs | chosen | chosen us | NCCL us | vs NCCL | default rule | default us | vs default "
        "| fastest (re-measured) | fastest us | regret |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    regrets = []
    for key in sorted(choices, key=int):
        bs, chosen = int(key), choices[key]["backend_name"]
        mine = fused.get(chosen, {}).get(bs)
        nccl = fused.get("nccl", {}).get(bs)
        rule = DEFAULT_RULE[1] if bs <= DEFAULT_RULE[0] else DEFAULT_RULE[2]
        default = fused.get(rule, {}).get(bs)
        loadable = {
            n: row[bs] for n, row in fused.items() if bs in row and types.get(n) in LOADABLE
        }
        fastest = min(loadable, key=loadable.__getitem__) if loadable else None
        if mine is None or fastest is None:
            out.append(f"| {bs} | {chosen} | not re-measured | | | | | | | | |")
            continue
        regret = mine / loadable[fastest] - 1
        regrets.append(regret)

        def ratio(other: float | None, mine: float = mine) -> str:
            return f"{other / mine:.2f}x" if other else "-"

        out.append(
            f"| {bs} | {chosen} | {mine:.2f} | {nccl or float('nan'):.2f} | {ratio(nccl)} | "
            f"{rule} | {default or float('nan'):.2f} | {ratio(default)} | {fastest} | "
            f"{loadable[fastest]:.2f} | {regret:.1%} |"
        )
    if regrets:
        out.append(
            f"\nregret: median {statistics.median(regrets):.1%}, largest {max(regrets):.1%} "
            f"over {len(regrets)} batch sizes (chosen / fastest - 1, re-measured)"
        )
    return "\n".join(out)


def verdicts_table(args: argparse.Namespace) -> str:
    """Per backend: how many checks of each suite passed, failed or were skipped."""
    evidence = load(args.evidence, args.dtype)
    suites = ("numerics", "graph", "latency")
    out = [
        "| backend | config type | " + " | ".join(suites) + " | batch sizes checked |",
        "|---|---|" + "---|" * len(suites) + "---|",
    ]
    for name, backend in sorted(evidence["backends"].items()):
        counts = {s: {"passed": 0, "failed": 0, "skipped": 0} for s in suites}
        sizes = []
        for bs, entry in backend.get("batch_sizes", {}).items():
            ran = False
            for suite in suites:
                for check in (entry.get("verdicts", {}).get(suite) or {}).get("checks", []):
                    counts[suite][check["outcome"]] += 1
                    ran = ran or check["outcome"] != "skipped"
            if ran:
                sizes.append(int(bs))
        if not sizes:
            continue

        def cell(c: dict[str, int]) -> str:
            text = f"{c['passed']} passed"
            if c["failed"]:
                text += f", **{c['failed']} failed**"
            return text + (f", {c['skipped']} skipped" if c["skipped"] else "")

        out.append(
            f"| {name} | {backend.get('backend_type') or '-'} | "
            + " | ".join(cell(counts[s]) for s in suites)
            + f" | {', '.join(map(str, sorted(sizes)))} |"
        )
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16")
    sub = parser.add_subparsers(dest="command", required=True)
    lat = sub.add_parser("latency")
    lat.add_argument("evidence")
    lat.add_argument("--sizes", type=lambda t: [int(x) for x in t.split(",")], default=None)
    rep = sub.add_parser("repeat")
    rep.add_argument("first")
    rep.add_argument("second")
    reg = sub.add_parser("regret")
    reg.add_argument("tuned")
    reg.add_argument("remeasured")
    ver = sub.add_parser("verdicts")
    ver.add_argument("evidence")
    args = parser.parse_args()
    commands = {
        "latency": latency_table,
        "repeat": repeat_table,
        "regret": regret_table,
        "verdicts": verdicts_table,
    }
    print(commands[args.command](args))


if __name__ == "__main__":
    main()
