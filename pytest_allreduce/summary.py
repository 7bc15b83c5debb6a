"""The session-end terminal summary: the backend matrix and where the artifacts went."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .session import AllreduceSession


def matrix_lines(session: AllreduceSession) -> list[str]:
    """One line per backend and world size; backends built for another device than the
    session's share one line per world size (on the CPU, every GPU backend)."""
    from .artifacts.index import for_another_device

    store = session.store
    rows = sorted(store.availability.values(), key=lambda a: (a.world_size, a.backend))
    if not rows:
        return []
    others = [a for a in rows if for_another_device(a.limits, a.available, store.device)]
    if len(others) < 2:
        others = []
    shown = [a for a in rows if a not in others]
    lines = [f"backend matrix ({store.device}):"]
    width = max((len(a.backend) for a in shown), default=0)
    for a in shown:
        status = "ran" if a.available else "skipped"
        reason = f"  {a.reason}" if a.reason else ""
        lines.append(f"  {a.backend:<{width}}  tp{a.world_size}  {status:<7}{reason}")
    for ws in sorted({a.world_size for a in others}):
        names = [a.backend for a in others if a.world_size == ws]
        devices = "/".join(sorted({str(a.limits["device"]) for a in others}))
        lines.append(
            f"  {len(names)} {devices} backends  tp{ws}  skipped  built for {devices}; this "
            f"session runs on {store.device}: {', '.join(names)}"
        )
    asked = {a.backend for a in rows}
    if missing := [v.name for v in session.plan.variants if v.name not in asked]:
        lines.append(f"  not reached (no test of theirs ran): {', '.join(sorted(missing))}")
    return lines


def summary_lines(session: AllreduceSession) -> list[str]:
    """Nothing for a session in which no allreduce test was collected (the plugin is loaded
    into every pytest run of its environment)."""
    report = session.report
    if not (session.store.availability or report.notes or report.errors):
        return []
    lines = [f"warning: {w}" for w in report.warnings]
    lines += matrix_lines(session)
    if report.artifacts:
        lines.append(f"artifacts ({len(report.artifacts)} files) in {session.options.output_dir}:")
        lines += [f"  {p}" for p in report.artifacts]
    elif session.is_writer and session.store.availability:
        lines.append("artifacts: none written (no latency was measured)")
    lines += [f"note: {n}" for n in report.notes]
    if report.gate_failures:
        lines.append(f"latency gate FAILED against {session.options.baseline}:")
        lines += [f"  {g}" for g in report.gate_failures]
    elif session.options.baseline is not None and session.is_writer:
        lines.append(f"latency gate passed against {session.options.baseline}")
    lines += [f"error: {e}" for e in report.errors]
    return lines
