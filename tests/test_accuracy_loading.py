"""Loading models: the tiny model, Hugging Face directories (single and sharded), GGUF files
(F32 and Q8_0, tied and untied, llama's rotary reordering), and how ranks shard them."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("gguf")

import gguf
import torch
from safetensors.torch import load_file, save_file

from pytest_allreduce.accuracy.checkpoint import Checkpoint
from pytest_allreduce.accuracy.gguf_convert import convert_gguf, unpermute_rotary
from pytest_allreduce.accuracy.model_config import ModelConfig, ModelFormatError
from pytest_allreduce.accuracy.source import prepare_model_source
from pytest_allreduce.accuracy.tiny import SPECIAL_TOKENS, TinySpec, build_tiny_model, byte_symbols
from pytest_allreduce.accuracy.tp_model import ShardingError, ShardLayout, TPModel

CPU = torch.device("cpu")


def _files(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


def test_tiny_model_is_deterministic(tmp_path: Path) -> None:
    a = build_tiny_model(tmp_path / "a")
    b = build_tiny_model(tmp_path / "b")
    c = build_tiny_model(tmp_path / "c", TinySpec(seed=1))
    assert _files(a) == _files(b)
    assert _files(a)["model.safetensors"] != _files(c)["model.safetensors"]
    weights = load_file(str(a / "model.safetensors"))
    # Random biases and norm weights: zeros or ones would hide sharding mistakes.
    assert weights["model.layers.0.self_attn.k_proj.bias"].abs().min() > 0
    assert not torch.allclose(weights["model.norm.weight"], torch.ones(128))


def test_tiny_source_is_built_once(tmp_path: Path) -> None:
    first = prepare_model_source("tiny", tmp_path)
    stamp = (Path(first.path) / "model.safetensors").stat().st_mtime_ns
    again = prepare_model_source("tiny", tmp_path)
    assert again == first
    assert (Path(first.path) / "model.safetensors").stat().st_mtime_ns == stamp


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("/nonexistent/model", "neither 'tiny'"),
        ("__file__", "neither 'tiny'"),  # a file that is not .gguf
    ],
)
def test_unusable_model_paths_are_refused(tmp_path: Path, spec: str, message: str) -> None:
    if spec == "__file__":
        spec = str(tmp_path / "weights.bin")
        Path(spec).write_bytes(b"x")
    with pytest.raises(ModelFormatError, match=message):
        prepare_model_source(spec, tmp_path)


def test_a_directory_without_tokenizer_is_refused(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "m")
    (model / "tokenizer.json").unlink()
    (model / "tokenizer_config.json").unlink()
    with pytest.raises(ModelFormatError, match="no tokenizer"):
        prepare_model_source(str(model), tmp_path)


def _config(**changes: object) -> dict[str, object]:
    raw: dict[str, object] = dict(
        model_type="qwen2",
        vocab_size=16,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
    )
    raw.update(changes)
    return raw


def test_config_reading() -> None:
    config = ModelConfig.from_dict(_config(rope_parameters={"rope_theta": 1e6}))
    assert (config.rope_theta, config.num_kv_heads, config.head_dim) == (1e6, 2, 4)
    assert config.qkv_bias and not config.o_bias
    for bad, message in [
        (_config(model_type="gemma3"), "not supported"),
        (_config(rope_scaling={"rope_type": "llama3"}), "RoPE scaling 'llama3'"),
        (_config(use_sliding_window=True), "sliding-window"),
        (_config(num_key_value_heads=3), "not a multiple"),
        ({"model_type": "llama"}, "missing key"),
    ]:
        with pytest.raises(ModelFormatError, match=message):
            ModelConfig.from_dict(bad)


def test_shard_layout() -> None:
    def config(heads: int, kv: int) -> ModelConfig:
        return ModelConfig.from_dict(
            _config(num_attention_heads=heads, num_key_value_heads=kv, hidden_size=heads * 4)
        )

    # Qwen2.5-0.5B at world size 2: 7 query heads and 1 KV head per rank.
    assert ShardLayout.of(config(14, 2), 1, 2) == ShardLayout(
        range(7, 14), range(1, 2), slice(8, 16)
    )
    # Fewer KV heads than ranks: each rank keeps the one its query heads read.
    assert [ShardLayout.of(config(8, 2), r, 4).kv_heads for r in range(4)] == [
        range(0, 1),
        range(0, 1),
        range(1, 2),
        range(1, 2),
    ]
    with pytest.raises(ShardingError, match="14 attention heads"):
        ShardLayout.of(config(14, 2), 0, 4)
    with pytest.raises(ShardingError, match="neither split"):
        ShardLayout.of(config(6, 3), 0, 2)


def test_sharded_checkpoint_loads_like_a_single_file(tmp_path: Path) -> None:
    single = build_tiny_model(tmp_path / "single")
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (sharded / name).write_bytes((single / name).read_bytes())
    weights = load_file(str(single / "model.safetensors"))
    names = sorted(weights)
    parts = {"a.safetensors": names[::2], "b.safetensors": names[1::2]}
    for file, part in parts.items():
        save_file({n: weights[n] for n in part}, str(sharded / file))
    index = {"weight_map": {n: f for f, part in parts.items() for n in part}}
    (sharded / "model.safetensors.index.json").write_text(json.dumps(index))
    for rank in range(2):
        a = TPModel.load(single, rank, 2, torch.float32, CPU)
        b = TPModel.load(sharded, rank, 2, torch.float32, CPU)
        for la, lb in zip(a.layers, b.layers, strict=True):
            assert torch.equal(la.qkv_weight, lb.qkv_weight)
            assert torch.equal(la.down_weight, lb.down_weight)
        assert torch.equal(a.lm_head, b.lm_head)
    (sharded / "b.safetensors").unlink()
    with pytest.raises(ModelFormatError, match="missing files"):
        Checkpoint(sharded)


def test_shards_hold_the_servers_slices(tmp_path: Path) -> None:
    model = build_tiny_model(tmp_path / "m", TinySpec(num_kv_heads=1))
    full = load_file(str(model / "model.safetensors"))
    p = "model.layers.1."
    shards = [TPModel.load(model, r, 2, torch.float32, CPU) for r in range(2)]
    for rank, shard in enumerate(shards):
        layer = shard.layers[1]
        q = full[f"{p}self_attn.q_proj.weight"][rank * 64 : (rank + 1) * 64]
        k = full[f"{p}self_attn.k_proj.weight"]  # one KV head: replicated
        v = full[f"{p}self_attn.v_proj.weight"]
        assert torch.equal(layer.qkv_weight, torch.cat([q, k, v]))
        q_bias = full[f"{p}self_attn.q_proj.bias"][rank * 64 : (rank + 1) * 64]
        assert layer.qkv_bias is not None
        assert torch.equal(layer.qkv_bias[:64], q_bias)
        cols = slice(rank * 64, (rank + 1) * 64)
        assert torch.equal(layer.o_weight, full[f"{p}self_attn.o_proj.weight"][:, cols])
        ffn = slice(rank * 128, (rank + 1) * 128)
        gate_up = torch.cat(
            [full[f"{p}mlp.gate_proj.weight"][ffn], full[f"{p}mlp.up_proj.weight"][ffn]]
        )
        assert torch.equal(layer.gate_up_weight, gate_up)
        assert torch.equal(layer.down_weight, full[f"{p}mlp.down_proj.weight"][:, ffn])
        assert torch.equal(shard.lm_head, full["lm_head.weight"])


# ---- GGUF ----------------------------------------------------------------------------------

_GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_GGUF_PARTS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}


def _gguf_name(hf: str) -> str:
    if hf in _GGUF_NAMES:
        return _GGUF_NAMES[hf]
    _, _, layer, *rest = hf.split(".")
    return f"blk.{layer}.{_GGUF_PARTS['.'.join(rest[:-1])]}.{rest[-1]}"


Q8_0 = gguf.GGMLQuantizationType.Q8_0


def write_gguf(model_dir: Path, out: Path, quantized: set[str]) -> dict[str, np.ndarray]:
    """The tiny model as llama.cpp would write it, the tensors named in `quantized` as Q8_0;
    returns what the file holds, as gguf itself dequantizes it, by Hugging Face name."""
    config = json.loads((model_dir / "config.json").read_text())
    weights = load_file(str(model_dir / "model.safetensors"))
    writer = gguf.GGUFWriter(str(out), "qwen2")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(config["num_attention_heads"])
    writer.add_head_count_kv(config["num_key_value_heads"])
    writer.add_rope_freq_base(config["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    tokens = [*byte_symbols(), *SPECIAL_TOKENS]
    writer.add_token_list(tokens)
    writer.add_token_types([1] * 256 + [3] * len(SPECIAL_TOKENS))
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_eos_token_id(config["eos_token_id"])
    stored = {}
    for name in sorted(weights):
        array = weights[name].numpy()
        if name in quantized:
            packed = gguf.quants.quantize(array, Q8_0)
            writer.add_tensor(_gguf_name(name), packed, raw_dtype=Q8_0)
            stored[name] = gguf.quants.dequantize(packed, Q8_0)
        else:
            writer.add_tensor(_gguf_name(name), array)
            stored[name] = array
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return stored


def test_gguf_converts_to_the_same_model(tmp_path: Path) -> None:
    """F32 tensors come back bit for bit and Q8_0 ones as gguf dequantizes them; a file
    without output.weight ties lm_head to the embeddings; the tokenizer is the same."""
    model = build_tiny_model(tmp_path / "hf", TinySpec(tie_word_embeddings=True))
    layer0 = {n for n in load_file(str(model / "model.safetensors")) if ".layers.0." in n}
    stored = write_gguf(
        model, tmp_path / "tiny.gguf", {n for n in layer0 if n.endswith("proj.weight")}
    )
    assert "lm_head.weight" not in stored
    source = prepare_model_source(str(tmp_path / "tiny.gguf"), tmp_path / "cache", gguf_workers=2)
    assert source.conversion_s is not None and source.gguf_sha256 == source.fingerprint
    converted = Path(source.path)
    with Checkpoint(converted) as ckpt:
        assert set(ckpt.files) == set(stored)
        for name, array in stored.items():
            assert np.array_equal(ckpt.read(name).numpy(), array), name
    quantized = stored["model.layers.0.mlp.up_proj.weight"]
    original = load_file(str(model / "model.safetensors"))["model.layers.0.mlp.up_proj.weight"]
    assert not np.array_equal(quantized, original.numpy())  # Q8_0 really was used
    want, got = ModelConfig.load(model), ModelConfig.load(converted)
    assert got.rms_norm_eps == pytest.approx(want.rms_norm_eps)
    assert got == ModelConfig(**{**want.__dict__, "rms_norm_eps": got.rms_norm_eps})
    shard = TPModel.load(converted, 1, 2, torch.float32, CPU)
    assert shard.lm_head is shard.embed

    from transformers import AutoTokenizer

    text = "Question: 48 clips, then half as many?\nAnswer:<|endoftext|>"
    hf = AutoTokenizer.from_pretrained(str(model))
    from_gguf = AutoTokenizer.from_pretrained(source.path)
    assert hf(text)["input_ids"] == from_gguf(text)["input_ids"]
    # The same bytes again: the cached directory, no new conversion.
    again = prepare_model_source(str(tmp_path / "tiny.gguf"), tmp_path / "cache")
    assert again.path == source.path and again.conversion_s is None


def test_gguf_with_foreign_tensors_is_refused_before_converting(tmp_path: Path) -> None:
    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "qwen2")
    for key, value in [("block_count", 1), ("embedding_length", 4), ("feed_forward_length", 8)]:
        writer.add_uint32(f"qwen2.{key}", value)
    writer.add_head_count(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_tensor("token_embd.weight", np.zeros((3, 4), dtype=np.float32))
    writer.add_tensor("blk.0.attn_qkv.weight", np.zeros((12, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelFormatError, match="attn_qkv"):
        convert_gguf(tmp_path / "odd.gguf", tmp_path / "cache", workers=1)
    assert not (tmp_path / "cache").exists()  # nothing half-written left behind


def _rope_half(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Hugging Face's rotary embedding: dimension i pairs with i + d/2."""
    half = x.shape[-1] // 2
    a, b = x[..., :half], x[..., half:]
    cos, sin = angles.cos(), angles.sin()
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def _rope_interleaved(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """llama.cpp's rotary embedding for llama-arch models: dimension 2i pairs with 2i + 1."""
    a, b = x[..., 0::2], x[..., 1::2]
    cos, sin = angles.cos(), angles.sin()
    return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=-1).flatten(-2)


def test_llama_rotary_unpermutation_matches_llama_cpp_rope() -> None:
    """GGUF-layout q/k rows under llama.cpp's interleaved RoPE give the same attention scores
    as the un-permuted rows under Hugging Face's RoPE, head by head."""
    gen = torch.Generator().manual_seed(0)
    heads, kv_heads, d, hidden, tokens = 4, 2, 8, 16, 5
    wq = torch.randn(heads * d, hidden, generator=gen, dtype=torch.float64)
    wk = torch.randn(kv_heads * d, hidden, generator=gen, dtype=torch.float64)
    x = torch.randn(tokens, hidden, generator=gen, dtype=torch.float64)
    angles = torch.outer(torch.arange(tokens, dtype=torch.float64), 0.5 ** torch.arange(d // 2))

    def scores(wq: torch.Tensor, wk: torch.Tensor, rope: Callable) -> torch.Tensor:
        q = rope((x @ wq.T).view(tokens, heads, d).transpose(0, 1), angles)
        k = rope((x @ wk.T).view(tokens, kv_heads, d).transpose(0, 1), angles)
        return q @ k.repeat_interleave(heads // kv_heads, 0).transpose(1, 2)

    hf_q = torch.from_numpy(unpermute_rotary(wq.numpy(), heads))
    hf_k = torch.from_numpy(unpermute_rotary(wk.numpy(), kv_heads))
    torch.testing.assert_close(scores(hf_q, hf_k, _rope_half), scores(wq, wk, _rope_interleaved))
    # and the reordering is not the identity, so the check has teeth
    assert not torch.allclose(scores(wq, wk, _rope_half), scores(wq, wk, _rope_interleaved))
