"""The evidence file: every measurement, verdict and decision behind a config.

A config without its evidence cannot be audited; with it, anyone can re-check a choice.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import stats
from ..model import GroupKey
from ..results import ResultStore
from ..selection import MIN_GAIN, SELECTION_JOB, Selection, standard_type
from .config import CONFIG_DTYPE_RULE
from .index import GroupData, availability_rows, group_data, latency_json, suites_shown

EVIDENCE_FORMAT = "pytest-allreduce-evidence"
EVIDENCE_VERSION = 1


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
    config_file: Path | None,
    config_note: str,
) -> dict[str, Any]:
    ran = {t.backend for key in groups for t in group_data(store, key).targets}
    return {
        "format": EVIDENCE_FORMAT,
        "format_version": EVIDENCE_VERSION,
        "generated": datetime.now(timezone.utc).isoformat(),
        "world_size": world_size,
        "hidden": hidden,
        "device": store.device,
        "device_name": dev,
        "config": {
            "file": config_file.name if config_file is not None else None,
            "dtype": config_dtype,
            "dtype_rule": CONFIG_DTYPE_RULE,
            "note": config_note,
        },
        "selection_rule": {
            "job": SELECTION_JOB,
            "standard_type": standard_type(store.device),
            "test": "one-sided Mann-Whitney U, challenger samples less than reference samples",
            "p_value_max": stats.P_VALUE_MAX,
            "min_gain": MIN_GAIN,
        },
        "required_suites": list(store.required_suites()),
        "missing_suites": store.missing_suites(),
        "machine": store.machine,
        "availability": availability_rows(store, world_size, ran),
        "dtypes": {
            key.dtype: _dtype_evidence(store, group_data(store, key), sel)
            for key, sel in groups.items()
        },
    }
