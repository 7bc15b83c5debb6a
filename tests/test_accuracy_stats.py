"""The accuracy statistics and the paired comparison, as pure functions."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from pytest_allreduce.accuracy.compare import compare_runs
from pytest_allreduce.accuracy.records import GSM8KRun, QuestionResult
from pytest_allreduce.accuracy.stats import (
    mcnemar_one_sided,
    mcnemar_verdict,
    wilson_interval,
)


@pytest.mark.parametrize("discordant", [1, 2, 7, 10, 20, 40, 80, 131])
def test_mcnemar_matches_scipy_binomtest(discordant: int) -> None:
    for b in range(discordant + 1):
        want = binomtest(b, discordant, 0.5, alternative="greater").pvalue
        assert mcnemar_one_sided(b, discordant - b) == pytest.approx(want, rel=1e-9, abs=1e-15)
    assert mcnemar_one_sided(0, 0) == 1.0


@pytest.mark.parametrize(
    ("discordant", "smallest_b"), [(10, 10), (20, 16), (40, 28), (80, 51), (120, 74)]
)
def test_smallest_rejected_loss_at_alpha_one_percent(discordant: int, smallest_b: int) -> None:
    """The table in the design notes: the fewest discordant losses that reject at 0.01."""
    n = 1319
    rejects = [mcnemar_verdict(b, discordant - b, n, 1).p < 0.01 for b in range(discordant + 1)]
    assert rejects.index(True) == smallest_b
    assert all(rejects[smallest_b:])


def test_mcnemar_decision_needs_significance_after_bonferroni_and_two_points() -> None:
    # 28 of 40 discordant lost (p = 0.0083), net loss 16 questions.
    significant = mcnemar_verdict(28, 12, 200, comparisons=1)
    assert significant.p < 0.01 and significant.loss == pytest.approx(0.08)
    assert significant.failed
    # Split over 3 backends the same p is no longer below 0.01 / 3.
    assert not mcnemar_verdict(28, 12, 200, comparisons=3).failed
    # Significant but smaller than 2 points of accuracy: 16 net of 1319 questions is 1.2.
    small = mcnemar_verdict(28, 12, 1319, comparisons=1)
    assert small.p < 0.01 and not small.failed
    # A gain never fails.
    assert not mcnemar_verdict(12, 28, 200, comparisons=1).failed
    with pytest.raises(ValueError, match="do not fit"):
        mcnemar_verdict(5, 6, 10, comparisons=1)


def test_wilson_interval() -> None:
    low, high = wilson_interval(50, 100)
    assert (low, high) == pytest.approx((0.4038, 0.5962), abs=1e-4)
    low, high = wilson_interval(0, 20)
    assert low == 0 and high == pytest.approx(0.1611, abs=1e-4)
    with pytest.raises(ValueError):
        wilson_interval(3, 0)


def _question(
    doc: int, right: bool, tokens: list[int] | None, tops: list[list[int]] | None = None
) -> QuestionResult:
    ids = lp = None
    if tokens is not None:
        tops = tops or [[t, 900, 901, 902, 903] for t in tokens]
        ids = np.array(tops, dtype=np.int32)
        lp = np.zeros(ids.shape, dtype=np.float32)
    toks = None if tokens is None else np.array(tokens, dtype=np.int32)
    return QuestionResult(doc, right, right, f"answer {tokens}", toks, ids, lp)


def _run(questions: list[QuestionResult]) -> GSM8KRun:
    return GSM8KRun(questions, 0.0, 0.0, 1.0)


def test_identical_runs() -> None:
    run = _run([_question(i, i % 2 == 0, [1, 2, 3]) for i in range(4)])
    result = compare_runs(run, run)
    assert result.token_identical and result.top_k_ok and result.agreement == 1.0
    assert result.first_divergence is None
    assert result.mcnemar["strict"].p == 1.0
    assert result.reference["flexible"].value == 0.5


def test_first_divergence_and_the_top_k_rule() -> None:
    reference = _run(
        [
            _question(0, True, [5, 6, 7]),
            _question(1, True, [5, 6, 7], [[5, 0, 0, 0, 0], [6, 8, 0, 0, 0], [7, 0, 0, 0, 0]]),
            _question(2, True, [1, 2]),
        ]
    )
    test = _run(
        [
            _question(0, True, [5, 6, 7]),
            # picks 8 at step 1, which the reference ranked second; its own top 5 has 6
            _question(1, False, [5, 8, 9], [[5, 0, 0, 0, 0], [8, 6, 0, 0, 0], [9, 0, 0, 0, 0]]),
            # picks 4 at step 1, which the reference did not have in its top 5
            _question(2, True, [1, 4]),
        ]
    )
    result = compare_runs(reference, test)
    assert result.token_identical is False
    assert result.agreement == pytest.approx(1 / 3)
    first = result.first_divergence
    assert first is not None and (first.doc_id, first.step) == (1, 1)
    assert (first.reference_token, first.test_token, first.within_top_k) == (6, 8, True)
    violation = result.first_top_k_violation
    assert violation is not None and (violation.doc_id, violation.step) == (2, 1)
    assert result.top_k_ok is False
    assert (result.mcnemar["strict"].b, result.mcnemar["strict"].c) == (1, 0)


def test_a_run_that_goes_on_past_the_other_is_a_divergence() -> None:
    result = compare_runs(_run([_question(0, True, [1, 2])]), _run([_question(0, True, [1, 2, 3])]))
    first = result.first_divergence
    assert first is not None and (first.step, first.reference_token, first.test_token) == (2, -1, 3)
    assert not first.within_top_k


def test_runs_without_tokens_compare_texts_only() -> None:
    reference = _run([_question(0, True, None), _question(1, False, None)])
    test = _run([_question(0, False, None), _question(1, False, None)])
    test.questions[1].response = "something else"
    result = compare_runs(reference, test)
    assert result.token_identical is None and result.top_k_ok is None
    assert result.agreement == 0.5
    assert (result.mcnemar["strict"].b, result.mcnemar["strict"].c) == (1, 0)


def test_runs_on_different_questions_are_refused() -> None:
    with pytest.raises(ValueError, match="same questions"):
        compare_runs(_run([_question(0, True, [1])]), _run([_question(1, True, [1])]))
