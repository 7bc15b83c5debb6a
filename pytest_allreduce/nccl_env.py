"""The NCCL settings every rank runs with: the one place the plugin changes NCCL's defaults.

NCCL_GRAPH_MIXING_SUPPORT (NCCL 2.x, default 1) lets captured and eager NCCL calls on one
communicator be outstanding together. NCCL 2.28 pays for it in every captured collective:
an extra event-record node on NCCL's internal stream, which the next NCCL kernel of the graph
waits for. Back-to-back captured allreduces (raw ncclAllReduce, as servers call it in their
graphs) carry that node on their critical path: the likely cause of raw pynccl taking 10.6 us
per op at 10 ops per graph and 59.2 us at 1000 on 2 x H200 where nccl-tests takes 6.8 us
(issue 13; benchmarks/pynccl_probe.py confirms or refutes it on the GPU machine).
Latency-minded users turn it off: TensorRT-LLM per communicator where NCCL allows it
(graphUsageMode, NCCL >= 2.29), serving forks process-wide for their decode graphs.

The plugin never needs mixing: no eager NCCL call meets a graph in flight on the same
communicator (the timing aligns ranks on a communicator of its own, and the checks synchronise
after their replays). So the ranks run with it off, unless the user set
NCCL_GRAPH_MIXING_SUPPORT themselves (theirs wins) or sets GRAPH_MIXING_SWITCH=1 to keep
NCCL's default. NCCL reads the variable once per process, so it is set before the rank's
first communicator exists; it applies to every communicator of the rank (torch's too), and
the fingerprint of every run records the NCCL settings in effect.
"""

from __future__ import annotations

import os
from collections.abc import MutableMapping

NCCL_GRAPH_MIXING = "NCCL_GRAPH_MIXING_SUPPORT"
# "0" (default): ranks run with NCCL graph mixing off; "1": NCCL's own default is kept.
GRAPH_MIXING_SWITCH = "PYTEST_ALLREDUCE_NCCL_GRAPH_MIXING"


def rank_settings(environ: MutableMapping[str, str]) -> dict[str, str]:
    """The NCCL variables a rank gets on top of `environ` (those the user set are kept).
    ValueError naming the switch when it holds anything but 0 or 1."""
    switch = environ.get(GRAPH_MIXING_SWITCH, "").strip() or "0"
    if switch not in ("0", "1"):
        raise ValueError(
            f"{GRAPH_MIXING_SWITCH}={switch!r}: expected 0 (NCCL graph mixing off in the "
            "ranks, the default) or 1 (keep NCCL's default)"
        )
    if switch == "0" and NCCL_GRAPH_MIXING not in environ:
        return {NCCL_GRAPH_MIXING: "0"}
    return {}


def apply_rank_settings(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Set the rank's NCCL variables (call before the first NCCL communicator); returns them."""
    settings = rank_settings(environ)
    environ.update(settings)
    return settings


def in_effect(environ: MutableMapping[str, str] = os.environ) -> dict[str, str]:
    """Every NCCL_* variable of this process, for the fingerprint; graph mixing always listed,
    as NCCL's default when unset."""
    found = {k: v for k, v in sorted(environ.items()) if k.startswith("NCCL_")}
    found.setdefault(NCCL_GRAPH_MIXING, "unset (NCCL default: 1)")
    return found
