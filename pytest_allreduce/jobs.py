"""Rank-side plumbing shared by the checks and the timing: set-up backends, the two jobs
(bare allreduce, and allreduce + residual add + RMSNorm), deterministic inputs, and the
availability vote.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
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
        cls, rows: int, hidden: int, dtype: torch.dtype, device: torch.device
    ) -> JobBuffers:
        def empty() -> torch.Tensor:
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


def run_job(backend: Backend, job: Job, buf: JobBuffers) -> None:
    """One op of `job`. Backends without a fused path get the engine's composition, so
    every backend does the same work."""
    if job == "allreduce":
        backend.all_reduce(buf.inp, buf.out)
    elif backend.fused:
        backend.fused_add_rms_norm(
            buf.inp, buf.residual, buf.weight, RMS_EPS, buf.out, buf.residual_out
        )
    else:
        backend.all_reduce(buf.inp, buf.out)
        buf.residual_out.copy_(buf.residual)
        add_rms_norm(buf.out.device).fn(buf.out, buf.residual_out, buf.weight, RMS_EPS)


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
    total = x.float() + residual.float()
    residual.copy_(total)
    inv_rms = torch.rsqrt(total.pow(2).mean(dim=-1, keepdim=True) + eps)
    x.copy_(total * inv_rms * weight.float())


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
    """Integers in [-3, 3], one draw per (seed, shape), as float64."""
    gen = generator(seed, -1, device)
    return torch.randint(-3, 4, (rows, hidden), generator=gen, device=device).double()


def exact_inputs(
    seed: int,
    rank: int,
    world_size: int,
    rows: int,
    hidden: int,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(this rank's input, the exact float64 sum over all ranks) for integer-valued inputs.

    Rank r holds c_r * base + d_r with c_r in {1, 2} and d_r in [-2, 2]: |input| <= 8, so a
    sum over up to 16 ranks stays within 128 and is exact in any order and every dtype
    (bfloat16 holds integers up to 256). One draw serves every rank, so the reference costs
    no more than the input, while every rank's values still differ (reading a peer's buffer
    twice, or one at the wrong offset, changes the sum).
    """
    return exact_from_base(integer_base(seed, rows, hidden, device), rank, world_size, dtype)


def exact_from_base(
    base: torch.Tensor, rank: int, world_size: int, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """exact_inputs' rule on a given integer base (e.g. the first rows of a larger draw)."""
    base = base.double()
    scale = [1 + r % 2 for r in range(world_size)]
    shift = [r % 5 - 2 for r in range(world_size)]
    mine = (scale[rank] * base + shift[rank]).to(dtype)
    return mine, sum(scale) * base + sum(shift)


def normal_input(
    seed: int, rank: int, rows: int, hidden: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    gen = generator(seed, rank, device)
    return torch.randn(rows, hidden, generator=gen, device=device, dtype=torch.float32).to(dtype)


def digest(t: torch.Tensor) -> str:
    """A hash of the exact bits, to prove every rank ended with identical results."""
    raw = t.detach().contiguous().view(torch.uint8).cpu().numpy()
    return hashlib.blake2b(raw, digest_size=8).hexdigest()
