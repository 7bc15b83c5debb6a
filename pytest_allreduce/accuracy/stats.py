"""The accuracy statistics: Wilson intervals and McNemar's exact test on paired questions."""

from __future__ import annotations

from dataclasses import dataclass

# Fail a backend when its loss against the reference is significant at this level (split
# over the backends compared, Bonferroni) and at least this large.
ALPHA = 0.01
MIN_LOSS = 0.02


def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (no continuity correction)."""
    from scipy.stats import binomtest

    if n < 1:
        raise ValueError("a proportion needs at least one trial")
    if not 0 <= successes <= n:
        raise ValueError(f"successes {successes} outside 0..{n}")
    ci = binomtest(successes, n).proportion_ci(confidence_level=confidence, method="wilson")
    return float(ci.low), float(ci.high)


def mcnemar_one_sided(b: int, c: int) -> float:
    """P(X >= b) for X ~ Bin(b + c, 1/2): the exact one-sided McNemar p-value that the test
    run loses questions, b = reference right and test wrong, c = the reverse."""
    from scipy.stats import binom

    if b < 0 or c < 0:
        raise ValueError(f"discordant counts must be non-negative, got b={b}, c={c}")
    if b + c == 0:
        return 1.0
    return float(binom.sf(b - 1, b + c, 0.5))


@dataclass(frozen=True)
class McNemarVerdict:
    b: int  # reference right, test wrong
    c: int  # reference wrong, test right
    n: int  # questions compared
    p: float
    alpha: float  # the per-comparison level after the Bonferroni split
    min_loss: float

    @property
    def loss(self) -> float:
        """Net accuracy lost against the reference, as a fraction of the questions."""
        return (self.b - self.c) / self.n

    @property
    def failed(self) -> bool:
        return self.p < self.alpha and self.loss >= self.min_loss


def mcnemar_verdict(
    b: int, c: int, n: int, comparisons: int, alpha: float = ALPHA, min_loss: float = MIN_LOSS
) -> McNemarVerdict:
    """Fail when p < alpha / comparisons and (b - c) / n >= min_loss."""
    if comparisons < 1:
        raise ValueError(f"comparisons must be at least 1, got {comparisons}")
    if n < 1 or b + c > n:
        raise ValueError(f"{b} + {c} discordant questions do not fit in n = {n}")
    return McNemarVerdict(b, c, n, mcnemar_one_sided(b, c), alpha / comparisons, min_loss)
