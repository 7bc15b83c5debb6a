"""The checks' references and bounds, on the CPU without ranks: that they are exact where they
claim to be, that correct summation orders stay inside them, and that each class of wrong
result the old checks let through now lands outside them (shown against the old bounds)."""

from __future__ import annotations

import math
from fractions import Fraction
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from broken_backends import quantize_e4m3, quantize_nvfp4

from pytest_allreduce import checks
from pytest_allreduce.checks import (
    CheckReport,
    check_quantized,
    correctly_rounded_sum,
    decode_e2m1,
    norm_relative_bound,
    round_e2m1,
    sum_error_bound,
)
from pytest_allreduce.jobs import (
    POOL_ROWS,
    RMS_EPS,
    Format,
    edge_pairs,
    fused_inputs,
    mixed_input,
    normal_input,
    pair_holders,
    pooled,
    special_pairs,
)

CPU = torch.device("cpu")
DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def exactly_rounded(q: Fraction, f: Format) -> float:
    """q rounded to nearest (ties to even) in the format, overflow to infinity."""
    if q == 0:
        return 0.0
    sign, q = (-1.0 if q < 0 else 1.0), abs(q)
    e = q.numerator.bit_length() - q.denominator.bit_length()
    if Fraction(2) ** e > q:
        e -= 1
    ulp = Fraction(2) ** (max(e, f.min_exponent) - f.digits + 1)
    steps, rest = divmod(q, ulp)
    if rest * 2 > ulp or (rest * 2 == ulp and steps % 2 == 1):
        steps += 1
    value = steps * ulp
    return sign * (math.inf if value > Fraction(f.largest) else float(value))


def old_sum_bound(abs_sum: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """The bound the checks used before issue 12: n * eps * sum|x| + tiny."""
    return n * torch.finfo(dtype).eps * abs_sum + torch.finfo(dtype).tiny


# ---- exactness of the references ---------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_correctly_rounded_sum_is_the_exact_rounding(dtype: torch.dtype) -> None:
    f = Format.of(dtype)
    a, b = edge_pairs(3, 8, 512, dtype, CPU)
    got = correctly_rounded_sum(a, b)
    finite = (a.isfinite() & b.isfinite()).flatten().nonzero().flatten().tolist()
    assert len(finite) > 3500
    for i in finite:
        x, y = a.view(-1)[i].item(), b.view(-1)[i].item()
        want = exactly_rounded(Fraction(x) + Fraction(y), f)
        assert got.view(-1)[i].item() == want, (x, y)


@pytest.mark.parametrize("dtype", DTYPES)
def test_edge_pairs_reach_every_edge(dtype: torch.dtype) -> None:
    f = Format.of(dtype)
    a, b = edge_pairs(3, 8, 512, dtype, CPU)
    values = torch.cat((a, b)).double()
    finite = values[values.isfinite() & (values != 0)].abs()
    assert (finite < f.smallest_normal).sum() > 50  # subnormals
    assert (finite > f.largest / 4).sum() > 50  # near the largest value
    sums = correctly_rounded_sum(a, b)
    assert sums.isinf().sum() > 40 and sums.isnan().sum() > 20
    specials = torch.tensor(special_pairs(dtype), dtype=torch.float64)
    laid = torch.stack((a.view(-1)[: len(specials)], b.view(-1)[: len(specials)]), -1).double()
    assert torch.equal(laid.isnan(), specials.isnan())
    assert torch.equal(laid.nan_to_num(0), specials.nan_to_num(0))


def test_pair_holders_are_two_different_ranks_and_move() -> None:
    for ws in (2, 3, 4, 8):
        first, second = pair_holders(64, ws, CPU)
        assert bool((first != second).all())
        assert set(first.tolist()) == set(range(ws)) == set(second.tolist())


def test_pools_give_each_size_its_own_rows_and_the_same_rows_each_time() -> None:
    ctx = SimpleNamespace(cache={}, device=CPU)
    built = []

    def build(rows: int) -> tuple[torch.Tensor, ...]:
        built.append(rows)
        return (torch.arange(rows).unsqueeze(1).float(), torch.ones(3))

    small, weight = pooled(ctx, ("test",), build, 5)
    assert weight.shape == (3,) and small.shape == (5, 1)
    again = pooled(ctx, ("test",), build, 5)[0]
    other = pooled(ctx, ("test",), build, 9)[0]
    assert built == [POOL_ROWS]
    assert torch.equal(small, again) and not torch.equal(small, other[:5])
    big = pooled(ctx, ("test",), build, 2000)[0]
    assert big.shape == (2000, 1)  # wraps around the pool


# ---- rounding: a truncating backend ------------------------------------------------------


def truncated(total: torch.Tensor) -> torch.Tensor:
    return (total.float().view(torch.int32) & -65536).view(torch.float32).to(torch.bfloat16)


def test_truncation_passed_the_old_bound_and_fails_the_correctly_rounded_sum() -> None:
    x = [normal_input(21, r, 16, 4096, torch.bfloat16, CPU) for r in range(2)]
    exact = x[0].double() + x[1].double()
    bad = truncated(x[0].float() + x[1].float())
    old = old_sum_bound(x[0].double().abs() + x[1].double().abs(), 2, torch.bfloat16)
    assert bool(((bad.double() - exact).abs() <= old).all())  # the old check passed it
    wrong = bad != correctly_rounded_sum(*x)
    assert 0.2 < wrong.float().mean().item() < 0.35  # about 27% of elements
    # Biased: every changed element moved towards zero.
    assert bool((bad[wrong].double().abs() < exact[wrong].abs()).all())
    report = CheckReport(0)
    checks._compare_exact(report, "two-rank sum", bad, correctly_rounded_sum(*x), tuple(x))
    assert report.problems and "differ from the correctly rounded sum" in report.problems[0]


# ---- more than two ranks: the derived bound ----------------------------------------------


def summed(terms: list[torch.Tensor], order: str, dtype: torch.dtype) -> torch.Tensor:
    """The sum as a correct backend may compute it."""
    if order == "sequential in the dtype":  # ring reduce-scatter, gloo
        acc = terms[0]
        for t in terms[1:]:
            acc = (acc.float() + t.float()).to(dtype)
        return acc
    if order == "pairwise in the dtype":
        level = list(terms)
        while len(level) > 1:
            pairs = [
                (level[i].float() + level[i + 1].float()).to(dtype)
                for i in range(0, len(level) - 1, 2)
            ]
            level = pairs + ([level[-1]] if len(level) % 2 else [])
        return level[0]
    acc = torch.zeros_like(terms[0], dtype=torch.float32)  # float32, then one rounding
    for t in reversed(terms):
        acc += t.float()
    return acc.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("ws", [3, 4, 8])
@pytest.mark.parametrize(
    "order", ["sequential in the dtype", "pairwise in the dtype", "float32 then round"]
)
def test_correct_orders_stay_within_the_bound(dtype: torch.dtype, ws: int, order: str) -> None:
    terms = [mixed_input(21, r, 16, 1024, dtype, CPU) for r in range(ws)]
    exact = sum(t.double() for t in terms)
    bound = sum_error_bound(sum(t.double().abs() for t in terms), ws, dtype)
    error = (summed(terms, order, dtype).double() - exact).abs()
    assert bool((error <= bound).all())
    # and the bound is far tighter than the old one
    old = old_sum_bound(sum(t.double().abs() for t in terms), ws, dtype)
    assert bool((bound < old / 2).all())


# ---- range: a narrower accumulator -------------------------------------------------------


def test_float16_accumulation_passed_the_old_check_and_fails_the_edges() -> None:
    x = [normal_input(21, r, 16, 4096, torch.bfloat16, CPU) for r in range(2)]
    narrow = (x[0].half() + x[1].half()).to(torch.bfloat16)
    exact = x[0].double() + x[1].double()
    old = old_sum_bound(x[0].double().abs() + x[1].double().abs(), 2, torch.bfloat16)
    assert bool(((narrow.double() - exact).abs() <= old).all())  # the old check passed it
    a, b = edge_pairs(25, 16, 4096, torch.bfloat16, CPU)
    narrow = (a.half() + b.half()).to(torch.bfloat16)
    report = CheckReport(0)
    ftz = checks.flush_to_zero_sum
    checks._compare_exact(
        report, "edges", narrow, correctly_rounded_sum(a, b), (a, b), lambda w: ftz(a[w], b[w])
    )
    assert report.problems


def test_flush_to_zero_is_accepted_only_below_float32_normals() -> None:
    a, b = edge_pairs(25, 16, 4096, torch.bfloat16, CPU)
    ftz = checks.flush_to_zero_sum(a, b)
    report = CheckReport(0)
    checks._compare_exact(
        report, "edges", ftz, correctly_rounded_sum(a, b), (a, b), lambda w: ftz[w]
    )
    assert not report.problems
    assert bool((ftz != correctly_rounded_sum(a, b)).any())  # it does differ somewhere


# ---- the fused job: epsilon and residual-out ---------------------------------------------


def composed(x: list[torch.Tensor], residual, weight, eps: float):
    """What an unfused backend's job gives: exact sum rounded, then add + RMSNorm."""
    from pytest_allreduce.jobs import add_rms_norm

    out = correctly_rounded_sum(*x) if len(x) == 2 else sum(t.float() for t in x).to(x[0].dtype)
    residual_out = residual.clone()
    add_rms_norm(CPU).fn(out, residual_out, weight, eps)
    return out, residual_out


def test_wrong_epsilon_passed_the_old_check_and_fails_on_small_rows() -> None:
    dtype, eps = torch.bfloat16, RMS_EPS
    # The old fused check: N(0, 1) rows and its bound.
    x = [normal_input(31, r, 8, 4096, dtype, CPU) for r in range(2)]
    residual = normal_input(31, 1000, 8, 4096, dtype, CPU)
    weight = (1 + 0.25 * normal_input(31, 1001, 1, 4096, dtype, CPU)[0]).to(dtype)
    out, _ = composed(x, residual, weight, eps * 1e4)
    total = x[0].double() + x[1].double() + residual.double()
    rms = torch.sqrt(total.pow(2).mean(-1, keepdim=True) + eps)
    norm = total / rms * weight.double()
    abs_sum = x[0].double().abs() + x[1].double().abs() + residual.double().abs()
    old_residual = old_sum_bound(abs_sum, 3, dtype)
    old_norm = weight.double().abs() * old_residual / rms + 4 * torch.finfo(dtype).eps * norm.abs()
    assert bool(((out.double() - norm).abs() <= old_norm).all())  # the old check passed it

    made = [fused_inputs(31, r, 2, 64, 4096, dtype, CPU) for r in range(2)]
    for wrong_eps in (eps * 1e4, eps / 1e4, 1e-5):  # also: ignoring the eps given
        out, _ = composed([m.mine for m in made], made[0].residual, made[0].weight, wrong_eps)
        total = made[0].exact_sum.double() + made[0].residual.double()
        rms = torch.sqrt(total.pow(2).mean(-1, keepdim=True) + eps)
        norm = total / rms * made[0].weight.double()
        bound = norm.abs() * norm_relative_bound(dtype, 4096) + 1e-30
        assert bool(((out.double() - norm).abs() > bound).any()), wrong_eps


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_inputs_are_exact_and_make_epsilon_matter(dtype: torch.dtype) -> None:
    ws = 3
    made = [fused_inputs(31, r, ws, 40, 512, dtype, CPU) for r in range(ws)]
    assert torch.equal(made[0].exact_sum.double(), sum(m.mine.double() for m in made))
    total = made[0].exact_sum.double() + made[0].residual.double()
    mean_square = total.pow(2).mean(-1)
    assert mean_square.min() < 1e-6 / 2 and mean_square.max() > 1e-5 * 100
    # The correct composition meets the bounds; its residual-out is the rounded sum.
    out, residual_out = composed([m.mine for m in made], made[0].residual, made[0].weight, 1e-5)
    if dtype != torch.float32:
        assert torch.equal(residual_out, (made[0].exact_sum + made[0].residual.float()).to(dtype))
    rms = torch.sqrt(mean_square.unsqueeze(-1) + 1e-5)
    norm = total / rms * made[0].weight.double()
    bound = norm.abs() * norm_relative_bound(dtype, 512) + 1e-30
    assert bool(((out.double() - norm).abs() <= bound).all())


# ---- quantized outputs -------------------------------------------------------------------


def test_e2m1_rounds_to_nearest_even_and_saturates() -> None:
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0, 7.0, 0.3, -0.25, -5.0, -2.9])
    want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0, 6.0, 0.5, -0.0, -4.0, -3.0]
    assert round_e2m1(x).tolist() == want
    # Two codes a byte, the even element in the low nibble; bit 3 of a code is the sign.
    packed = torch.tensor([[0x21, 0x9F]], dtype=torch.uint8)
    assert decode_e2m1(packed).tolist() == [[0.5, 1.0, -6.0, -0.5]]


def normalised(rows: int = 16, hidden: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 normalised values as a kernel holds them, their bfloat16 output)."""
    v = normal_input(5, 0, rows, hidden, torch.float32, CPU) * 2
    return v, v.to(torch.bfloat16)


def _check(out: torch.Tensor, quantized) -> list[str]:
    report = CheckReport(0)
    check_quantized(report, "q", out, quantized)
    return report.problems


def test_fp8_reference_quantization_and_its_window() -> None:
    from pytest_allreduce.backend import QuantizedOutput

    v32, out = normalised()
    # Quantized from the output itself, or from the float32 value the output rounds: both right.
    for source in (out, v32):
        assert not _check(out, QuantizedOutput("fp8_e4m3", quantize_e4m3(source, 0.5), 0.5))
    truncated = QuantizedOutput("fp8_e4m3", quantize_e4m3(out, 0.5, truncate=True), 0.5)
    assert "not the reference quantization" in _check(out, truncated)[0]
    wrong_scale = QuantizedOutput("fp8_e4m3", quantize_e4m3(out, 0.25), 0.5)
    assert _check(out, wrong_scale)


def test_nvfp4_reference_quantization_and_its_window() -> None:
    from pytest_allreduce.backend import QuantizedOutput

    v32, out = normalised()
    for source in (out, v32):
        packed, scales = quantize_nvfp4(source, 2.0)
        assert not _check(out, QuantizedOutput("nvfp4", packed, 2.0, scales))
    packed, scales = quantize_nvfp4(out, 2.0, block=32)
    problems = _check(out, QuantizedOutput("nvfp4", packed, 2.0, scales))
    assert problems and "block scales" in problems[0]
    packed, scales = quantize_nvfp4(out, 2.0)
    swapped = (packed >> 4) | (packed << 4)  # nibbles in the wrong order
    assert _check(out, QuantizedOutput("nvfp4", swapped, 2.0, scales))


@pytest.mark.parametrize("rows, cols", [(1, 4), (3, 32), (130, 6), (256, 8)])
def test_flashinfer_fp4_scales_are_read_back_from_the_128x4_tiling(rows: int, cols: int) -> None:
    from pytest_allreduce.backends.flashinfer_fusion import unswizzle_128x4

    padded_rows, padded_cols = -(-rows // 128) * 128, -(-cols // 4) * 4
    matrix = torch.randint(0, 255, (rows, cols), dtype=torch.uint8)
    swizzled = torch.zeros(padded_rows * padded_cols + 7, dtype=torch.uint8)
    for r in range(rows):  # where the FP4 kernels write scale (r, c), element by element
        for c in range(cols):
            at = (r // 128) * (padded_cols // 4) * 512 + (c // 4) * 512
            at += (r % 32) * 16 + (r % 128) // 32 * 4 + c % 4
            swizzled[at] = matrix[r, c]
    assert torch.equal(unswizzle_128x4(swizzled, rows, cols), matrix)


# ---- the digest of a GPU output (computed on the device) -------------------------------------


def test_word_fingerprint_changes_with_any_bit_and_any_order() -> None:
    from pytest_allreduce.jobs import word_fingerprint

    rng = torch.Generator().manual_seed(5)
    t = torch.randn(37, 129, generator=rng).to(torch.bfloat16)
    raw = t.view(-1).view(torch.uint8)
    base = word_fingerprint(raw)
    assert word_fingerprint(raw.clone()) == base
    for position in torch.randint(0, raw.numel(), (200,), generator=rng).tolist():
        for bit in (0, 3, 7):
            flipped = raw.clone()
            flipped[position] ^= 1 << bit
            assert word_fingerprint(flipped) != base, (position, bit)
    words = raw.view(torch.int16).clone()
    words[[0, 1]] = words[[1, 0]]  # two values swapped: the same multiset of bits
    if not torch.equal(words[0], words[1]):
        assert word_fingerprint(words.view(torch.uint8)) != base
    zeros = torch.zeros(8, dtype=torch.bfloat16)
    assert word_fingerprint(zeros.view(torch.uint8)) != word_fingerprint((-zeros).view(torch.uint8))
    # lengths that are no multiple of a word, and their zero padding
    odd = torch.arange(7, dtype=torch.uint8)
    assert word_fingerprint(odd) != word_fingerprint(torch.cat([odd, odd.new_zeros(1)]))


class _SoloSum:
    """A one-rank allreduce (the sum is the input), optionally wrong from a given call on:
    `fault(call, out)` spoils the output of a call."""

    fused = False

    def __init__(self, fault: Any = None) -> None:
        self.calls = 0
        self.fault = fault
        self.previous: torch.Tensor | None = None

    def all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(inp)
        right = inp.clone()
        if self.fault is not None:
            self.fault(self, out)
        self.previous = right
        self.calls += 1


def _stale_from_call_20(backend: _SoloSum, out: torch.Tensor) -> None:
    if backend.calls >= 20 and backend.previous is not None:
        out.copy_(backend.previous)  # the call before's sum: a buffer reused too early


def _one_unwritten(backend: _SoloSum, out: torch.Tensor) -> None:
    out.view(-1)[-1] = float("nan")


@pytest.mark.parametrize("graph_path", [False, True], ids=["host_numbered", "device_indexed"])
@pytest.mark.parametrize("job", ["allreduce", "fused"])
def test_checked_call_counts_every_wrong_call_in_both_modes(job: str, graph_path: bool) -> None:
    """The stress and graph suites' step: a right backend gives no problem; a stale output
    from call 20 on, and a single NaN in every output, are counted call by call, the same
    whether the host numbers the calls (eager stress) or the device keeps the shift index
    (the step as captured in a graph)."""
    ctx = SimpleNamespace(rank=0, world_size=1, device=CPU)
    target = SimpleNamespace(hidden=64, dtype="bfloat16")
    work = SimpleNamespace(target=target, dtype=torch.bfloat16)
    calls = 40

    def run(backend: _SoloSum) -> list[str]:
        step = checks.CheckedCall(ctx, work, 5, job, seed=3, calls=0 if graph_path else calls)
        for call in range(calls):
            step.call_and_check(backend, None if graph_path else call)
        return step.problems("test", calls)

    assert run(_SoloSum()) == []
    stale = run(_SoloSum(_stale_from_call_20))
    assert len(stale) == 1 and f"20 of {calls} back-to-back calls" in stale[0], stale
    unwritten = run(_SoloSum(_one_unwritten))
    # A NaN in the sum: wrong in the allreduce's output, and in the fused job's residual-out
    # and normalised output (the composed norm spreads it over the row).
    assert len(unwritten) == 1 and f"{calls} of {calls} back-to-back calls" in unwritten[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checked_call_norm_window_accepts_its_bound_and_nothing_beyond(dtype: torch.dtype) -> None:
    """The fused check's window: a normalised output moved by half the bound passes, one
    moved by a few bounds fails, both counted per call."""
    ctx = SimpleNamespace(rank=0, world_size=1, device=CPU)
    target = SimpleNamespace(hidden=64, dtype=str(dtype).removeprefix("torch."))
    work = SimpleNamespace(target=target, dtype=dtype)
    bound = checks.norm_relative_bound(dtype, 64)

    class Scaled(_SoloSum):
        fused = True

        def __init__(self, factor: float) -> None:
            super().__init__()
            self.factor = factor

        def fused_add_rms_norm(
            self,
            x: torch.Tensor,
            residual: torch.Tensor,
            weight: torch.Tensor,
            eps: float,
            out: torch.Tensor,
            residual_out: torch.Tensor,
        ) -> None:
            total = x.float() + residual.float()
            residual_out.copy_(total)
            out.copy_(total * torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + eps) * self.factor)

    for factor, wrong in ((1 + bound / 2, False), (1 + 4 * bound, True)):
        step = checks.CheckedCall(ctx, work, 5, "fused", seed=3, calls=10)
        for call in range(10):
            step.call_and_check(Scaled(factor), call)
        assert bool(step.problems("test", 10)) == wrong, factor
