"""Raw ncclAllReduce timed the way nccl-tests -G times it, outside the plugin: which of our
differences from nccl-tests moves NCCL's own time (issue 13).

Two rank processes (torch.multiprocessing), each holding one GPU and, by default, nothing
but a gloo group (to pass NCCL's unique id and to barrier) and one NCCL communicator made
through the pynccl backend's ctypes binding. Per size and variant: 50 out-of-place
ncclAllReduce captured in one CUDA graph, 10 eager warm-up calls, a host barrier, the graph
launched 20 times, a stream synchronize; per op = host time / 1000, averaged over ranks
(nccl-tests' figure) and the slower rank's. Variants, interleaved size by size:

    integers   the engine's inputs: small integers in bfloat16
    random     uniform [0, 1) values, as nccl-tests fills its buffers
    torch-pg   integers, with torch's NCCL process group also alive in each rank (one
               allreduce through it first), as in the plugin's rank processes; timed after
               the other two at every size, since the group cannot be taken away again

    python benchmarks/nccl_bare_probe.py [--min-bytes 8K] [--max-bytes 64M] [--out DIR]

Prints a table and writes nccl-bare-probe.json to --out (default $OUT or .).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytest_allreduce.backends.pynccl import nccl_dtype, nccl_library

from pytest_allreduce.nccl_env import apply_rank_settings

OPS_PER_GRAPH = 50
LAUNCHES = 20
WARMUP_CALLS = 10
VARIANTS = ("integers", "random", "torch-pg")


def _fill(kind: str, count: int, rank: int, device: torch.device) -> torch.Tensor:
    gen = torch.Generator(device=device)
    gen.manual_seed(1234 + rank)
    if kind == "random":
        return torch.rand(count, generator=gen, device=device).to(torch.bfloat16)
    return torch.randint(-3, 4, (count,), generator=gen, device=device).to(torch.bfloat16)


def _time_size(lib: Any, comm: int, nbytes: int, kind: str, rank: int) -> float:
    """Per-op us on this rank: nccl-tests' -G shape, host-timed."""
    device = torch.device("cuda", rank)
    count = nbytes // 2
    send = _fill(kind, count, rank, device)
    recv = torch.empty_like(send)
    dtype = nccl_dtype(torch.bfloat16)
    stream = torch.cuda.Stream(device)

    def call() -> None:
        lib.all_reduce(send.data_ptr(), recv.data_ptr(), count, dtype, comm, stream.cuda_stream)

    with torch.cuda.stream(stream):
        for _ in range(WARMUP_CALLS):
            call()
    stream.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        for _ in range(OPS_PER_GRAPH):
            call()
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


def _rank_main(rank: int, store_path: str, sizes: list[int], result_path: str) -> None:
    apply_rank_settings()
    torch.cuda.set_device(rank)
    store = dist.FileStore(store_path, 2)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    lib = nccl_library()
    box = [lib.unique_id() if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    comm = lib.init_rank(2, box[0], rank)
    results: dict[str, dict[int, list[float]]] = {v: {} for v in VARIANTS}

    def timed(variant: str, kind: str, at: list[int]) -> None:
        for nbytes in at:
            both: list[Any] = [None, None]
            dist.all_gather_object(both, _time_size(lib, comm, nbytes, kind, rank))
            results[variant][nbytes] = both

    for nbytes in sizes:  # the two data patterns interleaved, size by size
        timed("integers", "integers", [nbytes])
        timed("random", "random", [nbytes])
    torch_group = dist.new_group(backend="nccl")
    warm = torch.ones(1, device=f"cuda:{rank}")
    dist.all_reduce(warm, group=torch_group)
    torch.cuda.synchronize()
    timed("torch-pg", "integers", sizes)
    if rank == 0:
        Path(result_path).write_text(json.dumps(results))
    dist.barrier()
    lib.destroy(comm)
    dist.destroy_process_group()


def _parse_bytes(text: str) -> int:
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    if text and text[-1] in units:
        return int(text[:-1]) * units[text[-1]]
    return int(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-bytes", default="8K")
    parser.add_argument("--max-bytes", default="64M")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")))
    args = parser.parse_args(argv)
    if torch.cuda.device_count() < 2:
        parser.error("needs 2 GPUs")
    sizes = []
    n = _parse_bytes(args.min_bytes)
    while n <= _parse_bytes(args.max_bytes):
        sizes.append(n)
        n *= 2
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "result.json")
        mp.spawn(_rank_main, args=(os.path.join(tmp, "store"), sizes, result_path), nprocs=2)
        raw = json.loads(Path(result_path).read_text())
    heads = ["bytes"] + [f"{v} mean / max (us)" for v in VARIANTS]
    lines = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
    records = []
    for nbytes in sizes:
        record: dict[str, Any] = {"bytes": nbytes}
        cells = [str(nbytes)]
        for v in VARIANTS:
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
