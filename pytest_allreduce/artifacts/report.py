"""The Markdown report: per batch size what the server will run, how fast, and why."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .. import noise
from ..coverage import Coverage
from ..model import GroupKey
from ..results import ResultStore
from ..selection import (
    MIN_GAIN,
    MIN_RUN,
    SELECTION_JOB,
    EntryTiming,
    Selection,
    entry_label,
    standard_type,
)
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


def no_file_timing(selection: Selection, batch_size: int) -> EntryTiming | None:
    """The entry the consumer uses without a config file, as timed at `batch_size`."""
    if selection.state is None:
        return None
    entry = selection.state.profile.no_file_entry(batch_size)
    return next((t for t in selection.timings.get(batch_size, []) if t.entry == entry), None)


def speedups_vs_no_file(selection: Selection) -> dict[int, float]:
    """Per batch size with a winner: the no-file rule's time / the chosen entry's time,
    where the no-file rule's run was measured and is safe."""
    found = {}
    for bs, choice in selection.choices.items():
        other = no_file_timing(selection, bs)
        if other is not None and other.run.hazard is None and other.median_us is not None:
            found[bs] = other.median_us / choice.median_us
    return found


def _header(
    store: ResultStore,
    key: GroupKey,
    selection: Selection,
    dev: str,
    config_dtype: str,
    config_files: tuple[Path, ...],
    covered: Coverage,
) -> list[str]:
    lines = [
        f"# Allreduce report: tp{key.world_size}, hidden {key.hidden}, {key.dtype}, {dev}",
        "",
        f"- Device: {store.device}; {_machine_line(store.machine)}",
    ]
    state = selection.state
    if state is not None:
        s = state.server
        facts = "; ".join(f"{k} {v}" for k, v in state.facts.items())
        cuda = (
            f"compute capability {s.capability[0]}.{s.capability[1]}, multicast "
            f"{'on' if s.multicast else 'off'}, "
            if s.capability
            else ""
        )
        lines.append(
            f"- Consumer: {state.profile.name}, modelled at world size {s.world_size}, "
            f"{cuda}{s.dtype}, hidden {s.hidden}" + (f" ({_md_cell(facts)})" if facts else "")
        )
    model = selection.noise
    rule = (
        f"- Rule: config entries compete, each timed by the `{SELECTION_JOB}` job of the variant "
        f"the consumer runs for it; the standard entry `{standard_type(store.device)}` is kept "
        f"unless a challenger is faster over a run of at least {MIN_RUN} neighbouring sizes as "
        f"a whole, by z >= {noise.Z:.2f} and at least {MIN_GAIN:.0%}; ties go to the simpler"
    )
    if model is not None:
        rough = ", ".join(f"{n} {v:.3f}" for n, v in sorted(model.roughness.items()))
        rule += (
            f" (noise: run-to-run drift floor {model.drift:.3f}; this session's roughness per "
            f"backend: {rough or 'none'}; price of a segment {selection.segment_price:.3f})"
        )
    lines.append(rule)
    names = ", ".join(f"`{p.name}`" for p in config_files)
    if not config_files:
        lines.append("- Config: none written (no batch size has a winner)")
    elif key.dtype == config_dtype:
        lines.append(f"- Config: {names}, emitted from this selection")
    else:
        lines.append(
            f"- Config: {names}, emitted from the {config_dtype} selection, not this one "
            f"({CONFIG_DTYPE_RULE})"
        )
    if covered.complete:
        lines.append("- Coverage: complete (every planned case checked and timed)")
    else:
        lines.append(
            f"- Coverage: PARTIAL, so these files carry `.partial` and a complete config "
            f"is left as it was: {_md_cell('; '.join(covered.gaps))}"
        )
    if store.missing_suites():
        lines.append(f"- Gating suites that did not run: {', '.join(store.missing_suites())}")
    return lines


def _server_table(selection: Selection) -> list[str]:
    lines = [
        "",
        "## What the server runs per batch size",
        "",
        "Every measured size; the config holds the ones marked `key` (the ends, both sides of "
        "every change, and both sides of every size limit of the consumer); a size between two "
        "keys that run the same thing gets that same entry from the nearest-key lookup.",
        "",
        "| batch size | config key | entry | runs | fused | fallbacks declined | median (us) "
        "| no-file rule runs | no-file (us) | speed-up vs no-file | why |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    keys = set(selection.config_keys())
    for bs in selection.batch_sizes:
        choice = selection.choices.get(bs)
        if choice is None:
            why = _md_cell(selection.no_winner.get(bs, ""))
            lines.append(f"| {bs} | | none | - | - | - | - | - | - | - | {why} |")
            continue
        other = no_file_timing(selection, bs)
        other_runs, other_us, speedup = "-", None, "-"
        if other is not None:
            other_runs = f"{entry_label(other.entry)} -> {other.run.variant}"
            if other.run.hazard is not None:
                other_runs += " (unsafe)"
            elif other.median_us is not None:
                other_us = other.median_us
                speedup = f"{other.median_us / choice.median_us:.2f}x"
        declined = "; ".join(choice.run.declined) or "-"
        lines.append(
            f"| {bs} | {'key' if bs in keys else ''} | **{entry_label(choice.entry)}** | "
            f"{choice.run.variant} | "
            f"{'fused' if choice.run.fused else 'composed'} | {_md_cell(declined)} | "
            f"{_fmt_us(choice.median_us)} | {other_runs} | {_fmt_us(other_us)} | {speedup} | "
            f"{_md_cell(choice.reason)} |"
        )
    speedups = speedups_vs_no_file(selection)
    if speedups:
        values = list(speedups.values())
        geo = math.exp(sum(math.log(v) for v in values) / len(values))
        lines += [
            "",
            f"Speed-up against the consumer's no-file rule over {len(values)} batch sizes: "
            f"geometric mean {geo:.2f}x, lowest {min(values):.2f}x, highest {max(values):.2f}x.",
        ]
    return lines


def report(
    store: ResultStore,
    key: GroupKey,
    selection: Selection,
    dev: str,
    config_dtype: str,
    config_files: tuple[Path, ...],
    covered: Coverage,
) -> str:
    data = group_data(store, key)
    suites = suites_shown(store)
    lines = _header(store, key, selection, dev, config_dtype, config_files, covered)

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
    lines += _server_table(selection)

    lines += ["", "## Per batch size", ""]
    suite_heads = " | ".join(suites)
    for bs in data.sizes:
        timings = selection.timings.get(bs, [])
        standard = next(
            (t for t in timings if t.entry.backend_type == standard_type(store.device)), None
        )
        standard_us = standard.median_us if standard is not None else None
        lines += [f"### Batch size {bs}", ""]
        if timings:
            lines += [
                "| entry | runs | fused median (us) | eligible | why not |",
                "|---|---|---|---|---|",
            ]
            chosen = selection.choices.get(bs)
            for t in timings:
                name = entry_label(t.entry)
                if chosen is not None and chosen.entry == t.entry:
                    name = f"**{name}**"
                lines.append(
                    f"| {name} | {t.run.variant} | {_fmt_us(t.median_us)} | "
                    f"{'yes' if t.eligible else 'no'} | {_md_cell(t.exclusion or '')} |"
                )
            lines.append("")
        lines += [
            f"| variant | fused median (us) | allreduce median (us) | allreduce p10-p90 (us) "
            f"| algbw / busbw (GB/s) | speed-up vs standard entry | {suite_heads} | runs here |",
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
                f"{standard_us / fused_med:.2f}x"
                if standard_us is not None and fused_med is not None and fused_med > 0
                else "-"
            )
            outcomes = " | ".join(store.suite_outcome(case, s) for s in suites)
            runs_here = selection.winner(bs) == t.backend
            name = f"**{t.backend}**" if runs_here else t.backend
            spread = bandwidth = "-"
            if bare_lat is not None:
                low, high = bare_lat.spread_us
                spread = f"{low:.2f}-{high:.2f}"
                bandwidth = f"{bare_lat.algbw_gbps:.1f} / {bare_lat.busbw_gbps:.1f}"
            lines.append(
                f"| {name} | {_fmt_us(fused_med)} | "
                f"{_fmt_us(bare_lat.median_us if bare_lat else None)} | {spread} | {bandwidth} | "
                f"{speedup} | {outcomes} | {'yes' if runs_here else ''} |"
            )
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
