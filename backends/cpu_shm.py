"""cpu_shm: allreduce through shared memory among the ranks of one host.

This is how CPU tensor parallelism is served: ranks on one host skip the network stack and
exchange through a shared mapping. Layout of the mapping:

    [ one 64-byte arrival counter per rank ][ 2 x world_size slots of max input bytes ]

Call g writes this rank's input into slot set g % 2, then publishes g in its counter, waits
until every counter reaches g, and sums all slots of the set in rank order (so every rank
gets bit-identical results). Two slot sets make one wait per call enough: a rank can only
overwrite set g % 2 again at call g + 2, after every peer has arrived at call g + 1, which
each did only after finishing its reads of call g.

The mapping is a memfd: it has no name in /dev/shm or anywhere else, and the kernel frees it
when the last rank holding it exits, however it exits. Rank 0 creates it; the others open it
through rank 0's /proc/<pid>/fd entry, which the kernel lets only this user's processes do.
"""

from __future__ import annotations

import mmap
import os
import time
from typing import TYPE_CHECKING

from pytest_allreduce.backend import Backend, Limits, VariantSpec

if TYPE_CHECKING:
    import torch

    from pytest_allreduce.context import RankContext

_COUNTER_STRIDE = 64  # one cache line per rank, so counters never share a line
_SLOT_ALIGN = 64


class CpuShmBackend(Backend):
    name = "cpu_shm"
    variants = (
        VariantSpec(server_type="cpu_shm", summary="cpu_shm one-shot through shared memory"),
    )
    simplicity = 10

    @classmethod
    def limits(cls, variant: str, world_size: int) -> Limits:
        # The mapping holds 2 x world_size copies of the largest input and every rank sums
        # them all: 16 MiB per rank (2048 rows of hidden 4096 in bfloat16) keeps both the
        # mapping and a call's time bounded on small hosts.
        return Limits(device="cpu", dtypes=("float32", "float16", "bfloat16"), max_bytes=16 << 20)

    @classmethod
    def probe(cls, ctx: RankContext, variant: str) -> str | None:
        if not hasattr(os, "memfd_create") or not os.path.isdir("/proc/self/fd"):
            return "needs Linux (memfd_create and /proc/<pid>/fd)"
        if ctx.local_world_size != ctx.world_size:
            return (
                f"ranks span several hosts (LOCAL_WORLD_SIZE={ctx.local_world_size}, "
                f"WORLD_SIZE={ctx.world_size}); shared memory needs one host"
            )
        return None

    def setup(self) -> None:
        import torch

        ws = self.ctx.world_size
        itemsize = self.dtype.itemsize
        slot = -(-self.max_rows * self.hidden * itemsize // _SLOT_ALIGN) * _SLOT_ALIGN
        header = ws * _COUNTER_STRIDE
        size = header + 2 * ws * slot

        fd = -1
        try:
            where = None
            if self.ctx.rank == 0:
                fd = os.memfd_create("pytest-allreduce-cpu-shm", os.MFD_CLOEXEC)
                os.ftruncate(fd, size)
                where = f"/proc/{os.getpid()}/fd/{fd}"
            where = self.ctx.all_gather_object(where)[0]
            if self.ctx.rank != 0:
                fd = os.open(where, os.O_RDWR | os.O_CLOEXEC)
            self._map = mmap.mmap(fd, size)
            # Rank 0's descriptor is the others' way in: it stays open until all have mapped.
            self.ctx.barrier()
        finally:
            if fd >= 0:
                os.close(fd)

        raw = torch.frombuffer(self._map, dtype=torch.uint8)
        self._counters = raw[:header].view(torch.int64)[:: _COUNTER_STRIDE // 8]
        self._slots = [
            [
                raw[header + (s * ws + r) * slot : header + (s * ws + r + 1) * slot]
                for r in range(ws)
            ]
            for s in range(2)
        ]
        self._generation = 0

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        import torch

        g = self._generation + 1
        nbytes = inp.numel() * inp.element_size()
        slots = self._slots[g % 2]
        slots[self.ctx.rank][:nbytes].copy_(inp.reshape(-1).view(torch.uint8))
        self._counters[self.ctx.rank] = g
        self._wait_for_all(g)
        acc_dtype = torch.float64 if inp.dtype == torch.float64 else torch.float32
        # copy=True: for float32 input .to() would alias rank 0's shared slot, and the sums
        # below would write into memory the other ranks are still reading.
        acc = slots[0][:nbytes].view(inp.dtype).to(acc_dtype, copy=True)
        for r in range(1, self.ctx.world_size):
            acc += slots[r][:nbytes].view(inp.dtype)
        out.copy_(acc.view(out.shape))
        self._generation = g

    def _wait_for_all(self, generation: int) -> None:
        # Spin briefly (peers usually arrive within microseconds), then back off so that a
        # slow peer on an oversubscribed machine gets the core.
        deadline = time.monotonic() + self.ctx.timeout_s
        spins = 0
        while bool((self._counters < generation).any()):
            spins += 1
            if spins > 2000:
                time.sleep(50e-6)
                if time.monotonic() > deadline:
                    late = (self._counters < generation).nonzero().flatten().tolist()
                    raise TimeoutError(
                        f"cpu_shm: rank(s) {late} did not reach call {generation} within "
                        f"{self.ctx.timeout_s:.0f} s"
                    )
            else:
                os.sched_yield()

    def release(self) -> None:
        del self._counters, self._slots
        self._map.close()
