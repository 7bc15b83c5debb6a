"""Latency, measured inside the ranks: every candidate at one size, interleaved.

How one sample is taken, and why:

* CUDA: a candidate's job is captured `ops_per_sample` times back to back in a CUDA graph (as
  servers replay a decode step); a sample is one replay timed with CUDA events, divided by the
  op count, and the maximum over ranks (a collective is as slow as its slowest rank).
* The ranks must start every timed replay together. A host barrier before the replay does not
  achieve that: each GPU starts when its own host gets there, microseconds apart, and the early
  rank's first collective waits for the late one inside the timed region (at 50 ops that added
  about 0.6 us to every op on 2 x H200, 20% of a small kernel). nccl-tests only amortises that
  skew over 1000 ops; differencing two graph lengths cancels only its mean, doubles the
  captures, and hides a per-op cost that grows with the graph. So the ranks are aligned on the
  device: a round opens with a GPU-side sleep long enough for the host to queue the whole
  round, and before every timed replay a one-element allreduce on a group of its own, which
  every GPU leaves within its completion skew (about a microsecond over NVLink); then the start
  event, the replay, the end event. The host's pace never lands inside the timed region; a
  round whose queueing outlasted the sleep is timed again with a longer sleep.
* Candidates are interleaved: each round times every candidate once, in an order that rotates
  from round to round, and each candidate has several instances (own buffers and capture) used
  in turn, so drift over the run, and one unlucky capture, hit every candidate alike.
* CPU: the same rounds with the wall clock; the CPU group's barrier aligns the ranks (its skew
  is negligible against collectives that take milliseconds).
* Inputs are integer-valued, so the exact sum is known: after the rounds every instance's last
  output is compared with it, and a candidate whose results were wrong while being timed fails.
* Cache state: by default every op of a graph works on the same buffers, so a message smaller
  than the L2 cache is read from it, as a server's allreduce reads the activations the GEMM
  before it has just written. nccl-tests instead shifts each op's buffers through a 64 MiB
  region "to avoid cache effects" (op k at offset (k % (64 MiB / size)) x size), so from
  about 512 KiB up its 50 ops' inputs no longer fit in the L2 of an H200. `rotate=BYTES`
  gives each op of a graph its own buffer set, k % min(ops, BYTES // message bytes), which is
  that access pattern; comparing with nccl-tests needs it (benchmarks/vs_nccl_tests.py).
  `memory=ncclmem` (CUDA) also takes the buffers from ncclMemAlloc, as nccl-tests does
  (pytest_allreduce.ncclmem says why that matters).
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any, Protocol

import torch

from .backend import Backend
from .context import RankContext
from .jobs import (
    RMS_EPS,
    JobBuffers,
    Work,
    backend_for,
    capture_each,
    engaged,
    exact_inputs,
    integer_base,
    run_job,
    warm_up_on_side_stream,
)
from .model import Job
from .ncclmem import NcclMemory

# Overrides the device's default plan, e.g. "samples=24,ops=100,instances=3,warmup=2".
TIMING_ENV = "PYTEST_ALLREDUCE_TIMING"
# Eager ops per instance before capture: libraries allocate and connect on first use.
EAGER_WARMUP_OPS = 2
# The first rounds' sleep, before the host's queueing time is known (warm-up rounds only).
INITIAL_SLEEP_US = 2000.0
# Sleep = SLEEP_FACTOR x the slowest rank's queueing time of a round + SLEEP_MARGIN_US.
SLEEP_FACTOR = 2.0
SLEEP_MARGIN_US = 100.0
# The fewest ops a sample holds when large messages shorten it (TimingPlan.ops_for).
MIN_OPS_PER_SAMPLE = 4
_ALIGN_GROUP = "timing.align_group"
_SLEEP_RATE = "timing.sleep_cycles_per_us"
_INTEGER_DRAWS = "timing.integer_draws"


@dataclass(frozen=True)
class TimingPlan:
    """How many samples, ops per sample and instances each candidate gets."""

    samples: int  # timed rounds: every candidate gets exactly this many samples
    ops_per_sample: int  # ops per graph (CUDA) or per timed loop (CPU)
    warmup: int  # untimed rounds first (graph upload, caches, the sleep's calibration)
    instances: int  # per candidate; round r uses instance r % instances
    # Replays of the same instance back to back between one pair of marks, as nccl-tests -G
    # launches one graph many times per timing: a sample then covers ops_per_sample x
    # launches ops, the steady state of a stream that never drains between graphs.
    launches: int = 1
    # 0: every op of a sample on the same buffers. Else each op on its own buffer set, set k
    # % min(ops_per_sample, rotate_bytes // message bytes): nccl-tests' shifting of its
    # buffers through rotate_bytes (64 MiB there), which keeps larger messages out of the
    # cache (module docstring).
    rotate_bytes: int = 0
    # Where the job buffers come from: "torch" (its caching allocator, as a server's) or
    # "ncclmem" (ncclMemAlloc, as nccl-tests'; CUDA only).
    memory: str = "torch"
    # 0: every sample holds ops_per_sample ops. Else ops_per_sample is halved, down to
    # MIN_OPS_PER_SAMPLE, while a sample would move more than this many bytes (ops_for).
    sample_bytes: int = 0

    def ops_for(self, message_bytes: int) -> int:
        """Ops per sample at this message size. A graph's head and tail (its launch, the
        first op's ramp) cost the same few microseconds however large its ops are, so at
        large messages a few ops already make a sample of half a millisecond, and more ops
        only add GPU time to the run (the latency suite's rounds were most of its time at 4
        MiB and up)."""
        ops = self.ops_per_sample
        if self.sample_bytes:
            while ops // 2 >= MIN_OPS_PER_SAMPLE and ops * message_bytes > self.sample_bytes:
                ops //= 2
        return ops

    def at(self, message_bytes: int) -> TimingPlan:
        """This plan with the op count of `message_bytes` fixed (ops_for)."""
        return replace(self, ops_per_sample=self.ops_for(message_bytes), sample_bytes=0)

    def buffer_sets(self, message_bytes: int) -> int:
        """How many buffer sets one instance cycles through at this message size."""
        if not self.rotate_bytes:
            return 1
        return max(1, min(self.ops_per_sample, self.rotate_bytes // max(1, message_bytes)))

    def __post_init__(self) -> None:
        if self.memory not in MEMORIES:
            raise ValueError(
                f"timing plan: memory must be one of {', '.join(MEMORIES)}, not {self.memory!r}"
            )
        for f in fields(self):
            if f.name == "memory":
                continue
            value = getattr(self, f.name)
            least = 0 if f.name in ("warmup", "rotate_bytes", "sample_bytes") else 1
            if not isinstance(value, int) or value < least:
                raise ValueError(
                    f"timing plan: {f.name} must be an integer >= {least}, not {value!r}"
                )

    @classmethod
    def for_device(cls, device: str, environ: Mapping[str, str] = os.environ) -> TimingPlan:
        if device == "cuda":
            # With the ranks aligned on the device the per-op figure no longer depends on the
            # op count; 32 ops keep a graph's head and tail under 1% of a small op and a
            # sample short. Three instances: one bad capture cannot move the median. 12
            # samples: on 2 x H200 one median's noise is about 0.2% (roughness 0.002), so
            # 24 bought nothing a decision used; where one is close, settling adds samples
            # (up to 4x, `selection.unsettled_sizes`). Above 4 MiB fewer ops (ops_for): on
            # 2 x H200 a sample there carries a constant of a few microseconds (launch,
            # first op's ramp; median 6 us at 4-64 MiB), and with at least 128 MiB moved
            # per sample the per-op figure stays within 2% of the estimate from differencing
            # 4- and 200-op graphs, for every backend from 4 to 64 MiB.
            plan = cls(samples=12, ops_per_sample=32, warmup=2, instances=3, sample_bytes=128 << 20)
        else:
            # CPU collectives take milliseconds: single ops, few samples, one instance (there
            # is no capture to vary) keep the default run short.
            plan = cls(samples=8, ops_per_sample=1, warmup=1, instances=1)
        text = environ.get(TIMING_ENV, "").strip()
        plan = plan.overridden(text) if text else plan
        if plan.memory != "torch" and device != "cuda":
            raise ValueError(f"{TIMING_ENV}={text!r}: memory={plan.memory} needs CUDA")
        return plan

    def overridden(self, text: str) -> TimingPlan:
        """This plan with fields replaced from "key=value,..." (keys: samples, ops, warmup,
        instances, launches, rotate, sample, memory; rotate and sample take bytes, with K, M
        or G allowed; memory takes torch or ncclmem); ValueError naming TIMING_ENV and the
        bad part otherwise. An op count given without `sample` holds at every size."""
        names = {"samples": "samples", "ops": "ops_per_sample", "warmup": "warmup"}
        names |= {"instances": "instances", "launches": "launches", "rotate": "rotate_bytes"}
        names |= {"sample": "sample_bytes"}
        changes: dict[str, int | str] = {}
        for part in text.split(","):
            key, sep, value = part.partition("=")
            key = key.strip()
            if key == "memory" and value.strip() in MEMORIES:
                changes["memory"] = value.strip()
                continue
            number = _integer(value, byte_units=key in ("rotate", "sample"))
            if not sep or key not in names or number is None:
                raise ValueError(
                    f"{TIMING_ENV}={text!r}: bad part {part.strip()!r}; expected key=integer "
                    f"pairs with keys {', '.join(names)} (e.g. 'samples=24,ops=100,rotate=64M'), "
                    f"or memory={'|'.join(MEMORIES)}"
                )
            changes[names[key]] = number
        if "ops_per_sample" in changes:
            changes.setdefault("sample_bytes", 0)
        try:
            return replace(self, **changes)
        except ValueError as exc:
            raise ValueError(f"{TIMING_ENV}={text!r}: {exc}") from None


def parse_bytes(text: str) -> int:
    """A byte count written as an integer with an optional K, M or G (binary units);
    ValueError naming the text otherwise."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    digits = text.strip().upper()
    scale = 1
    if digits[-1:] in units:
        digits, scale = digits[:-1], units[digits[-1]]
    if not digits.lstrip("-").isdigit():
        raise ValueError(f"not a byte size: {text.strip()!r} (e.g. 8K, 64M, 4096)")
    return int(digits) * scale


def _integer(text: str, byte_units: bool) -> int | None:
    try:
        return parse_bytes(text) if byte_units else int(text.strip())
    except ValueError:
        return None


MEMORIES = ("torch", "ncclmem")


# ---- results -------------------------------------------------------------------------------


@dataclass
class CandidateTiming:
    """One candidate's samples (each the maximum over ranks) and what went wrong, if anything."""

    samples_us: list[float]
    clock: str  # "cuda_graph", "cuda_eager" (a backend that cannot be captured) or "wall_clock"
    engaged: str
    problems: list[str] = field(default_factory=list)  # "rank r: ..." from any rank


@dataclass
class InterleavedTiming:
    candidates: list[CandidateTiming]  # in the order of the works given
    ops_per_sample: int
    message_bytes: int
    sleep_us: float | None  # the device-side sleep that opened each round (CUDA only)
    late_rounds: int  # rounds still queued slower than the sleep after being timed again


# ---- the rounds (device-independent, so the mechanism can be tested on a fake clock) --------


class Clock(Protocol):
    """Marks time on one rank. Pairs of marks are turned into microseconds at a round's end."""

    sleep_us: float  # a round is late when its host queueing took longer than this

    def begin_round(self) -> None: ...

    def align(self) -> None: ...

    def mark(self) -> Any: ...

    def end_round(self, pairs: list[tuple[Any, Any]]) -> tuple[list[float], float]:
        """(elapsed us of each (start, stop) pair, the host's queueing time of the round in us)."""
        ...

    def calibrate(self, host_us: float) -> None:
        """Set the sleep from the slowest rank's queueing time of one round."""
        ...


def rotation(candidates: int, round_index: int) -> list[int]:
    """The candidates' order in a round: rotated by one every round, so each candidate takes
    each position equally often and drift cannot favour whoever goes first."""
    start = round_index % candidates
    return [(start + k) % candidates for k in range(candidates)]


@dataclass
class RoundTimes:
    per_op_us: list[float]  # per candidate, this rank only
    host_us: float


def time_rounds(
    clock: Clock,
    replays: Sequence[Sequence[Callable[[], None]]],
    round_indexes: Sequence[int],
    ops_per_sample: int,
    launches: int = 1,
) -> dict[int, RoundTimes]:
    """Time the given rounds on this rank; replays[c][i] is candidate c's instance i, run
    `launches` times between one pair of marks."""
    times: dict[int, RoundTimes] = {}
    for r in round_indexes:
        order = rotation(len(replays), r)
        clock.begin_round()
        pairs = []
        for c in order:
            instances = replays[c]
            clock.align()
            replay = instances[r % len(instances)]
            start = clock.mark()
            for _ in range(launches):
                replay()
            pairs.append((start, clock.mark()))
        elapsed, host_us = clock.end_round(pairs)
        per_op = [0.0] * len(replays)
        for c, us in zip(order, elapsed, strict=True):
            per_op[c] = us / (ops_per_sample * launches)
        times[r] = RoundTimes(per_op, host_us)
    return times


def run_rounds(
    clock: Clock,
    replays: Sequence[Sequence[Callable[[], None]]],
    plan: TimingPlan,
    gather: Callable[[Any], list[Any]],
) -> tuple[list[list[float]], int]:
    """Warm-up rounds (which calibrate the sleep), the timed rounds, then the late ones again.

    `gather` exchanges a value among the ranks (every rank's, in rank order), so every rank
    takes the same decisions: the same sleep and the same rounds timed again. Returns this
    rank's per-op samples per candidate (round order) and how many rounds stayed late.
    """
    device_paced = math.isfinite(clock.sleep_us)  # the same on every rank

    def rounds(indexes: Sequence[int]) -> dict[int, RoundTimes]:
        return time_rounds(clock, replays, indexes, plan.ops_per_sample, plan.launches)

    if plan.warmup:
        warm = rounds(range(-plan.warmup, 0))
        if device_paced:
            # The last warm-up round: the first one also pays for uploading every graph.
            clock.calibrate(max(gather(warm[-1].host_us)))
    timed = rounds(range(plan.samples))
    still: list[int] = []
    if device_paced and (late := sorted(set().union(*gather(_late(clock, timed))))):
        # Late rounds are timed again after the slowest queueing seen, doubled.
        clock.calibrate(max(gather(max(timed[r].host_us for r in late))))
        timed.update(rounds(late))
        still = sorted(set().union(*gather(_late(clock, {r: timed[r] for r in late}))))
    samples = [[timed[r].per_op_us[c] for r in range(plan.samples)] for c in range(len(replays))]
    return samples, len(still)


def _late(clock: Clock, times: dict[int, RoundTimes]) -> set[int]:
    return {r for r, t in times.items() if t.host_us > clock.sleep_us}


# ---- clocks ----------------------------------------------------------------------------------


class WallClock:
    """CPU: the CPU group's barrier aligns the ranks; perf_counter marks.

    The barrier blocks in the kernel, so a waiting rank gives up its core and is woken with
    the scheduler's favour. A shared-memory spin barrier leaves ranks closer together on an
    idle host, but on a busy one the spinning rank uses up its share and is preempted inside
    the timed op: samples came out several times slower on the 2-core development machine.
    """

    sleep_us = math.inf  # nothing to outrun: the host is the device

    def __init__(self, ctx: RankContext) -> None:
        self.ctx = ctx

    def begin_round(self) -> None:
        pass

    def align(self) -> None:
        self.ctx.barrier()

    def mark(self) -> float:
        return time.perf_counter()

    def end_round(self, pairs: list[tuple[Any, Any]]) -> tuple[list[float], float]:
        return [(stop - start) * 1e6 for start, stop in pairs], 0.0

    def calibrate(self, host_us: float) -> None:
        pass


class CudaClock:
    """CUDA: a device-side sleep opens each round, a one-element allreduce on a group of its
    own aligns the ranks before each replay, CUDA events mark (see the module docstring)."""

    def __init__(self, ctx: RankContext, pairs_per_round: int) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.group = _align_group(ctx)
        self.token = torch.zeros(1, device=ctx.device)
        self.cycles_per_us = _sleep_cycles_per_us(ctx)
        self.sleep_us = INITIAL_SLEEP_US
        self.events = [torch.cuda.Event(enable_timing=True) for _ in range(2 * pairs_per_round)]
        self._used = 0
        self._began = 0.0

    def begin_round(self) -> None:
        self._used = 0
        self._began = time.perf_counter()
        torch.cuda._sleep(int(self.sleep_us * self.cycles_per_us))

    def align(self) -> None:
        self._dist.all_reduce(self.token, group=self.group)

    def mark(self) -> torch.cuda.Event:
        event = self.events[self._used]
        self._used += 1
        event.record()
        return event

    def end_round(self, pairs: list[tuple[Any, Any]]) -> tuple[list[float], float]:
        host_us = (time.perf_counter() - self._began) * 1e6
        pairs[-1][1].synchronize()  # one stream: every earlier event is done too
        return [start.elapsed_time(stop) * 1e3 for start, stop in pairs], host_us

    def calibrate(self, host_us: float) -> None:
        self.sleep_us = SLEEP_FACTOR * host_us + SLEEP_MARGIN_US


def _align_group(ctx: RankContext) -> Any:
    """A device group used only for aligning: no candidate's communicator is touched between
    its captured ops, whatever NCCL's graph-mixing setting. Created once per rank process."""
    group = ctx.cache.get(_ALIGN_GROUP)
    if group is None:
        import torch.distributed as dist

        group = dist.new_group(backend=dist.get_backend(ctx.group))
        warm = torch.zeros(1, device=ctx.device)
        dist.all_reduce(warm, group=group)  # the communicator exists before any timing
        torch.cuda.synchronize(ctx.device)
        ctx.cache[_ALIGN_GROUP] = group
    return group


def _sleep_cycles_per_us(ctx: RankContext) -> float:
    """GPU clock cycles per microsecond of torch.cuda._sleep, measured once per rank."""
    rate = ctx.cache.get(_SLEEP_RATE)
    if rate is None:
        cycles = 1_000_000
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        for _ in range(2):  # the first launch also loads the kernel
            start.record()
            torch.cuda._sleep(cycles)
            stop.record()
            stop.synchronize()
        rate = cycles / (start.elapsed_time(stop) * 1e3)
        ctx.cache[_SLEEP_RATE] = rate
    return rate


# ---- candidates: buffers, expected outputs, captures -------------------------------------------


@dataclass
class _Expected:
    """What every instance's outputs must hold: the exact sum, and for the fused job the exact
    residual sum and the norm's reference with its bound."""

    out: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    norm: torch.Tensor | None = None
    norm_bound: torch.Tensor | None = None


@dataclass
class _Inputs:
    mine: torch.Tensor
    residual: torch.Tensor
    expected: _Expected


def _integer_rows(ctx: RankContext, seed: int, rows: int, work: Work) -> torch.Tensor:
    """The first `rows` rows of one integer draw (integer_base) per seed and hidden size, made
    once per rank process at the largest size any candidate is set up for: the inputs cost a
    slice, not a fresh draw per size (which took longer than the timing itself on the CPU)."""
    cache: dict[tuple[int, int], torch.Tensor] = ctx.cache.setdefault(_INTEGER_DRAWS, {})
    key = (seed, work.target.hidden)
    draw = cache.get(key)
    if draw is None or draw.shape[0] < rows:
        size = max(rows, work.setup_rows)
        draw = integer_base(seed, size, work.target.hidden, ctx.device).to(torch.int8)
        cache[key] = draw
    return draw[:rows]


def _inputs(ctx: RankContext, work: Work, rows: int, job: Job) -> _Inputs:
    dtype = work.dtype
    mine, total = exact_inputs(
        _integer_rows(ctx, 51, rows, work).float(), ctx.rank, ctx.world_size, dtype
    )
    # The residual is the same on every rank, as in a model.
    residual = _integer_rows(ctx, 52, rows, work).to(dtype)
    # Integers stay exact through the sum and the residual add, in any dtype; comparisons run
    # in float32, which holds them exactly (elementwise bfloat16 is slow on CPUs).
    if job == "allreduce":
        return _Inputs(mine, residual, _Expected(out=total.float()))
    wide = torch.float64 if dtype == torch.float32 else torch.float32
    res_sum = total + residual.double()
    norm = (res_sum * torch.rsqrt(res_sum.pow(2).mean(-1, keepdim=True) + RMS_EPS)).to(wide)
    bound = 4 * torch.finfo(dtype).eps * norm.abs() + 1e-6
    return _Inputs(mine, residual, _Expected(residual=res_sum.float(), norm=norm, norm_bound=bound))


@dataclass
class _Candidate:
    backend: Backend
    buffers: list[list[JobBuffers]]  # per instance, its buffer sets (one unless rotating)
    replays: list[Callable[[], None]]
    clock: str
    graphs: list[Any] = field(default_factory=list)  # kept alive while replayed


def _buffers(
    ctx: RankContext, work: Work, rows: int, inputs: _Inputs, memory: NcclMemory | None
) -> JobBuffers:
    allocate = memory.empty if memory is not None else None
    buf = JobBuffers.allocate(rows, work.target.hidden, work.dtype, ctx.device, allocate)
    buf.inp.copy_(inputs.mine)
    buf.residual.copy_(inputs.residual)
    buf.weight.fill_(1)
    return buf


def _ops(backend: Backend, job: Job, sets: Sequence[JobBuffers], ops: int) -> Callable[[], None]:
    """`ops` runs of the job, op k on buffer set k % len(sets)."""

    def run() -> None:
        for k in range(ops):
            run_job(backend, job, sets[k % len(sets)])

    return run


def _prepare(
    ctx: RankContext,
    work: Work,
    rows: int,
    job: Job,
    plan: TimingPlan,
    inputs: _Inputs,
    memory: NcclMemory | None,
) -> _Candidate:
    backend = backend_for(ctx, work)
    sets = plan.buffer_sets(inputs.mine.numel() * inputs.mine.element_size())
    bufs = [
        [_buffers(ctx, work, rows, inputs, memory) for _ in range(sets)]
        for _ in range(plan.instances)
    ]
    if not ctx.is_cuda:
        return _Candidate(
            backend, bufs, [_ops(backend, job, b, plan.ops_per_sample) for b in bufs], "wall_clock"
        )
    # Every set at least once: libraries allocate and connect on first use.
    stream = warm_up_on_side_stream(
        [_ops(backend, job, inst, max(EAGER_WARMUP_OPS, len(inst))) for inst in bufs]
    )
    if not backend.limits_.graph_capturable:
        # Timed as launched eagerly, as a server runs it; the sleep covers the launches too.
        return _Candidate(
            backend, bufs, [_ops(backend, job, b, plan.ops_per_sample) for b in bufs], "cuda_eager"
        )
    # Every instance in one capture context, then one registration.
    runs = [_ops(backend, job, inst, plan.ops_per_sample) for inst in bufs]
    graphs = capture_each(ctx, backend, runs, stream)
    backend.after_capture()
    return _Candidate(backend, bufs, [g.replay for g in graphs], "cuda_graph", graphs)


def _output_problems(job: Job, buf: JobBuffers, expected: _Expected) -> list[str]:
    """What is wrong with an instance's last outputs (NaN from the poisoning counts as wrong)."""
    if job == "allreduce":
        assert expected.out is not None
        wrong = int(torch.count_nonzero(buf.out.float() != expected.out))
        return [f"{wrong} of {buf.out.numel()} elements differ from the exact sum"] if wrong else []
    assert expected.residual is not None and expected.norm is not None
    assert expected.norm_bound is not None
    problems = []
    wrong = int(torch.count_nonzero(buf.residual_out.float() != expected.residual))
    if wrong:
        problems.append(
            f"residual-out: {wrong} of {buf.residual_out.numel()} elements differ "
            "from the exact sum"
        )
    ratio = (buf.out.to(expected.norm.dtype) - expected.norm).abs() / expected.norm_bound
    worst = float(ratio.nan_to_num(nan=math.inf).max().item())
    if worst > 1:
        problems.append(f"normalised output off by {worst:.3g}x its error bound")
    return problems


# ---- the rank function -------------------------------------------------------------------------


def measure_interleaved(
    ctx: RankContext, works: Sequence[Work], rows: int, job: Job, plan: TimingPlan
) -> InterleavedTiming:
    """Time `job` at `rows` for every work, interleaved (see the module docstring).

    Every candidate's backend is set up (or reused) and prepared before the first round, so
    they all coexist as they would in a server that switches backends by size. Collective:
    every rank calls it with the same arguments.
    """
    if plan.memory == "ncclmem" and not ctx.is_cuda:
        raise ValueError("timing plan memory=ncclmem needs CUDA")
    memory = NcclMemory(ctx.device) if plan.memory == "ncclmem" else None
    try:
        return _measure(ctx, works, rows, job, plan, memory)
    finally:
        if memory is not None:
            memory.free()


def _measure(
    ctx: RankContext,
    works: Sequence[Work],
    rows: int,
    job: Job,
    plan: TimingPlan,
    memory: NcclMemory | None,
) -> InterleavedTiming:
    inputs = _inputs(ctx, works[0], rows, job)
    plan = plan.at(inputs.mine.numel() * inputs.mine.element_size())
    candidates = [_prepare(ctx, w, rows, job, plan, inputs, memory) for w in works]
    for cand in candidates:
        for inst in cand.buffers:
            for buf in inst:
                buf.poison()  # an output the timed loop never writes is caught below
    clock: Clock = CudaClock(ctx, len(candidates)) if ctx.is_cuda else WallClock(ctx)
    samples, late = run_rounds(clock, [c.replays for c in candidates], plan, ctx.all_gather_object)
    if ctx.is_cuda:
        torch.cuda.synchronize()
    problems = [
        [
            f"instance {i}{f' buffer set {j}' if len(inst) > 1 else ''}: {p}"
            for i, inst in enumerate(c.buffers)
            for j, buf in enumerate(inst)
            for p in _output_problems(job, buf, inputs.expected)
        ]
        for c in candidates
    ]
    everyone = ctx.all_gather_object((samples, problems))
    result = []
    for k, cand in enumerate(candidates):
        worst = [
            max(rank_samples[k][i] for rank_samples, _ in everyone) for i in range(plan.samples)
        ]
        found = [
            f"rank {r}: {p}"
            for r, (_, rank_problems) in enumerate(everyone)
            for p in rank_problems[k]
        ]
        if any(s <= 0 for s in worst):
            found.append(f"non-positive latency samples: {worst}")
        result.append(CandidateTiming(worst, cand.clock, engaged(cand.backend, job), found))
    buf = candidates[0].buffers[0][0]
    return InterleavedTiming(
        candidates=result,
        ops_per_sample=plan.ops_per_sample * plan.launches,
        message_bytes=buf.inp.numel() * buf.inp.element_size(),
        sleep_us=clock.sleep_us if ctx.is_cuda else None,
        late_rounds=late,
    )
