"""The session-end terminal summary: the backend matrix and where the artifacts went."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .session import AllreduceSession


def summary_lines(session: AllreduceSession) -> list[str]:
    store = session.store
    rows = sorted(store.availability.values(), key=lambda a: (a.world_size, a.backend))
    width = max(len(a.backend) for a in rows)
    lines = [f"backend matrix ({store.device}):"]
    for a in rows:
        status = "ran" if a.available else "skipped"
        reason = f"  {a.reason}" if a.reason else ""
        lines.append(f"  {a.backend:<{width}}  tp{a.world_size}  {status:<7}{reason}")
    not_asked = sorted(v.name for v in session.plan.variants)
    asked = {a.backend for a in rows}
    if missing := [n for n in not_asked if n not in asked]:
        lines.append(f"  not reached (no test of theirs ran): {', '.join(missing)}")
    report = session.report
    if report.artifacts:
        lines.append(f"artifacts ({len(report.artifacts)} files) in {session.options.output_dir}:")
        lines += [f"  {p}" for p in report.artifacts]
    elif session.is_writer:
        lines.append("artifacts: none written (no latency was measured)")
    lines += [f"note: {n}" for n in report.notes]
    if report.gate_failures:
        lines.append(f"latency gate FAILED against {session.options.baseline}:")
        lines += [f"  {g}" for g in report.gate_failures]
    elif session.options.baseline is not None and session.is_writer:
        lines.append(f"latency gate passed against {session.options.baseline}")
    lines += [f"error: {e}" for e in report.errors]
    return lines
