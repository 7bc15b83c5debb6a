"""A tensor-parallel Llama/Qwen2 decoder in plain torch, sharded as SGLang and vLLM shard it.

q/k/v and gate/up are split by output (whole heads per rank; key/value heads are replicated
when there are fewer of them than ranks), o_proj and down_proj by input, and their partial
outputs are summed across ranks. Embeddings, norms and lm_head are replicated, so the only
collectives of a forward are the 2 x layers row-parallel reduces, and each of them goes
through the injected reducer together with the residual add and the next RMSNorm, as a
server runs them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from .checkpoint import Checkpoint
from .model_config import ModelConfig, ModelFormatError
from .reducers import ReduceAddNorm

# (layer index, q [T, local heads, d], k and v [T, local kv heads, d]) -> [T, local heads * d]
Attention = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class ShardingError(ValueError):
    """A model that cannot be split over this many ranks the way servers split it."""


@dataclass(frozen=True)
class ShardLayout:
    """Which heads and which MLP columns one rank holds."""

    q_heads: range
    kv_heads: range
    ffn: slice

    @classmethod
    def of(cls, config: ModelConfig, rank: int, world_size: int) -> ShardLayout:
        heads, kv, ffn = config.num_heads, config.num_kv_heads, config.intermediate_size
        if heads % world_size:
            raise ShardingError(f"{heads} attention heads do not split over {world_size} ranks")
        if ffn % world_size:
            raise ShardingError(f"intermediate size {ffn} does not split over {world_size} ranks")
        per_rank = heads // world_size
        q_heads = range(rank * per_rank, (rank + 1) * per_rank)
        if kv % world_size == 0:
            kv_per_rank = kv // world_size
            kv_heads = range(rank * kv_per_rank, (rank + 1) * kv_per_rank)
        elif world_size % kv == 0:
            # Fewer KV heads than ranks: each rank keeps a copy of the one KV head its query
            # heads read, as the servers replicate them.
            owner = rank // (world_size // kv)
            kv_heads = range(owner, owner + 1)
        else:
            raise ShardingError(
                f"{kv} key/value heads can be neither split over nor replicated on "
                f"{world_size} ranks"
            )
        step = ffn // world_size
        return cls(q_heads, kv_heads, slice(rank * step, (rank + 1) * step))


@dataclass
class LayerShard:
    input_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv_weight: torch.Tensor  # q, k and v rows of this rank's heads, one GEMM
    qkv_bias: torch.Tensor | None
    o_weight: torch.Tensor  # the o_proj columns of this rank's heads
    o_bias: torch.Tensor | None  # on rank 0 only: the bias is added once before the sum
    gate_up_weight: torch.Tensor  # gate rows, then up rows of this rank's MLP slice
    gate_up_bias: torch.Tensor | None
    down_weight: torch.Tensor
    down_bias: torch.Tensor | None  # rank 0 only, as o_bias


@dataclass
class TPModel:
    """One rank's shard of the decoder."""

    config: ModelConfig
    layout: ShardLayout
    rank: int
    world_size: int
    dtype: torch.dtype
    device: torch.device
    embed: torch.Tensor
    final_norm: torch.Tensor
    lm_head: torch.Tensor  # may be `embed` itself (tied)
    layers: list[LayerShard]
    _rope: tuple[torch.Tensor, torch.Tensor] | None = None
    # Tables replaced by longer ones stay alive: a captured CUDA graph still reads them.
    _retired_rope: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)

    @property
    def local_heads(self) -> int:
        return len(self.layout.q_heads)

    @property
    def local_kv_heads(self) -> int:
        return len(self.layout.kv_heads)

    @property
    def head_dim(self) -> int:
        return self.config.head_dim

    # ---- loading -------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        model_dir: Path,
        rank: int,
        world_size: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> TPModel:
        config = ModelConfig.load(model_dir)
        layout = ShardLayout.of(config, rank, world_size)
        d = config.head_dim

        def rows_of(heads: range) -> slice:
            return slice(heads.start * d, heads.stop * d)

        with Checkpoint(model_dir) as ckpt:

            def get(
                name: str, rows: slice | None = None, cols: slice | None = None
            ) -> torch.Tensor:
                return ckpt.read(name, rows, cols).to(device=device, dtype=dtype)

            def row_parallel_bias(name: str, present: bool) -> torch.Tensor | None:
                # The ranks' partial outputs are summed, so the bias must join only one of them.
                return get(name) if present and rank == 0 else None

            layers = []
            for i in range(config.num_layers):
                p = f"model.layers.{i}."
                q, kv = rows_of(layout.q_heads), rows_of(layout.kv_heads)
                attn = [(f"{p}self_attn.{n}_proj", s) for n, s in (("q", q), ("k", kv), ("v", kv))]
                qkv_bias = None
                if config.qkv_bias:
                    qkv_bias = torch.cat([get(f"{n}.bias", s) for n, s in attn])
                mlp = [f"{p}mlp.gate_proj", f"{p}mlp.up_proj"]
                gate_up_bias = None
                if config.mlp_bias:
                    gate_up_bias = torch.cat([get(f"{n}.bias", layout.ffn) for n in mlp])
                layers.append(
                    LayerShard(
                        input_norm=get(f"{p}input_layernorm.weight"),
                        post_norm=get(f"{p}post_attention_layernorm.weight"),
                        qkv_weight=torch.cat([get(f"{n}.weight", s) for n, s in attn]),
                        qkv_bias=qkv_bias,
                        o_weight=get(f"{p}self_attn.o_proj.weight", cols=q),
                        o_bias=row_parallel_bias(f"{p}self_attn.o_proj.bias", config.o_bias),
                        gate_up_weight=torch.cat([get(f"{n}.weight", layout.ffn) for n in mlp]),
                        gate_up_bias=gate_up_bias,
                        down_weight=get(f"{p}mlp.down_proj.weight", cols=layout.ffn),
                        down_bias=row_parallel_bias(f"{p}mlp.down_proj.bias", config.mlp_bias),
                    )
                )
            embed = get("model.embed_tokens.weight")
            if "lm_head.weight" in ckpt and not config.tie_word_embeddings:
                lm_head = get("lm_head.weight")
            elif config.tie_word_embeddings:
                lm_head = embed
            else:
                raise ModelFormatError(
                    f"{model_dir}: no lm_head.weight and tie_word_embeddings is false"
                )
            final_norm = get("model.norm.weight")
        if embed.shape[0] != config.vocab_size:
            raise ModelFormatError(
                f"{model_dir}: embedding has {embed.shape[0]} rows, config says vocab_size "
                f"{config.vocab_size}"
            )
        return cls(
            config, layout, rank, world_size, dtype, device, embed, final_norm, lm_head, layers
        )

    # ---- forward -------------------------------------------------------------------------

    def rope(self, positions: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin rows for `positions`, from tables of at least `length` positions."""
        if self._rope is None or self._rope[0].shape[0] < length:
            if self._rope is not None:
                self._retired_rope.append(self._rope)
            length = max(length, 2 * self._rope[0].shape[0] if self._rope else 4096)
            d = self.head_dim
            inv_freq = 1.0 / (
                self.config.rope_theta
                ** (torch.arange(0, d, 2, dtype=torch.float32, device=self.device) / d)
            )
            pos = torch.arange(length, dtype=torch.float32, device=self.device)
            angles = torch.outer(pos, inv_freq)
            angles = torch.cat([angles, angles], dim=-1)
            self._rope = (angles.cos().to(self.dtype), angles.sin().to(self.dtype))
        cos, sin = self._rope
        return cos[positions], sin[positions]

    def first_norm(self, embedded: torch.Tensor) -> torch.Tensor:
        """Layer 0's input RMSNorm, the one norm with no reduce before it. Computed as the
        engine composes add + RMSNorm (float32), so every norm of the model rounds alike."""
        weight = self.layers[0].input_norm
        normed = F.rms_norm(embedded.float(), (embedded.shape[-1],), weight.float(), self.eps)
        return normed.to(self.dtype)

    @property
    def eps(self) -> float:
        return self.config.rms_norm_eps

    def hidden_states(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        rope_length: int,
        attention: Attention,
        reducer: ReduceAddNorm,
    ) -> torch.Tensor:
        """The final-normed hidden states [T, hidden] of the tokens `ids` [T]."""
        t = ids.shape[0]
        d = self.head_dim
        h_local, kv_local = self.local_heads, self.local_kv_heads
        cos, sin = self.rope(positions, rope_length)
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        residual = F.embedding(ids, self.embed)
        x = self.first_norm(residual)
        for i, layer in enumerate(self.layers):
            qkv = F.linear(x, layer.qkv_weight, layer.qkv_bias)
            q, k, v = qkv.split([h_local * d, kv_local * d, kv_local * d], dim=-1)
            q = _apply_rope(q.view(t, h_local, d), cos, sin)
            k = _apply_rope(k.view(t, kv_local, d), cos, sin)
            attn = attention(i, q, k, v.view(t, kv_local, d))
            partial = F.linear(attn, layer.o_weight, layer.o_bias)
            x, residual = reducer(partial, residual, layer.post_norm, self.eps)
            gate, up = F.linear(x, layer.gate_up_weight, layer.gate_up_bias).chunk(2, dim=-1)
            partial = F.linear(F.silu(gate) * up, layer.down_weight, layer.down_bias)
            following = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else None
            next_norm = self.final_norm if following is None else following
            x, residual = reducer(partial, residual, next_norm, self.eps)
        return x

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.lm_head).float()


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin
