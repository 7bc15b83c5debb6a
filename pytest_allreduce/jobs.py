"""Rank-side plumbing shared by the checks and the timing: set-up backends, the two jobs
(bare allreduce, and allreduce + residual add + RMSNorm), deterministic inputs, and the
availability vote.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch

from .backend import Backend
from .context import RankContext
from .model import Job, Target
from .registry import Variant

RMS_EPS = 1e-6
_BACKENDS = "backends"


@dataclass(frozen=True)
class Work:
    """What a rank needs to build a backend for a target: sent with every call."""

    variant: Variant
    target: Target
    setup_rows: int  # rows the set-up must hold (same on every rank)

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.target.dtype)


# ---- availability ------------------------------------------------------------------------


def vote_availability(ctx: RankContext, variant: Variant) -> list[str | None]:
    """Every rank's probe answer (None = yes), exchanged so that all ranks decide alike
    before any of them enters the backend's collectives."""
    try:
        answer = variant.cls.probe(ctx, variant.variant)
    except Exception as exc:  # a probe that crashes says no, with why
        answer = f"probe raised {type(exc).__name__}: {exc}"
    return ctx.all_gather_object(answer)


# ---- set-up backends -----------------------------------------------------------------------


def backend_for(ctx: RankContext, work: Work) -> Backend:
    """The set-up instance for this work, created on first use (collectively) and kept."""
    cache: dict[tuple[str, int, str, int], Backend] = ctx.cache.setdefault(_BACKENDS, {})
    key = (work.target.backend, work.target.hidden, work.target.dtype, work.setup_rows)
    backend = cache.get(key)
    if backend is None:
        backend = work.variant.cls(
            ctx, work.variant.variant, work.target.hidden, work.dtype, work.setup_rows
        )
        cache[key] = backend
    return backend


def close_backends(ctx: RankContext) -> list[str]:
    """Close every set-up backend in creation order (the same on every rank)."""
    cache: dict[tuple[str, int, str, int], Backend] = ctx.cache.pop(_BACKENDS, {})
    problems = []
    for backend in cache.values():
        try:
            backend.close()
        except Exception as exc:
            problems.append(f"{backend.full_name}: {type(exc).__name__}: {exc}")
    if ctx.is_cuda:
        torch.cuda.synchronize()
    return problems


# ---- the jobs ------------------------------------------------------------------------------


@dataclass
class JobBuffers:
    """Inputs and outputs of one job at one shape. Outputs are allocated once so that CUDA
    graphs can capture the job and the checks can poison them before each call."""

    inp: torch.Tensor
    out: torch.Tensor
    residual: torch.Tensor
    weight: torch.Tensor
    residual_out: torch.Tensor

    @classmethod
    def allocate(
        cls,
        rows: int,
        hidden: int,
        dtype: torch.dtype,
        device: torch.device,
        allocate: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None,
    ) -> JobBuffers:
        """`allocate(shape, dtype)`, when given, provides the row buffers (timing's
        memory=ncclmem); torch's allocator otherwise."""

        def empty() -> torch.Tensor:
            if allocate is not None:
                return allocate((rows, hidden), dtype)
            return torch.empty(rows, hidden, dtype=dtype, device=device)

        return cls(
            inp=empty(),
            out=empty(),
            residual=empty(),
            weight=torch.empty(hidden, dtype=dtype, device=device),
            residual_out=empty(),
        )

    def poison(self) -> None:
        for t in (self.out, self.residual_out):
            t.fill_(float("nan"))


def run_job(backend: Backend, job: Job, buf: JobBuffers, eps: float = RMS_EPS) -> None:
    """One op of `job`. Backends without a fused path get the engine's composition, so
    every backend does the same work."""
    if job == "allreduce":
        backend.all_reduce(buf.inp, buf.out)
    elif backend.fused:
        backend.fused_add_rms_norm(
            buf.inp, buf.residual, buf.weight, eps, buf.out, buf.residual_out
        )
    else:
        backend.all_reduce(buf.inp, buf.out)
        buf.residual_out.copy_(buf.residual)
        add_rms_norm(buf.out.device).fn(buf.out, buf.residual_out, buf.weight, eps)


@dataclass(frozen=True)
class AddRmsNorm:
    """In place: residual += x; x = RMSNorm(residual) * weight."""

    name: str
    fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, float], None]


def _torch_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> None:
    # As the fused kernels do: the sum in float32, rounded once into the residual, and the
    # norm taken from the unrounded float32 sum.
    # In place on one float32 copy, each row's sum of squares a dot product (no tensor of
    # squares; exact where the sums are representable). On the CPU, where every unfused
    # backend's fused job (checks, timing) runs this, in-place ops took half the time of
    # out-of-place ones, and vecdot half that of a batched matmul of 1-row by 1-column
    # matrices (0.38 against 0.77 ms at 128 x 4096, 2.3 against 4.0 ms at 504, one thread).
    total = x.float()
    total += residual
    residual.copy_(total)
    sum_sq = torch.linalg.vecdot(total, total).unsqueeze(-1)
    total.mul_(torch.rsqrt(sum_sq.div_(total.shape[-1]).add_(eps))).mul_(weight)
    x.copy_(total)


_COMPOSERS: dict[str, AddRmsNorm] = {}


def add_rms_norm(device: torch.device) -> AddRmsNorm:
    """The one residual add + RMSNorm that follows an unfused allreduce, everywhere: in the
    checks, the timing, the accuracy model and the runtime dispatcher.

    On CUDA this is the one-kernel fused_add_rmsnorm that servers run after their
    allreduce (sgl-kernel's), when installed: composing it from eager torch ops costs several
    extra kernel launches and would handicap every unfused backend. Elsewhere, torch ops in
    float32. The name goes into the evidence, so which one ran is on record.
    """
    key = device.type
    if key not in _COMPOSERS:
        chosen = AddRmsNorm("torch float32 add + rms_norm", _torch_add_rms_norm)
        if key == "cuda":
            try:
                from sgl_kernel import fused_add_rmsnorm

                chosen = AddRmsNorm("sgl_kernel fused_add_rmsnorm", fused_add_rmsnorm)
            except Exception:  # not installed, or built for another torch: torch it is
                pass
        _COMPOSERS[key] = chosen
    return _COMPOSERS[key]


def engaged(backend: Backend, job: Job) -> str:
    if job == "fused" and not backend.fused:
        composer = add_rms_norm(backend.ctx.device).name
        return f"{backend.engaged()} + engine-composed residual add and RMSNorm ({composer})"
    return backend.engaged()


# ---- deterministic inputs ------------------------------------------------------------------


def generator(seed: int, rank: int, device: torch.device) -> torch.Generator:
    """A generator whose stream depends only on (seed, rank): any rank can rebuild any
    other rank's input, so references need no communication."""
    digest = hashlib.sha256(f"{seed}:{rank}".encode()).digest()
    gen = torch.Generator(device=device)
    gen.manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    return gen


def integer_base(seed: int, rows: int, hidden: int, device: torch.device) -> torch.Tensor:
    """Integers in [-3, 3], one draw per (seed, shape), as float32 (exact: small integers)."""
    gen = generator(seed, -1, device)
    return torch.randint(-3, 4, (rows, hidden), generator=gen, device=device).float()


def exact_inputs(
    base: torch.Tensor, rank: int, world_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's input, the exact float32 sum over all ranks) for integer-valued inputs
    made from `base` (an `integer_base` draw).

    Rank r holds c_r * base + d_r with c_r in {1, 2} and d_r in [-2, 2]: |input| <= 8, so a
    sum over up to 16 ranks stays within 128 and is exact in any order and every dtype
    (bfloat16 holds integers up to 256). One draw serves every rank, so the reference costs
    no more than the input, while every rank's values still differ (reading a peer's buffer
    twice, or one at the wrong offset, changes the sum).
    """
    scale = [1 + r % 2 for r in range(world_size)]
    shift = [r % 5 - 2 for r in range(world_size)]
    mine = (scale[rank] * base + shift[rank]).to(dtype)
    return mine, sum(scale) * base + sum(shift)


def normal_input(
    seed: int, rank: int, rows: int, hidden: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    gen = generator(seed, rank, device)
    return torch.randn(rows, hidden, generator=gen, device=device, dtype=torch.float32).to(dtype)


def wide_dtype(dtype: torch.dtype) -> torch.dtype:
    """The format references are computed in: one whose sum of two `dtype` values, rounded
    once more to `dtype`, is the correctly rounded sum.

    For bfloat16 and float16 that is float32: a sum computed with p' >= 2p + 1 significant
    bits and rounded again to p bits equals the directly rounded sum (double rounding is
    innocuous for addition when p' >= 2p + 1; 24 >= 2 * 11 + 1). float64 (53 >= 2 * 24 + 1)
    serves float32. float32 arithmetic is several times cheaper than float64 on both
    devices, which is what lets the checks run at every size.
    """
    return torch.float32 if dtype.itemsize <= 2 else torch.float64


def mixed_input(
    seed: int,
    rank: int,
    rows: int,
    hidden: int,
    dtype: torch.dtype,
    device: torch.device,
    octaves: int = 8,
) -> torch.Tensor:
    """Normal values scaled by random factors 2^z, z normal with deviation octaves / 2 and
    clipped to +-octaves: mixed signs and magnitudes within every row, so sums cancel and
    carry across exponents."""
    gen = generator(seed, rank, device)
    values = torch.randn(rows, hidden, generator=gen, device=device)
    spread = torch.randn(rows, hidden, generator=gen, device=device).mul_(octaves / 2)
    return values.mul_(spread.clamp_(-octaves, octaves).exp2_()).to(dtype)


@dataclass(frozen=True)
class Format:
    """The binary floating-point facts of a dtype the edge inputs are built from."""

    digits: int  # significand bits, the implicit one included
    max_exponent: int  # of the largest finite value
    min_exponent: int  # of the smallest normal value

    @classmethod
    def of(cls, dtype: torch.dtype) -> Format:
        info = torch.finfo(dtype)
        digits = 1 - math.frexp(info.eps)[1] + 1  # eps = 2^(1 - digits) = 0.5 * 2^frexp
        return cls(digits, math.frexp(info.max)[1] - 1, math.frexp(info.smallest_normal)[1] - 1)

    @property
    def largest(self) -> float:
        return (2 - 2.0 ** (1 - self.digits)) * 2.0**self.max_exponent

    @property
    def smallest_normal(self) -> float:
        return 2.0**self.min_exponent

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.min_exponent - self.digits + 1)

    @property
    def ulp_of_largest(self) -> float:
        return 2.0 ** (self.max_exponent - self.digits + 1)


def special_pairs(dtype: torch.dtype) -> list[tuple[float, float]]:
    """(a, b) pairs at the edges of `dtype`, each exactly representable in it, whose
    correctly rounded sums a backend gets wrong first: overflow to infinity (and the tie
    that decides it), cancellation near the largest value, subnormal sums and carries into
    the normal range, signed zeros, infinities and NaN, and ties at 1."""
    f = Format.of(dtype)
    top, half_ulp = f.largest, f.ulp_of_largest / 2
    sub, normal = f.smallest_subnormal, f.smallest_normal
    one_ulp = 2.0 ** (1 - f.digits)  # the spacing just above 1
    big, small = 2.0 ** (f.max_exponent // 2), 2.0 ** -(f.max_exponent // 2)
    inf, nan = math.inf, math.nan
    return [
        # overflow, and the tie at the overflow threshold (the largest value's significand
        # is odd, so the tie rounds up, to infinity)
        (top, top), (-top, -top), (top, half_ulp), (-top, -half_ulp),
        (top, half_ulp / 2), (top, -top), (top / 2, top / 2), (top, -half_ulp),
        (top, -big), (top / 2, top / 4),
        # infinities and NaN
        (inf, 1.0), (-inf, top), (inf, -inf), (inf, inf), (nan, 1.0), (1.0, nan), (nan, -inf),
        # signed zeros
        (0.0, 0.0), (-0.0, -0.0), (0.0, -0.0), (-0.0, sub), (-0.0, -1.0), (1.0, -1.0),
        # subnormals and the step into the normal range
        (sub, sub), (sub, -sub), (normal - sub, sub), (normal, -sub), (3 * sub, -sub),
        (normal / 2, normal / 2), (-sub, -sub), (sub, 1.0), (-normal / 4, normal),
        # ties and carries at 1, and magnitudes far apart
        (1.0, one_ulp / 2), (1.0 + one_ulp, one_ulp / 2), (1.0, 0.75 * one_ulp),
        (1.0, -one_ulp / 4), (2.0 - one_ulp, one_ulp / 2), (big, 1.0), (small, 1.0),
        (big, -small), (-big, big * one_ulp),
    ]  # fmt: skip


# A prime: the special pairs land on every lane and vector offset in turn.
EDGE_SPECIALS_STRIDE = 509


def edge_pairs(
    seed: int, rows: int, hidden: int, dtype: torch.dtype, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(a, b), each (rows, hidden) in `dtype`: random finite values spread evenly over every
    binade of the dtype (subnormals to the largest value, both signs), b within a few
    binades of a in three pairs of four (so their sum rounds) and anywhere in the fourth,
    with `special_pairs` laid over them every EDGE_SPECIALS_STRIDE elements.

    Values are built from random bit patterns (sign, exponent field below the all-ones
    one, significand), which is both uniform over binades and several times cheaper than
    drawing floats: the check runs at every size."""
    f = Format.of(dtype)
    width = dtype.itemsize * 8
    significand = f.digits - 1
    top_field = (1 << (width - 1 - significand)) - 2  # the largest finite exponent field
    gen = generator(seed, -2, device)
    shape = (rows, hidden)

    def random_bits() -> torch.Tensor:
        return torch.randint(0, 1 << 62, shape, generator=gen, device=device)

    def assemble(bits: torch.Tensor, field: torch.Tensor) -> torch.Tensor:
        pattern = ((bits & 1) << (width - 1)) | (field << significand)
        pattern |= (bits >> 20) & ((1 << significand) - 1)
        as_int = {16: torch.int16, 32: torch.int32}[width]
        return pattern.to(as_int).view(dtype)  # the sign bit wraps into the int's sign

    bits_a, bits_b = random_bits(), random_bits()
    field_a = (bits_a >> 1) % (top_field + 1)
    reach = f.digits + 2
    near = (field_a + (bits_b >> 1) % (2 * reach + 1) - reach).clamp_(0, top_field)
    anywhere = (bits_b >> 8) % (top_field + 1)
    a = assemble(bits_a, field_a)
    b = assemble(bits_b, torch.where((bits_b >> 50) % 4 == 0, anywhere, near))

    specials = torch.tensor(special_pairs(dtype), dtype=torch.float64).to(dtype).to(device)
    starts = torch.arange(0, rows * hidden, EDGE_SPECIALS_STRIDE, device=device)
    where = (starts.unsqueeze(1) + torch.arange(len(specials), device=device)).flatten()
    which = torch.arange(len(specials), device=device).repeat(len(starts))
    inside = where < rows * hidden
    where, which = where[inside], which[inside]
    a.view(-1)[where] = specials[which, 0]
    b.view(-1)[where] = specials[which, 1]
    return a, b


def pair_holders(rows: int, world_size: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(first, second), (rows,) each: per row, the two ranks that hold that row's pair; every
    other rank holds +0 there. The pair moves over the ranks from row to row, so every rank
    is a holder and every rank an idle one."""
    row = torch.arange(rows, device=device)
    first = row % world_size
    step = 1 + (row // world_size) % max(world_size - 1, 1)
    return first, (first + step) % world_size


# splitmix64's constants as signed 64-bit integers (torch has no unsigned 64-bit arithmetic).
_MIX = tuple(
    c - (1 << 64) if c >= 1 << 63 else c
    for c in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB)
)


def digest(t: torch.Tensor) -> str:
    """A fingerprint of the exact bits, to prove every rank ended with identical results:
    two different results get the same one with probability about 2^-32.

    On the CPU, the CRC-32 of the bytes (0.65 ms for 4 MB on the 2-core machine, against
    3.5 ms for blake2b, which was a quarter of a fused-job check there). On a GPU,
    `word_fingerprint`, computed where the bits are: copying them to the host and hashing
    them there was most of a numerics check's time on 2 x H200 (8-11 ms of a 12-40 ms check
    at 504 rows).
    """
    raw = t.detach().contiguous().view(-1).view(torch.uint8)
    if raw.device.type == "cpu":
        return f"{zlib.crc32(raw.numpy()):08x}-{raw.numel()}"
    return word_fingerprint(raw)


def word_fingerprint(raw: torch.Tensor) -> str:
    """The sum, modulo 2^64, of the 32-bit words of the bytes `raw`, each times an odd weight
    mixed from its position (splitmix64's finaliser), and the byte count: two different byte
    strings of one length get the same sum only if their weighted differences cancel, which
    for any one difference happens with probability about 2^-32 at worst."""
    length = raw.numel()
    if length % 4:
        raw = torch.cat([raw, raw.new_zeros(4 - length % 4)])
    words = raw.view(torch.int32).to(torch.int64)
    # int64 arithmetic wraps modulo 2^64; the shifts are arithmetic, which still mixes.
    weights = torch.arange(words.numel(), device=raw.device, dtype=torch.int64)
    weights = weights * _MIX[0] + 1
    weights = (weights ^ (weights >> 30)) * _MIX[1]
    weights = (weights ^ (weights >> 27)) * _MIX[2]
    weights = (weights ^ (weights >> 31)) | 1
    total = int((words * weights).sum().item()) % (1 << 64)
    return f"{total:016x}-{length}"


@dataclass(frozen=True)
class FusedInputs:
    """One rank's inputs to the fused job, and what the reference needs of all ranks'."""

    mine: torch.Tensor  # this rank's allreduce input, in the dtype
    exact_sum: torch.Tensor  # the allreduce's exact sum, in `wide_dtype`
    abs_sum: torch.Tensor  # the sum of its terms' magnitudes, in `wide_dtype`
    residual: torch.Tensor
    weight: torch.Tensor


# Rows are scaled by powers of two across these binades: at two ranks row RMS runs from
# 5e-4 to 0.25, so rms^2 runs from below the common RMSNorm epsilons (1e-6, 1e-5) to far
# above them, as in real residual streams.
FUSED_ROW_BINADES = (-14, -5)


def fused_inputs(
    seed: int,
    rank: int,
    world_size: int,
    rows: int,
    hidden: int,
    dtype: torch.dtype,
    device: torch.device,
) -> FusedInputs:
    """Inputs to the fused job whose rows have small RMS, so that epsilon matters.

    Each row r is scaled by its own power of two 2^e, e cycling over FUSED_ROW_BINADES:
    the allreduce inputs are `exact_inputs`-style integers times 2^e (so their sum is exact
    in every dtype and order, and the residual-out has one rounding to check), the residual
    is normal noise of four times that scale (so sum + residual does round), and the weight
    is 1 + N(0, 1/16), the same on every rank as in a model.
    """
    wide = wide_dtype(dtype)
    base = integer_base(seed, rows, hidden, device)
    low, high = FUSED_ROW_BINADES
    binade = low + (torch.arange(rows, device=device) * 3) % (high - low + 1)
    row_scale = torch.ldexp(torch.ones(rows, 1, device=device), binade.unsqueeze(1))
    terms = [(1 + r % 2) * base + (r % 5 - 2) for r in range(world_size)]
    residual = normal_input(seed, 1000, rows, hidden, torch.float32, device) * 4 * row_scale
    weight = 1 + 0.25 * normal_input(seed, 1001, 1, hidden, torch.float32, device)[0]
    return FusedInputs(
        mine=(terms[rank] * row_scale).to(dtype),
        exact_sum=(sum(terms) * row_scale).to(wide),
        abs_sum=(sum(t.abs() for t in terms) * row_scale).to(wide),
        residual=residual.to(dtype),
        weight=weight.to(dtype),
    )


# ---- input pools ---------------------------------------------------------------------------

# Rows of each pool. Random inputs cost more to draw than the checks cost to run, and the
# checks run at every size, so each rank draws a pool once and every size takes its rows
# from it, starting at an offset that depends on the size and wrapping around. A prime:
# inputs longer than the pool repeat every 509 rows, never at a power-of-two byte offset,
# so a kernel that reads the wrong chunk of a power-of-two size still reads other values.
POOL_ROWS = 509


def pooled(
    ctx: RankContext,
    key: tuple[object, ...],
    build: Callable[[int], tuple[torch.Tensor, ...]],
    rows: int,
) -> tuple[torch.Tensor, ...]:
    """`rows` rows of each tensor of the pool `build(POOL_ROWS)` (built once per rank and
    `key`): rows offset, offset + 1, ... modulo POOL_ROWS, the offset set by `rows`."""
    pool = ctx.cache.get(("pool", *key))
    if pool is None:
        pool = ctx.cache[("pool", *key)] = build(POOL_ROWS)
    offset = rows * 97 % POOL_ROWS
    index = (torch.arange(rows, device=ctx.device) + offset) % POOL_ROWS
    return tuple(t.index_select(0, index) if t.dim() == 2 else t for t in pool)


@contextlib.contextmanager
def capturing(graph: torch.cuda.CUDAGraph, stream: torch.cuda.Stream) -> Iterator[None]:
    """Capture the work of the block into `graph` on `stream`, as `torch.cuda.graph` does,
    but without emptying the caching allocator before the capture. `torch.cuda.graph` does
    that on every capture, to leave the graph room; the latency suite captures about 30
    graphs per test and the graph suite 4 per check, and each emptying hands every cached
    block back to the driver, to be allocated again by the next check."""
    torch.cuda.synchronize()
    with torch.cuda.stream(stream):
        graph.capture_begin()
        try:
            yield
        finally:
            graph.capture_end()


def warm_up_on_side_stream(runs: Sequence[Callable[[], None]]) -> torch.cuda.Stream:
    """Each of `runs` once, eagerly, on a new side stream, then drained: libraries allocate
    and connect on first use, which a capture cannot. Returns the stream to capture on."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for run in runs:
            run()
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    return stream


def capture_each(
    ctx: RankContext,
    backend: Backend,
    runs: Sequence[Callable[[], None]],
    stream: torch.cuda.Stream,
) -> list[torch.cuda.CUDAGraph]:
    """One graph per run, once every rank is here, all inside one capture context of the
    backend, as a server captures several sizes before registering their buffers. The
    caller registers (`backend.after_capture`)."""
    ctx.barrier()
    graphs = []
    with backend.capture():
        for run in runs:
            graph = torch.cuda.CUDAGraph()
            with capturing(graph, stream):
                run()
            graphs.append(graph)
    return graphs
