"""A ResultStore as one JSON string, for the trip from a pytest-xdist worker to the controller.

xdist carries a worker's `workeroutput` over execnet, which serialises only built-in types
(dispatching on the exact type name: no dataclasses, paths or numpy scalars), so the store
travels as one string and is rebuilt, then merged, on the controller. What a worker knows is
what its own tests recorded: availability as its ranks voted, every verdict, every latency
and the machine fingerprint of its ranks. Variant declarations do not travel: the controller
declares the same variants from the same plan.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .model import Availability, Case, Latency, Target, Verdict
from .results import ResultStore

FORMAT = "pytest-allreduce-results/1"


def _case(data: dict[str, Any]) -> Case:
    return Case(Target(**data["target"]), data["batch_size"])


def dump_results(store: ResultStore) -> str:
    """Everything a worker measured or decided, as JSON text (samples keep full precision)."""
    return json.dumps(
        {
            "format": FORMAT,
            "availability": [dataclasses.asdict(a) for a in store.availability.values()],
            "verdicts": [
                [dataclasses.asdict(case), dataclasses.asdict(verdict)]
                for case, by_suite in store.verdicts.items()
                for verdicts in by_suite.values()
                for verdict in verdicts
            ],
            "latencies": [dataclasses.asdict(lat) for lat in store.latencies.values()],
            "machine": store.machine,
        },
        default=str,
    )


def merge_results(store: ResultStore, text: str, source: str) -> None:
    """Add a worker's results (from `dump_results`) to `store`.

    Verdicts accumulate, so a check that failed on any worker fails the case (as one that
    failed in a single process would); a latency is recorded by the one worker that ran its
    test. Where workers disagree on availability, the refusal is kept, naming `source`.
    """
    data = json.loads(text)
    if data.get("format") != FORMAT:
        found = data.get("format")
        raise ValueError(f"results from {source} are in format {found!r}, not {FORMAT}")
    for item in data["availability"]:
        theirs = Availability(**item)
        ours = store.availability.get((theirs.backend, theirs.world_size))
        if ours is None or (ours.available and not theirs.available):
            if not theirs.available and ours is not None:
                theirs.reason = f"{source}: {theirs.reason}"
            store.record_availability(theirs)
    for case, verdict in data["verdicts"]:
        store.record_verdict(_case(case), Verdict(**verdict))
    for item in data["latencies"]:
        store.record_latency(Latency(**{**item, "case": _case(item["case"])}))
    if not store.machine:
        store.machine = data["machine"]
