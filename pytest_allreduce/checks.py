"""Rank functions that check a backend's numbers: exact sums, random inputs against a float64
reference, the fused job, size limits, and CUDA-graph capture and replay.

Each returns a CheckReport per rank, which the engine turns into one outcome in the pytest
process; `checktable.CHECKS` says which suite runs which, and where. Outputs are poisoned with
NaN before every call, so an element a backend leaves unwritten fails.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .backend import UnsupportedInput
from .context import RankContext
from .jobs import (
    RMS_EPS,
    JobBuffers,
    Work,
    backend_for,
    digest,
    exact_inputs,
    integer_base,
    normal_input,
    run_job,
)
from .model import JOBS, Job

EXACT_SEEDS = (11, 12)  # two rounds, rewriting the input in between


@dataclass
class CheckReport:
    rank: int
    problems: list[str] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)  # identical on every rank, or a problem
    engaged: str = ""
    details: dict[str, object] = field(default_factory=dict)


def _finish(ctx: RankContext, report: CheckReport) -> CheckReport:
    """Exchange digests so every rank can tell whether all ended with identical results."""
    everyone = ctx.all_gather_object(report.digests)
    if any(d != everyone[0] for d in everyone):
        differing = [r for r, d in enumerate(everyone) if d != everyone[0]]
        report.problems.append(
            f"ranks ended with different results (differ from rank 0: {differing})"
        )
    return report


def _sync(ctx: RankContext) -> None:
    if ctx.is_cuda:
        torch.cuda.synchronize()


def _unwritten(t: torch.Tensor) -> int:
    return int(torch.isnan(t).sum().item())


# ---- exact -------------------------------------------------------------------------------


def exact_sum(ctx: RankContext, work: Work, rows: int) -> CheckReport:
    """Integer-valued inputs: the result must equal the reference bit for bit on every rank,
    over several rounds that rewrite the input after each allreduce."""
    backend = backend_for(ctx, work)
    hidden, dtype, dev = work.target.hidden, work.dtype, ctx.device
    report = CheckReport(ctx.rank, engaged=backend.engaged())
    buf = JobBuffers.allocate(rows, hidden, dtype, dev)
    for seed in EXACT_SEEDS:
        mine, total = exact_inputs(seed, ctx.rank, ctx.world_size, rows, hidden, dtype, dev)
        buf.inp.copy_(mine)
        buf.poison()
        run_job(backend, "allreduce", buf)
        _sync(ctx)
        expected = total.to(dtype)
        if (nan := _unwritten(buf.out)) > 0:
            report.problems.append(f"seed {seed}: {nan} output elements left unwritten (NaN)")
        wrong = int((buf.out != expected).sum().item())
        if wrong:
            idx = tuple((buf.out != expected).nonzero()[0].tolist())
            got, want = buf.out[idx].item(), expected[idx].item()
            report.problems.append(
                f"seed {seed}: {wrong} of {buf.out.numel()} elements differ from the exact sum; "
                f"first at {list(idx)}: got {got}, want {want}"
            )
        if not torch.equal(buf.inp, mine):
            report.problems.append(f"seed {seed}: the input was modified (must be out of place)")
        report.digests.append(digest(buf.out))
    return _finish(ctx, report)


# ---- random normal -------------------------------------------------------------------------


def sum_error_bound(inputs_abs_sum: torch.Tensor, n_terms: int, dtype: torch.dtype) -> torch.Tensor:
    """Worst-case error of summing n_terms values in `dtype` in any order, rounding once per
    addition and once more on output: n_terms * eps * sum(|terms|).

    Each of the n-1 additions (and the final rounding) errs by at most eps/2 of a partial sum
    bounded by sum(|terms|); eps instead of eps/2 leaves room for kernels that accumulate in
    the input dtype with an extra conversion.
    """
    eps = torch.finfo(dtype).eps
    return n_terms * eps * inputs_abs_sum + torch.finfo(dtype).tiny


def random_sum(ctx: RankContext, work: Work, rows: int) -> CheckReport:
    """Normal inputs against a float64 reference, within sum_error_bound."""
    backend = backend_for(ctx, work)
    hidden, dtype, dev = work.target.hidden, work.dtype, ctx.device
    report = CheckReport(ctx.rank, engaged=backend.engaged())
    seed = 21
    buf = JobBuffers.allocate(rows, hidden, dtype, dev)
    buf.inp.copy_(normal_input(seed, ctx.rank, rows, hidden, dtype, dev))
    buf.poison()
    run_job(backend, "allreduce", buf)
    _sync(ctx)
    inputs = [
        normal_input(seed, r, rows, hidden, dtype, dev).double() for r in range(ctx.world_size)
    ]
    reference = sum(inputs)
    bound = sum_error_bound(sum(x.abs() for x in inputs), ctx.world_size, dtype)
    _compare(report, "allreduce output", buf.out, reference, bound)
    report.digests.append(digest(buf.out))
    return _finish(ctx, report)


def _compare(
    report: CheckReport, what: str, got: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor
) -> None:
    if (nan := _unwritten(got)) > 0:
        report.problems.append(f"{what}: {nan} elements left unwritten or NaN")
        return
    error = (got.double() - reference).abs()
    ratio = error / bound
    worst = float(ratio.max().item())
    if worst > 1.0:
        idx = tuple((ratio == ratio.max()).nonzero()[0].tolist())
        over = int((ratio > 1).sum().item())
        report.problems.append(
            f"{what}: {over} elements outside the error bound; worst at {list(idx)}: got "
            f"{got[idx].item():.6g}, reference {reference[idx].item():.6g}, "
            f"bound {bound[idx].item():.3g}"
        )


# ---- fused job -----------------------------------------------------------------------------


def fused_reference(
    inputs: list[torch.Tensor], residual: torch.Tensor, weight: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(norm reference, residual reference, norm bound, residual bound), all float64.

    The residual sum errs as any sum of world_size + 1 terms. The normalised output inherits
    that error divided by the row's RMS (scaled by |weight|), plus the RMS's own relative
    error and the output rounding, a few eps of the result.
    """
    eps = torch.finfo(dtype).eps
    total = sum(inputs) + residual
    abs_sum = sum(x.abs() for x in inputs) + residual.abs()
    residual_bound = sum_error_bound(abs_sum, len(inputs) + 1, dtype)
    rms = torch.sqrt(total.pow(2).mean(-1, keepdim=True) + RMS_EPS)
    norm = total / rms * weight
    norm_bound = (
        weight.abs() * residual_bound / rms + 4 * eps * norm.abs() + torch.finfo(dtype).tiny
    )
    return norm, total, norm_bound, residual_bound


def fused_job(ctx: RankContext, work: Work, rows: int) -> CheckReport:
    """allreduce + residual add + RMSNorm: output and residual-out against the reference."""
    backend = backend_for(ctx, work)
    hidden, dtype, dev = work.target.hidden, work.dtype, ctx.device
    report = CheckReport(ctx.rank, engaged=backend.engaged())
    seed = 31
    buf = JobBuffers.allocate(rows, hidden, dtype, dev)
    buf.inp.copy_(normal_input(seed, ctx.rank, rows, hidden, dtype, dev))
    # Residual and weight are the same on every rank, as in a model.
    buf.residual.copy_(normal_input(seed, 1000, rows, hidden, dtype, dev))
    buf.weight.copy_(1 + 0.25 * normal_input(seed, 1001, 1, hidden, dtype, dev)[0])
    buf.poison()
    run_job(backend, "fused", buf)
    _sync(ctx)
    inputs = [
        normal_input(seed, r, rows, hidden, dtype, dev).double() for r in range(ctx.world_size)
    ]
    norm, total, norm_bound, res_bound = fused_reference(
        inputs, buf.residual.double(), buf.weight.double(), dtype
    )
    _compare(report, "residual-out", buf.residual_out, total, res_bound)
    _compare(report, "normalised output", buf.out, norm, norm_bound)
    report.digests += [digest(buf.out), digest(buf.residual_out)]
    return _finish(ctx, report)


# ---- size limits ---------------------------------------------------------------------------


def size_limits(ctx: RankContext, work: Work, rows: int) -> CheckReport:
    """At the declared largest input: max - d and max must be exact, max + d must be refused
    with UnsupportedInput on every rank before anything is sent. Likewise below min_rows.
    (`rows` is the case's size, the declared largest; the check steps around it itself.)"""
    backend = backend_for(ctx, work)
    limits = backend.limits_
    hidden, dtype = work.target.hidden, work.target.dtype
    report = CheckReport(ctx.rank, engaged=backend.engaged())
    largest = limits.largest_rows(hidden, dtype)
    step = _aligned_step(
        limits.alignment_bytes, hidden * torch.empty((), dtype=work.dtype).element_size()
    )
    report.details = {"largest_rows": largest, "step_rows": step}
    accepted = [r for r in ([largest - step, largest] if largest else []) if r >= limits.min_rows]
    refused = ([largest + step] if largest else []) + (
        [limits.min_rows - 1] if limits.min_rows > 1 else []
    )
    for rows in accepted:
        sub = exact_sum(ctx, work, rows)
        report.problems += [f"{rows} rows (within the limit): {p}" for p in sub.problems]
    for rows in refused:
        x = torch.zeros(rows, hidden, dtype=work.dtype, device=ctx.device)
        out = torch.empty_like(x)
        try:
            backend.all_reduce(x, out)
        except UnsupportedInput as exc:
            report.details[f"refused_{rows}"] = str(exc)
        else:
            report.problems.append(f"{rows} rows (outside the limits) was not refused")
    report.digests.append(str(sorted(report.details.items())))
    return _finish(ctx, report)


def _aligned_step(alignment_bytes: int, row_bytes: int) -> int:
    """The fewest rows whose byte size is a multiple of the alignment."""
    import math

    return alignment_bytes // math.gcd(alignment_bytes, row_bytes)


# ---- CUDA graphs ---------------------------------------------------------------------------

GRAPH_SHIFTS = 7  # inputs move by k in [-7, 7] between replays; sums stay exact


def graph_replays(ctx: RankContext, work: Work, rows: int, replays: int) -> CheckReport:
    """Capture both jobs at `rows` and at the smallest size the backend accepts (two sizes
    alive at once, as in a server that captured several decode sizes), then replay each
    graph `replays` times, changing the inputs in place before every replay and checking
    every replay's output (poisoned before each). Also: the graph-buffer count every rank
    registered, and a replay inside the backend's capture context."""
    backend = backend_for(ctx, work)
    sizes = sorted({rows, backend.limits_.min_rows})
    hidden, dtype, dev, ws = work.target.hidden, work.dtype, ctx.device, ctx.world_size
    report = CheckReport(ctx.rank, engaged=backend.engaged())
    stream = torch.cuda.Stream()

    slots: list[tuple[int, Job, JobBuffers, torch.Tensor, torch.Tensor]] = []
    for rows in sizes:
        for job in JOBS:
            buf = JobBuffers.allocate(rows, hidden, dtype, dev)
            base, total = exact_inputs(41 + rows, ctx.rank, ws, rows, hidden, dtype, dev)
            buf.inp.copy_(base)
            buf.residual.copy_(integer_base(43, rows, hidden, dev))
            buf.weight.fill_(1)
            slots.append((rows, job, buf, base, total))

    # Warm up eagerly on a side stream (libraries allocate on first use), then capture.
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _, job, buf, _, _ in slots:
            run_job(backend, job, buf)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    ctx.barrier()

    graphs: list[torch.cuda.CUDAGraph] = []
    with backend.capture():
        for _, job, buf, _, _ in slots:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                run_job(backend, job, buf)
            graphs.append(graph)
    registered = backend.after_capture()
    counts = ctx.all_gather_object(registered)
    report.details["graph_buffers_registered"] = counts
    if len(set(counts)) > 1:
        report.problems.append(f"ranks registered different numbers of graph buffers: {counts}")

    bad = torch.zeros((), dtype=torch.int64, device=dev)
    worst = torch.zeros((), dtype=torch.float64, device=dev)

    def replay_and_check(i: int, graph: torch.cuda.CUDAGraph, slot: tuple) -> None:
        _, job, buf, base, total = slot
        k = (i % (2 * GRAPH_SHIFTS + 1)) - GRAPH_SHIFTS
        buf.inp.copy_(base + k)
        buf.poison()
        graph.replay()
        expected = total + ws * k
        if job == "allreduce":
            bad.add_((buf.out.double() != expected).sum())
            return
        res_expected = expected + buf.residual.double()
        bad.add_((buf.residual_out.double() != res_expected).sum())
        rms = torch.sqrt(res_expected.pow(2).mean(-1, keepdim=True) + RMS_EPS)
        norm = res_expected / rms
        bound = 4 * torch.finfo(dtype).eps * norm.abs() + 1e-6
        ratio = ((buf.out.double() - norm).abs() / bound).nan_to_num(nan=float("inf"))
        worst.copy_(torch.maximum(worst, ratio.max()))

    for i in range(replays):
        for graph, slot in zip(graphs, slots, strict=True):
            replay_and_check(i, graph, slot)
    torch.cuda.synchronize()
    if int(bad.item()):
        report.problems.append(
            f"{int(bad.item())} wrong or unwritten elements over {replays} replays of "
            f"{len(graphs)} graphs (sizes {sizes})"
        )
    if float(worst.item()) > 1:
        report.problems.append(
            f"normalised output off by {float(worst.item()):.3g}x its error bound in replays"
        )

    # A replay while the backend is in capture mode again (servers capture size after size,
    # replaying earlier graphs in between): earlier graphs must still be right.
    bad.zero_()
    worst.zero_()
    with backend.capture():
        for graph, slot in zip(graphs, slots, strict=True):
            replay_and_check(replays, graph, slot)
        torch.cuda.synchronize()
    registered_again = ctx.all_gather_object(backend.after_capture())
    if len(set(registered_again)) > 1:
        report.problems.append(
            f"ranks registered different numbers of graph buffers on re-entry: {registered_again}"
        )
    if int(bad.item()) or float(worst.item()) > 1:
        report.problems.append("a replay inside the capture context gave wrong results")
    report.details["replays"] = replays * len(graphs)
    del graphs
    torch.cuda.synchronize()
    report.digests.append(str(counts))
    return _finish(ctx, report)
