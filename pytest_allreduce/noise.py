"""How much of a measured speed-up noise can explain: the model every selection decision uses.

A decision compares two config entries by the log ratio of their medians at a size,
``l = ln(reference median / challenger median)`` (positive: the challenger is faster). Three
sources of error move that ratio, and the within-run spread of the samples sees only the first:

1. sampling: the standard error of each median, from its own samples;
2. this session's independent noise per measurement (a median taken at one moment differs
   from one taken a minute later). It shows as roughness: medians of one backend at
   neighbouring sizes scatter around the smooth curve the backend really follows, and that
   scatter is measured here, in the session's own data ("roughness");
3. run-to-run drift: a whole run of one backend can sit a few percent above or below another
   run of it (clocks, other tenants, the order backends were timed in). Within one run this is
   a common shift of every size, so no amount of pooling over sizes removes it, and no single
   run can see it. It is a stated floor, measured from pairs of runs (DRIFT_FLOOR).

A ratio of backends c and r at one size then has variance
``max(sampling, roughness_c^2 + roughness_r^2)``, and the mean of `k` neighbouring sizes has
``mean(variance) / k + drift^2``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Any

from . import stats

# One-sided normal quantile of the significance level every decision shares (p < 0.01).
Z: float = NormalDist().inv_cdf(1.0 - stats.P_VALUE_MAX)

# Run-to-run drift of a log ratio of two backends' medians at one size, per run: a whole run's
# common shift, as benchmarks/drift.py measures it from pairs of runs of one plan on one
# machine. The floor is the LARGEST per-run drift seen, not a standard deviation: a handful of
# pairs cannot pin one down, the drift is not normal (machines switch between states), and a
# drift that happened once will happen again.
# - cuda: 2 x H200, the committed runs docs/results/h200x2/{suites, suites-repeat,
#   remeasure-h4096}, the five variants SGLang can run: 0.046, 0.063 and 0.026 for the three
#   pairs. Those runs timed backends one after another, which puts drift on whole backends.
#   With candidates timed interleaved, two back-to-back default main jobs on one machine
#   (docs/results/h200x2/main-job) drifted by under 0.001; one pair on one machine bounds
#   nothing across machines or days, so the floor stays until more pairs are measured.
# - cpu: the 2-core development machine, idle, six runs of the default CPU main job with
#   candidates timed interleaved (15 pairs, benchmarks/config_repeat.py; docs/results/
#   cpu-main-job.md): 0.001 to 0.141. The earlier floor, 0.294, came from runs that timed
#   backends one after another on a machine shared with other jobs; against interleaved
#   runs it made the one real CPU speed-up (cpu_shm, about 2x gloo below 500 rows) fail
#   its test in 3 of 4 runs (z 2.26-2.32 against 2.33), so the config flipped between all
#   gloo and cpu_shm at small sizes.
DRIFT_FLOOR: dict[str, float] = {"cuda": 0.063, "cpu": 0.141}

# Roughness is read from triples of neighbouring sizes whose outer sizes lie within this ratio
# (wider triples would count a curve's real bend as noise), and only when enough triples exist.
# It is a median absolute deviation: a backend's real steps (a protocol or a fallback switching
# at some size) hit a few triples hard and must not pass for noise; heavy tails it misses are
# what the drift floor is for.
ROUGHNESS_MAX_SPAN = 2.0
ROUGHNESS_MIN_TRIPLES = 8


def log_median_se(samples: Sequence[float]) -> float:
    """Standard error of ln(median of `samples`): 1.2533 sigma / sqrt(n) for a normal, with
    sigma the robust spread of the log samples."""
    import numpy as np

    logs = np.log(np.asarray(samples, dtype=float))
    if len(logs) < 2:
        return 0.0
    sigma = 1.4826 * float(np.median(np.abs(logs - np.median(logs))))
    return 1.2533 * sigma / math.sqrt(len(logs))


def roughness(curves: Mapping[str, Mapping[int, float]]) -> dict[str, float]:
    """Per backend, the sigma of one median's independent noise (0.0 where too few triples).

    Each median is compared with the straight line (in log size, log time) through its two
    neighbours; for independent noise of sigma per median the residual has
    sigma * sqrt(1 + w^2 + (1 - w)^2), w the neighbours' weights.
    """
    import numpy as np

    found = {}
    for name, medians in curves.items():
        points = sorted((size, t) for size, t in medians.items() if t > 0)
        residuals = []
        for (a, ta), (b, tb), (c, tc) in zip(points, points[1:], points[2:], strict=False):
            if c > a * ROUGHNESS_MAX_SPAN:
                continue
            w = (math.log(b) - math.log(a)) / (math.log(c) - math.log(a))
            line = (1 - w) * math.log(ta) + w * math.log(tc)
            residuals.append((math.log(tb) - line) / math.sqrt(1 + w * w + (1 - w) ** 2))
        if len(residuals) < ROUGHNESS_MIN_TRIPLES:
            found[name] = 0.0
            continue
        values = np.asarray(residuals)
        found[name] = 1.4826 * float(np.median(np.abs(values - np.median(values))))
    return found


@dataclass(frozen=True)
class NoiseModel:
    drift: float  # run-to-run drift of a log ratio (the stated floor)
    roughness: dict[str, float]  # per backend, this session's noise of one median

    @classmethod
    def for_session(cls, device: str, curves: Mapping[str, Mapping[int, float]]) -> NoiseModel:
        return cls(DRIFT_FLOOR["cuda" if device == "cuda" else "cpu"], roughness(curves))

    def size_variance(
        self, se_challenger: float, se_reference: float, challenger: str, reference: str
    ) -> float:
        """Variance of one size's log ratio of two backends, from the run: sampling or the
        two backends' roughness, whichever is larger (roughness already contains the
        sampling error of a median)."""
        rough = self.roughness.get(challenger, 0.0) ** 2 + self.roughness.get(reference, 0.0) ** 2
        return max(se_challenger**2 + se_reference**2, rough)

    def segment_sigma(self, variances: Sequence[float]) -> float:
        """Sigma of the mean log ratio over neighbouring sizes: the independent part averages
        out over them, the drift does not."""
        k = len(variances)
        return math.sqrt(sum(variances) / (k * k) + self.drift**2)

    def to_json(self) -> dict[str, Any]:
        return {
            "z": Z,
            "p_value_max": stats.P_VALUE_MAX,
            "drift_floor": self.drift,
            "roughness": dict(sorted(self.roughness.items())),
            "size_variance": "max(se_c^2 + se_r^2, roughness_c^2 + roughness_r^2)",
            "segment_sigma": "sqrt(mean(size variance) / k + drift_floor^2)",
        }
