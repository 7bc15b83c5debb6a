"""Replay a run's selection from its evidence with today's rules: which sizes refinement asks
for after the suites, and the config the final selection writes.

    python tools/replay_refinement.py EVIDENCE[.gz] [...] [--hidden 4096] [--dtype bfloat16]

The evidence holds every latency and verdict of the run, refinement's sizes included. The
plan's sizes are the ones measured by the suites (every size with a latency test verdict;
the rest were added at session end). For each file this prints the refinement points the
current rules ask for after selecting over the plan's sizes (the first bisection round),
the pairs of neighbouring sizes whose change of choice is within noise
(`selection.change_resolved`), and the final config keys. A rule change can then be checked
against runs made before it, on the GPU's own measurements, without the GPU.
"""

from __future__ import annotations

import argparse
import gzip
import itertools
import json
from pathlib import Path
from typing import Any

from pytest_allreduce import selection as sel
from pytest_allreduce.artifacts.evidence import store_from_evidence
from pytest_allreduce.model import GroupKey


def _load(path: Path) -> dict[str, Any]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt") as handle:  # type: ignore[operator]
        return json.load(handle)


# Test ids session-end work records its checks under (`session.SESSION_END_STEPS`).
SESSION_END_STEPS = ("bisection", "routed size")


def _suite_sizes(doc: dict[str, Any], dtype: str) -> list[int]:
    """Sizes the latency suite timed: a latency verdict recorded under a test id that is not a
    session-end step's (the limits suite's probe sizes have no latency)."""
    sizes = set()
    for backend in doc["dtypes"][dtype]["backends"].values():
        for size, record in backend["batch_sizes"].items():
            checks = record.get("verdicts", {}).get("latency", {}).get("checks", [])
            if any(not c["test_id"].startswith(SESSION_END_STEPS) for c in checks):
                sizes.add(int(size))
    return sorted(sizes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("evidence", nargs="+", type=Path)
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--world-size", type=int, default=2)
    args = parser.parse_args(argv)
    key = GroupKey(args.world_size, args.hidden, args.dtype)
    for path in args.evidence:
        doc = _load(path)
        store = store_from_evidence(doc)
        plan = _suite_sizes(doc, args.dtype)
        first = sel.select(store, key, plan)
        points = sel.refinement_points(first, plan, max(plan))
        final = sel.select(store, key)
        unresolved = [
            (lo, hi)
            for lo, hi in itertools.pairwise(final.batch_sizes)
            if final.choices.get(lo) is not None
            and final.choices.get(hi) is not None
            and final.choices[lo].run != final.choices[hi].run
            and not sel.change_resolved(final, lo, hi)
        ]
        keys = {k: final.choices[k].backend_name for k in final.config_keys()}
        print(f"{path}:")
        print(f"  first refinement round asks for: {points}")
        print(f"  changes of choice within noise: {unresolved}")
        print(f"  config: {keys}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
