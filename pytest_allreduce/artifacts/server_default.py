"""What the server runs without a config file, and how much the chosen backends gain on it.

A config is worth what it changes: without one, the consumer applies its no-file rule
(`ConsumerProfile.no_file_entry`) and runs whatever its dispatch makes of that entry at
each size (`ConsumerProfile.runs`). That run is timed like every candidate, so the speed-up
of a choice is the measured latency of the no-file run over the chosen one's, at one size.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..consumer import Server, profile_for
from ..model import GroupKey, Target
from ..results import ResultStore
from ..selection import SELECTION_JOB, Selection

# The variants whose availability tells which server facts hold on this machine: a
# multicast variant that ran means the symmetric buffer gets a multicast address, a custom
# allreduce that ran beyond two ranks means full NVLink (its probe refuses otherwise).
MULTICAST_WITNESS = "torch_symm_mem_multimem"
FULL_NVLINK_WITNESS = "custom_ar"


@dataclass(frozen=True)
class Gain:
    """At one size: what the server runs without a file, and the choice's speed-up on it."""

    batch_size: int
    default_variant: str
    default_us: float
    chosen_us: float

    @property
    def speedup(self) -> float:
        return self.default_us / self.chosen_us


def server_for(store: ResultStore, key: GroupKey) -> Server | None:
    """The server this session's machine stands for, or None where a fact is missing."""
    if store.device == "cpu":
        return Server.cpu(world_size=key.world_size, dtype=key.dtype, hidden=key.hidden)
    try:
        major, minor = (int(p) for p in str(store.machine["compute_capability"]).split("."))
    except (KeyError, ValueError):
        return None

    def ran(name: str) -> bool:
        availability = store.availability.get((name, key.world_size))
        return availability is not None and availability.available

    return Server.cuda(
        world_size=key.world_size,
        capability=(major, minor),
        multicast=ran(MULTICAST_WITNESS),
        full_nvlink=key.world_size <= 2 or ran(FULL_NVLINK_WITNESS),
        dtype=key.dtype,
        hidden=key.hidden,
        # Every latency here is a CUDA-graph replay, as a server's decode steps are.
        in_cuda_graph=True,
    )


def gains(store: ResultStore, key: GroupKey, selection: Selection) -> list[Gain]:
    """Per chosen size where the no-file run was timed too: the speed-up of the choice."""
    server = server_for(store, key)
    if server is None:
        return []
    profile = profile_for(store.device)
    found = []
    for rows, choice in sorted(selection.choices.items()):
        run = profile.runs(profile.no_file_entry(rows), server, rows)
        default_case = Target(run.variant, key.world_size, key.hidden, key.dtype).at(rows)
        default = store.latency(default_case, SELECTION_JOB)
        if default is None or choice.median_us <= 0:
            continue
        found.append(Gain(rows, run.variant, default.median_us, choice.median_us))
    return found
