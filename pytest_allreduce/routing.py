"""The token counts a config routes to each of its keys, and which of them to check.

A server looks a token count up by the nearest key (a tie goes to the smaller key; above the
largest key, the largest), so the backend written at a key serves every count from halfway
to the key below to halfway to the key above, far more sizes than were measured. A backend
wrong only in a band between measured sizes would be written for that band; session-end
work therefore runs the check table at sizes sampled in every gap between keys, for the
backend the config sends there. `config.AllreduceConfig.lookup_key` is the lookup itself;
the tests hold the two to the same answer at every size.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

# A gap between neighbouring keys wider than this many rows gets its midpoints on both
# sides sampled too, not only the two sizes at the switch from one key to the next. Plans
# space their keys 8 rows apart where tokens are dense; only wider gaps (the sparse start
# and the tail) hold enough unmeasured sizes for a band to hide in.
WIDE_GAP = 16
# Inside a wide gap: odd sizes this many rows apart, so that a band of wrong sizes at least
# this wide is always hit (a tail loop taken for some row counts); in gaps wider than
# GAP_SAMPLES * SAMPLE_STEP, GAP_SAMPLES sizes evenly spread instead, which bounds the cost
# of the sparse tail at the price of narrower bands there going unseen.
SAMPLE_STEP = 8
GAP_SAMPLES = 8


def _odd(n: int) -> int:
    return n | 1


def sizes_to_check(
    winners: Mapping[int, str], end: int, measured: Sequence[int] = ()
) -> list[tuple[int, int]]:
    """(rows, key it is routed to) for every size to check, ascending, given the winner of
    each key: every key; in every gap between neighbouring keys, the sizes on both sides of
    the switch from one key to the next where the winner changes there, else the odd one
    of the two (the same backend serves both); wide gaps also get the odd midpoint of each
    side. Below the smallest key and above the largest (up to `end`), the range's ends and
    odd midpoint. Every gap wider than WIDE_GAP between any two of these or of `measured`
    (the sizes the suites ran at) is unmeasured ground, even inside one key's range: it gets
    odd sizes at most SAMPLE_STEP rows apart, or GAP_SAMPLES of them in a larger gap."""
    ordered = sorted(winners)
    if not ordered:
        return []
    points: set[int] = set(ordered)
    for low, high in itertools.pairwise(ordered):
        if high - low < 2:
            continue
        switch = (low + high) // 2  # the last size routed to `low`
        if winners[low] != winners[high] or high - low > WIDE_GAP:
            points |= {switch, switch + 1}
        else:
            points.add(_odd(switch))
    grid = sorted(set(measured) | set(ordered))
    for low, high in itertools.pairwise(grid):
        points |= set(_inside(low, high))
    lowest, highest = ordered[0], ordered[-1]
    if lowest > 1:
        points |= {1, _odd((1 + lowest) // 2)}
    if end > highest:
        points |= {highest + 1, _odd((highest + end) // 2), end}
    chosen = sorted(p for p in points if 1 <= p <= max(end, highest))
    return [(rows, _nearest(ordered, rows)) for rows in chosen]


def _inside(low: int, high: int) -> list[int]:
    """Odd sizes strictly between `low` and `high` sampled in a gap wider than WIDE_GAP."""
    if high - low <= WIDE_GAP:
        return []
    step = max(SAMPLE_STEP, -(-(high - low) // GAP_SAMPLES))
    return [_odd(size) for size in range(low + step, high, step) if _odd(size) < high]


def _nearest(ordered: Sequence[int], rows: int) -> int:
    """The key `rows` is routed to (nearest; ties to the smaller; beyond the ends, the end)."""
    best = ordered[0]
    for key in ordered:
        if abs(rows - key) < abs(rows - best):
            best = key
    return best
