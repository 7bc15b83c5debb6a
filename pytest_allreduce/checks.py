"""Rank functions that check a backend's numbers: exact sums, correctly rounded sums of mixed
inputs, the edges of every dtype, the fused job on small rows, size limits, CUDA-graph capture
and replay, and thousands of back-to-back calls.

Each returns a CheckReport per rank, which the engine turns into one outcome in the pytest
process; `checktable.CHECKS` says which suite runs which, and where. Outputs are poisoned with
NaN before every call, so an element a backend leaves unwritten fails.

The bounds are what a correct backend can actually be off by, derived per check, not a
generous multiple of eps: a result truncated instead of rounded, a sum carried through a
narrower format or a norm with the wrong epsilon must land outside them.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from .backend import Backend, QuantizedOutput, UnsupportedInput
from .context import RankContext
from .jobs import (
    RMS_EPS,
    Format,
    JobBuffers,
    Work,
    backend_for,
    capture_each,
    digest,
    edge_pairs,
    exact_inputs,
    fused_inputs,
    integer_base,
    mixed_input,
    pair_holders,
    pooled,
    run_job,
    warm_up_on_side_stream,
    wide_dtype,
)
from .model import JOBS, Job

EXACT_SEEDS = (11, 12)  # two rounds, rewriting the input in between
# The RMSNorm epsilons of the common model families (1e-6: Qwen, DeepSeek; 1e-5: Llama):
# the fused job runs with each, and its inputs make both matter (see `jobs.fused_inputs`).
FUSED_EPS: tuple[float, ...] = (1e-6, 1e-5)
FLOAT32_UNIT_ROUNDOFF = 2.0**-24
FLOAT32_SMALLEST_NORMAL = 2.0**-126


@dataclass
class CheckReport:
    rank: int
    problems: list[str] = field(default_factory=list)
    digests: list[str] = field(default_factory=list)  # identical on every rank, or a problem
    engaged: str = ""
    details: dict[str, object] = field(default_factory=dict)


def _finish(ctx: RankContext, report: CheckReport) -> CheckReport:
    """Compare the ranks' digests, so every rank can tell whether all ended with identical
    results: a 56-bit hash of them compared in one allreduce, the digests themselves
    gathered only when the hashes differ, to name the ranks that differ."""
    text = "\x1f".join(report.digests).encode()
    key = int.from_bytes(hashlib.blake2b(text, digest_size=7).digest(), "little")
    if ctx.same_everywhere(key):
        return report
    everyone = ctx.all_gather_object(report.digests)
    if any(d != everyone[0] for d in everyone):
        differing = [r for r, d in enumerate(everyone) if d != everyone[0]]
        report.problems.append(
            f"ranks ended with different results (differ from rank 0: {differing})"
        )
    return report


def _everyones_count(ctx: RankContext, count: int) -> list[int]:
    """Every rank's count, gathered only when they are not all the same."""
    if ctx.same_everywhere(count):
        return [count] * ctx.world_size
    return ctx.all_gather_object(count)


def _sync(ctx: RankContext) -> None:
    if ctx.is_cuda:
        torch.cuda.synchronize()


def _unwritten(t: torch.Tensor) -> int:
    return int(torch.count_nonzero(torch.isnan(t)))


# ---- exact -------------------------------------------------------------------------------


def exact_sum(ctx: RankContext, work: Work, rows: int) -> CheckReport:
    """Integer-valued inputs: the result must equal the reference bit for bit on every rank,
    over several rounds that rewrite the input after each allreduce."""
    backend = backend_for(ctx, work)
    hidden, dtype, dev = work.target.hidden, work.dtype, ctx.device
    report = CheckReport(ctx.rank, engaged=backend.engaged())
    buf = JobBuffers.allocate(rows, hidden, dtype, dev)

    def build(pool_rows: int) -> tuple[torch.Tensor, ...]:
        made = []
        for seed in EXACT_SEEDS:
            base = integer_base(seed, pool_rows, hidden, dev)
            mine, total = exact_inputs(base, ctx.rank, ctx.world_size, dtype)
            made += [mine, total.to(dtype)]
        return tuple(made)

    pool = pooled(ctx, ("exact_sum", ctx.world_size, hidden, dtype), build, rows)
    for seed, mine, expected in zip(EXACT_SEEDS, pool[::2], pool[1::2], strict=True):
        buf.inp.copy_(mine)
        buf.poison()
        run_job(backend, "allreduce", buf)
        _sync(ctx)
        if not torch.equal(buf.out, expected):
            differ = buf.out != expected
            wrong = int(torch.count_nonzero(differ))
            idx = tuple(differ.nonzero()[0].tolist())
            got, want = buf.out[idx].item(), expected[idx].item()
            report.problems.append(
                f"seed {seed}: {wrong} of {buf.out.numel()} elements differ from the exact sum "
                f"({_unwritten(buf.out)} left unwritten, NaN); first at {list(idx)}: got "
                f"{got}, want {want}"
            )
        if not torch.equal(buf.inp, mine):
            report.problems.append(f"seed {seed}: the input was modified (must be out of place)")
        report.digests.append(digest(buf.out))
    return _finish(ctx, report)


# ---- rounding ------------------------------------------------------------------------------


def unit_roundoff(dtype: torch.dtype) -> float:
    """Half an ulp of 1: the largest relative error of one rounding to nearest."""
    return torch.finfo(dtype).eps / 2


def sum_error_bound(abs_sum: torch.Tensor, n_terms: int, dtype: torch.dtype) -> torch.Tensor:
    """The largest error of a correct backend's sum of `n_terms` values of `dtype`, in any
    order it may choose.

    A backend adds the n terms with n - 1 additions arranged in some tree (sequential,
    pairwise, a ring, reduce-scatter then all-gather: each is a tree). It may round every
    partial sum to float32 (accumulating in float32), to the dtype (accumulating in the
    dtype, as NCCL and gloo do hop by hop for 16-bit types) or both, and rounds the last one
    to the dtype. One rounding of a partial sum p errs by at most u * |p|, u being half an
    ulp, and |p| <= sum(|terms|) grown by the earlier errors, so over n - 1 nodes

        |result - exact| <= ((1 + u_dtype)^(n-1) * (1 + u_float32)^(n-1) - 1) * sum(|terms|)

    plus an absolute part: rounding in the subnormal range errs by half the dtype's smallest
    subnormal, and kernels built with flush-to-zero drop float32 subnormals (operands and
    results, under float32's smallest normal each). At n = 2 this is about u * sum|x|, where
    a correct result is in fact unique: `rounded_sum` demands it bit for bit there.
    """
    steps = n_terms - 1
    # For float32 itself the two roundings are one.
    accumulator = FLOAT32_UNIT_ROUNDOFF if dtype.itemsize < 4 else 0.0
    factor = ((1 + unit_roundoff(dtype)) * (1 + accumulator)) ** steps - 1
    slack = n_terms * (Format.of(dtype).smallest_subnormal + 2 * FLOAT32_SMALLEST_NORMAL)
    return factor * abs_sum + slack


def correctly_rounded_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b rounded once to their dtype (see `jobs.wide_dtype` for why this is exact)."""
    wide = wide_dtype(a.dtype)
    return (a.to(wide) + b.to(wide)).to(a.dtype)


def flushed(x: torch.Tensor) -> torch.Tensor:
    """x with float32 subnormals replaced by zeros of their sign, as flush-to-zero does."""
    return torch.where(x.abs() < FLOAT32_SMALLEST_NORMAL, x * 0, x)


def flush_to_zero_sum(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """What a flush-to-zero kernel computes for a + b: operands and result flushed."""
    wide = wide_dtype(a.dtype)
    return flushed((flushed(a.to(wide)) + flushed(b.to(wide))).to(a.dtype))


def _same(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Equal values, NaN matching NaN (+0 and -0 are equal values)."""
    return (got == want) | (got.isnan() & want.isnan())


def _compare_exact(
    report: CheckReport,
    what: str,
    got: torch.Tensor,
    want: torch.Tensor,
    operands: tuple[torch.Tensor, ...],
    allowed: Callable[[tuple[torch.Tensor, ...]], torch.Tensor | None] = lambda where: None,
) -> None:
    """`got` must equal `want` (NaN where it is NaN, zeros of either sign), or else
    `allowed(where)`, an alternative result computed only at the positions `where` that
    differ, which keeps the check one comparison over the tensor when all is well."""
    if torch.equal(got, want):
        return  # the common case, in one pass and without listing positions
    differ = (got != want).nonzero(as_tuple=True)
    if differ[0].numel() == 0:
        return
    got_d, want_d = got[differ], want[differ]
    ok = _same(got_d, want_d)
    alternative = allowed(differ)
    if alternative is not None:
        ok |= _same(got_d, alternative)
    wrong = (~ok).nonzero().flatten()
    if wrong.numel():
        first = int(wrong[0])
        idx = [int(d[first]) for d in differ]
        summands = " + ".join(f"{x[tuple(idx)].item()!r}" for x in operands)
        report.problems.append(
            f"{what}: {wrong.numel()} of {got.numel()} elements differ from the correctly "
            f"rounded sum; first at {idx}: {summands} gave {got_d[first].item()!r}, "
            f"want {want_d[first].item()!r}"
        )


def rounded_sum(ctx: RankContext, work: Work, rows: int) -> CheckReport:
    """Inputs of mixed sign and magnitude on every rank (`jobs.mixed_input`).

    Two ranks: the result must be the correctly rounded sum, bit for bit. The only rounding
    a correct backend does is that of a + b, in the dtype or in float32 and then to the dtype
    (the same, see `jobs.wide_dtype`), so any other result (truncated, flushed, rounded
    twice through a narrower format) is wrong. More ranks: the order of the additions is the
    backend's choice and changes the rounding, so the result must lie within
    `sum_error_bound` of the exact sum.
    """
    backend = backend_for(ctx, work)
    hidden, dtype, dev, ws = work.target.hidden, work.dtype, ctx.device, ctx.world_size
    report = CheckReport(ctx.rank, engaged=backend.engaged())

    def build(pool_rows: int) -> tuple[torch.Tensor, ...]:
        inputs = [mixed_input(21, r, pool_rows, hidden, dtype, dev) for r in range(ws)]
        return (*inputs, correctly_rounded_sum(*inputs)) if ws == 2 else tuple(inputs)

    *inputs, expected = pooled(ctx, ("rounded_sum", ws, hidden, dtype), build, rows)
    if ws > 2:
        inputs.append(expected)
    buf = JobBuffers.allocate(rows, hidden, dtype, dev)
    buf.inp.copy_(inputs[ctx.rank])
    buf.poison()
    run_job(backend, "allreduce", buf)
    _sync(ctx)
    if ws == 2:
        _compare_exact(report, "two-rank sum", buf.out, expected, tuple(inputs))
    else:
        wide = [x.double() for x in inputs]
        bound = sum_error_bound(sum(x.abs() for x in wide), ws, dtype)
        _compare(report, f"{ws}-rank sum", buf.out, sum(wide), bound)
    report.digests.append(digest(buf.out))
    return _finish(ctx, report)


def edge_values(ctx: RankContext, work: Work, rows: int) -> CheckReport:
    """Pairs at the edges of the dtype (`jobs.edge_pairs`): in each row two ranks hold a and
    b and every other rank holds +0, so whatever order a backend adds in, it rounds once,
    and the result must be the correctly rounded a + b bit for bit at any world size:
    infinity exactly where the reference overflows, NaN where it gives NaN, subnormal sums
    exact, and everything within float32's normal range exact.

    Two allowances, for behaviour real kernels show and no model can tell apart: a zero
    result may have either sign (Lamport-style kernels use -0 as their "not written yet"
    mark and store +0 in its place; accumulators start from +0), and where an operand or
    the result lies below float32's normal range the flush-to-zero result is accepted too
    (CUDA kernels built with fast math flush). A narrower accumulator (float16 for
    bfloat16 overflows at 65504 and loses everything below 6e-8) or a truncation still fails.
    """
    backend = backend_for(ctx, work)
    hidden, dtype, dev, ws = work.target.hidden, work.dtype, ctx.device, ctx.world_size
    report = CheckReport(ctx.rank, engaged=backend.engaged())

    def build(pool_rows: int) -> tuple[torch.Tensor, ...]:
        a, b = edge_pairs(25, pool_rows, hidden, dtype, dev)
        return a, b, correctly_rounded_sum(a, b)

    a, b, want = pooled(ctx, ("edge_values", hidden, dtype), build, rows)
    first, second = pair_holders(rows, ws, dev)
    buf = JobBuffers.allocate(rows, hidden, dtype, dev)
    buf.inp.zero_()
    for holders, values in ((first, a), (second, b)):
        mine = holders == ctx.rank
        buf.inp[mine] = values[mine]
    buf.poison()
    run_job(backend, "allreduce", buf)
    _sync(ctx)

    def flush_to_zero(where: tuple[torch.Tensor, ...]) -> torch.Tensor | None:
        # float16's subnormals are float32 normals: flush-to-zero cannot touch them.
        return flush_to_zero_sum(a[where], b[where]) if dtype != torch.float16 else None

    _compare_exact(report, "edge-value sums", buf.out, want, (a, b), flush_to_zero)
    report.digests.append(digest(buf.out))
    return _finish(ctx, report)


def _compare(
    report: CheckReport, what: str, got: torch.Tensor, reference: torch.Tensor, bound: torch.Tensor
) -> None:
    error = (got.to(reference.dtype) - reference).abs()
    outside = ~(error <= bound)  # NaN, an unwritten element, is outside
    over = int(torch.count_nonzero(outside))
    if over:
        ratio = torch.where(outside, (error / bound).nan_to_num(nan=math.inf), 0)
        idx = tuple((ratio == ratio.max()).nonzero()[0].tolist())
        report.problems.append(
            f"{what}: {over} elements outside the error bound ({_unwritten(got)} NaN); worst "
            f"at {list(idx)}: got {got[idx].item():.6g}, reference "
            f"{reference[idx].item():.6g}, bound {bound[idx].item():.3g}"
        )


# ---- fused job -----------------------------------------------------------------------------


def norm_relative_bound(dtype: torch.dtype, hidden: int) -> float:
    """How far, relative to its value, a correct normalised output may be from the reference
    computed from the same residual sum.

    A kernel normalises either the float32 sum or the residual-out rounded to the dtype (u_d
    relative each; the RMS inherits the same), accumulates the mean square of `hidden` terms
    in float32 in some order (at most hidden * u_32 relative, halved by the square root),
    takes an approximate reciprocal square root and multiplies by it and by the weight (a few
    u_32), and rounds the output, possibly once before the weight and once after (u_d each):
    4 u_d + (hidden / 2 + 4) u_32. The reference itself is computed in float32 for 16-bit
    dtypes and may err as much again in its float32 part, hence (hidden + 8) u_32.
    """
    return 4 * unit_roundoff(dtype) + (hidden + 8) * FLOAT32_UNIT_ROUNDOFF


def fused_job(ctx: RankContext, work: Work, rows: int) -> CheckReport:
    """allreduce + residual add + RMSNorm on rows of small RMS, once per epsilon of
    FUSED_EPS (`jobs.fused_inputs`: at two ranks row RMS runs from 5e-4 to 0.25, so rms^2
    runs from below both epsilons to far above them; epsilon changes outputs by up to tens of
    percent, and one wrong by 10^4 either way moves them far outside the bound).

    The allreduce part of those inputs is exact in the dtype, so for 16-bit dtypes the
    residual-out must be the correctly rounded sum + residual, bit for bit (one rounding in
    float32 or the dtype, as in `rounded_sum`); for float32 it is held to `sum_error_bound`.
    The normalised output is held to `norm_relative_bound`. Where the backend also writes a
    quantized copy of the output, that copy must be the reference quantization of the
    verified output (`check_quantized`).
    """
    backend = backend_for(ctx, work)
    hidden, dtype, dev, ws = work.target.hidden, work.dtype, ctx.device, ctx.world_size
    report = CheckReport(ctx.rank, engaged=backend.engaged())
    exact_residual = dtype.itemsize <= 2

    def build(pool_rows: int) -> tuple[torch.Tensor, ...]:
        # The references of every epsilon are pooled with the inputs: per size, the check
        # is then the calls and one comparison per output.
        made = fused_inputs(31, ctx.rank, ws, pool_rows, hidden, dtype, dev)
        wide = wide_dtype(dtype)
        total = made.exact_sum + made.residual.to(wide)
        w = made.weight.to(wide)
        if exact_residual:
            residual_bound = torch.zeros_like(total)
            residual_want = total.to(dtype)
        else:
            terms = made.abs_sum + made.residual.to(wide).abs()
            residual_bound, residual_want = sum_error_bound(terms, ws + 1, dtype), total
        mean_square = total.pow(2).mean(-1, keepdim=True)
        references = []
        for eps in FUSED_EPS:
            rms = torch.sqrt(mean_square + eps)
            norm = total / rms * w
            bound = (
                norm.abs() * norm_relative_bound(dtype, hidden)
                + w.abs() * residual_bound / rms
                + Format.of(dtype).smallest_subnormal
                + FLOAT32_SMALLEST_NORMAL
            )
            references += [norm, bound]
        inputs = (made.mine, made.residual, made.weight, made.exact_sum)
        return (*inputs, residual_want, residual_bound, *references)

    pool = pooled(ctx, ("fused_job", ws, hidden, dtype), build, rows)
    mine, residual, weight, exact_sum, residual_want, residual_bound = pool[:6]
    buf = JobBuffers.allocate(rows, hidden, dtype, dev)
    for i, eps in enumerate(FUSED_EPS):
        norm, bound = pool[6 + 2 * i : 8 + 2 * i]
        buf.inp.copy_(mine)
        buf.residual.copy_(residual)
        buf.weight.copy_(weight)
        buf.poison()
        run_job(backend, "fused", buf, eps)
        _sync(ctx)
        label = f"eps {eps:g}"
        if exact_residual:
            operands = (exact_sum, residual)
            _compare_exact(
                report, f"{label}: residual-out", buf.residual_out, residual_want, operands
            )
        else:
            _compare(
                report, f"{label}: residual-out", buf.residual_out, residual_want, residual_bound
            )
        _compare(report, f"{label}: normalised output", buf.out, norm, bound)
        quantized = backend.quantized_output()
        if quantized is not None:
            check_quantized(report, f"{label}: {quantized.format} output", buf.out, quantized)
        report.digests += [digest(buf.out), digest(buf.residual_out)]
    return _finish(ctx, report)


# ---- quantized outputs ---------------------------------------------------------------------

E4M3_LARGEST = 448.0
E2M1_VALUES: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
NVFP4_BLOCK = 16


def round_e4m3(x: torch.Tensor) -> torch.Tensor:
    """x rounded to nearest e4m3 (ties to even), saturating at +-448 as the kernels'
    satfinite conversions do (torch's own cast gives NaN beyond 448), as float32."""
    return x.float().clamp(-E4M3_LARGEST, E4M3_LARGEST).to(torch.float8_e4m3fn).float()


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """x rounded to nearest e2m1 (ties to the even code), saturating at +-6, as float32."""
    grid = torch.tensor(E2M1_VALUES, device=x.device)
    midpoints = (grid[1:] + grid[:-1]) / 2
    magnitude = x.float().abs()
    below = torch.bucketize(magnitude, midpoints, right=False)
    above = torch.bucketize(magnitude, midpoints, right=True)
    # On a midpoint the two differ by one code: the even code is the one with mantissa 0.
    code = torch.where((below != above) & (below % 2 == 1), above, below)
    return torch.copysign(grid[code], x.float())


def decode_e2m1(packed: torch.Tensor) -> torch.Tensor:
    """(rows, hidden // 2) uint8, two codes a byte with the even element low -> float32."""
    grid = torch.tensor(E2M1_VALUES, device=packed.device)
    codes = torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2).long()
    magnitude = grid[codes & 7]
    return torch.where(codes >= 8, -magnitude, magnitude)


def check_quantized(
    report: CheckReport, what: str, out: torch.Tensor, quantized: QuantizedOutput
) -> None:
    """The backend's quantized copy against a reference quantization of `out`, its verified
    normalised output, within the format's own rounding.

    The kernel quantizes its float32 normalised value, of which `out` is the rounding to the
    dtype, so that value lies within u_d of `out` (plus a few float32 operations of scaling):
    every code must be what rounding gives for some value in that window. FP8: e4m3 of
    out / scale. NVFP4: each 16-element block's scale must be the e4m3 rounding of
    amax / 6 / scale (amax over the block), and each code the e2m1 rounding of the element
    divided by the block scale the kernel chose and the tensor scale.
    """
    v = out.float()
    relative = unit_roundoff(out.dtype) + 8 * FLOAT32_UNIT_ROUNDOFF
    problems: list[str] = []
    if quantized.format == "fp8_e4m3":
        target = v / quantized.scale
        _against(problems, "values", quantized.values.float(), target, relative, round_e4m3)
    elif quantized.format == "nvfp4":
        rows, hidden = v.shape
        blocks = v.view(rows, hidden // NVFP4_BLOCK, NVFP4_BLOCK)
        assert quantized.block_scales is not None
        scales = quantized.block_scales.float().view(rows, hidden // NVFP4_BLOCK)
        ideal = blocks.abs().amax(-1) / 6 / quantized.scale
        _against(problems, "block scales", scales, ideal, relative, round_e4m3)
        codes = decode_e2m1(quantized.values).view(rows, hidden // NVFP4_BLOCK, NVFP4_BLOCK)
        divisor = (scales * quantized.scale).unsqueeze(-1)
        # A zero block scale means a zero block: every code must then be zero.
        target = torch.where(divisor > 0, blocks / divisor.clamp_min(1e-30), 0.0)
        # the kernel's division by the block scale adds a few float32 roundings
        window = relative + 4 * FLOAT32_UNIT_ROUNDOFF
        _against(problems, "codes", codes, target, window, round_e2m1)
    else:
        problems.append(f"unknown quantized format {quantized.format!r}")
    report.problems += [f"{what}: {p}" for p in problems]


def _against(
    problems: list[str],
    what: str,
    got: torch.Tensor,
    target: torch.Tensor,
    relative: float,
    rounding: Callable[[torch.Tensor], torch.Tensor],
) -> None:
    """`got` must be what `rounding` gives for some value within `relative` of `target`.
    Rounding is monotone, so that is anything between its results at the window's ends."""
    ends = (target * (1 - relative), target * (1 + relative))
    low, high = rounding(torch.minimum(*ends)), rounding(torch.maximum(*ends))
    bad = ~((got >= low) & (got <= high))  # NaN is outside
    count = int(torch.count_nonzero(bad))
    if count:
        idx = tuple(bad.nonzero()[0].tolist())
        allowed = f"{low[idx].item()!r}" + (
            f" to {high[idx].item()!r}" if high[idx] != low[idx] else ""
        )
        problems.append(
            f"{what}: {count} of {bad.numel()} are not the reference quantization; first at "
            f"{list(idx)}: got {got[idx].item()!r}, want {allowed} (the rounding of "
            f"{target[idx].item():.6g})"
        )


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


def graph_replays(ctx: RankContext, work: Work, rows: int, replays: int) -> CheckReport:
    """Capture both jobs at `rows` and at the smallest size the backend accepts (two sizes
    alive at once, as in a server that captured several decode sizes), then replay each
    graph `replays` times, the inputs changed in place before every replay and every
    replay's output (poisoned before each) checked. Also: the graph-buffer count every rank
    registered, and a replay inside the backend's capture context.

    Each graph holds one `CheckedCall` step: the input change, the poison, the job and the
    check, as a server's decode graph holds its allreduce among other kernels. So a replay
    is one launch, and the check's dozen small operations are not launched from the host
    between replays (they were 50-100 ms of each check on 2 x H200 when they were).
    """
    backend = backend_for(ctx, work)
    sizes = sorted({rows, backend.limits_.min_rows})
    report = CheckReport(ctx.rank, engaged=backend.engaged())
    steps = [CheckedCall(ctx, work, size, job, seed=41 + size) for size in sizes for job in JOBS]
    graphs = _capture_steps(ctx, backend, steps)
    registered = backend.after_capture()
    counts = _everyones_count(ctx, registered)
    report.details["graph_buffers_registered"] = counts
    if len(set(counts)) > 1:
        report.problems.append(f"ranks registered different numbers of graph buffers: {counts}")

    for _ in range(replays):
        for graph in graphs:
            graph.replay()
    torch.cuda.synchronize()
    for step in steps:
        report.problems += step.problems(
            f"{step.rows} rows, warm-up call and graph replays", replays + 1
        )

    # A replay while the backend is in capture mode again (servers capture size after size,
    # replaying earlier graphs in between): earlier graphs must still be right.
    for step in steps:
        step.reset_counts()
    with backend.capture():
        for graph in graphs:
            graph.replay()
        torch.cuda.synchronize()
    registered_again = _everyones_count(ctx, backend.after_capture())
    if len(set(registered_again)) > 1:
        report.problems.append(
            f"ranks registered different numbers of graph buffers on re-entry: {registered_again}"
        )
    for step in steps:
        report.problems += step.problems(f"{step.rows} rows, replay inside the capture context", 1)
    report.details["replays"] = replays * len(graphs)
    del graphs
    torch.cuda.synchronize()
    report.digests.append(str(counts))
    return _finish(ctx, report)


# ---- stress --------------------------------------------------------------------------------

# Back-to-back calls of each job at each stress size. On CUDA thousands, eagerly and as graph
# replays: races between consecutive calls (a buffer reused before every peer read it, a
# flag reset late) need calls that follow each other closely and often, and a GPU call costs
# microseconds. On the CPU a call costs a millisecond or more of cores that every rank (and
# the reference work) shares, so 100 calls per job keep the suite to seconds; a race that
# corrupts a fraction p of calls still escapes all of them with probability (1 - p)^100
# (1e-30 at p = 1/2, 13% at p = 2%), and backends are called hundreds of times more by the
# other checks, where a late failure is caught as well.
STRESS_CALLS: dict[str, int] = {"cuda": 2000, "cpu": 100}
# Call i adds k = i % 15 - 7 to the input: no two neighbours alike, sums exact in every dtype.
SHIFTS = 15


class CheckedCall:
    """One job at one size, set up so that a call, its input change and its check are a
    few device operations with no host sync: the mismatch counts stay on the device, and
    the whole step can be captured in a CUDA graph (the shift index lives on the device).

    Everything a call compares with is made once, per shift: the inputs, the exact outputs
    and, for the fused job, the window [norm - bound, norm + bound] its normalised output
    must fall in (in the output's dtype). So a check is a few kernels however many values
    it covers: a call's step is launched from the host a few thousand times per stress
    check, and in a graph every kernel is a node that each replay runs (the check's own
    kernels were most of the graph and stress suites' time on 2 x H200 when they were a
    dozen per call).
    """

    def __init__(
        self, ctx: RankContext, work: Work, rows: int, job: Job, seed: int, calls: int = 0
    ) -> None:
        """`calls`: how many calls the host will number (eager calls); each gets a count
        slot, written by the call's last kernel, so numbering costs no kernel of its own."""
        hidden, dtype, dev, ws = work.target.hidden, work.dtype, ctx.device, ctx.world_size
        self.job = job
        self.rows = rows
        self.buf = JobBuffers.allocate(rows, hidden, dtype, dev)
        base, total = exact_inputs(integer_base(seed, rows, hidden, dev), ctx.rank, ws, dtype)
        residual = integer_base(seed + 2, rows, hidden, dev)
        self.buf.residual.copy_(residual)
        self.buf.weight.fill_(1)
        shifts = (torch.arange(SHIFTS, device=dev) - SHIFTS // 2).float().view(-1, 1, 1)
        # Inputs are integers whose sums stay within 256: exact in every dtype and order.
        self.inputs = (base.float() + shifts).to(dtype)
        unshifted = total + residual if job == "fused" else total
        exact = unshifted + ws * shifts
        self.wants = exact.to(dtype)
        # A captured step shifts by adding a scalar it gathers by the device's index (its
        # input shift, its output shift): elementwise adds run at full bandwidth, where
        # gathering whole tensors by a device index does not.
        self.base, self.want_base = base, unshifted.to(dtype)
        self.shift_table = torch.cat([shifts, ws * shifts], dim=1).view(SHIFTS, 2).to(dtype)
        self.shift_now = torch.empty(1, 2, dtype=dtype, device=dev)
        self.windows: torch.Tensor | None = None
        if job == "fused":
            # The window [norm - bound, norm + bound] (float32 norm from the exact sums) with
            # its ends rounded to the dtype, so that it costs the output's bytes: rounding is
            # monotone, so the window still holds the rounded norm and everything within the
            # bound, and it widens by at most half an ulp (the allowance the bound keeps for a
            # reference rounded to the dtype).
            tolerance = norm_relative_bound(dtype, hidden)
            self.windows = torch.empty(SHIFTS, 2, rows, hidden, dtype=dtype, device=dev)
            for k in range(SHIFTS):  # one shift at a time: small temporaries
                norm = exact[k] / torch.sqrt(exact[k].pow(2).mean(-1, keepdim=True) + RMS_EPS)
                margin = norm.abs() * tolerance
                torch.sub(norm, margin, out=self.windows[k, 0])
                torch.add(norm, margin, out=self.windows[k, 1])
        del exact
        # Scratch the step writes: what it compares with (graph steps gather it by the
        # device's shift index), the clamped output, and one mismatch flag per value.
        fused = job == "fused"
        self.want = torch.empty_like(self.buf.out)
        self.window = torch.empty(2, rows, hidden, dtype=dtype, device=dev) if fused else None
        self.clamped = torch.empty_like(self.buf.out) if fused else None
        self.flags = torch.empty(1 + fused, rows, hidden, dtype=torch.bool, device=dev)
        self.index = torch.zeros(1, dtype=torch.int64, device=dev)
        self.wrong = torch.zeros((), dtype=torch.int64, device=dev)
        self.per_call = torch.zeros(calls, dtype=torch.int64, device=dev)
        self.bad_elements = torch.zeros((), dtype=torch.int64, device=dev)
        self.bad_calls = torch.zeros((), dtype=torch.int64, device=dev)
        # The views each path uses, made once: an eager call is a few microseconds of host
        # time per kernel, and indexing a tensor costs about as much again.
        ends: list[tuple[torch.Tensor, ...] | None] = [None] * SHIFTS
        if self.windows is not None:
            ends = [w.unbind(0) for w in self.windows.unbind(0)]
        self._by_shift = list(zip(self.inputs.unbind(0), self.wants.unbind(0), ends, strict=True))
        self._slots = self.per_call.unbind(0)
        self._flag_rows = self.flags.unbind(0)
        self._flat_flags = self.flags.view(-1)
        self._window_words: tuple[torch.Tensor, torch.Tensor] | None = None
        if self.windows is not None and self.window is not None:
            # Gathered as the widest words the window's bytes divide into: the gather moves
            # one element per word.
            self._window_words = (
                _as_words(self.windows.view(SHIFTS, -1)),
                _as_words(self.window.view(1, -1)),
            )

    def reset_counts(self) -> None:
        self.per_call.zero_()
        self.bad_elements.zero_()
        self.bad_calls.zero_()

    def call_and_check(self, backend: Backend, call: int | None = None) -> None:
        """Move to the next shift, call, and count what differs from the expected output.

        `call`: the call's number (below the constructor's `calls`), when the host runs the
        calls one by one (eagerly): the shift is then picked on the host, as views, and the
        count goes to the call's slot. None in a captured step, where the shift index must
        live on the device and the count is added to running totals.
        """
        buf = self.buf
        ends: tuple[torch.Tensor, ...] | None
        if call is None:
            self.index.add_(1).remainder_(SHIFTS)
            torch.index_select(self.shift_table, 0, self.index, out=self.shift_now)
            torch.add(self.base, self.shift_now[0, 0], out=buf.inp)
            want = torch.add(self.want_base, self.shift_now[0, 1], out=self.want)
            ends = None
            if self._window_words is not None and self.window is not None:
                words, into = self._window_words
                torch.index_select(words, 0, self.index, out=into)
                ends = self.window.unbind(0)
        else:
            shift_input, want, ends = self._by_shift[call % SHIFTS]
            buf.inp.copy_(shift_input)
        buf.out.fill_(float("nan"))
        if self.job == "fused":
            buf.residual_out.fill_(float("nan"))
        run_job(backend, self.job, buf)
        got = buf.residual_out if self.job == "fused" else buf.out
        torch.ne(got, want, out=self._flag_rows[0])
        if ends is not None and self.clamped is not None:
            # Inside the window the clamp returns the value itself; NaN stays NaN, unequal.
            torch.clamp(buf.out, ends[0], ends[1], out=self.clamped)
            torch.ne(self.clamped, buf.out, out=self._flag_rows[1])
        if call is None:
            torch.sum(self._flat_flags, dim=0, out=self.wrong)
            self.bad_elements.add_(self.wrong)
            self.bad_calls.add_(self.wrong > 0)
        else:
            torch.sum(self._flat_flags, dim=0, out=self._slots[call])

    def problems(self, mode: str, calls: int) -> list[str]:
        bad_calls = int(self.bad_calls.item()) + int((self.per_call > 0).sum().item())
        if not bad_calls:
            return []
        elements = int(self.bad_elements.item()) + int(self.per_call.sum().item())
        return [
            f"{self.job}, {mode}: {bad_calls} of {calls} back-to-back calls gave wrong or "
            f"unwritten elements ({elements} elements)"
        ]


def _as_words(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's bytes viewed as the widest integers its last dimension allows."""
    row_bytes = t.shape[-1] * t.element_size()
    for word in (torch.int64, torch.int32, torch.int16):
        if row_bytes % word.itemsize == 0:
            return t.view(word)
    return t


def back_to_back(ctx: RankContext, work: Work, rows: int) -> CheckReport:
    """STRESS_CALLS calls of each job in a row, the input changed before every call and
    every output checked on the device, eagerly and (on CUDA, for capturable backends) as
    as many replays of a captured graph of the same step."""
    backend = backend_for(ctx, work)
    report = CheckReport(ctx.rank, engaged=backend.engaged())
    calls = STRESS_CALLS["cuda" if ctx.is_cuda else "cpu"]
    graphs = ctx.is_cuda and backend.limits_.graph_capturable
    for job in JOBS:
        stress = CheckedCall(ctx, work, rows, job, seed=61 + rows, calls=calls)
        for call in range(calls):
            stress.call_and_check(backend, call)
        _sync(ctx)
        report.problems += stress.problems("eager", calls)
        if graphs:
            stress = CheckedCall(ctx, work, rows, job, seed=61 + rows)
            checked = _replay_stress(ctx, backend, stress, calls)
            report.problems += stress.problems("warm-up call and graph replays", checked)
    report.details["calls_per_job"] = calls
    return _finish(ctx, report)


def _replay_stress(ctx: RankContext, backend: Backend, stress: CheckedCall, replays: int) -> int:
    """Capture one step (input change, call, check) and replay it `replays` times, after
    one eager warm-up call of the same step; returns how many calls were checked."""
    (graph,) = _capture_steps(ctx, backend, [stress])
    backend.after_capture()
    for _ in range(replays):
        graph.replay()
    torch.cuda.synchronize()
    del graph
    return replays + 1


def _capture_steps(
    ctx: RankContext, backend: Backend, steps: list[CheckedCall]
) -> list[torch.cuda.CUDAGraph]:
    """One graph per step, after one checked warm-up call of each (the warm-up and the
    captured calls both count)."""
    runs = [functools.partial(step.call_and_check, backend) for step in steps]
    return capture_each(ctx, backend, runs, warm_up_on_side_stream(runs))
