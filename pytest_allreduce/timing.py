"""Latency, measured inside the ranks.

CUDA: `ops_per_sample` ops of the job are captured in one CUDA graph (as servers replay
their decode steps); each sample is one replay timed with CUDA events, divided by the op
count. CPU: the same loop, timed with the wall clock. Ops are out of place from an unchanged
input, so values never grow however many ops run. Every rank runs the same number of ops
(the count comes from the pool, agreed before capture), and each sample is the maximum over
ranks: a collective is as slow as its slowest rank.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .context import RankContext
from .jobs import JobBuffers, Work, backend_for, engaged, normal_input, run_job
from .model import Job


@dataclass(frozen=True)
class TimingPlan:
    samples: int
    ops_per_sample: int
    warmup: int

    @classmethod
    def for_device(cls, device: str) -> TimingPlan:
        if device == "cuda":
            # 50 ops per replay amortise the few microseconds by which ranks start apart.
            return cls(samples=30, ops_per_sample=50, warmup=5)
        # CPU collectives take milliseconds: few, single ops keep the default run short.
        return cls(samples=8, ops_per_sample=1, warmup=1)


@dataclass
class TimingResult:
    samples_us: list[float]  # max over ranks, per sample
    ops_per_sample: int
    clock: str
    engaged: str
    message_bytes: int


def measure(ctx: RankContext, work: Work, rows: int, job: Job, plan: TimingPlan) -> TimingResult:
    backend = backend_for(ctx, work)
    hidden, dtype, dev = work.target.hidden, work.dtype, ctx.device
    buf = JobBuffers.allocate(rows, hidden, dtype, dev)
    buf.inp.copy_(normal_input(51, ctx.rank, rows, hidden, dtype, dev))
    buf.residual.copy_(normal_input(52, 1000, rows, hidden, dtype, dev))
    buf.weight.fill_(1)
    mine = (
        _time_cuda(ctx, backend, job, buf, plan)
        if ctx.is_cuda
        else _time_cpu(ctx, backend, job, buf, plan)
    )
    everyone = ctx.all_gather_object(mine)
    worst = [max(per_rank[i] for per_rank in everyone) for i in range(plan.samples)]
    return TimingResult(
        samples_us=worst,
        ops_per_sample=plan.ops_per_sample,
        clock="cuda_graph" if ctx.is_cuda else "wall_clock",
        engaged=engaged(backend, job),
        message_bytes=buf.inp.numel() * buf.inp.element_size(),
    )


def _time_cpu(
    ctx: RankContext, backend, job: Job, buf: JobBuffers, plan: TimingPlan
) -> list[float]:
    for _ in range(plan.warmup):
        run_job(backend, job, buf)
    samples = []
    for _ in range(plan.samples):
        ctx.barrier()
        start = time.perf_counter()
        for _ in range(plan.ops_per_sample):
            run_job(backend, job, buf)
        samples.append((time.perf_counter() - start) * 1e6 / plan.ops_per_sample)
    return samples


def _time_cuda(
    ctx: RankContext, backend, job: Job, buf: JobBuffers, plan: TimingPlan
) -> list[float]:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(plan.warmup):
            run_job(backend, job, buf)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    ctx.barrier()
    graph = torch.cuda.CUDAGraph()
    with backend.capture(), torch.cuda.graph(graph, stream=stream):
        for _ in range(plan.ops_per_sample):
            run_job(backend, job, buf)
    backend.after_capture()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    samples = []
    for _ in range(plan.samples):
        ctx.barrier()
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) * 1e3 / plan.ops_per_sample)
    del graph
    return samples
