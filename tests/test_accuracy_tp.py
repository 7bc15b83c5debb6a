"""The tensor-parallel model at world size 2 over gloo, against transformers' unsharded
model; the comparison's power against reducers with planted faults; and the tiny model
through lm-eval's GSM8K end to end. One rank pool serves the whole module."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")
pytest.importorskip("lm_eval")

import torch
from accuracy_ranks import drop_share_reducer, ulp_reducer
from safetensors.torch import load_file, save_file

from pytest_allreduce.accuracy.compare import compare_runs
from pytest_allreduce.accuracy.generate import (
    GenerationBatch,
    GenerationOptions,
    GenerationRequest,
    rank_generate,
    rank_logits,
)
from pytest_allreduce.accuracy.gsm8k import PoolLM, pool_generate, run_gsm8k
from pytest_allreduce.accuracy.records import GSM8KRun, QuestionResult
from pytest_allreduce.accuracy.reducers import ReducerFactory, torch_reducer
from pytest_allreduce.accuracy.source import ModelSource, prepare_model_source
from pytest_allreduce.accuracy.tiny import TinySpec, build_tiny_model
from pytest_allreduce.pool import RankPool

PROMPTS = (
    "Question: Natalia sold clips to 48 of her friends in April. How many in May?\nAnswer:",
    "Hi",
    "Question: what is 2+2?\nAnswer:",
    "The quick brown fox jumps over the lazy dog, twice.",
)


@pytest.fixture(scope="module")
def pool() -> Iterator[RankPool]:
    pool = RankPool(2, "cpu", 120).start()
    yield pool
    pool.close()


def _tiny(root: Path, kv_heads: int) -> ModelSource:
    path = build_tiny_model(root / f"tiny-kv{kv_heads}", TinySpec(num_kv_heads=kv_heads))
    return ModelSource("tiny", str(path), f"kv{kv_heads}")


def _llama_with_biases(root: Path) -> ModelSource:
    """The tiny model as a Llama with biases on every projection: o_proj and down_proj are
    row-parallel, so their biases must be added once (on rank 0), not once per rank."""
    path = build_tiny_model(root / "tiny-llama", TinySpec(num_kv_heads=2))
    config = json.loads((path / "config.json").read_text())
    config.update(
        model_type="llama", architectures=["LlamaForCausalLM"], attention_bias=True, mlp_bias=True
    )
    (path / "config.json").write_text(json.dumps(config))
    weights = load_file(str(path / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    for name in [
        n
        for n in weights
        if n.endswith(
            ("o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "down_proj.weight")
        )
    ]:
        rows = weights[name].shape[0]
        weights[name.removesuffix("weight") + "bias"] = torch.randn(rows, generator=gen) * 0.5
    save_file(weights, str(path / "model.safetensors"), metadata={"format": "pt"})
    return ModelSource("tiny-llama", str(path), "llama")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("tiny-models")


def _generate(
    pool: RankPool,
    source: ModelSource,
    prompts: tuple[str, ...],
    reducer: ReducerFactory,
    *,
    max_gen_toks: int,
    until: tuple[str, ...] = (),
    **options: object,
) -> list[GenerationBatch]:
    request = GenerationRequest(prompts, until, max_gen_toks)
    return pool.run(rank_generate, source, request, reducer, GenerationOptions(**options))


@pytest.mark.parametrize("model", ["kv-heads-split", "kv-heads-replicated", "llama-with-biases"])
def test_tp_forward_equals_unsharded_transformers(
    pool: RankPool, tiny_dir: Path, model: str
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model == "llama-with-biases":
        source = _llama_with_biases(tiny_dir)
    else:
        source = _tiny(tiny_dir, 2 if model == "kv-heads-split" else 1)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    reference = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32)
    ids = [tokenizer(p)["input_ids"] for p in PROMPTS]

    per_rank = pool.run(rank_logits, source, ids, torch_reducer)
    with torch.no_grad():
        expected = [reference(torch.tensor([i])).logits[0].numpy() for i in ids]
    for rank, logits in enumerate(per_rank):
        for prompt, got, want in zip(PROMPTS, logits, expected, strict=True):
            worst = float(np.abs(got - want).max())
            assert worst <= 1e-5, f"rank {rank}, {prompt!r}: logits off by {worst:.2e}"

    # Prompts of different lengths in one batch, packed two per prefill forward.
    batches = _generate(
        pool, source, PROMPTS, torch_reducer, max_gen_toks=12, dtype="float32", prefill_tokens=96
    )
    for row, prompt_ids in enumerate(ids):
        out = reference.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False)
        want = out[0, len(prompt_ids) :].tolist()
        for batch in batches:
            assert batch.generations[row].tokens.tolist() == want, (batch.rank, PROMPTS[row])


def _expected_stop(tokenizer: Any, tokens: list[int], stop: str) -> tuple[list[int], str]:
    """What generation must return when `stop` ends it: the fewest tokens whose text holds
    the stop string, and that text cut before it."""
    for n in range(1, len(tokens) + 1):
        text = tokenizer.decode(tokens[:n], skip_special_tokens=True)
        if stop in text:
            return tokens[:n], text[: text.index(stop)]
    return tokens, tokenizer.decode(tokens, skip_special_tokens=True)


def test_stop_strings_end_every_rank_at_the_same_token(pool: RankPool, tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    source = _tiny(tiny_dir / "stop", 2)
    tokenizer = AutoTokenizer.from_pretrained(source.path)
    free = _generate(pool, source, PROMPTS, torch_reducer, max_gen_toks=24, dtype="float32")
    text = free[0].generations[0].text
    # A character from the middle of the first sequence's text (in this byte-level model
    # often one that takes two tokens, so the stop lands mid-character at first).
    stop = next(c for c in text[3:] if c != "\ufffd" and not c.isspace())
    stopped = _generate(
        pool,
        source,
        PROMPTS,
        torch_reducer,
        max_gen_toks=24,
        until=(stop,),
        dtype="float32",
        stop_check_interval=5,
    )
    for row, gen in enumerate(free[0].generations):
        tokens, cut = _expected_stop(tokenizer, gen.tokens.tolist(), stop)
        for batch in stopped:
            got = batch.generations[row]
            assert (got.tokens.tolist(), got.text) == (tokens, cut), (batch.rank, row)
    assert stopped[0].generations[0].finish == "stop"
    if all(g.finish == "stop" for g in stopped[0].generations):
        # every sequence stopped: the batch ended early, on every rank alike
        assert stopped[0].decode_steps == stopped[1].decode_steps < free[0].decode_steps


def _run(batches: list[GenerationBatch]) -> GSM8KRun:
    """Generations as a GSM8K run (scores do not matter for token comparisons)."""
    questions = [
        QuestionResult(i, False, False, g.text, g.tokens, g.top_ids, g.top_logprobs)
        for i, g in enumerate(batches[0].generations)
    ]
    return GSM8KRun(questions, 0.0, 0.0, 1.0)


# 130 rows: every decode step has rows 0, 64 and 128, the rows a drop-one-row-in-64 fault hits.
MUTATION_PROMPTS = tuple(
    f"Question {i}: how many apples are {i * 7 % 13} plus {i % 5}?\nAnswer:" for i in range(130)
)
MUTATION_STEPS = 24


@pytest.fixture(scope="module")
def bf16_reference(pool: RankPool, tiny_dir: Path) -> tuple[ModelSource, GSM8KRun]:
    source = _tiny(tiny_dir / "bf16", 2)
    batches = _generate(pool, source, MUTATION_PROMPTS, torch_reducer, max_gen_toks=MUTATION_STEPS)
    assert [g.tokens.tolist() for g in batches[0].generations] == [
        g.tokens.tolist() for g in batches[1].generations
    ]
    return source, _run(batches)


def test_a_dropped_share_of_one_row_in_64_is_caught(
    pool: RankPool, bf16_reference: tuple[ModelSource, GSM8KRun]
) -> None:
    source, reference = bf16_reference
    broken = _run(
        _generate(pool, source, MUTATION_PROMPTS, drop_share_reducer, max_gen_toks=MUTATION_STEPS)
    )
    result = compare_runs(reference, broken)
    assert result.token_identical is False
    assert result.top_k_ok is False, result.divergences
    # The rows hit at every decode step are the ones whose first divergence is far off.
    hit = {d.doc_id for d in result.divergences if not d.within_top_k}
    assert hit & {0, 64, 128}, result.divergences


def test_an_ulp_off_fails_token_identity_but_passes_top5(
    pool: RankPool, bf16_reference: tuple[ModelSource, GSM8KRun]
) -> None:
    source, reference = bf16_reference
    nudged = _run(
        _generate(pool, source, MUTATION_PROMPTS, ulp_reducer, max_gen_toks=MUTATION_STEPS)
    )
    result = compare_runs(reference, nudged)
    assert result.token_identical is False
    assert result.top_k_ok is True, result.first_top_k_violation
    assert len(result.divergences) >= 10, "too few divergences for the top-5 rule to be tested"


def test_the_same_reducer_gives_identical_generations(
    pool: RankPool, bf16_reference: tuple[ModelSource, GSM8KRun]
) -> None:
    source, reference = bf16_reference
    again = compare_runs(
        reference,
        _run(_generate(pool, source, MUTATION_PROMPTS, torch_reducer, max_gen_toks=MUTATION_STEPS)),
    )
    assert again.token_identical is True
    assert again.agreement == 1.0


GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"


@pytest.mark.skipif(not (GSM8K / "test.jsonl").is_file(), reason=f"no GSM8K data at {GSM8K}")
def test_tiny_model_end_to_end_on_the_pool(pool: RankPool, tmp_path: Path) -> None:
    source = prepare_model_source("tiny", tmp_path / "models")
    generate = pool_generate(pool, source, torch_reducer, GenerationOptions(dtype="float32"))
    runs = [
        run_gsm8k(
            PoolLM(generate, batch_size=2),
            data_dir=GSM8K,
            cache_dir=tmp_path / "datasets",
            limit=3,
            num_fewshot=1,
            max_gen_toks=16,
        )
        for _ in range(2)
    ]
    for run in runs:
        assert run.n == 3 and not run.rank_mismatches
        assert [b.rows for b in run.batches] == [2, 1]
        assert all(b.graph_buffers_registered == ((), ()) for b in run.batches)  # no graphs on CPU
        for q in run.questions:
            assert q.tokens is not None and q.top_ids is not None
            assert 1 <= len(q.tokens) <= 16 and q.top_ids.shape == (len(q.tokens), 5)
            assert "Question:" not in q.response
    result = compare_runs(runs[0], runs[1])
    assert result.token_identical and result.agreement == 1.0
