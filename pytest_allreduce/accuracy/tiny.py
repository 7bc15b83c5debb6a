"""`tiny`: a random-weight Qwen2-architecture model and a byte-level tokenizer, built
in-process from a seed and written as a Hugging Face directory, so ranks load it through the
same path as any real model. Same seed and sizes, same bytes.

The q/k/v biases are random (transformers initialises them to zero, which would hide a bias
sharding bug), and so are the norm weights (all-ones would hide a norm applied with the wrong
layer's weight). The logits spread over a few nats, so a one-ulp change in a reduce flips
only near-ties while a wrong reduce changes the next token outright.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# o_proj and down_proj outputs are this many times the size of the unit residual they join,
# so the reduced sums dominate the hidden state: a row that loses one rank's share then
# decorrelates the next token's logits (its pick falls outside the reference's top 5), which
# with smaller branches (gain 1) it often does not.
BRANCH_GAIN = 3.0
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
EOS_TOKEN = "<|endoftext|>"


@dataclass(frozen=True)
class TinySpec:
    seed: int = 0
    hidden_size: int = 128
    intermediate_size: int = 256
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    rope_theta: float = 10000.0
    max_positions: int = 4096
    tie_word_embeddings: bool = False

    @property
    def vocab_size(self) -> int:
        return 256 + len(SPECIAL_TOKENS)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def byte_symbols() -> list[str]:
    """The printable character byte-level BPE uses for each byte value, in byte order:
    printable Latin-1 bytes stand for themselves, the others for code points from 256 up."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    symbols, extra = {}, 0
    for b in range(256):
        if b in printable:
            symbols[b] = chr(b)
        else:
            symbols[b] = chr(256 + extra)
            extra += 1
    return [symbols[b] for b in range(256)]


def build_tokenizer(out_dir: Path) -> None:
    """A byte-level BPE with no merges: one token per byte, then the special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {symbol: i for i, symbol in enumerate(byte_symbols())}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN
    )
    wrapped.save_pretrained(str(out_dir))


def config_dict(spec: TinySpec, eos_id: int) -> dict[str, Any]:
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": spec.vocab_size,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": spec.max_positions,
        "rms_norm_eps": 1e-6,
        "rope_theta": spec.rope_theta,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "use_sliding_window": False,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "pad_token_id": eos_id,
        "torch_dtype": "float32",
        "tiny_spec": asdict(spec),  # provenance: how this directory was made
    }


def tiny_weights(spec: TinySpec) -> dict[str, Any]:
    """The state dict, drawn in a fixed order from one generator seeded with `spec.seed`."""
    import torch

    gen = torch.Generator().manual_seed(spec.seed)
    h, ffn, d = spec.hidden_size, spec.intermediate_size, spec.head_dim
    q_out, kv_out = spec.num_heads * d, spec.num_kv_heads * d

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def norm_weight() -> torch.Tensor:
        return 1.0 + normal(h, std=0.2)

    weights = {"model.embed_tokens.weight": normal(spec.vocab_size, h, std=1.0)}
    o_std, down_std = BRANCH_GAIN / math.sqrt(q_out), BRANCH_GAIN / math.sqrt(ffn)
    for i in range(spec.num_layers):
        p = f"model.layers.{i}."
        weights.update(
            {
                f"{p}input_layernorm.weight": norm_weight(),
                f"{p}self_attn.q_proj.weight": normal(q_out, h, std=1 / math.sqrt(h)),
                f"{p}self_attn.q_proj.bias": normal(q_out, std=0.5),
                f"{p}self_attn.k_proj.weight": normal(kv_out, h, std=1 / math.sqrt(h)),
                f"{p}self_attn.k_proj.bias": normal(kv_out, std=0.5),
                f"{p}self_attn.v_proj.weight": normal(kv_out, h, std=1 / math.sqrt(h)),
                f"{p}self_attn.v_proj.bias": normal(kv_out, std=0.5),
                f"{p}self_attn.o_proj.weight": normal(h, q_out, std=o_std),
                f"{p}post_attention_layernorm.weight": norm_weight(),
                f"{p}mlp.gate_proj.weight": normal(ffn, h, std=1 / math.sqrt(h)),
                f"{p}mlp.up_proj.weight": normal(ffn, h, std=1 / math.sqrt(h)),
                f"{p}mlp.down_proj.weight": normal(h, ffn, std=down_std),
            }
        )
    weights["model.norm.weight"] = norm_weight()
    if not spec.tie_word_embeddings:
        weights["lm_head.weight"] = normal(spec.vocab_size, h, std=3 / math.sqrt(h))
    return weights


def build_tiny_model(out_dir: Path, spec: TinySpec = TinySpec()) -> Path:
    """Write the tiny model (config.json, model.safetensors, tokenizer files) to `out_dir`,
    which must not exist yet or be empty."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty")
    build_tokenizer(out_dir)
    eos_id = 256 + SPECIAL_TOKENS.index(EOS_TOKEN)
    (out_dir / "config.json").write_text(
        json.dumps(config_dict(spec, eos_id), indent=2, sort_keys=True) + "\n"
    )
    weights = tiny_weights(spec)
    save_file(
        {k: weights[k].contiguous() for k in sorted(weights)},
        str(out_dir / "model.safetensors"),
        metadata={"format": "pt"},
    )
    return out_dir
