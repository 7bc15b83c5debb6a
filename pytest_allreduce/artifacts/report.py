"""The Markdown report: per batch size what ran, how fast, what passed, and the choice."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import stats
from ..model import GroupKey
from ..results import ResultStore
from ..selection import MIN_GAIN, SELECTION_JOB, Selection, standard_type
from .config import CONFIG_DTYPE_RULE
from .index import availability_rows, collapse_other_device, group_data, suites_shown


def _fmt_us(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _machine_line(machine: Mapping[str, Any]) -> str:
    fields = [
        ("GPU", "device_name"),
        ("driver", "driver_version"),
        ("CUDA", "cuda_version"),
        ("NCCL", "nccl_version"),
        ("torch", "torch_version"),
        ("FlashInfer", "flashinfer_version"),
        ("sgl-kernel", "sgl_kernel_version"),
        ("host", "hostname"),
    ]
    parts = [f"{label} {machine[k]}" for label, k in fields if machine.get(k) is not None]
    return "; ".join(parts) if parts else "no machine fingerprint recorded"


def report(
    store: ResultStore,
    key: GroupKey,
    selection: Selection,
    dev: str,
    config_dtype: str,
    config_file: Path | None,
) -> str:
    data = group_data(store, key)
    suites = suites_shown(store)
    std = standard_type(store.device)
    lines = [
        f"# Allreduce report: tp{key.world_size}, hidden {key.hidden}, {key.dtype}, {dev}",
        "",
        f"- Device: {store.device}; {_machine_line(store.machine)}",
        f"- Job compared: `{SELECTION_JOB}` (allreduce + residual add + RMSNorm); "
        f"standard path: `{std}`",
        f"- Rule: a challenger replaces the default only with one-sided Mann-Whitney "
        f"p < {stats.P_VALUE_MAX} and a median at least {MIN_GAIN:.0%} lower; ties go to the "
        "simpler backend",
    ]
    if config_file is not None and key.dtype == config_dtype:
        lines.append(f"- Config: `{config_file.name}` is emitted from this selection")
    elif config_file is not None:
        lines.append(
            f"- Config: `{config_file.name}` is emitted from the {config_dtype} selection, "
            f"not this one ({CONFIG_DTYPE_RULE})"
        )
    else:
        lines.append("- Config: none written (no batch size has a winner)")
    if store.missing_suites():
        lines.append(f"- Gating suites that did not run: {', '.join(store.missing_suites())}")

    ran = {t.backend for t in data.targets}
    lines += [
        "",
        "## Backends",
        "",
        "| backend | config type | fused kernel | status | reason |",
        "|---|---|---|---|---|",
    ]
    for row in collapse_other_device(availability_rows(store, key.world_size, ran), store.device):
        fused = "yes" if store.fused(row["backend"]) else "no"
        lines.append(
            f"| {row['backend']} | {row['backend_type'] or '-'} | {fused} | {row['status']} "
            f"| {_md_cell(row['reason'] or '')} |"
        )

    lines += [
        "",
        "## Chosen backend per batch size",
        "",
        "| batch size | chosen | config type | fusion flag | fused median (us) | why |",
        "|---|---|---|---|---|---|",
    ]
    for bs in selection.batch_sizes:
        choice = selection.choices.get(bs)
        if choice is None:
            why = _md_cell(selection.no_winner.get(bs, ""))
            lines.append(f"| {bs} | none | - | - | - | {why} |")
            continue
        lines.append(
            f"| {bs} | **{choice.backend_name}** | {choice.backend_type} | "
            f"{str(choice.use_residual_rmsnorm_fusion).lower()} | {_fmt_us(choice.median_us)} "
            f"| {_md_cell(choice.reason)} |"
        )

    lines += ["", "## Per batch size", ""]
    suite_heads = " | ".join(suites)
    for bs in data.sizes:
        std_medians = [
            lat.median_us
            for t in data.targets
            if store.server_type(t.backend) == std
            and (lat := data.latency(t.backend, bs, SELECTION_JOB)) is not None
        ]
        std_best = min(std_medians) if std_medians else None
        lines += [
            f"### Batch size {bs}",
            "",
            f"| backend | fused median (us) | allreduce median (us) | allreduce p10-p90 (us) "
            f"| algbw / busbw (GB/s) | speedup vs fastest {std} | {suite_heads} | chosen |",
            "|---|---|---|---|---|---|" + "---|" * len(suites) + "---|",
        ]
        for t in data.targets:
            fused_lat = data.latency(t.backend, bs, SELECTION_JOB)
            bare_lat = data.latency(t.backend, bs, "allreduce")
            case = t.at(bs)
            if fused_lat is None and bare_lat is None and case not in store.verdicts:
                continue
            fused_med = fused_lat.median_us if fused_lat is not None else None
            speedup = (
                f"{std_best / fused_med:.2f}x"
                if std_best is not None and fused_med is not None and fused_med > 0
                else "-"
            )
            outcomes = " | ".join(store.suite_outcome(case, s) for s in suites)
            chosen = selection.winner(bs) == t.backend
            name = f"**{t.backend}**" if chosen else t.backend
            spread = bandwidth = "-"
            if bare_lat is not None:
                low, high = bare_lat.spread_us
                spread = f"{low:.2f}-{high:.2f}"
                bandwidth = f"{bare_lat.algbw_gbps:.1f} / {bare_lat.busbw_gbps:.1f}"
            lines.append(
                f"| {name} | {_fmt_us(fused_med)} | "
                f"{_fmt_us(bare_lat.median_us if bare_lat else None)} | {spread} | {bandwidth} | "
                f"{speedup} | {outcomes} | {'chosen' if chosen else ''} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
