"""GSM8K through lm-eval: the scoring path with oracle models, deterministic batching and
the data errors. The tiny model end to end on the rank pool is in test_accuracy_tp.py."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from pytest_allreduce.accuracy.compare import compare_runs
from pytest_allreduce.accuracy.generate import Generation, GenerationBatch
from pytest_allreduce.accuracy.gsm8k import GSM8KUnavailable, PoolLM, run_gsm8k

GSM8K = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gsm8k"
needs_gsm8k = pytest.mark.skipif(
    not (GSM8K / "test.jsonl").is_file(), reason=f"GSM8K data not found at {GSM8K}"
)


@pytest.fixture(scope="module")
def answers() -> dict[str, str]:
    """Question text -> its reference answer (reasoning, then '#### N')."""
    rows = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines()]
    return {row["question"]: row["answer"] for row in rows}


def _fake_generate(
    reply: Callable[[str], str], calls: list[list[str]]
) -> Callable[[list[str], list[str], int], list[GenerationBatch]]:
    """A two-rank `generate` that answers each prompt's last question with `reply`."""

    def generate(prompts: list[str], until: list[str], max_gen_toks: int) -> list[GenerationBatch]:
        calls.append(prompts)
        gens = []
        for prompt in prompts:
            question = prompt.rsplit("Question: ", 1)[1].removesuffix("\nAnswer:")
            empty = np.zeros((0, 5), dtype=np.int32)
            gens.append(
                Generation(
                    np.zeros(0, np.int32), empty, empty.astype(np.float32), reply(question), "stop"
                )
            )
        return [GenerationBatch(rank, gens, 1, 0, 0.0, 0.0) for rank in range(2)]

    return generate


@needs_gsm8k
def test_oracle_scores_one_on_both_filters(answers: dict[str, str], tmp_path: Path) -> None:
    calls: list[list[str]] = []
    lm = PoolLM(_fake_generate(lambda q: " " + answers[q], calls), batch_size=8)
    run = run_gsm8k(lm, data_dir=GSM8K, cache_dir=tmp_path, limit=20, num_fewshot=5)
    assert (run.n, run.accuracy_strict, run.accuracy_flexible) == (20, 1.0, 1.0)
    assert all(q.strict and q.flexible for q in run.questions)
    assert [q.doc_id for q in run.questions] == list(range(20))
    # Batches of 8, longest prompts first; every prompt carries 5 examples and its question.
    assert [len(c) for c in calls] == [8, 8, 4]
    lengths = [len(p) for c in calls for p in c]
    assert lengths == sorted(lengths, reverse=True)
    assert all(p.count("Question: ") == 6 for c in calls for p in c)
    # The same questions batch the same way again.
    again: list[list[str]] = []
    run_gsm8k(
        PoolLM(_fake_generate(lambda q: " " + answers[q], again), batch_size=8),
        data_dir=GSM8K,
        cache_dir=tmp_path,
        limit=20,
    )
    assert again == calls


@needs_gsm8k
def test_the_answer_is_n_passes_only_the_flexible_filter(
    answers: dict[str, str], tmp_path: Path
) -> None:
    def reply(question: str) -> str:
        return f" The answer is {answers[question].rsplit('#### ', 1)[1]}."

    run = run_gsm8k(PoolLM(_fake_generate(reply, [])), data_dir=GSM8K, cache_dir=tmp_path, limit=10)
    assert (run.accuracy_strict, run.accuracy_flexible) == (0.0, 1.0)
    oracle = run_gsm8k(
        PoolLM(_fake_generate(lambda q: " " + answers[q], [])),
        data_dir=GSM8K,
        cache_dir=tmp_path,
        limit=10,
    )
    strict = compare_runs(oracle, run).mcnemar["strict"]
    assert (strict.b, strict.c) == (10, 0)
    assert compare_runs(oracle, run).mcnemar["flexible"].p == 1.0


def test_missing_data_files_are_named(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text("")
    with pytest.raises(GSM8KUnavailable, match=r"test\.jsonl"):
        run_gsm8k(PoolLM(_fake_generate(str, [])), data_dir=tmp_path, cache_dir=tmp_path)


def test_an_unreachable_hub_dataset_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import datasets

    def offline(*args: object, **kwargs: object) -> None:
        raise ConnectionError("Couldn't reach 'openai/gsm8k' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(GSM8KUnavailable, match=r"openai/gsm8k.*train.jsonl and test.jsonl"):
        run_gsm8k(PoolLM(_fake_generate(str, [])), data_dir=None, cache_dir=tmp_path)
