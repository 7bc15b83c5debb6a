"""The one table of checks: every correctness check the plugin runs, and where.

The pytest suites parametrise their tests from this table, and session-end bisection runs
the same entries at the sizes it adds, so a check added here runs at every size the config
will hold and its failures are recorded under its own suite everywhere. Rank functions are
named, not imported: this module is read while tests are collected, before any rank runs.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

# Rows the numerics checks always cover besides the plan's: awkward sizes that vectorised
# kernels get wrong first (a single row, an odd count, one below a power of two).
AWKWARD_ROWS: tuple[int, ...] = (1, 3, 127)
# Replays of each captured graph at each size: Lamport-style spin-wait hangs and stale
# registered buffers have shown up in servers only over many replays, not the first few.
GRAPH_REPLAYS_PER_SIZE = 100
# The stress suite's sizes: a decode-sized call (odd, so vector tails are exercised) and a
# medium one, the two regimes where one-shot kernels and their flags are hammered hardest.
STRESS_ROWS: tuple[int, ...] = (3, 128)

# The order suites run in within a world size: correctness before timing.
SUITE_ORDER: tuple[str, ...] = ("numerics", "limits", "graph", "stress", "latency", "accuracy")


@dataclass(frozen=True)
class Check:
    """One correctness check: which suite records it, what runs on every rank, where.

    sizes:
      "each"   -- at every batch size of the plan (plus `extra_rows`) and at every size
                  session-end work adds (bisection, and the sizes a config routes to);
      "limits" -- once per target, at the declared largest input (the check steps around it);
      "listed" -- at the sizes of `extra_rows` only.
    The rank function is called as fn(ctx, work, rows, *args) and returns a CheckReport.
    """

    suite: str
    name: str
    function: str  # a function of pytest_allreduce.checks
    sizes: Literal["each", "limits", "listed"] = "each"
    extra_rows: tuple[int, ...] = ()
    args: tuple[Any, ...] = ()
    needs_graphs: bool = False  # only where CUDA graphs exist and the backend captures
    doc: str = field(default="", compare=False)

    @property
    def fn(self) -> Callable[..., Any]:
        return getattr(importlib.import_module("pytest_allreduce.checks"), self.function)

    @property
    def label(self) -> str:
        return f"{self.suite}::{self.name}"


CHECKS: tuple[Check, ...] = (
    Check(
        "numerics",
        "exact_sum",
        "exact_sum",
        extra_rows=AWKWARD_ROWS,
        doc="integer inputs: bit for bit the exact sum, over rounds that rewrite the input",
    ),
    Check(
        "numerics",
        "rounded_sum",
        "rounded_sum",
        extra_rows=AWKWARD_ROWS,
        doc="mixed sign and magnitude: correctly rounded at 2 ranks, else a derived bound",
    ),
    Check(
        "numerics",
        "edge_values",
        "edge_values",
        extra_rows=AWKWARD_ROWS,
        doc="overflow, subnormals, signed zeros, NaN, Inf: the correctly rounded sum",
    ),
    Check(
        "numerics",
        "fused_job",
        "fused_job",
        extra_rows=AWKWARD_ROWS,
        doc="small-RMS rows, several eps: residual-out exact, norm and quantized outputs",
    ),
    Check(
        "limits",
        "size_limits",
        "size_limits",
        sizes="limits",
        doc="max - d and max exact, max + d refused on every rank before any collective",
    ),
    Check(
        "graph",
        "graph_replays",
        "graph_replays",
        args=(GRAPH_REPLAYS_PER_SIZE,),
        needs_graphs=True,
        doc="both jobs captured and replayed with inputs changed before every replay",
    ),
    Check(
        "stress",
        "back_to_back",
        "back_to_back",
        sizes="listed",
        extra_rows=STRESS_ROWS,
        doc="thousands of back-to-back calls, inputs changing, every output checked on device",
    ),
)


def checks_of(suite: str) -> list[Check]:
    return [c for c in CHECKS if c.suite == suite]


def checks_at_each_size() -> list[Check]:
    """What bisection runs at a size it adds."""
    return [c for c in CHECKS if c.sizes == "each"]


def suite_rank(suite: str) -> int:
    return SUITE_ORDER.index(suite) if suite in SUITE_ORDER else len(SUITE_ORDER)
