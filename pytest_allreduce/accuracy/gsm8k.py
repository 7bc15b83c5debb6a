"""GSM8K through lm-eval: its own gsm8k task (prompts, filters, metrics), optionally read from
a local train.jsonl/test.jsonl, scored per question for the paired comparison.

`PoolLM` is the lm-eval model that sends batches of prompts to an injected `generate`
callable (the rank pool, in the plugin). Any other lm-eval `LM` (local-completions for a
running server) goes through the same `run_gsm8k`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lm_eval.api.model import LM

from .generate import (
    Generation,
    GenerationBatch,
    GenerationOptions,
    GenerationRequest,
    rank_generate,
)
from .records import BatchStats, GSM8KRun, QuestionResult
from .reducers import ReducerFactory
from .source import ModelSource

# lm-eval's fixed seed for drawing few-shot examples (its simple_evaluate default), so every
# run of a question sees the same examples.
FEWSHOT_SEED = 1234
STRICT = "strict-match"
FLEXIBLE = "flexible-extract"
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's default for models whose task sets none

# (prompts, stop strings, max new tokens) -> one GenerationBatch per rank, in rank order.
GenerateFn = Callable[[list[str], list[str], int], list[GenerationBatch]]


class GSM8KUnavailable(RuntimeError):
    """The GSM8K data cannot be read (missing files, or lm-eval's dataset unreachable)."""


def pool_generate(
    executor: Any,
    source: ModelSource,
    reducer_factory: ReducerFactory,
    options: GenerationOptions | None = None,
) -> GenerateFn:
    """A `generate` for PoolLM that runs rank_generate on every rank of `executor` (a
    RankPool, or anything with its `run(fn, *args)`)."""

    def generate(prompts: list[str], until: list[str], max_gen_toks: int) -> list[GenerationBatch]:
        request = GenerationRequest(tuple(prompts), tuple(until), max_gen_toks)
        return executor.run(rank_generate, source, request, reducer_factory, options)

    return generate


def rank_mismatch(per_rank: Sequence[Generation]) -> str | None:
    """Where another rank's tokens first differ from rank 0's, or None when all agree."""
    first = per_rank[0].tokens
    for rank, gen in enumerate(per_rank[1:], start=1):
        if not np.array_equal(gen.tokens, first):
            n = min(len(gen.tokens), len(first))
            diff = np.flatnonzero(gen.tokens[:n] != first[:n])
            step = int(diff[0]) if diff.size else n
            return f"rank {rank} differs from rank 0 at step {step}"
    return None


class PoolLM(LM):
    """An lm-eval model that generates with greedy batches through `generate`.

    Batches are formed deterministically: requests sorted by prompt length (longest first,
    ties by arrival), then cut into `batch_size` chunks, so the same questions always make
    the same batches, whichever backend runs them.
    """

    def __init__(self, generate: GenerateFn, *, batch_size: int = 128) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.generate = generate
        self.batch_size = batch_size
        # doc_id -> every rank's generation of that question (one PoolLM per run)
        self.generations: dict[int, list[Generation]] = {}
        self.batch_stats: list[BatchStats] = []

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        settings: dict[tuple[tuple[str, ...], int], list[int]] = {}
        for i, request in enumerate(requests):
            _context, kwargs = request.args
            settings.setdefault(_stopping(kwargs), []).append(i)
        texts: list[str] = [""] * len(requests)
        for (until, max_gen_toks), members in settings.items():
            ordered = sorted(members, key=lambda i: (-len(requests[i].args[0]), i))
            for lo in range(0, len(ordered), self.batch_size):
                chunk = ordered[lo : lo + self.batch_size]
                prompts = [requests[i].args[0] for i in chunk]
                per_rank = self.generate(prompts, list(until), max_gen_toks)
                first = per_rank[0]
                self.batch_stats.append(
                    BatchStats(
                        len(chunk),
                        first.prefill_forwards,
                        first.decode_steps,
                        first.prefill_s,
                        first.decode_s,
                        tuple(tuple(b.graph_buffers_registered) for b in per_rank),
                        dict(first.reduce_rows),
                    )
                )
                for pos, i in enumerate(chunk):
                    gens = [batch.generations[pos] for batch in per_rank]
                    texts[i] = gens[0].text
                    self.generations[requests[i].doc_id] = gens
        return texts

    def loglikelihood(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        raise NotImplementedError("PoolLM only generates (GSM8K needs nothing else)")

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False) -> list[Any]:
        raise NotImplementedError("PoolLM only generates (GSM8K needs nothing else)")


def _stopping(kwargs: dict[str, Any]) -> tuple[tuple[str, ...], int]:
    if kwargs.get("do_sample") or float(kwargs.get("temperature", 0.0) or 0.0) > 0:
        raise ValueError(f"only greedy generation is supported, got {kwargs}")
    until = kwargs.get("until") or ()
    if isinstance(until, str):
        until = (until,)
    return tuple(until), int(kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS))


def gsm8k_task_config(
    data_dir: Path | None, cache_dir: Path, max_gen_toks: int | None
) -> dict[str, Any]:
    """lm-eval's own gsm8k task config, read from the installed package, with the dataset
    pointed at `data_dir` (train.jsonl, test.jsonl) when given and the datasets cache at
    `cache_dir`."""
    import lm_eval.tasks
    from lm_eval.tasks._yaml_loader import load_yaml

    config = load_yaml(Path(lm_eval.tasks.__file__).parent / "gsm8k" / "gsm8k.yaml")
    config.pop("tag", None)  # tags index the default task list, which is not loaded here
    kwargs: dict[str, Any] = {"cache_dir": str(cache_dir)}
    if data_dir is not None:
        files = {split: Path(data_dir) / f"{split}.jsonl" for split in ("train", "test")}
        missing = [str(p) for p in files.values() if not p.is_file()]
        if missing:
            raise GSM8KUnavailable(f"GSM8K data directory lacks {', '.join(missing)}")
        kwargs["data_files"] = {split: str(p.resolve()) for split, p in files.items()}
        config.update(dataset_path="json", dataset_name=None)
    config["dataset_kwargs"] = kwargs
    if max_gen_toks is not None:
        config["generation_kwargs"] = {**config["generation_kwargs"], "max_gen_toks": max_gen_toks}
    return config


def load_gsm8k_task(config: dict[str, Any], num_fewshot: int) -> dict[str, Any]:
    from lm_eval.tasks import TaskManager

    try:
        loaded = TaskManager(include_defaults=False).load([config])
    except Exception as exc:
        where = config["dataset_path"]
        if where == "json":
            raise GSM8KUnavailable(f"the local GSM8K files could not be read: {exc}") from exc
        raise GSM8KUnavailable(
            f"lm-eval's GSM8K dataset ({where}) could not be loaded ({type(exc).__name__}: "
            f"{exc}); pass a directory with train.jsonl and test.jsonl instead"
        ) from exc
    for task in loaded["tasks"].values():
        task.set_config(key="num_fewshot", value=num_fewshot)
        task.set_fewshot_seed(seed=FEWSHOT_SEED)
    return loaded


def run_gsm8k(
    lm: Any,
    *,
    data_dir: Path | None,
    cache_dir: Path,
    limit: int | None = None,
    num_fewshot: int = 5,
    max_gen_toks: int | None = None,
) -> GSM8KRun:
    """Score `lm` (a PoolLM or any lm-eval LM) on the first `limit` GSM8K test questions."""
    from lm_eval.evaluator import evaluate

    if limit is not None and limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")
    if num_fewshot < 0:
        raise ValueError(f"num_fewshot must be at least 0, got {num_fewshot}")
    config = gsm8k_task_config(data_dir, cache_dir, max_gen_toks)
    task_dict = load_gsm8k_task(config, num_fewshot)
    started = time.perf_counter()
    results = evaluate(lm=lm, task_dict=task_dict, limit=limit, bootstrap_iters=0, log_samples=True)
    seconds = time.perf_counter() - started
    (task_name,) = task_dict["tasks"]
    scores = results["results"][task_name]
    per_doc: dict[int, dict[str, Any]] = {}
    for sample in results["samples"][task_name]:
        entry = per_doc.setdefault(int(sample["doc_id"]), {"response": sample["resps"][0][0]})
        entry[sample["filter"]] = bool(sample["exact_match"])
    generations: dict[int, list[Generation]] = getattr(lm, "generations", {})
    questions, mismatches = [], []
    for doc_id in sorted(per_doc):
        entry = per_doc[doc_id]
        question = QuestionResult(doc_id, entry[STRICT], entry[FLEXIBLE], entry["response"])
        if doc_id in generations:
            gens = generations[doc_id]
            question.tokens, question.top_ids = gens[0].tokens, gens[0].top_ids
            question.top_logprobs = gens[0].top_logprobs
            if (problem := rank_mismatch(gens)) is not None:
                mismatches.append(f"question {doc_id}: {problem}")
        questions.append(question)
    return GSM8KRun(
        questions,
        float(scores[f"exact_match,{STRICT}"]),
        float(scores[f"exact_match,{FLEXIBLE}"]),
        seconds,
        mismatches,
        list(getattr(lm, "batch_stats", [])),
    )
