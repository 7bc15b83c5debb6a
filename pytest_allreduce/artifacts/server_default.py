"""What the server runs without a config file, and how much the chosen backends gain on it.

A config is worth what it changes: without one, the consumer applies its no-file rule
(`ConsumerProfile.no_file_entry`) and runs whatever its dispatch makes of that entry at
each size (`ConsumerProfile.runs`). That run is timed like every candidate, so the speed-up
of a choice is the measured latency of the no-file run over the chosen one's, at one size.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..model import GroupKey, Target
from ..results import ResultStore
from ..selection import SELECTION_JOB, Selection
from ..serving import UnknownServer, session_server


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


def gains(store: ResultStore, key: GroupKey, selection: Selection) -> list[Gain]:
    """Per chosen size where the no-file run was timed too: the speed-up of the choice."""
    try:
        state = session_server(store, key)
    except UnknownServer:
        return []
    found = []
    for rows, choice in sorted(selection.choices.items()):
        run = state.runs(state.profile.no_file_entry(rows), rows)
        default_case = Target(run.variant, key.world_size, key.hidden, key.dtype).at(rows)
        default = store.latency(default_case, SELECTION_JOB)
        if default is None or choice.median_us <= 0:
            continue
        found.append(Gain(rows, run.variant, default.median_us, choice.median_us))
    return found
