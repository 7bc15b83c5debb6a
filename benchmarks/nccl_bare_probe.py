"""Raw ncclAllReduce timed the way nccl-tests -G times it, outside the plugin: which of our
differences from nccl-tests moves NCCL's own time (issue 13).

Two rank processes (torch.multiprocessing), each holding one GPU and, by default, nothing
but a gloo group (to pass NCCL's unique id and to barrier) and one NCCL communicator made
through the pynccl backend's ctypes binding. Per size and variant: 50 out-of-place
ncclAllReduce captured in one CUDA graph, 10 eager warm-up calls, a host barrier, the graph
launched 20 times, a stream synchronize; per op = host time / 1000, averaged over ranks
(nccl-tests' figure) and the slower rank's. Variants, interleaved size by size:

    integers         the engine's inputs: small integers in bfloat16, every op on the same
                     send and receive buffers (torch's allocator)
    random           uniform [0, 1) values, as nccl-tests fills its buffers
    rotated          integers; op k of the graph works at byte offset (k % steps) * size of a
                     send and a receive buffer of the largest size (steps = largest // size),
                     as nccl-tests' startColl shifts its buffers "to avoid cache effects":
                     from 512 KiB up, 50 ops' inputs and outputs no longer fit the L2 cache
    ncclmem          integers, same buffers, allocated with ncclMemAlloc (cuMem), as
                     nccl-tests 2.19 allocates its buffers
    ncclmem-rotated  both: nccl-tests' buffers and offsets
    torch-pg         integers, with torch's NCCL process group also alive in each rank (one
                     allreduce through it first), as in the plugin's rank processes; timed after
                     the others at every size, since the group cannot be taken away again

    python benchmarks/nccl_bare_probe.py [--variants integers,rotated,...] [--min-bytes 8K]
        [--max-bytes 64M] [--out DIR]

Prints a table and writes nccl-bare-probe.json to --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytest_allreduce.backends.pynccl import NcclLibrary, nccl_dtype, nccl_library

from pytest_allreduce.nccl_env import apply_rank_settings
from pytest_allreduce.ncclmem import NcclMemory
from pytest_allreduce.timing import parse_bytes

OPS_PER_GRAPH = 50
LAUNCHES = 20
WARMUP_CALLS = 10


@dataclass(frozen=True)
class Variant:
    fill: str  # "integers" or "random"
    alloc: str  # "torch" or "ncclmem"
    rotate: bool  # shift each op's buffers as nccl-tests does
    torch_pg: bool = False  # torch's NCCL process group alive (timed last)


VARIANTS = {
    "integers": Variant("integers", "torch", False),
    "random": Variant("random", "torch", False),
    "rotated": Variant("integers", "torch", True),
    "ncclmem": Variant("integers", "ncclmem", False),
    "ncclmem-rotated": Variant("integers", "ncclmem", True),
    "torch-pg": Variant("integers", "torch", False, torch_pg=True),
}
DEFAULT_VARIANTS = "integers,rotated,ncclmem,ncclmem-rotated"


class RankBuffers:
    """One send and one receive buffer of the largest size per allocator, filled once."""

    def __init__(self, largest: int, rank: int, device: torch.device) -> None:
        self.largest, self.rank, self.device = largest, rank, device
        self.pairs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.nccl_memory = NcclMemory(device)

    def pair(self, alloc: str) -> tuple[torch.Tensor, torch.Tensor]:
        if alloc not in self.pairs:
            count = self.largest // 2
            if alloc == "ncclmem":
                send = self.nccl_memory.empty((count,), torch.bfloat16)
                recv = self.nccl_memory.empty((count,), torch.bfloat16)
            else:
                send = torch.empty(count, dtype=torch.bfloat16, device=self.device)
                recv = torch.empty_like(send)
            send.copy_(_fill("integers", count, self.rank, self.device))
            recv.zero_()
            self.pairs[alloc] = (send, recv)
        return self.pairs[alloc]

    def free(self) -> None:
        self.pairs.clear()
        self.nccl_memory.free()


def _fill(kind: str, count: int, rank: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(1234 + rank)
    if kind == "random":
        return torch.rand(count, generator=gen, device=device).to(torch.bfloat16)
    return torch.randint(-3, 4, (count,), generator=gen, device=device).to(torch.bfloat16)


def _time_size(
    lib: NcclLibrary, comm: int, nbytes: int, variant: Variant, buffers: RankBuffers
) -> float:
    """Per-op us on this rank: nccl-tests' -G shape, host-timed."""
    device = buffers.device
    count = nbytes // 2
    if variant.fill == "random":
        send = _fill("random", count, buffers.rank, device)
        recv = torch.empty_like(send)
    else:
        send, recv = buffers.pair(variant.alloc)
    steps = buffers.largest // nbytes if variant.rotate else 1
    dtype = nccl_dtype(torch.bfloat16)
    stream = torch.cuda.Stream(device)

    def call(op: int) -> None:
        offset = (op % steps) * count  # elements; nccl-tests shifts by whole sizes
        lib.all_reduce(
            send[offset:].data_ptr(), recv[offset:].data_ptr(), count, dtype, comm,
            stream.cuda_stream,
        )  # fmt: skip

    with torch.cuda.stream(stream):
        for op in range(WARMUP_CALLS):
            call(op)
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for op in range(OPS_PER_GRAPH):
            call(op)
    graph.replay()  # upload
    torch.cuda.synchronize(device)
    dist.barrier()
    began = time.perf_counter()
    with torch.cuda.stream(stream):
        for _ in range(LAUNCHES):
            graph.replay()
    stream.synchronize()
    per_op = (time.perf_counter() - began) * 1e6 / (OPS_PER_GRAPH * LAUNCHES)
    del graph
    return per_op


def _rank_main(
    rank: int, store_path: str, sizes: list[int], names: list[str], result_path: str
) -> None:
    apply_rank_settings()
    torch.cuda.set_device(rank)
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    lib = nccl_library()
    box = [lib.unique_id() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    comm = lib.init_rank(2, box[0], rank)
    buffers = RankBuffers(max(sizes), rank, torch.device("cuda", rank))
    results: dict[str, dict[int, list[float]]] = {name: {} for name in names}

    def timed(name: str, at: list[int]) -> None:
        for nbytes in at:
            both: list[Any] = [None, None]
            per_op = _time_size(lib, comm, nbytes, VARIANTS[name], buffers)
            dist.all_gather_object(both, per_op)
            results[name][nbytes] = both

    before = [n for n in names if not VARIANTS[n].torch_pg]
    for nbytes in sizes:  # interleaved, size by size
        for name in before:
            timed(name, [nbytes])
    after = [n for n in names if VARIANTS[n].torch_pg]
    if after:
        torch_group = dist.new_group(backend="nccl")
        warm = torch.ones(1, device=f"cuda:{rank}")
        dist.all_reduce(warm, group=torch_group)
        torch.cuda.synchronize()
        for name in after:
            timed(name, sizes)
    if rank == 0:
        Path(result_path).write_text(json.dumps(results))
    dist.barrier()
    buffers.free()
    lib.destroy(comm)
    dist.destroy_process_group()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--variants",
        default=DEFAULT_VARIANTS,
        help=f"comma list of {', '.join(VARIANTS)} (default {DEFAULT_VARIANTS})",
    )
    parser.add_argument("--min-bytes", default="8K")
    parser.add_argument("--max-bytes", default="64M")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args(argv)
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown or not names:
        parser.error(f"--variants: unknown {unknown or 'none given'}; choose from {list(VARIANTS)}")
    if torch.cuda.device_count() < 2:
        parser.error("needs 2 GPUs")
    sizes = []
    n = parse_bytes(args.min_bytes)
    while n <= parse_bytes(args.max_bytes):
        sizes.append(n)
        n *= 2
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        mp.spawn(_rank_main, args=(os.path.join(tmp, "store"), sizes, names, result_path), nprocs=2)
        raw = json.loads(Path(result_path).read_text())
    heads = ["bytes"] + [f"{v} mean / max (us)" for v in names]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    records = []
    for nbytes in sizes:
        record: dict[str, Any] = {"bytes": nbytes}
        cells = [str(nbytes)]
        for v in names:
            ranks = raw[v][str(nbytes)]
            mean, worst = sum(ranks) / len(ranks), max(ranks)
            record[v] = {"mean_us": round(mean, 3), "max_us": round(worst, 3), "ranks": ranks}
            cells.append(f"{mean:.2f} / {worst:.2f}")
        records.append(record)
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "nccl-bare-probe.json").write_text(json.dumps(records, indent=1) + "\n")
    (args.out / "nccl-bare-probe.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
