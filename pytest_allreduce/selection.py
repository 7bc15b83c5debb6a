"""Selection: the winning backend per batch size for one (world size, hidden, dtype).

Why a statistical rule: latency samples of collectives are noisy (clock jitter, other
tenants, NVLink contention), and a config that flips to an exotic backend on a 1% blip makes
the server depend on a more fragile path for no real gain. So the standard path keeps a size
unless another backend is faster beyond measurement noise.

Candidates at a batch size are the backends that

- passed every required gating suite at that exact shape (`ResultStore.eligible`),
- have a declared server type the server can load (`GPU_CONFIG_TYPES` on CUDA,
  `CPU_CONFIG_TYPES` on the CPU; a variant declared without one never qualifies), and
- have latency samples for the "fused" job (allreduce + residual add + RMSNorm), which is
  the work the server actually does at that point of the model.

The rule, applied at each batch size:

1. The default is the simplest candidate whose type is the standard one ("nccl" on CUDA,
   "gloo" on the CPU); simplicity comes from the variant's declaration (lower is simpler,
   ties broken by name). If no standard candidate exists (it failed a suite, or is
   unavailable), the simplest remaining candidate is the default.
2. A challenger *beats* a reference when both hold:
   - a one-sided Mann-Whitney U test (challenger samples less than reference samples) gives
     p < `stats.P_VALUE_MAX` (0.01), and
   - the challenger's median is at least `MIN_GAIN` (3%) below the reference's median.
   The test says the difference is not noise; the gain threshold says it is worth a switch.
3. If no challenger beats the default, the default wins.
4. Otherwise the fastest challenger by median among those that beat the default wins,
   except that a strictly simpler challenger which also beat the default and which the
   fastest does not beat (by the same rule) wins the tie; among several such, the simplest.
5. No candidates: no entry for that size; the reason is recorded.

Every `Choice` carries the evidence: every candidate's median, the p-values and gains of the
comparisons made, who was beaten and who tied.

Bisection lives here too: where the winner changes between two measured sizes, the session
measures the sizes `bisection_points` names until every crossover lies between keys no more
than `BISECTION_RESOLUTION` apart, so a server's nearest-key lookup switches backends where
the measurements did.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import stats
from .backend import CPU_CONFIG_TYPES, GPU_CONFIG_TYPES
from .config import FUSED_CONFIG_TYPE, AllreduceConfig, ConfigEntry
from .model import Case, GroupKey, Job
from .results import ResultStore

# A challenger must be faster beyond noise (stats.significant) and its median at least this
# fraction below the reference's median.
MIN_GAIN: float = 0.03
# Bisection stops after this many rounds per config even if crossovers remain wider...
MAX_BISECTION_ROUNDS = 6
# ... and does not split a crossover interval narrower than this fraction of its lower end
# (at least 2 rows): a server's nearest-key lookup gains nothing from finer keys, and on
# noisy machines finer splits only chase noise.
BISECTION_RESOLUTION = 1 / 16
# The job candidates compete on: the server's allreduce + residual add + RMSNorm.
SELECTION_JOB: Job = "fused"
# The config type of the always-available standard path, per device.
STANDARD_TYPE: dict[str, str] = {"cuda": "nccl", "cpu": "gloo"}


def fusion_flag(fused: bool, backend_type: str) -> bool:
    """The config's `use_residual_rmsnorm_fusion` for a winner.

    True when the variant's fused job is a fused kernel; but the server only knows how to
    fuse through `FUSED_CONFIG_TYPE`, and the config validator refuses the flag on any other
    type, so a fused kernel of another type is written with the flag off.
    """
    return fused and backend_type == FUSED_CONFIG_TYPE


def loadable_types(device: str) -> frozenset[str]:
    """Config types a server on `device` can load."""
    return GPU_CONFIG_TYPES if device == "cuda" else CPU_CONFIG_TYPES


def standard_type(device: str) -> str:
    """The config type of the standard path on `device` ("nccl" on CUDA, "gloo" on CPU)."""
    return STANDARD_TYPE["cuda" if device == "cuda" else "cpu"]


@dataclass(frozen=True)
class Comparison:
    """The outcome of the rule for one challenger against one reference."""

    challenger: str
    reference: str
    challenger_median_us: float
    reference_median_us: float
    p_value: float
    gain: float  # 1 - challenger median / reference median; positive means faster
    beats: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "challenger": self.challenger,
            "reference": self.reference,
            "challenger_median_us": self.challenger_median_us,
            "reference_median_us": self.reference_median_us,
            "p_value": self.p_value,
            "gain": self.gain,
            "beats": self.beats,
        }


def compare_samples(
    challenger: Sequence[float],
    reference: Sequence[float],
    challenger_name: str = "challenger",
    reference_name: str = "reference",
) -> Comparison:
    """Apply the rule: does `challenger` beat `reference` beyond noise?

    A p-value that cannot be computed (empty or all-tied samples) counts as 1: no evidence.
    """
    p_value = stats.mann_whitney_p(challenger, reference, "less")
    c_med, r_med = stats.median(challenger), stats.median(reference)
    gain = 1.0 - c_med / r_med if r_med > 0 else 0.0
    beats = stats.significant(p_value) and gain >= MIN_GAIN
    return Comparison(challenger_name, reference_name, c_med, r_med, p_value, gain, beats)


@dataclass(frozen=True)
class Candidate:
    """A backend that may win at one batch size."""

    name: str
    backend_type: str
    fused: bool
    simplicity: int
    samples_us: tuple[float, ...]

    @property
    def median_us(self) -> float:
        return stats.median(self.samples_us)

    @property
    def order(self) -> tuple[int, str]:
        return (self.simplicity, self.name)


@dataclass(frozen=True)
class Choice:
    """The winner at one batch size, and why."""

    batch_size: int
    backend_name: str
    backend_type: str
    use_residual_rmsnorm_fusion: bool
    median_us: float
    reason: str
    default: str  # the reference the challengers had to beat
    default_is_standard: bool
    medians_us: dict[str, float]  # every candidate's fused-job median
    comparisons: tuple[Comparison, ...] = ()
    beaten: tuple[str, ...] = ()  # candidates the winner beat by the rule
    tied: tuple[str, ...] = ()  # faster candidates it tied with (within noise), if any

    def config_entry(self) -> ConfigEntry:
        return ConfigEntry(
            backend_type=self.backend_type,
            use_residual_rmsnorm_fusion=self.use_residual_rmsnorm_fusion,
            backend_name=self.backend_name,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "backend_name": self.backend_name,
            "backend_type": self.backend_type,
            "use_residual_rmsnorm_fusion": self.use_residual_rmsnorm_fusion,
            "median_us": self.median_us,
            "reason": self.reason,
            "default": self.default,
            "default_is_standard": self.default_is_standard,
            "candidate_medians_us": dict(sorted(self.medians_us.items())),
            "comparisons": [c.to_json() for c in self.comparisons],
            "beaten": list(self.beaten),
            "tied": list(self.tied),
        }


@dataclass
class Selection:
    """Winners per batch size for one GroupKey, with the reasons for sizes without one."""

    key: GroupKey
    device: str
    choices: dict[int, Choice] = field(default_factory=dict)
    no_winner: dict[int, str] = field(default_factory=dict)  # batch size -> why none
    # batch size -> backend -> why it was not a candidate there
    excluded: dict[int, dict[str, str]] = field(default_factory=dict)

    @property
    def batch_sizes(self) -> list[int]:
        """Every batch size that was considered, with or without a winner."""
        return sorted(set(self.choices) | set(self.no_winner))

    def winner(self, batch_size: int) -> str | None:
        choice = self.choices.get(batch_size)
        return choice.backend_name if choice else None

    def to_config(self) -> AllreduceConfig:
        """The server config: batch size -> entry, keys ascending.

        Raises `config.ConfigError` when no batch size has a winner (a config cannot be
        empty); `no_winner` says why.
        """
        return AllreduceConfig({bs: self.choices[bs].config_entry() for bs in sorted(self.choices)})

    def to_json(self) -> dict[str, Any]:
        return {
            "world_size": self.key.world_size,
            "hidden": self.key.hidden,
            "dtype": self.key.dtype,
            "device": self.device,
            "rule": {
                "job": SELECTION_JOB,
                "test": "one-sided Mann-Whitney U (challenger less than reference)",
                "p_value_max": stats.P_VALUE_MAX,
                "min_gain": MIN_GAIN,
                "standard_type": standard_type(self.device),
            },
            "choices": {str(bs): self.choices[bs].to_json() for bs in sorted(self.choices)},
            "no_winner": {str(bs): why for bs, why in sorted(self.no_winner.items())},
            "excluded": {
                str(bs): dict(sorted(why.items())) for bs, why in sorted(self.excluded.items())
            },
        }


def _exclusion(store: ResultStore, case: Case, loadable: frozenset[str]) -> str | None:
    """Why `case` cannot be a candidate, or None when it can."""
    name = case.target.backend
    availability = store.availability.get((name, case.target.world_size))
    if availability is not None and not availability.available:
        return f"unavailable: {availability.reason or 'no reason given'}"
    btype = store.server_type(name)
    if btype is None or btype not in loadable:
        return f"config type {btype!r} cannot be loaded by the server on {store.device}"
    if case not in store.verdicts and store.latency(case, SELECTION_JOB) is None:
        return "not checked or measured at this size"
    if (why := store.ineligibility(case)) is not None:
        return f"not eligible: {why}"
    latency = store.latency(case, SELECTION_JOB)
    if latency is None or not latency.samples_us:
        return f"no {SELECTION_JOB!r} latency samples"
    return None


def _pick(batch_size: int, candidates: list[Candidate], device: str) -> Choice:
    """Apply the rule to the candidates at one batch size (non-empty)."""
    candidates = sorted(candidates, key=lambda c: c.order)
    std = standard_type(device)
    standards = [c for c in candidates if c.backend_type == std]
    default = standards[0] if standards else candidates[0]
    medians = {c.name: c.median_us for c in candidates}
    by_name = {c.name: c for c in candidates}

    versus_default = [
        compare_samples(c.samples_us, default.samples_us, c.name, default.name)
        for c in candidates
        if c is not default
    ]
    challengers = [by_name[cmp.challenger] for cmp in versus_default if cmp.beats]
    default_label = "standard default" if standards else "default (no standard candidate)"

    def choice(
        winner: Candidate,
        reason: str,
        comparisons: list[Comparison],
        beaten: list[str],
        tied: list[str],
    ) -> Choice:
        return Choice(
            batch_size=batch_size,
            backend_name=winner.name,
            backend_type=winner.backend_type,
            use_residual_rmsnorm_fusion=fusion_flag(winner.fused, winner.backend_type),
            median_us=winner.median_us,
            reason=reason,
            default=default.name,
            default_is_standard=bool(standards),
            medians_us=medians,
            comparisons=tuple(comparisons),
            beaten=tuple(beaten),
            tied=tuple(tied),
        )

    if not challengers:
        if versus_default:
            best = min(versus_default, key=lambda c: c.challenger_median_us)
            detail = (
                f"; best other {best.challenger} at {best.challenger_median_us:.2f} us "
                f"(gain {best.gain:+.1%}, p={best.p_value:.3g}) is within noise"
            )
        else:
            detail = "; it is the only candidate"
        reason = f"{default_label} {default.name} kept at {default.median_us:.2f} us{detail}"
        return choice(default, reason, versus_default, [], [])

    fastest = min(challengers, key=lambda c: (c.median_us, c.order))
    simpler = [c for c in challengers if c.order < fastest.order]
    versus_simpler = [
        compare_samples(fastest.samples_us, c.samples_us, fastest.name, c.name) for c in simpler
    ]
    tied = [by_name[cmp.reference] for cmp in versus_simpler if not cmp.beats]
    comparisons = versus_default + versus_simpler
    beat_default = next(c for c in versus_default if c.challenger == fastest.name)
    if tied:
        winner = min(tied, key=lambda c: c.order)
        won = next(c for c in versus_default if c.challenger == winner.name)
        reason = (
            f"{winner.name} beat {default_label} {default.name} "
            f"({won.challenger_median_us:.2f} vs {won.reference_median_us:.2f} us, "
            f"gain {won.gain:.1%}, p={won.p_value:.3g}); the fastest, {fastest.name} at "
            f"{fastest.median_us:.2f} us, does not beat it beyond noise, so the simpler "
            f"backend wins the tie"
        )
        return choice(winner, reason, comparisons, [default.name], [fastest.name])

    reason = (
        f"{fastest.name} is the fastest challenger that beat {default_label} {default.name} "
        f"({fastest.median_us:.2f} vs {default.median_us:.2f} us, gain {beat_default.gain:.1%}, "
        f"p={beat_default.p_value:.3g})"
    )
    if versus_simpler:
        reason += "; it also beat every simpler challenger: " + ", ".join(
            f"{c.reference} (gain {c.gain:.1%}, p={c.p_value:.3g})" for c in versus_simpler
        )
    beaten = [default.name] + [c.reference for c in versus_simpler]
    return choice(fastest, reason, comparisons, beaten, [])


def select(
    store: ResultStore, key: GroupKey, batch_sizes: Iterable[int] | None = None
) -> Selection:
    """Pick the winner at every batch size measured for `key` (or the given ones)."""
    sizes = sorted(set(batch_sizes) if batch_sizes is not None else store.batch_sizes(key))
    loadable = loadable_types(store.device)
    selection = Selection(key=key, device=store.device)
    missing = store.missing_suites()
    for bs in sizes:
        candidates: list[Candidate] = []
        excluded: dict[str, str] = {}
        for case in store.cases(key, bs):
            why = _exclusion(store, case, loadable)
            if why is not None:
                excluded[case.target.backend] = why
                continue
            latency = store.latency(case, SELECTION_JOB)
            assert latency is not None  # _exclusion checked it
            info = store.variants[case.target.backend]
            candidates.append(
                Candidate(
                    name=info.name,
                    backend_type=info.server_type or "",
                    fused=info.fused,
                    simplicity=info.simplicity,
                    samples_us=tuple(float(s) for s in latency.samples_us),
                )
            )
        selection.excluded[bs] = excluded
        if candidates:
            selection.choices[bs] = _pick(bs, candidates, store.device)
            continue
        if missing:
            why = f"gating suite(s) {', '.join(missing)} did not run this session"
        elif excluded:
            why = "no candidate: " + "; ".join(f"{n}: {w}" for n, w in sorted(excluded.items()))
        else:
            why = "no backend was measured at this size"
        selection.no_winner[bs] = why
    return selection


def bisection_points(selection: Selection) -> list[int]:
    """Batch sizes to measure next so every crossover ends up between adjacent sizes.

    For each pair of neighbouring considered sizes whose winners differ (a size without a
    winner counts as its own value, so the edge of a region nobody covers is located too)
    and that are more than 1 apart: the midpoint (lo + hi) // 2. The midpoint always lies
    strictly between the two, so measuring it and repeating terminates.
    """
    sizes = selection.batch_sizes
    points = []
    for lo, hi in itertools.pairwise(sizes):
        if hi - lo > 1 and selection.winner(lo) != selection.winner(hi):
            points.append((lo + hi) // 2)
    return points


def worth_splitting(measured: Iterable[int], point: int) -> bool:
    """Whether `point` splits a crossover interval still wider than the resolution."""
    measured = set(measured)
    if point in measured:
        return False
    lower = max((m for m in measured if m < point), default=point)
    upper = min((m for m in measured if m > point), default=point)
    return upper - lower > max(2, int(lower * BISECTION_RESOLUTION))


def select_with_bisection(
    store: ResultStore,
    key: GroupKey,
    measure_size: Callable[[int], None],
    agree: Callable[[list[int]], list[int]] = lambda points: points,
) -> Selection:
    """Select, then measure the sizes bisection asks for and select again, until every
    crossover is resolved or the rounds run out. `measure_size(rows)` runs every check and
    timing at `rows`; `agree` makes all ranks of a torchrun job measure the same sizes."""
    chosen = select(store, key)
    for _ in range(MAX_BISECTION_ROUNDS):
        measured = store.batch_sizes(key)
        points = agree([p for p in bisection_points(chosen) if worth_splitting(measured, p)])
        if not points:
            break
        for rows in points:
            measure_size(rows)
        chosen = select(store, key)
    return chosen
