"""What a rank knows about itself: handed to every rank function and every backend.

Imported while pytest starts (backends name it in their signatures), so torch is imported
only where a rank uses it."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# Environment switches that keep NVLink multicast off. On shared multi-GPU hosts a program
# that creates a multicast object can take the host's GPUs out of service, so backends that
# need multicast are skipped, never tried, whenever any of these says "off".
MULTICAST_OFF_SWITCHES: dict[str, str] = {
    "NCCL_NVLS_ENABLE": "0",
    "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
    "NVSHMEM_DISABLE_NVLS": "1",
}


def multicast_disabled_by() -> list[str]:
    """The environment settings that forbid NVLink multicast here (empty when allowed)."""
    return [
        f"{name}={value}"
        for name, value in MULTICAST_OFF_SWITCHES.items()
        if os.environ.get(name, "").strip().lower() == value
    ]


@dataclass
class RankContext:
    """One rank's view of its process group.

    `group` is the collective group of the device (gloo on the CPU, NCCL on CUDA);
    `cpu_group` is a gloo group for CPU-side exchanges (IPC handles, votes, timings), which
    on the CPU is the same group. `timeout_s` bounds any wait for peers inside a rank (the
    groups' own timeout, a backend's spin on a flag): it is longer than the pool's bounds,
    so a stuck call is reported by the pool, with every rank's stack, before any rank gives
    up on its own.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    group: Any  # dist.ProcessGroup
    cpu_group: Any  # dist.ProcessGroup
    timeout_s: float
    # Objects a rank keeps between calls (set-up backends, CUDA graphs); owned by the engine.
    cache: dict[Any, Any] = field(default_factory=dict)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def multicast_allowed(self) -> bool:
        return not multicast_disabled_by()

    def all_gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, exchanged over the CPU group.

        Uses one broadcast per rank rather than all_gather_object: gloo's all_gather fails
        under torch.inference_mode (pytorch#126032), and servers exchange handles this way.
        """
        import torch.distributed as dist

        gathered: list[Any] = []
        for src in range(self.world_size):
            box = [obj if src == self.rank else None]
            dist.broadcast_object_list(box, src=self._global(src), group=self.cpu_group)
            gathered.append(box[0])
        return gathered

    def same_everywhere(self, value: int) -> bool:
        """Whether every rank passed the same `value` (0 <= value < 2**62), in one allreduce
        over the CPU group: [value, -value] reduced with MAX is [max, -min]. A few times
        cheaper than gathering objects (one collective, no pickling), for the checks that
        end every call by comparing the ranks' results."""
        import torch
        import torch.distributed as dist

        if not 0 <= value < 1 << 62:
            raise ValueError(f"same_everywhere takes 0 <= value < 2**62, got {value}")
        pair = torch.tensor([value, -value], dtype=torch.int64)
        dist.all_reduce(pair, op=dist.ReduceOp.MAX, group=self.cpu_group)
        return int(pair[0]) == -int(pair[1])

    def barrier(self) -> None:
        import torch.distributed as dist

        dist.barrier(group=self.cpu_group)

    def _global(self, group_rank: int) -> int:
        import torch.distributed as dist

        return dist.get_global_rank(self.cpu_group, group_rank)
