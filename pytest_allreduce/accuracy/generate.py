"""Batched greedy generation with the tensor-parallel model, and the rank function that runs it.

One batch is prefilled a few prompts at a time (prompts packed into one forward up to a token
budget, eager), then decoded together with a static KV cache. On CUDA the decode step is
captured in a CUDA graph per (batch size, cache length) under the reducer's capture hooks and
replayed, as servers run decode. Prompts are placed to end at the same cache slot (padded on
the left), so every decode step writes one shared slot and only the mask and positions differ
per row.

Ranks must enter the same number of collectives, so whether a sequence has finished is
decided by rank 0 (stop strings, EOS, length) and broadcast every few steps; no rank acts on
its own tokens. Every rank returns its own tokens, cut at the agreed lengths, for the caller
to compare.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from .reducers import ReduceAddNorm, ReducerFactory
from .source import ModelSource
from .tp_model import TPModel

if TYPE_CHECKING:
    from ..context import RankContext

_MODEL_KEY = "accuracy:model"
_GRAPHS_KEY = "accuracy:decode-graphs"


@dataclass(frozen=True)
class GenerationRequest:
    """Prompts generated together as one batch, with lm-eval's stopping settings."""

    prompts: tuple[str, ...]
    until: tuple[str, ...]
    max_gen_toks: int

    def __post_init__(self) -> None:
        if not self.prompts:
            raise ValueError("a generation request needs at least one prompt")
        if self.max_gen_toks < 1:
            raise ValueError(f"max_gen_toks must be at least 1, got {self.max_gen_toks}")


@dataclass(frozen=True)
class GenerationOptions:
    """How a batch is generated. Rows per reduce: the batch size in decode; in prefill the
    packed prompts' tokens, at most max(prefill_tokens, the longest prompt)."""

    dtype: str = "bfloat16"
    # Most prompt tokens packed into one prefill forward; a longer prompt is prefilled alone.
    prefill_tokens: int = 2048
    # Decode steps between two stop decisions (each one is a host sync and a broadcast).
    stop_check_interval: int = 16
    cuda_graphs: bool = True
    top_k: int = 5
    # The KV cache length is rounded up to a multiple of this, so batches of the same size
    # reuse one captured graph.
    cache_granularity: int = 256

    def __post_init__(self) -> None:
        for name in ("prefill_tokens", "stop_check_interval", "top_k", "cache_granularity"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {self.dtype!r}")


@dataclass
class Generation:
    """One sequence as one rank generated it, cut at the agreed finish."""

    tokens: np.ndarray  # int32 [n]: the chosen token per step (top_ids[:, 0])
    top_ids: np.ndarray  # int32 [n, k]
    top_logprobs: np.ndarray  # float32 [n, k]
    text: str  # decoded, cut before the first stop string
    finish: str  # "stop", "eos" or "length"


@dataclass
class GenerationBatch:
    rank: int
    generations: list[Generation]
    prefill_forwards: int
    decode_steps: int
    prefill_s: float
    decode_s: float
    # One entry per capture: what reducer.after_capture() returned on this rank.
    graph_buffers_registered: list[int] = field(default_factory=list)
    # Rows of every row-parallel reduce this batch ran -> how many such reduces (two per
    # layer per forward, graph replays included), so the caller can tell which share of
    # the reduces a size-limited backend carried.
    reduce_rows: dict[int, int] = field(default_factory=dict)


@dataclass
class _Loaded:
    key: tuple[str, str, str]
    model: TPModel
    tokenizer: Any
    eos_ids: frozenset[int]


def _load(ctx: RankContext, source: ModelSource, dtype: torch.dtype) -> _Loaded:
    """This rank's shard and the tokenizer, loaded once per (rank, model, dtype)."""
    key = (source.path, source.fingerprint, str(dtype))
    loaded: _Loaded | None = ctx.cache.get(_MODEL_KEY)
    if loaded is not None and loaded.key == key:
        return loaded
    # Another model: free the old one and the graphs that read its weights first.
    ctx.cache.pop(_GRAPHS_KEY, None)
    ctx.cache.pop(_MODEL_KEY, None)
    from transformers import AutoTokenizer

    model = TPModel.load(Path(source.path), ctx.rank, ctx.world_size, dtype, ctx.device)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    eos = set(model.config.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(int(tokenizer.eos_token_id))
    loaded = _Loaded(key, model, tokenizer, frozenset(eos))
    ctx.cache[_MODEL_KEY] = loaded
    return loaded


# ---- decode state and the decode step ---------------------------------------------------------


@dataclass
class _DecodeState:
    """Static buffers of one (batch size, cache length): a captured graph reads and writes
    exactly these, so a new batch of the same shape is set up by copying into them."""

    k_cache: list[torch.Tensor]  # per layer [B, local kv heads, L, d]
    v_cache: list[torch.Tensor]
    ids: torch.Tensor  # [B] the token each row feeds this step
    positions: torch.Tensor  # [B] its RoPE position
    slot: torch.Tensor  # [1] the cache slot this step writes (shared by all rows)
    start: torch.Tensor  # [B] each row's first valid slot
    slots: torch.Tensor  # [L] 0..L-1
    top_ids: torch.Tensor  # [B, k] outputs of the step
    top_logprobs: torch.Tensor
    graph: Any = None  # torch.cuda.CUDAGraph once captured

    @classmethod
    def allocate(cls, model: TPModel, batch: int, length: int, top_k: int) -> _DecodeState:
        dev = model.device
        shape = (batch, model.local_kv_heads, length, model.head_dim)
        # Zeros, not empty: masked slots still enter the attention products, and stale NaN
        # bit patterns there would poison the softmax.
        layers = range(len(model.layers))
        return cls(
            k_cache=[torch.zeros(shape, dtype=model.dtype, device=dev) for _ in layers],
            v_cache=[torch.zeros(shape, dtype=model.dtype, device=dev) for _ in layers],
            ids=torch.zeros(batch, dtype=torch.long, device=dev),
            positions=torch.zeros(batch, dtype=torch.long, device=dev),
            slot=torch.zeros(1, dtype=torch.long, device=dev),
            start=torch.zeros(batch, dtype=torch.long, device=dev),
            slots=torch.arange(length, device=dev),
            top_ids=torch.zeros(batch, top_k, dtype=torch.long, device=dev),
            top_logprobs=torch.zeros(batch, top_k, dtype=torch.float32, device=dev),
        )

    @property
    def length(self) -> int:
        return self.slots.shape[0]


def _decode_step(model: TPModel, state: _DecodeState, reducer: ReduceAddNorm) -> None:
    """One token for every row: reads ids/positions/slot, writes the KV cache at `slot` and
    the top-k outputs. Captured as is into the CUDA graph."""
    batch = state.ids.shape[0]
    kv_local, d = model.local_kv_heads, model.head_dim
    group = model.local_heads // kv_local
    valid = (state.slots >= state.start[:, None]) & (state.slots <= state.slot)
    mask = valid[:, None, None, :]

    def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        k_cache, v_cache = state.k_cache[layer], state.v_cache[layer]
        k_cache.index_copy_(2, state.slot, k.unsqueeze(2))
        v_cache.index_copy_(2, state.slot, v.unsqueeze(2))
        # One query position per row: the query heads that share a KV head become that
        # head's "positions", which is exact and needs no GQA support from the kernel.
        grouped = q.view(batch, kv_local, group, d)
        out = F.scaled_dot_product_attention(grouped, k_cache, v_cache, attn_mask=mask)
        return out.reshape(batch, kv_local * group * d)

    hidden = model.hidden_states(state.ids, state.positions, state.length, attention, reducer)
    top = torch.log_softmax(model.logits(hidden), dim=-1).topk(state.top_ids.shape[1], dim=-1)
    state.top_ids.copy_(top.indices)
    state.top_logprobs.copy_(top.values)


def _capture(
    ctx: RankContext, model: TPModel, state: _DecodeState, reducer: ReduceAddNorm, pool: Any
) -> int:
    """Capture the decode step as servers do: warm up eagerly on a side stream, capture under
    the reducer's capture context, then let the reducer register its graph buffers."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        _decode_step(model, state, reducer)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    ctx.barrier()
    graph = torch.cuda.CUDAGraph()
    with reducer.capture(), torch.cuda.graph(graph, pool=pool, stream=stream):
        _decode_step(model, state, reducer)
    state.graph = graph
    return reducer.after_capture()


@dataclass
class _GraphCache:
    """Decode states (and their graphs) of one reducer; a different reducer starts afresh,
    since a graph has that reducer's buffers baked in."""

    reducer: ReduceAddNorm
    states: dict[tuple[int, int, int], _DecodeState] = field(default_factory=dict)
    pool: Any = None


def _state_for(
    ctx: RankContext, model: TPModel, reducer: ReduceAddNorm, batch: int, length: int, top_k: int
) -> _DecodeState:
    cache: _GraphCache | None = ctx.cache.get(_GRAPHS_KEY)
    if cache is None or cache.reducer is not reducer:
        cache = _GraphCache(reducer)
        ctx.cache[_GRAPHS_KEY] = cache
    key = (batch, length, top_k)
    if key not in cache.states:
        cache.states[key] = _DecodeState.allocate(model, batch, length, top_k)
    return cache.states[key]


# ---- prefill ----------------------------------------------------------------------------------


def _pack(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive rows grouped so that each group's prompt tokens stay within `budget`."""
    groups: list[list[int]] = []
    total = 0
    for row, n in enumerate(lengths):
        if groups and total + n <= budget:
            groups[-1].append(row)
            total += n
        else:
            groups.append([row])
            total = n
    return groups


# (layer, prompt's index in the forward, its k [n, kv heads, d], its v) -> None
KVStore = Callable[[int, int, torch.Tensor, torch.Tensor], None]


def _packed_forward(
    model: TPModel,
    reducer: ReduceAddNorm,
    prompts: list[list[int]],
    rope_length: int,
    store: KVStore | None,
) -> tuple[torch.Tensor, list[int]]:
    """Final-normed hidden states of prompts packed into one causal forward, each attending
    only to itself; `store` receives each prompt's keys and values. Returns the hidden states
    and the prompts' offsets in them."""
    dev = model.device
    lengths = [len(p) for p in prompts]
    ids = torch.tensor([t for p in prompts for t in p], dtype=torch.long, device=dev)
    positions = torch.cat([torch.arange(n, device=dev) for n in lengths])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    mask = None
    if len(prompts) > 1:
        segment = torch.repeat_interleave(
            torch.arange(len(prompts), device=dev), torch.tensor(lengths, device=dev)
        )
        causal = positions[:, None] >= positions[None, :]
        mask = (segment[:, None] == segment[None, :]) & causal

    def attention(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if store is not None:
            for i, (lo, hi) in enumerate(pairwise(offsets)):
                store(layer, i, k[lo:hi], v[lo:hi])
        # Each KV head repeated for its query heads: exact, and unlike enable_gqa it leaves
        # every SDPA kernel eligible.
        group = q.shape[1] // k.shape[1]
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            k.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0),
            v.repeat_interleave(group, dim=1).transpose(0, 1).unsqueeze(0),
            attn_mask=mask,
            is_causal=mask is None,
        )
        return out[0].transpose(0, 1).reshape(q.shape[0], -1)

    return model.hidden_states(ids, positions, rope_length, attention, reducer), offsets


def _prefill(
    model: TPModel,
    state: _DecodeState,
    reducer: ReduceAddNorm,
    prompts: list[list[int]],
    rows: list[int],
    end: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefill prompts `rows` in one forward; their K/V go to the cache so that each prompt
    ends at slot `end`. Returns the top-k (ids, logprobs) after each prompt."""

    def store(layer: int, i: int, k: torch.Tensor, v: torch.Tensor) -> None:
        row, first = rows[i], end - k.shape[0]
        state.k_cache[layer][row, :, first:end] = k.transpose(0, 1)
        state.v_cache[layer][row, :, first:end] = v.transpose(0, 1)

    packed = [prompts[r] for r in rows]
    hidden, offsets = _packed_forward(model, reducer, packed, state.length, store)
    last = torch.tensor([hi - 1 for hi in offsets[1:]], device=model.device)
    logprobs = torch.log_softmax(model.logits(hidden[last]), dim=-1)
    top = logprobs.topk(state.top_ids.shape[1], dim=-1)
    return top.indices, top.values


# ---- stopping ---------------------------------------------------------------------------------


class _StopScanner:
    """Rank 0's view of which sequences have finished, and after how many tokens."""

    def __init__(self, tokenizer: Any, until: tuple[str, ...], eos_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.until = [s for s in until if s]
        self.eos_ids = eos_ids

    def text(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def has_stop(self, tokens: list[int]) -> bool:
        text = self.text(tokens)
        return any(s in text for s in self.until)

    def scan(self, tokens: list[int], scanned: int) -> tuple[int, str] | None:
        """(length, reason) when `tokens` finish after the first `scanned`, else None. The
        length is the fewest tokens whose text holds a stop string, or up to an EOS."""
        end = len(tokens)
        reason = None
        for i in range(scanned, len(tokens)):
            if tokens[i] in self.eos_ids:
                end, reason = i + 1, "eos"
                break
        if self.until and self.has_stop(tokens[:end]):
            # Text only grows at its end as tokens are added, so the first prefix that holds
            # a stop string lies beyond the part scanned before.
            n = next((n for n in range(scanned + 1, end) if self.has_stop(tokens[:n])), end)
            return n, "stop"
        return (end, reason) if reason else None


def _broadcast_from_rank0(ctx: RankContext, obj: Any) -> Any:
    box = [obj if ctx.rank == 0 else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(ctx.cpu_group, 0), group=ctx.cpu_group)
    return box[0]


def _cut_at_stop(text: str, until: tuple[str, ...]) -> str:
    cut = len(text)
    for s in until:
        if s and (i := text.find(s)) != -1:
            cut = min(cut, i)
    return text[:cut]


# ---- the rank function ------------------------------------------------------------------------


def _generate_batch(
    ctx: RankContext,
    loaded: _Loaded,
    request: GenerationRequest,
    reducer: ReduceAddNorm,
    options: GenerationOptions,
) -> GenerationBatch:
    model, tokenizer = loaded.model, loaded.tokenizer
    k, steps = options.top_k, request.max_gen_toks
    prompts = [list(tokenizer(p)["input_ids"]) for p in request.prompts]
    if any(not p for p in prompts):
        raise ValueError("a prompt tokenized to nothing")
    batch, end = len(prompts), max(len(p) for p in prompts)
    gran = options.cache_granularity
    length = -(-(end + steps) // gran) * gran
    state = _state_for(ctx, model, reducer, batch, length, k)
    use_graph = ctx.is_cuda and options.cuda_graphs
    sync = torch.cuda.synchronize if ctx.is_cuda else (lambda: None)

    hist_ids = torch.zeros(batch, steps, k, dtype=torch.long, device=model.device)
    hist_lp = torch.zeros(batch, steps, k, dtype=torch.float32, device=model.device)
    started = time.perf_counter()
    groups = _pack([len(p) for p in prompts], options.prefill_tokens)
    for rows in groups:
        top_ids, top_lp = _prefill(model, state, reducer, prompts, rows, end)
        index = torch.tensor(rows, device=model.device)
        hist_ids[index, 0] = top_ids
        hist_lp[index, 0] = top_lp
    lengths = torch.tensor([len(p) for p in prompts], device=model.device)
    state.ids.copy_(hist_ids[:, 0, 0])
    state.positions.copy_(lengths)
    state.start.copy_(end - lengths)
    state.slot.fill_(end)
    sync()
    prefill_s = time.perf_counter() - started

    started = time.perf_counter()
    registered: list[int] = []
    scanner = _StopScanner(tokenizer, request.until, loaded.eos_ids)
    host_tokens: list[list[int]] = [[] for _ in range(batch)]  # rank 0 only
    finish: list[tuple[int, str] | None] = [None] * batch
    step = 1
    while True:
        if step % options.stop_check_interval == 0 or step == steps:
            decided: list[tuple[int, str] | None] | None = None
            if ctx.rank == 0:
                fresh = hist_ids[:, len(host_tokens[0]) : step, 0].tolist()
                for row, new in enumerate(fresh):
                    scanned = len(host_tokens[row])
                    host_tokens[row].extend(new)
                    if finish[row] is None:
                        finish[row] = scanner.scan(host_tokens[row], scanned)
                decided = finish
            finish = _broadcast_from_rank0(ctx, decided)
            if all(f is not None for f in finish) or step == steps:
                break
        if use_graph:
            if state.graph is None:
                registered.append(_capture(ctx, model, state, reducer, _graph_pool(ctx)))
            state.graph.replay()
        else:
            _decode_step(model, state, reducer)
        hist_ids[:, step] = state.top_ids
        hist_lp[:, step] = state.top_logprobs
        state.ids.copy_(state.top_ids[:, 0])
        state.positions.add_(1)
        state.slot.add_(1)
        step += 1
    sync()
    decode_s = time.perf_counter() - started

    ids_np = hist_ids[:, :step].to(torch.int32).cpu().numpy()
    lp_np = hist_lp[:, :step].cpu().numpy()
    generations = []
    for row in range(batch):
        n, reason = finish[row] or (step, "length")
        tokens = ids_np[row, :n, 0].copy()
        text = _cut_at_stop(scanner.text(tokens.tolist()), request.until)
        generations.append(
            Generation(tokens, ids_np[row, :n].copy(), lp_np[row, :n].copy(), text, reason)
        )
    per_forward = 2 * len(model.layers)
    reduce_rows: dict[int, int] = {}
    for rows in groups:
        tokens = sum(len(prompts[r]) for r in rows)
        reduce_rows[tokens] = reduce_rows.get(tokens, 0) + per_forward
    if step > 1:
        reduce_rows[batch] = reduce_rows.get(batch, 0) + per_forward * (step - 1)
    return GenerationBatch(
        rank=ctx.rank,
        generations=generations,
        prefill_forwards=len(groups),
        decode_steps=step - 1,
        prefill_s=prefill_s,
        decode_s=decode_s,
        graph_buffers_registered=registered,
        reduce_rows=reduce_rows,
    )


def _graph_pool(ctx: RankContext) -> Any:
    cache: _GraphCache = ctx.cache[_GRAPHS_KEY]
    if cache.pool is None:
        cache.pool = torch.cuda.graph_pool_handle()
    return cache.pool


def rank_generate(
    ctx: RankContext,
    source: ModelSource,
    request: GenerationRequest,
    reducer_factory: ReducerFactory,
    options: GenerationOptions | None = None,
) -> GenerationBatch:
    """The rank function: generate `request` greedily with this rank's shard of `source`,
    every row-parallel reduce going through `reducer_factory(ctx)`.

    The shard is loaded once per (rank, model) and kept in ctx.cache; decode graphs are kept
    per reducer object, so a factory that returns the same reducer each call reuses them.
    """
    options = options or GenerationOptions()
    loaded = _load(ctx, source, getattr(torch, options.dtype))
    reducer = reducer_factory(ctx)
    with torch.inference_mode():
        return _generate_batch(ctx, loaded, request, reducer, options)


def rank_logits(
    ctx: RankContext,
    source: ModelSource,
    token_ids: list[list[int]],
    reducer_factory: ReducerFactory,
    dtype: str = "float32",
) -> list[np.ndarray]:
    """The rank function for teacher-forced logits: float32 [len, vocab] for each token
    sequence, each run as its own prefill forward (no cache)."""
    loaded = _load(ctx, source, getattr(torch, dtype))
    reducer = reducer_factory(ctx)
    out = []
    with torch.inference_mode():
        for ids in token_ids:
            hidden, _ = _packed_forward(loaded.model, reducer, [ids], len(ids), None)
            out.append(loaded.model.logits(hidden).cpu().numpy())
    return out
