"""The statistics every decision uses: medians, spreads and one-sided Mann-Whitney tests.

Selection (is a challenger faster beyond noise?) and the baseline gate (did a backend get
slower beyond noise?) ask the same question in opposite directions, so they share the test
and its significance level here. numpy and scipy are imported on first use: this module is
imported while pytest starts.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

# A difference counts as real only when the one-sided test gives p below this.
P_VALUE_MAX: float = 0.01


def median(samples: Sequence[float]) -> float:
    import numpy as np

    return float(np.median(np.asarray(samples, dtype=float)))


def spread(samples: Sequence[float]) -> tuple[float, float]:
    """The 10th and 90th percentiles."""
    import numpy as np

    low, high = np.percentile(np.asarray(samples, dtype=float), [10, 90])
    return float(low), float(high)


def mann_whitney_p(
    sample: Sequence[float], other: Sequence[float], alternative: Literal["less", "greater"]
) -> float:
    """One-sided Mann-Whitney U p-value that `sample` is stochastically less (or greater)
    than `other`. A p-value that cannot be computed (all ties) counts as 1: no evidence."""
    from scipy.stats import mannwhitneyu

    if not sample or not other:
        raise ValueError("both sample sets must be non-empty")
    p_value = float(mannwhitneyu(sample, other, alternative=alternative).pvalue)
    return 1.0 if math.isnan(p_value) else p_value


def significant(p_value: float) -> bool:
    return p_value < P_VALUE_MAX
