"""The hyperparameters of a Llama/Qwen2 decoder, read from a Hugging Face config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Architectures whose decoder layer is the one built here: pre-norm attention and SwiGLU MLP,
# RMSNorm, rotate-half RoPE. They differ only in which projections carry biases.
SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


class ModelFormatError(ValueError):
    """A model directory or file that cannot be loaded, with what is wrong with it."""


@dataclass(frozen=True)
class ModelConfig:
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    tie_word_embeddings: bool
    qkv_bias: bool  # q/k/v projections carry biases (always for Qwen2)
    o_bias: bool  # o_proj carries a bias (Llama with attention_bias)
    mlp_bias: bool  # gate/up/down carry biases (Llama with mlp_bias)
    eos_token_ids: tuple[int, ...]

    @classmethod
    def from_dict(cls, raw: dict[str, Any], where: str = "config.json") -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelFormatError(
                f"{where}: model_type {model_type!r} is not supported "
                f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        try:
            hidden = int(raw["hidden_size"])
            heads = int(raw["num_attention_heads"])
            config = cls(
                model_type=model_type,
                vocab_size=int(raw["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(raw["intermediate_size"]),
                num_layers=int(raw["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(raw.get("num_key_value_heads") or heads),
                head_dim=int(raw.get("head_dim") or hidden // heads),
                rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
                rope_theta=_rope_theta(raw, where),
                tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
                qkv_bias=model_type == "qwen2" or bool(raw.get("attention_bias", False)),
                o_bias=model_type == "llama" and bool(raw.get("attention_bias", False)),
                mlp_bias=model_type == "llama" and bool(raw.get("mlp_bias", False)),
                eos_token_ids=_token_ids(raw.get("eos_token_id")),
            )
        except KeyError as exc:
            raise ModelFormatError(f"{where}: missing key {exc.args[0]!r}") from None
        if model_type == "qwen2" and raw.get("use_sliding_window"):
            raise ModelFormatError(f"{where}: sliding-window attention is not supported")
        if config.num_heads % config.num_kv_heads:
            raise ModelFormatError(
                f"{where}: {config.num_heads} attention heads are not a multiple of "
                f"{config.num_kv_heads} key/value heads"
            )
        return config

    @classmethod
    def load(cls, model_dir: Path) -> ModelConfig:
        path = Path(model_dir) / "config.json"
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelFormatError(f"{model_dir}: no config.json") from None
        except json.JSONDecodeError as exc:
            raise ModelFormatError(f"{path}: not valid JSON ({exc})") from None
        return cls.from_dict(raw, str(path))

    @property
    def queries_per_kv_head(self) -> int:
        return self.num_heads // self.num_kv_heads


def _rope_theta(raw: dict[str, Any], where: str) -> float:
    # transformers 5 writes rope settings under rope_parameters; older files keep rope_theta
    # and rope_scaling at the top level. Only unscaled RoPE is built here.
    params = raw.get("rope_parameters") or {}
    scaling = raw.get("rope_scaling") or params
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type != "default":
        raise ModelFormatError(f"{where}: RoPE scaling {rope_type!r} is not supported")
    return float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))


def _token_ids(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return (int(value),)
