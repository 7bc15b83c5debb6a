"""The tensor-parallel model at world size 2 over gloo, against transformers' unsharded
model, and the comparison's power against reducers with planted faults."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import torch
from accuracy_ranks import drop_share_reducer, ulp_reducer

from pytest_allreduce.accuracy.compare import compare_runs
from pytest_allreduce.accuracy.generate import (
    GenerationBatch,
    GenerationOptions,
    GenerationRequest,
    rank_generate,
    rank_logits,
)
from pytest_allreduce.accuracy.records import GSM8KRun, QuestionResult
from pytest_allreduce.accuracy.reducers import ReducerFactory, torch_reducer
from pytest_allreduce.accuracy.source import ModelSource
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


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["kv-heads-split", "kv-heads-replicated"])
def test_tp_forward_equals_unsharded_transformers(
    pool: RankPool, tiny_dir: Path, kv_heads: int
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _tiny(tiny_dir, kv_heads)
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
