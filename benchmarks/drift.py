"""Run-to-run drift of backend ratios, from the evidence of two runs of the same plan.

Selection's noise model (`pytest_allreduce/noise.py`) needs the drift of a log ratio of two
backends' medians between runs, which no single run can see. Given two evidence files of the
same plan on the same machine, for every pair of variants the consumer can run and every size
both runs measured, this prints

- the common shift: per pair, the mean over sizes of the change of ln(median x / median y)
  between the runs; its root mean square over pairs, divided by sqrt(2), is the drift of one
  run (the figure `noise.DRIFT_FLOOR` states);
- the independent part: the spread of the same change around each pair's mean.

    python benchmarks/drift.py EVIDENCE_A EVIDENCE_B [--dtype bfloat16] [--all-variants]

Evidence files may be gzip-compressed (`.gz`).
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
import math
from pathlib import Path
from typing import Any

from pytest_allreduce.consumer import profile_for
from pytest_allreduce.serving import runnable_variants


def load(path: Path) -> dict[str, Any]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:  # type: ignore[operator]
        return json.load(handle)


def medians(doc: dict[str, Any], dtype: str) -> dict[str, dict[int, float]]:
    """variant -> batch size -> fused-job median."""
    found: dict[str, dict[int, float]] = {}
    for name, backend in doc["dtypes"][dtype]["backends"].items():
        for size, record in backend["batch_sizes"].items():
            fused = record.get("latency", {}).get("fused")
            if fused:
                found.setdefault(name, {})[int(size)] = fused["median_us"]
    return found


def drift(
    a: dict[str, dict[int, float]], b: dict[str, dict[int, float]], variants: set[str] | None
) -> tuple[float, float, int]:
    """(drift of one run, independent spread of one size's change, pairs used)."""
    names = sorted(set(a) & set(b) & (variants if variants is not None else set(a)))
    shifts, residuals = [], []
    for x, y in itertools.combinations(names, 2):
        sizes = sorted(set(a[x]) & set(a[y]) & set(b[x]) & set(b[y]))
        if len(sizes) < 2:
            continue
        changes = [math.log(b[x][s] / b[y][s]) - math.log(a[x][s] / a[y][s]) for s in sizes]
        mean = sum(changes) / len(changes)
        shifts.append(mean)
        residuals += [c - mean for c in changes]
    if not shifts:
        raise SystemExit("no pair of variants was measured at two or more common sizes")
    common = math.sqrt(sum(s * s for s in shifts) / len(shifts)) / math.sqrt(2)
    spread = math.sqrt(sum(r * r for r in residuals) / len(residuals)) / math.sqrt(2)
    return common, spread, len(shifts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path)
    parser.add_argument("second", type=Path)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument(
        "--all-variants",
        action="store_true",
        help="every measured variant, not only those the consumer can run",
    )
    args = parser.parse_args(argv)
    first, second = load(args.first), load(args.second)
    variants = None
    if not args.all_variants:
        profile = profile_for(first["device"])
        variants = set().union(*(runnable_variants(profile, e) for e in profile.entries))
    common, spread, pairs = drift(medians(first, args.dtype), medians(second, args.dtype), variants)
    print(f"{pairs} pairs of variants, {args.dtype}")
    print(f"drift of one run (common shift of a log ratio): {common:.3f}")
    print(f"independent change of one size's log ratio, per run: {spread:.3f}")


if __name__ == "__main__":
    main()
