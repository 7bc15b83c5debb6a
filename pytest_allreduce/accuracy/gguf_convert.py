"""GGUF -> a cached Hugging Face directory that ranks load like any other checkpoint.

Dequantizing a 0.5B GGUF is seconds of numpy per tensor group, so it is done once per file
(cached by the file's sha256), spread over worker processes that each write their own
safetensors shard, while the parent converts the tokenizer. Ranks then read only their slices
of the float32 shards.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from .checkpoint import INDEX_FILE
from .model_config import SUPPORTED_MODEL_TYPES, ModelFormatError

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_PARTS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_BLOCK_NAME = re.compile(r"blk\.(\d+)\.([a-z_]+)\.(weight|bias)")


@dataclass(frozen=True)
class Conversion:
    model_dir: Path
    sha256: str
    seconds: float  # spent converting now; 0 when the cached directory was reused
    reused: bool


def hf_tensor_name(name: str) -> str:
    if name in _TOP_LEVEL:
        return _TOP_LEVEL[name]
    match = _BLOCK_NAME.fullmatch(name)
    if match is None or match.group(2) not in _BLOCK_PARTS:
        raise ModelFormatError(f"GGUF tensor {name!r} has no counterpart in a Llama/Qwen2 model")
    layer, part, kind = match.groups()
    return f"model.layers.{layer}.{_BLOCK_PARTS[part]}.{kind}"


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_config(reader: Any, where: str) -> dict[str, Any]:
    """The config.json of the model in a GGUF, from its metadata and tensor list."""
    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_MODEL_TYPES:
        raise ModelFormatError(
            f"{where}: architecture {arch!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )

    def need(key: str) -> Any:
        value = _field(reader, f"{arch}.{key}")
        if value is None:
            raise ModelFormatError(f"{where}: metadata {arch}.{key} is missing")
        return value

    names = {t.name for t in reader.tensors}
    if "token_embd.weight" not in names:
        raise ModelFormatError(f"{where}: no token_embd.weight tensor")
    embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
    hidden, heads = int(need("embedding_length")), int(need("attention.head_count"))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // heads))
    rope_dims = _field(reader, f"{arch}.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ModelFormatError(f"{where}: partial rotary embeddings are not supported")
    scaling = _field(reader, f"{arch}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise ModelFormatError(f"{where}: RoPE scaling {scaling!r} is not supported")
    attention_bias = "blk.0.attn_q.bias" in names
    if arch == "llama" and attention_bias != ("blk.0.attn_output.bias" in names):
        raise ModelFormatError(f"{where}: llama with biases on q/k/v but not on o (or back)")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    config = {
        "architectures": ["Qwen2ForCausalLM" if arch == "qwen2" else "LlamaForCausalLM"],
        "model_type": arch,
        "vocab_size": int(embed.shape[-1]),
        "hidden_size": hidden,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 4096)),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        # Servers tie lm_head to the embeddings when the file has no output tensor.
        "tie_word_embeddings": "output.weight" not in names,
        "torch_dtype": "float32",
    }
    if arch == "llama":
        config["attention_bias"] = attention_bias
        config["mlp_bias"] = "blk.0.ffn_gate.bias" in names
    if eos is not None:
        config["eos_token_id"] = int(eos)
    if bos is not None:
        config["bos_token_id"] = int(bos)
    return config


def unpermute_rotary(weight: Any, heads: int) -> Any:
    """Undo llama.cpp's reordering of q/k rows for llama-arch models: GGUF keeps each head's
    rotary pairs interleaved (row 2i+j), Hugging Face keeps the halves apart (row j*d/2+i)."""
    rows = weight.shape[0]
    half = rows // heads // 2
    return weight.reshape(heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


@dataclass(frozen=True)
class _TensorSpec:
    """Where a tensor's bytes lie in the GGUF file, so workers need not parse its header."""

    name: str
    offset: int
    n_bytes: int
    qtype: int  # gguf.GGMLQuantizationType value
    shape: tuple[int, ...]  # numpy order: rows first
    permute_heads: int  # llama q/k: heads to un-permute over; 0 for none

    @classmethod
    def of(cls, tensor: Any, permute_heads: int) -> _TensorSpec:
        shape = tuple(int(n) for n in reversed(tensor.shape))
        return cls(
            tensor.name,
            int(tensor.data_offset),
            int(tensor.n_bytes),
            int(tensor.tensor_type),
            shape,
            permute_heads,
        )


def _convert_part(gguf_path: str, specs: list[_TensorSpec], out_file: str) -> list[str]:
    """Worker: dequantize `specs` to float32 and write them as one safetensors file."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize
    from safetensors.numpy import save_file

    out = {}
    for spec in specs:
        qtype = GGMLQuantizationType(spec.qtype)
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        raw = np.memmap(
            gguf_path, dtype=np.uint8, mode="r", offset=spec.offset, shape=(spec.n_bytes,)
        )
        # Rows of quantized blocks, as dequantize expects them.
        rows = raw.reshape(*spec.shape[:-1], spec.shape[-1] // block_elems * block_bytes)
        array = dequantize(rows, qtype).astype(np.float32, copy=False).reshape(spec.shape)
        if spec.permute_heads:
            array = unpermute_rotary(array, spec.permute_heads)
        out[hf_tensor_name(spec.name)] = np.ascontiguousarray(array)
    save_file(out, out_file, metadata={"format": "pt"})
    return sorted(out)


def _balanced(sizes: dict[str, int], parts: int) -> list[list[str]]:
    """Largest first onto the least-loaded part, so no worker waits on one big tail."""
    loads = [0] * parts
    groups: list[list[str]] = [[] for _ in range(parts)]
    for name in sorted(sizes, key=lambda n: (-sizes[n], n)):
        i = loads.index(min(loads))
        groups[i].append(name)
        loads[i] += sizes[name]
    return [g for g in groups if g]


def convert_gguf(gguf_path: Path, cache_dir: Path, workers: int | None = None) -> Conversion:
    """The Hugging Face directory for `gguf_path` under `cache_dir`, converted now unless an
    earlier conversion of the same bytes is there. Written under a temporary name and renamed
    into place, so a failed conversion leaves nothing behind that looks finished."""
    gguf_path = Path(gguf_path).resolve()
    if not gguf_path.is_file():
        raise ModelFormatError(f"{gguf_path}: no such GGUF file")
    sha = file_sha256(gguf_path)
    final = Path(cache_dir) / f"gguf-{sha[:16]}"
    if (final / "config.json").is_file():
        return Conversion(final, sha, 0.0, True)

    started = time.perf_counter()
    # The header is read (and refused, if need be) before any process starts or any file is
    # written.
    specs, config = _read_header(gguf_path)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    tmp = Path(cache_dir) / f".tmp-gguf-{sha[:16]}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    workers = max(1, workers or os.cpu_count() or 1)
    try:
        groups = _balanced({s.name: s.n_bytes for s in specs}, workers)
        by_name = {s.name: s for s in specs}
        files = [f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors" for i in range(len(groups))]
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            # transformers parses the whole header again for the tokenizer, the slowest
            # single job: it starts first and runs while the tensors convert.
            tokenizer = pool.submit(_save_tokenizer, gguf_path, tmp)
            parts = [
                pool.submit(_convert_part, str(gguf_path), [by_name[n] for n in g], str(tmp / f))
                for g, f in zip(groups, files, strict=True)
            ]
            weight_map: dict[str, str] = {}
            for part, file in zip(parts, files, strict=True):
                weight_map.update(dict.fromkeys(part.result(), file))
            tokenizer.result()
        (tmp / INDEX_FILE).write_text(
            json.dumps({"metadata": {}, "weight_map": dict(sorted(weight_map.items()))}, indent=1)
        )
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        seconds = time.perf_counter() - started
        (tmp / "converted_from.json").write_text(
            json.dumps({"gguf": gguf_path.name, "sha256": sha, "seconds": round(seconds, 2)})
        )
        try:
            tmp.rename(final)
        except OSError:
            if not (final / "config.json").is_file():
                raise
            # Another process finished the same conversion first; keep theirs.
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return Conversion(final, sha, seconds, False)


def _read_header(gguf_path: Path) -> tuple[list[_TensorSpec], dict[str, Any]]:
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(gguf_path))
    except Exception as exc:
        raise ModelFormatError(f"{gguf_path}: not a readable GGUF file ({exc})") from None
    config = gguf_config(reader, str(gguf_path))
    heads = {
        ".attn_q.": config["num_attention_heads"],
        ".attn_k.": config["num_key_value_heads"],
    }
    specs = []
    for tensor in reader.tensors:
        hf_tensor_name(tensor.name)  # refuse unknown tensors before any work starts
        permute = 0
        if config["model_type"] == "llama":
            permute = next((n for part, n in heads.items() if part in tensor.name), 0)
        specs.append(_TensorSpec.of(tensor, permute))
    return specs, config


def _save_tokenizer(gguf_path: Path, out_dir: Path) -> None:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
    except Exception as exc:
        raise ModelFormatError(
            f"{gguf_path}: transformers cannot build its tokenizer ({type(exc).__name__}: {exc})"
        ) from None
    tokenizer.save_pretrained(str(out_dir))
