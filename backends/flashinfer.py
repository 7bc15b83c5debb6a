"""FlashInfer standalone allreduce: allreduce_fusion(pattern=kAllReduce) on a unified workspace.

Variants pick the workspace backend: `trtllm` (CUDA VMM, no multicast), `mnnvl` (NVLink
multicast), `auto` (FlashInfer's choice: mnnvl wherever every rank reports multicast
support). mnnvl and auto need multicast, so the engine skips them where it is off, and the
probe refuses them too: a multicast object is never created on such a machine.

No server type: SGLang's adaptive allreduce runs FlashInfer only for a `flashinfer_fusion`
entry with the fusion flag set (the fused kernel, `flashinfer_fusion`); for the flag unset it
runs its default NCCL path, so a config can never make a server run this standalone
allreduce. It is measured and reported beside the others, never written.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from pytest_allreduce.backend import Backend, Limits, VariantSpec

from . import _flashinfer as fi
from . import _gpu

if TYPE_CHECKING:
    import torch

    from pytest_allreduce.context import RankContext


class FlashinferBackend(Backend):
    name = "flashinfer"
    variants = tuple(
        VariantSpec(suffix, summary=f"flashinfer {suffix} allreduce (kAllReduce)")
        for suffix in ("trtllm", "mnnvl", "auto")
    )
    simplicity = 40

    @classmethod
    def limits(cls, variant: str, world_size: int) -> Limits:
        return Limits(
            device="cuda",
            dtypes=("bfloat16", "float16"),
            world_sizes=fi.MNNVL_WORLD_SIZES if variant == "mnnvl" else fi.TRTLLM_WORLD_SIZES,
            max_rows=fi.SERVER_MAX_ROWS,
            hidden_multiple=fi.HIDDEN_MULTIPLE,
            # Servers run MNNVL eagerly (not treated as capture-safe); auto may pick MNNVL.
            graph_capturable=variant == "trtllm",
            needs_multicast=variant in ("mnnvl", "auto"),
        )

    @classmethod
    def probe(cls, ctx: RankContext, variant: str) -> str | None:
        if reason := _gpu.cuda_refusal(ctx):
            return reason
        if variant != "trtllm" and (reason := _gpu.multicast_refusal(ctx)):
            return reason
        if variant != "mnnvl" and (reason := _gpu.one_node_refusal(ctx)):
            return reason
        majors = fi.MNNVL_MAJORS if variant == "mnnvl" else fi.TRTLLM_MAJORS
        return fi.probe_flashinfer(ctx, majors, f"FlashInfer {variant}")

    def setup(self) -> None:
        self.workspace: Any = fi.create_workspace(
            self.ctx, self.variant, self.max_rows, self.hidden, self.dtype
        )
        self.kind = fi.workspace_kind(self.workspace)
        lib = fi.comm()
        self._allreduce_fusion = lib.allreduce_fusion
        self._pattern = int(lib.AllReduceFusionPattern.kAllReduce)
        self._itemsize = self.dtype.itemsize

    def _use_oneshot(self, rows: int) -> bool | None:
        if self.kind != "trtllm":
            return None  # MNNVL's own size rule (one-shot up to 1 MiB), same on every rank
        return fi.trtllm_use_oneshot(rows, self.hidden, self._itemsize, self.ctx.world_size)

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        self._allreduce_fusion(
            input=inp,
            workspace=self.workspace,
            pattern=self._pattern,
            launch_with_pdl=False,
            output=out,
            use_oneshot=self._use_oneshot(inp.shape[0]),
        )

    def engaged(self) -> str:
        picked = f" (auto picked {self.kind})" if self.variant == "auto" else ""
        if self.kind == "trtllm":
            mode = "one-shot/two-shot by size, chosen explicitly per call"
        else:
            mode = "MNNVL strategy by size"
        return f"flashinfer {self.kind} allreduce kAllReduce{picked}, {mode}"

    def release(self) -> None:
        workspace, self.workspace = getattr(self, "workspace", None), None
        if workspace is not None:
            fi.destroy_workspace(self.ctx, workspace)
