"""A test run against the reference run, question by question on the same questions:
token identity and the first divergence, the top-k rule at each question's first differing
token, the agreement rate, and McNemar's test on the GSM8K scores."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .records import GSM8KRun, QuestionResult
from .stats import McNemarVerdict, mcnemar_verdict, wilson_interval

METRICS = ("strict", "flexible")


@dataclass(frozen=True)
class Divergence:
    """Where one question's generations first differ. A token of -1 means that run had
    already stopped."""

    doc_id: int
    step: int
    reference_token: int
    test_token: int
    # Each run's pick is in the other's top k at that step.
    within_top_k: bool


@dataclass(frozen=True)
class Accuracy:
    correct: int
    n: int
    low: float  # Wilson 95% interval
    high: float

    @property
    def value(self) -> float:
        return self.correct / self.n


@dataclass(frozen=True)
class Comparison:
    n: int
    # Token-level results; None when either run has no tokens (endpoints).
    token_identical: bool | None
    top_k_ok: bool | None
    divergences: tuple[Divergence, ...]
    agreement: float  # questions with identical generations / n
    reference: dict[str, Accuracy]  # by metric
    test: dict[str, Accuracy]
    mcnemar: dict[str, McNemarVerdict]

    @property
    def first_divergence(self) -> Divergence | None:
        return self.divergences[0] if self.divergences else None

    @property
    def first_top_k_violation(self) -> Divergence | None:
        return next((d for d in self.divergences if not d.within_top_k), None)


def divergence(ref: QuestionResult, test: QuestionResult, top_k: int) -> Divergence | None:
    """The first step where the two token sequences differ, with the top-k rule there."""
    assert ref.tokens is not None and test.tokens is not None
    n = min(len(ref.tokens), len(test.tokens))
    differ = np.flatnonzero(ref.tokens[:n] != test.tokens[:n])
    if differ.size:
        step = int(differ[0])
        r, t = int(ref.tokens[step]), int(test.tokens[step])
        assert ref.top_ids is not None and test.top_ids is not None
        ok = r in test.top_ids[step, :top_k] and t in ref.top_ids[step, :top_k]
        return Divergence(ref.doc_id, step, r, t, bool(ok))
    if len(ref.tokens) == len(test.tokens):
        return None
    # Same tokens, but one run went on: the shorter one's stop is not a near-tie.
    r = int(ref.tokens[n]) if len(ref.tokens) > n else -1
    t = int(test.tokens[n]) if len(test.tokens) > n else -1
    return Divergence(ref.doc_id, n, r, t, False)


def _accuracy(run: GSM8KRun, metric: str) -> Accuracy:
    correct = sum(getattr(q, metric) for q in run.questions)
    return Accuracy(correct, run.n, *wilson_interval(correct, run.n))


def compare_runs(
    reference: GSM8KRun, test: GSM8KRun, *, comparisons: int = 1, top_k: int = 5
) -> Comparison:
    """Compare `test` with `reference`; `comparisons` is how many test runs are compared
    with the same reference (the Bonferroni split of McNemar's level)."""
    ref_ids = [q.doc_id for q in reference.questions]
    if ref_ids != [q.doc_id for q in test.questions]:
        raise ValueError("the two runs did not answer the same questions")
    if not ref_ids:
        raise ValueError("no questions to compare")
    with_tokens = all(
        q.tokens is not None and q.top_ids is not None
        for q in (*reference.questions, *test.questions)
    )
    divergences: list[Divergence] = []
    same = 0
    for ref, tst in zip(reference.questions, test.questions, strict=True):
        if with_tokens:
            found = divergence(ref, tst, top_k)
            if found is None:
                same += 1
            else:
                divergences.append(found)
        elif ref.response == tst.response:
            same += 1
    n = len(ref_ids)
    verdicts = {}
    for metric in METRICS:
        b = sum(
            getattr(r, metric) and not getattr(t, metric)
            for r, t in zip(reference.questions, test.questions, strict=True)
        )
        c = sum(
            getattr(t, metric) and not getattr(r, metric)
            for r, t in zip(reference.questions, test.questions, strict=True)
        )
        verdicts[metric] = mcnemar_verdict(b, c, n, comparisons)
    return Comparison(
        n=n,
        token_identical=(not divergences) if with_tokens else None,
        top_k_ok=all(d.within_top_k for d in divergences) if with_tokens else None,
        divergences=tuple(divergences),
        agreement=same / n,
        reference={m: _accuracy(reference, m) for m in METRICS},
        test={m: _accuracy(test, m) for m in METRICS},
        mcnemar=verdicts,
    )
