"""What the store holds for one (world size, hidden, dtype), indexed for the writers."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from typing import Any

from ..model import GroupKey, Latency, Target
from ..results import ResultStore


@dataclasses.dataclass
class GroupData:
    """What the store holds for one GroupKey, indexed for the writers."""

    key: GroupKey
    targets: list[Target]
    sizes: list[int]
    latencies: dict[tuple[str, int, str], Latency]  # (backend, batch size, job) -> latency

    def latency(self, backend: str, batch_size: int, job: str) -> Latency | None:
        return self.latencies.get((backend, batch_size, job))


def group_data(store: ResultStore, key: GroupKey) -> GroupData:
    latencies = {
        (case.target.backend, case.batch_size, job): lat
        for (case, job), lat in store.latencies.items()
        if case.target.group_key == key
    }
    targets = [t for t in store.targets() if t.group_key == key]
    return GroupData(key, targets, store.checked_batch_sizes(key), latencies)


def suites_shown(store: ResultStore) -> list[str]:
    """Suites to show: the gating ones first (in their order), then the others by name."""
    required = list(store.required_suites())
    others = sorted(store.suites_run - set(required))
    return required + others


def latency_json(lat: Latency) -> dict[str, Any]:
    return {
        "median_us": lat.median_us,
        "p10_us": lat.spread_us[0],
        "p90_us": lat.spread_us[1],
        "algbw_gbps": lat.algbw_gbps,
        "busbw_gbps": lat.busbw_gbps,
        "samples_us": [float(s) for s in lat.samples_us],
        "ops_per_sample": lat.ops_per_sample,
        "clock": lat.clock,
        "message_bytes": lat.message_bytes,
        "engaged": lat.engaged,
    }


def availability_rows(store: ResultStore, world_size: int, ran: Iterable[str]) -> list[dict]:
    """One row per backend known at `world_size`: ran, available-but-not-run or skipped."""
    ran = set(ran)
    rows: dict[str, dict[str, Any]] = {}
    for (name, ws), avail in store.availability.items():
        if ws != world_size:
            continue
        status = "skipped"
        if avail.available:
            status = "ran" if name in ran else "available, not run"
        rows[name] = {
            "backend": name,
            "backend_type": store.server_type(name),
            "available": avail.available,
            "status": status,
            "reason": avail.reason,
            "limits": avail.limits,
        }
    for name in ran - set(rows):
        rows[name] = {
            "backend": name,
            "backend_type": store.server_type(name),
            "available": True,
            "status": "ran",
            "reason": "",
            "limits": {},
        }
    return [rows[n] for n in sorted(rows)]


def for_another_device(limits: Mapping[str, Any], available: bool, device: str) -> bool:
    """A backend refused only because it is built for another device than the session's."""
    return not available and limits.get("device") not in (None, device)


def collapse_other_device(rows: list[dict], device: str) -> list[dict]:
    """`availability_rows` with the backends built for another device on one row: on a CPU
    machine, the GPU backends are one fact, not seventeen."""
    others = [r for r in rows if for_another_device(r["limits"], r["available"], device)]
    if len(others) < 2:
        return rows
    kept = [r for r in rows if r not in others]
    their_device = "/".join(sorted({r["limits"]["device"] for r in others}))
    names = ", ".join(r["backend"] for r in others)
    kept.append(
        {
            "backend": f"{len(others)} {their_device} backends",
            "backend_type": None,
            "available": False,
            "status": "skipped",
            "reason": f"built for {their_device}; this session runs on {device}: {names}",
            "limits": {},
        }
    )
    return kept
