"""Whether a run covered its whole plan: only a complete run may replace a config.

A tuned config is the product of a whole run. A run of part of the plan (``-k``, ``--lf``,
``--deselect``, one suite file, an interrupted or failed session) still measures something,
but its selection sees fewer sizes or fewer backends, so its config must not overwrite the
complete one a server may be reading: it is written beside it as ``.partial.json`` instead,
and the summary says why.

A (world size, hidden) is COMPLETE when the session ended with exit status 0 and, for every
planned target of it (every planned variant at every planned dtype):

- its availability was decided (a target no test ever reached is a gap), and, when it is
  available, at every planned batch size (the tail included):
- every check of every gating suite that runs at each size has a verdict there (passed,
  failed or skipped with a reason: a skip is an answer, an unrun test is not), and
- both jobs were timed, or the latency test there was skipped with a reason (the case
  cannot run here, e.g. past the backend's size limit).

Sizes that session-end refinement adds are not planned and do not count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .checktable import checks_at_each_size
from .model import JOBS, Case
from .results import ResultStore

if TYPE_CHECKING:
    from .plan import Plan

# How many examples of each kind of gap a reason lists.
EXAMPLES = 3


@dataclass(frozen=True)
class Coverage:
    """How completely a run covered the plan of one (world size, hidden)."""

    world_size: int
    hidden: int
    gaps: tuple[str, ...]  # why the run is not complete; empty when it is

    @property
    def complete(self) -> bool:
        return not self.gaps

    def describe(self) -> str:
        return "complete" if self.complete else "partial: " + "; ".join(self.gaps)

    def to_json(self) -> dict[str, Any]:
        return {"complete": self.complete, "gaps": list(self.gaps)}


def session_gaps(exitstatus: int, tests_failed: int) -> list[str]:
    """Why the session as a whole cannot vouch for a complete config."""
    if exitstatus == 0:
        return []
    if exitstatus == 1:
        return [f"{tests_failed} test(s) failed"]
    if exitstatus == 2:
        return ["the session was interrupted"]
    return [f"the session ended with exit status {exitstatus}"]


def _suite_checks() -> dict[str, int]:
    """Checks per suite that record a verdict at every planned size."""
    counts: dict[str, int] = {}
    for check in checks_at_each_size():
        counts[check.suite] = counts.get(check.suite, 0) + 1
    return counts


def _measured(store: ResultStore, case: Case) -> bool:
    if all(store.latency(case, job) is not None for job in JOBS):
        return True
    return store.suite_outcome(case, "latency") == "skipped"


def _examples(kind: str, cases: list[Case]) -> str:
    shown = ", ".join(
        f"{c.target.backend} {c.target.dtype} at {c.batch_size}" for c in cases[:EXAMPLES]
    )
    more = f" and {len(cases) - EXAMPLES} more" if len(cases) > EXAMPLES else ""
    return f"{kind} at {len(cases)} planned case(s) ({shown}{more})"


def coverage(
    plan: Plan, store: ResultStore, run_gaps: Sequence[str]
) -> dict[tuple[int, int], Coverage]:
    """Coverage of every planned (world size, hidden), given the session-level gaps."""
    required = store.required_suites()
    per_suite = _suite_checks()
    found: dict[tuple[int, int], Coverage] = {}
    for ws in plan.world_sizes:
        for hidden in plan.hidden_sizes:
            gaps = list(run_gaps)
            unreached: list[str] = []
            unchecked: dict[str, list[Case]] = {suite: [] for suite in required}
            untimed: list[Case] = []
            for target in plan.targets():
                if (target.world_size, target.hidden) != (ws, hidden):
                    continue
                availability = store.availability.get((target.backend, ws))
                if availability is None:
                    unreached.append(f"{target.backend} {target.dtype}")
                    continue
                if not availability.available:
                    continue
                for rows in plan.batch_sizes:
                    case = target.at(rows)
                    verdicts = store.verdicts.get(case, {})
                    for suite in required:
                        ran = {v.test_id for v in verdicts.get(suite, [])}
                        if len(ran) < per_suite.get(suite, 1):
                            unchecked[suite].append(case)
                    if not _measured(store, case):
                        untimed.append(case)
            if unreached:
                gaps.append(
                    f"no test reached {', '.join(unreached[:EXAMPLES])}"
                    + (
                        f" and {len(unreached) - EXAMPLES} more"
                        if len(unreached) > EXAMPLES
                        else ""
                    )
                )
            for suite, cases in unchecked.items():
                if cases:
                    gaps.append(_examples(f"the {suite} suite did not run every check", cases))
            if untimed:
                gaps.append(_examples("the latency suite did not time both jobs", untimed))
            found[(ws, hidden)] = Coverage(ws, hidden, tuple(gaps))
    return found
