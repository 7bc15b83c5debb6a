"""The evidence file: every measurement, verdict and decision behind a config.

A config without its evidence cannot be audited; with it, anyone can re-check a choice: it
records the consumer profile and server state the choice was made for, per batch size every
config entry's run, time and why it was or was not eligible, the segments the rule tested,
the noise model, and every variant's raw samples and verdicts.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from ..coverage import Coverage
from ..model import Availability, GroupKey, Latency, Target, VariantInfo, Verdict
from ..results import ResultStore
from ..selection import Selection, rule_json
from .config import CONFIG_DTYPE_RULE
from .index import GroupData, availability_rows, group_data, latency_json, suites_shown

EVIDENCE_FORMAT = "pytest-allreduce-evidence"
EVIDENCE_VERSION = 2


def _dtype_evidence(store: ResultStore, data: GroupData, selection: Selection | None) -> dict:
    suites = suites_shown(store)
    backends: dict[str, Any] = {}
    for target in data.targets:
        per_size: dict[str, Any] = {}
        for bs in data.sizes:
            case = target.at(bs)
            checks = store.verdicts.get(case, {})
            lats = {
                job: latency_json(lat)
                for job in ("allreduce", "fused")
                if (lat := data.latency(target.backend, bs, job)) is not None
            }
            if not checks and not lats:
                continue
            per_size[str(bs)] = {
                "eligible": store.eligible(case),
                "verdicts": {
                    suite: {
                        "outcome": store.suite_outcome(case, suite),
                        "checks": [dataclasses.asdict(v) for v in checks.get(suite, [])],
                    }
                    for suite in suites
                    if suite in checks or suite in store.required_suites()
                },
                "latency": lats,
            }
        backends[target.backend] = {
            "backend_type": store.server_type(target.backend),
            "fused_kernel": store.fused(target.backend),
            "simplicity": store.variants[target.backend].simplicity
            if target.backend in store.variants
            else None,
            # Why it may win nowhere in this config (a failure at any size, in any suite).
            "disqualified": store.disqualification(target),
            "batch_sizes": per_size,
        }
    return {
        "selection": selection.to_json() if selection is not None else None,
        "backends": backends,
    }


def evidence(
    store: ResultStore,
    world_size: int,
    hidden: int,
    dev: str,
    groups: dict[GroupKey, Selection],
    config_dtype: str,
    config_files: tuple[Path, ...],
    config_note: str,
    covered: Coverage,
) -> dict[str, Any]:
    ran = {t.backend for key in groups for t in group_data(store, key).targets}
    source = groups.get(GroupKey(world_size, hidden, config_dtype))
    return {
        "format": EVIDENCE_FORMAT,
        "format_version": EVIDENCE_VERSION,
        "generated": datetime.now(timezone.utc).isoformat(),
        "world_size": world_size,
        "hidden": hidden,
        "device": store.device,
        "device_name": dev,
        "config": {
            "file": config_files[0].name if config_files else None,
            "files": [p.name for p in config_files],
            "dtype": config_dtype,
            "dtype_rule": CONFIG_DTYPE_RULE,
            "note": config_note,
        },
        "coverage": covered.to_json(),
        "consumer": source.state.to_json() if source and source.state else None,
        "selection_rule": rule_json(
            store.device,
            source.noise if source else None,
            source.segment_price if source else 0.0,
        ),
        "required_suites": list(store.required_suites()),
        "missing_suites": store.missing_suites(),
        "machine": store.machine,
        "availability": availability_rows(store, world_size, ran),
        "dtypes": {
            key.dtype: _dtype_evidence(store, group_data(store, key), sel)
            for key, sel in groups.items()
        },
    }


def store_from_evidence(doc: dict[str, Any]) -> ResultStore:
    """The measurements and verdicts an evidence file records, as a store again.

    Selection can then be re-run on a past run's data (a changed rule, a re-measured drift
    floor) without measuring anything.
    """
    if doc.get("format") != EVIDENCE_FORMAT:
        raise ValueError(f"not a {EVIDENCE_FORMAT} file (format {doc.get('format')!r})")
    store = ResultStore(doc["device"])
    store.machine = dict(doc.get("machine") or {})
    ws, hidden = doc["world_size"], doc["hidden"]
    for row in doc.get("availability", []):
        store.record_availability(
            Availability(row["backend"], ws, row["available"], row["reason"] or "", row["limits"])
        )
    for dtype, per_dtype in doc["dtypes"].items():
        for name, backend in per_dtype["backends"].items():
            simplicity = backend["simplicity"] if backend["simplicity"] is not None else 50
            store.declare(
                VariantInfo(name, backend["backend_type"], backend["fused_kernel"], simplicity)
            )
            for bs, record in backend["batch_sizes"].items():
                case = Target(name, ws, hidden, dtype).at(int(bs))
                for suite in record["verdicts"].values():
                    for verdict in suite["checks"]:
                        store.record_verdict(case, Verdict(**verdict))
                for job, lat in record["latency"].items():
                    store.record_latency(
                        Latency(
                            case,
                            job,
                            list(lat["samples_us"]),
                            lat["ops_per_sample"],
                            lat["clock"],
                            lat["message_bytes"],
                            lat["engaged"],
                        )
                    )
    return store
