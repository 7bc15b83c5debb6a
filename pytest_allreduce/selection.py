"""Selection: which config entry the server should use at each batch size, and why.

What competes are config ENTRIES (a backend type and its fusion flag), because that is all a
config can ask of its reader. The consumer profile (`consumer.py`, through `serving.py`) says
what the reader runs for an entry at a size on this session's server: a variant, fused or
composed, after whatever its fallbacks declined. An entry is timed by the measured fused job
(allreduce + residual add + RMSNorm) of that variant at that size, and it may win there only
where that variant passed every gating suite at that size and the run is safe (an entry whose
run has a `hazard`, like FlashInfer's fusion past its workspace, is never written). Variants
the reader never runs (two-shot fusion, one-shot symmetric memory, FP8/FP4 outputs, ...) are
measured and reported, never chosen. The written `backend_name` is the variant that runs.

The rule, per (world size, hidden, dtype):

1. The default at each size is the standard entry ("nccl" on CUDA, "gloo" on the CPU) where it
   is eligible, else the simplest eligible entry. Entries are compared by
   ``l = ln(default median / entry median)``, with the noise model of `noise.py` (sampling,
   this session's roughness, and a stated run-to-run drift).
2. Segmentation: neighbouring sizes are split into segments, each run by one entry, by the
   assignment that maximises the summed log speed-up beyond MIN_GAIN minus a price per
   challenger segment of ``Z x`` the typical noise of one size's ratio (drift included), with
   every challenger segment holding at least MIN_RUN sizes where it gains more than MIN_GAIN.
   A segment must pay for itself beyond what noise alone can produce, so a single noisy size
   cannot flip the config back and forth, a slower size inside a winning run does not split
   it, and a segment does not stretch over sizes where it merely ties.
3. Each challenger segment must then win *as a whole*: its mean log speed-up must exceed
   ``Z x sqrt(mean size variance / k + drift^2)`` and be worth at least MIN_GAIN. A segment
   that does not reverts to the default.
4. Ties go to the simpler: within an accepted segment, a simpler entry that also wins there as
   a whole, and that the chosen one does not beat there as a whole, takes the segment.

Refinement (bisection) lives here too: the session measures the sizes `refinement_points`
names, so the config holds keys on both sides of every crossover and of every size limit of
the consumer (where an entry's run changes), and narrow wins get their neighbours measured
before they can count. And settling: at a size beside a change of choice, the choice is
one size's comparison against a threshold, so a run whose samples there land on the other
side writes another config. Where that comparison is within the sampling noise of its own
samples (`unsettled_sizes`), the session times the two entries meeting there again and
adds the samples, until it is not or the samples reach their cap.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from . import noise
from .config import AllreduceConfig, ConfigEntry
from .consumer import Entry, Run
from .model import GroupKey, Job, Target
from .noise import NoiseModel
from .results import ResultStore
from .serving import ServerState, UnknownServer, session_server

# A segment must be worth at least this relative gain over the default, however certain.
MIN_GAIN: float = 0.03
# The same as a log gain: sizes where a challenger gains less only tie with the default.
WORTH: float = -math.log(1.0 - MIN_GAIN)
# The fewest neighbouring sizes a challenger segment spans: one size alone cannot tell a real
# speed-up from a noisy measurement of its reference; where the grid leaves room, refinement
# measures the neighbours of such a narrow win instead.
MIN_RUN = 2
# Bisection stops after this many rounds per config even if crossovers remain wider...
MAX_BISECTION_ROUNDS = 6
# ... and does not split an interval narrower than this fraction of its lower end (at least 2
# rows): a server's nearest-key lookup gains nothing from finer keys.
BISECTION_RESOLUTION = 1 / 16
# Settling times the two entries at an unsettled size again, adding the plan's samples each
# time, until each has this many times the plan's samples there.
SETTLING_MAX_FACTOR = 4
# The job entries are timed on: the server's allreduce + residual add + RMSNorm.
SELECTION_JOB: Job = "fused"
# The config type of the always-available standard path, per device.
STANDARD_TYPE: dict[str, str] = {"cuda": "nccl", "cpu": "gloo"}


def standard_type(device: str) -> str:
    """The config type of the standard path on `device` ("nccl" on CUDA, "gloo" on CPU)."""
    return STANDARD_TYPE["cuda" if device == "cuda" else "cpu"]


def entry_label(entry: Entry) -> str:
    return f"{entry.backend_type} (fused)" if entry.fused else entry.backend_type


def describe_run(run: Run) -> str:
    """What the server runs, in words: variant, fused or composed, and what declined first."""
    text = f"{run.variant}, {'fused' if run.fused else 'composed'}"
    if run.declined:
        text += " (after " + "; ".join(run.declined) + ")"
    return text


# ---- per size: what each entry runs and how fast ---------------------------------------------


@dataclass(frozen=True)
class EntryTiming:
    """One config entry at one size: what the consumer runs, its time, whether it may win."""

    entry: Entry
    run: Run
    samples_us: tuple[float, ...]
    exclusion: str | None  # why it may not win here; None when eligible
    simplicity: int  # of the variant it runs (lower is simpler)

    @property
    def eligible(self) -> bool:
        return self.exclusion is None

    @property
    def median_us(self) -> float | None:
        from . import stats

        return stats.median(self.samples_us) if self.samples_us else None

    @property
    def se(self) -> float:
        return noise.log_median_se(self.samples_us)

    def to_json(self) -> dict[str, Any]:
        return {
            "entry": entry_label(self.entry),
            "backend_type": self.entry.backend_type,
            "use_residual_rmsnorm_fusion": self.entry.fused,
            "runs": self.run.variant,
            "fused": self.run.fused,
            "declined": list(self.run.declined),
            "input_copied": self.run.input_copied,
            "hazard": self.run.hazard,
            "median_us": self.median_us,
            "eligible": self.eligible,
            "why_not": self.exclusion,
        }


def _exclusion(store: ResultStore, target: Target, run: Run, rows: int) -> str | None:
    """Why the variant `run` names cannot stand for its entry at `rows`, or None."""
    name = run.variant
    if run.hazard is not None:
        return f"unsafe: {run.hazard}"
    if name not in store.variants:
        return f"runs {name}, which this session did not plan"
    availability = store.availability.get((name, target.world_size))
    if availability is not None and not availability.available:
        return f"runs {name}, unavailable: {availability.reason or 'no reason given'}"
    if store.fused(name) != run.fused:
        timed = "one fused kernel" if store.fused(name) else "composed"
        wanted = "fused" if run.fused else "composed"
        return f"runs {name} {wanted}, but its fused job was timed {timed}"
    case = target.at(rows)
    if case not in store.verdicts and store.latency(case, SELECTION_JOB) is None:
        return f"runs {name}, not checked or measured at this size"
    if (why := store.ineligibility(case)) is not None:
        return f"runs {name}, not eligible: {why}"
    latency = store.latency(case, SELECTION_JOB)
    if latency is None or not latency.samples_us:
        return f"runs {name}, no {SELECTION_JOB!r} latency samples"
    return None


def entry_timings(
    store: ResultStore, key: GroupKey, state: ServerState, rows: int
) -> list[EntryTiming]:
    """Every entry of the profile at `rows`, in the profile's order."""
    timings = []
    for entry in state.profile.entries:
        run = state.runs(entry, rows)
        target = Target(run.variant, key.world_size, key.hidden, key.dtype)
        why = _exclusion(store, target, run, rows)
        latency = store.latency(target.at(rows), SELECTION_JOB)
        samples = tuple(float(s) for s in latency.samples_us) if latency else ()
        info = store.variants.get(run.variant)
        timings.append(EntryTiming(entry, run, samples, why, info.simplicity if info else 99))
    return timings


# ---- the decision ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Segment:
    """Neighbouring sizes a challenger entry was tested on as a whole."""

    entry: Entry
    sizes: tuple[int, ...]
    mean_log_gain: float  # mean over the sizes of ln(reference median / entry median)
    sigma: float  # noise of that mean (noise.NoiseModel.segment_sigma)
    reference: str  # what it was compared with: "the default", or a simpler entry
    accepted: bool
    why: str

    @property
    def gain(self) -> float:
        """1 - (geometric-mean time ratio): 0.2 means 20% faster."""
        return 1.0 - math.exp(-self.mean_log_gain)

    @property
    def z(self) -> float:
        return self.mean_log_gain / self.sigma if self.sigma > 0 else math.inf

    def to_json(self) -> dict[str, Any]:
        return {
            "entry": entry_label(self.entry),
            "sizes": list(self.sizes),
            "reference": self.reference,
            "mean_log_gain": self.mean_log_gain,
            "gain": self.gain,
            "sigma": self.sigma,
            "z": self.z,
            "accepted": self.accepted,
            "why": self.why,
        }


@dataclass(frozen=True)
class Unsettled:
    """A size beside a change of choice where the choice between the two entries meeting
    there is within the sampling noise of their samples at that size."""

    rows: int
    variants: tuple[str, str]  # what the two entries run there: the cases to time again
    margin: float  # how far the choice clears its threshold, in log units
    sigma: float  # the sampling error of that margin
    samples: int  # the fewer samples of the two there

    def to_json(self) -> dict[str, Any]:
        return {
            "variants": list(self.variants),
            "margin": self.margin,
            "sigma": self.sigma,
            "z": self.margin / self.sigma if self.sigma > 0 else math.inf,
            "samples": self.samples,
        }


@dataclass(frozen=True)
class Choice:
    """What the server runs at one batch size, and why."""

    batch_size: int
    timing: EntryTiming  # the chosen entry and what it runs
    reason: str
    default: Entry  # the reference challengers had to beat here
    default_is_standard: bool
    segment: Segment | None = None  # the accepted segment, when a challenger won

    @property
    def entry(self) -> Entry:
        return self.timing.entry

    @property
    def run(self) -> Run:
        return self.timing.run

    @property
    def backend_name(self) -> str:
        return self.timing.run.variant

    @property
    def backend_type(self) -> str:
        return self.timing.entry.backend_type

    @property
    def use_residual_rmsnorm_fusion(self) -> bool:
        return self.timing.entry.fused

    @property
    def median_us(self) -> float:
        median = self.timing.median_us
        assert median is not None  # a chosen entry was eligible, so it has samples
        return median

    def config_entry(self) -> ConfigEntry:
        return ConfigEntry(
            backend_type=self.backend_type,
            use_residual_rmsnorm_fusion=self.use_residual_rmsnorm_fusion,
            backend_name=self.backend_name,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "entry": entry_label(self.entry),
            "backend_name": self.backend_name,
            "backend_type": self.backend_type,
            "use_residual_rmsnorm_fusion": self.use_residual_rmsnorm_fusion,
            "runs": describe_run(self.run),
            "median_us": self.median_us,
            "reason": self.reason,
            "default": entry_label(self.default),
            "default_is_standard": self.default_is_standard,
            "segment": self.segment.to_json() if self.segment else None,
        }


@dataclass
class Selection:
    """What runs at each considered batch size of one GroupKey, with every reason."""

    key: GroupKey
    device: str
    state: ServerState | None = None
    noise: NoiseModel | None = None
    choices: dict[int, Choice] = field(default_factory=dict)
    no_winner: dict[int, str] = field(default_factory=dict)  # batch size -> why none
    timings: dict[int, list[EntryTiming]] = field(default_factory=dict)
    segments: list[Segment] = field(default_factory=list)  # every challenger segment tested
    # sizes where one entry won beyond noise alone, too narrowly to count yet
    narrow_wins: dict[int, str] = field(default_factory=dict)
    segment_price: float = 0.0  # what a challenger segment must pay for itself (log units)
    # sizes beside a change of choice still decided within sampling noise after settling
    unsettled: dict[int, Unsettled] = field(default_factory=dict)

    @property
    def batch_sizes(self) -> list[int]:
        """Every batch size that was considered, with or without a winner."""
        return sorted(set(self.choices) | set(self.no_winner))

    def winner(self, batch_size: int) -> str | None:
        """The variant the server runs at `batch_size` (the written backend_name)."""
        choice = self.choices.get(batch_size)
        return choice.backend_name if choice else None

    def excluded(self, batch_size: int) -> dict[str, str]:
        """Entry label -> why it could not win at `batch_size`."""
        return {
            entry_label(t.entry): t.exclusion
            for t in self.timings.get(batch_size, [])
            if t.exclusion is not None
        }

    def config_keys(self) -> list[int]:
        """The sizes the config holds: the smallest and largest with a winner, both sides of
        every change of what runs, and both sides of every consumer size limit in between.

        A size between two kept keys that run the same thing changes no nearest-key lookup,
        so it is left out: the file then depends only on the decisions, not on which sizes
        refinement happened to measure, and two runs that decide alike write the same file.
        Every measured size stays in the report and the evidence.
        """
        sizes = sorted(self.choices)
        if not sizes:
            return []
        keep = {sizes[0], sizes[-1]} | set(stop_points(self, sizes[-1])) & set(sizes)
        for lo, hi in itertools.pairwise(sizes):
            if _what_runs(self, lo) != _what_runs(self, hi):
                keep |= {lo, hi}
        return sorted(keep)

    def to_config(self) -> AllreduceConfig:
        """The server config over `config_keys`, ascending (the consumer breaks ties by file
        order). Raises `config.ConfigError` when no batch size has a winner."""
        return AllreduceConfig({bs: self.choices[bs].config_entry() for bs in self.config_keys()})

    def to_json(self) -> dict[str, Any]:
        return {
            "world_size": self.key.world_size,
            "hidden": self.key.hidden,
            "dtype": self.key.dtype,
            "device": self.device,
            "consumer": self.state.to_json() if self.state else None,
            "rule": rule_json(self.device, self.noise, self.segment_price),
            "choices": {str(bs): self.choices[bs].to_json() for bs in sorted(self.choices)},
            "no_winner": {str(bs): why for bs, why in sorted(self.no_winner.items())},
            "entries": {
                str(bs): [t.to_json() for t in self.timings[bs]] for bs in sorted(self.timings)
            },
            "segments": [s.to_json() for s in self.segments],
            "narrow_wins": {str(bs): why for bs, why in sorted(self.narrow_wins.items())},
            "unsettled": {str(bs): u.to_json() for bs, u in sorted(self.unsettled.items())},
        }


def rule_json(device: str, model: NoiseModel | None, segment_price: float) -> dict[str, Any]:
    return {
        "job": SELECTION_JOB,
        "standard_type": standard_type(device),
        "compared": "config entries, each timed by the variant the consumer runs for it",
        "statistic": "mean over neighbouring sizes of ln(default median / entry median)",
        "min_gain": MIN_GAIN,
        "min_run": MIN_RUN,
        "segment_price": segment_price,
        "noise": model.to_json() if model else None,
    }


def _rank(t: EntryTiming, standard: str, order: dict[Entry, int]) -> tuple[int, int, int]:
    """Lower is simpler: the standard entry, then the simpler variant, then profile order."""
    return (t.entry.backend_type != standard, t.simplicity, order[t.entry])


@dataclass(frozen=True)
class _Size:
    """One size with at least one eligible entry, as the segmentation sees it."""

    rows: int
    default: EntryTiming
    default_is_standard: bool
    eligible: dict[Entry, EntryTiming]

    def challenges(self, entry: Entry) -> bool:
        """Eligible here and running something other than the default: an entry that runs
        what the default runs is the default's path under another name, never a challenger."""
        mine = self.eligible.get(entry)
        return mine is not None and (mine.run.variant, mine.run.fused) != (
            self.default.run.variant,
            self.default.run.fused,
        )

    def log_gain(self, entry: Entry, over: Entry | None = None) -> float:
        ref = self.eligible[over] if over is not None else self.default
        mine = self.eligible[entry]
        return math.log(ref.median_us / mine.median_us)  # type: ignore[operator]

    def variance(self, model: NoiseModel, entry: Entry, over: Entry | None = None) -> float:
        ref = self.eligible[over] if over is not None else self.default
        mine = self.eligible[entry]
        return model.size_variance(mine.se, ref.se, mine.run.variant, ref.run.variant)


def _segment_test(
    sizes: list[_Size], entry: Entry, model: NoiseModel, over: Entry | None, reference: str
) -> Segment:
    gains = [s.log_gain(entry, over) for s in sizes]
    mean = sum(gains) / len(gains)
    sigma = model.segment_sigma([s.variance(model, entry, over) for s in sizes])
    gain = 1.0 - math.exp(-mean)
    rows = tuple(s.rows for s in sizes)
    if mean < noise.Z * sigma:
        why = (
            f"{gain:+.1%} over {reference} is within noise "
            f"(z = {mean / sigma:.2f} < {noise.Z:.2f}; sigma {sigma:.3f})"
        )
        return Segment(entry, rows, mean, sigma, reference, False, why)
    if gain < MIN_GAIN:
        why = f"{gain:+.1%} over {reference} is real but below the {MIN_GAIN:.0%} worth a switch"
        return Segment(entry, rows, mean, sigma, reference, False, why)
    why = (
        f"{gain:.1%} faster than {reference} over {len(rows)} sizes "
        f"(z = {mean / sigma:.2f} >= {noise.Z:.2f}; sigma {sigma:.3f})"
    )
    return Segment(entry, rows, mean, sigma, reference, True, why)


def _segmentation(chain: list[_Size], challengers: list[Entry], price: float) -> list[Entry | None]:
    """The label per size (None: the default) that maximises, over the challenger sizes,
    the log gain beyond WORTH (the gain worth a switch at all), minus `price` for every
    challenger run started, where every challenger run holds at least MIN_RUN sizes at which
    it gains more than WORTH. So a slower size inside a winning run costs less than a second
    run and does not split it; a run is not stretched over sizes where it merely ties; and
    one fast size next to a slow one is not a run. Optimal partitioning by dynamic
    programming; a state is (label, the count of such sizes in its run so far, capped)."""
    labels: list[Entry | None] = [None, *challengers]
    State = tuple[Entry | None, int]
    best: list[dict[State, tuple[float, State | None]]] = []
    for i, size in enumerate(chain):
        here: dict[State, tuple[float, State | None]] = {}
        for label in labels:
            if label is None:
                gain, faster = 0.0, MIN_RUN
            elif size.challenges(label):
                gain = size.log_gain(label) - WORTH
                faster = int(gain > 0)
            else:
                continue
            start = 0.0 if label is None else price
            options: list[tuple[float, State, State | None]] = []
            if i == 0:
                options.append((gain - start, (label, faster), None))
            for prev, (score, _) in best[-1].items() if i else ():
                if prev[0] == label:
                    state = (label, min(prev[1] + faster, MIN_RUN))
                    options.append((score + gain, state, prev))
                elif prev[1] >= MIN_RUN:
                    options.append((score + gain - start, (label, faster), prev))
            for candidate, state, prev in options:
                if candidate > here.get(state, (-math.inf, None))[0]:
                    here[state] = (candidate, prev)
        best.append(here)
    finals = {state: score for state, (score, _) in best[-1].items() if state[1] >= MIN_RUN}
    state: State | None = max(finals, key=lambda st: (finals[st], st[0] is None))
    out: list[Entry | None] = []
    for i in range(len(chain) - 1, -1, -1):
        assert state is not None
        out.append(state[0])
        state = best[i][state][1]
    return out[::-1]


def _runs_of(labels: list[Entry | None]) -> list[tuple[Entry | None, int, int]]:
    """(label, start, stop) of each maximal run of equal labels."""
    runs = []
    start = 0
    for i in range(1, len(labels) + 1):
        if i == len(labels) or labels[i] != labels[start]:
            runs.append((labels[start], start, i))
            start = i
    return runs


def select(
    store: ResultStore, key: GroupKey, batch_sizes: Iterable[int] | None = None
) -> Selection:
    """What runs at every batch size timed for `key` (or the given ones), and why."""
    sizes = sorted(set(batch_sizes) if batch_sizes is not None else store.batch_sizes(key))
    selection = Selection(key=key, device=store.device)
    try:
        state = session_server(store, key)
    except UnknownServer as exc:
        selection.no_winner = dict.fromkeys(sizes, str(exc))
        return selection
    selection.state = state
    curves: dict[str, dict[int, float]] = {}
    for (case, job), latency in store.latencies.items():
        if job == SELECTION_JOB and case.target.group_key == key and latency.samples_us:
            curves.setdefault(case.target.backend, {})[case.batch_size] = latency.median_us
    model = NoiseModel.for_session(store.device, curves)
    selection.noise = model

    standard = standard_type(store.device)
    order = {e: i for i, e in enumerate(state.profile.entries)}
    missing = store.missing_suites()
    chains: list[list[_Size]] = [[]]
    for rows in sizes:
        timings = entry_timings(store, key, state, rows)
        selection.timings[rows] = timings
        eligible = sorted(
            (t for t in timings if t.eligible), key=lambda t: _rank(t, standard, order)
        )
        if not eligible:
            if missing:
                why = f"gating suite(s) {', '.join(missing)} did not run this session"
            else:
                why = "no eligible entry: " + "; ".join(
                    f"{entry_label(t.entry)}: {t.exclusion}" for t in timings
                )
            selection.no_winner[rows] = why
            if chains[-1]:
                chains.append([])
            continue
        default = eligible[0]
        chains[-1].append(
            _Size(
                rows,
                default,
                default.entry.backend_type == standard,
                {t.entry: t for t in eligible},
            )
        )

    challengers = [e for e in state.profile.entries if e.backend_type != standard]
    # A segment must pay for itself beyond what noise can make of one size's ratio: the typical
    # variance of a challenger's ratio at one size, drift included.
    variances = sorted(
        s.variance(model, e)
        for chain in chains
        for s in chain
        for e in s.eligible
        if s.challenges(e)
    )
    typical = variances[len(variances) // 2] if variances else 0.0
    selection.segment_price = noise.Z * math.sqrt(typical + model.drift**2)
    for chain in chains:
        if chain:
            _decide_chain(selection, chain, challengers, model, standard, order)
    return selection


def _decide_chain(
    selection: Selection,
    chain: list[_Size],
    challengers: list[Entry],
    model: NoiseModel,
    standard: str,
    order: dict[Entry, int],
) -> None:
    labels = _segmentation(chain, challengers, selection.segment_price)
    for label, start, stop in _runs_of(labels):
        part = chain[start:stop]
        if label is None:
            for size in part:
                selection.choices[size.rows] = _default_choice(size, selection, model)
            continue
        tested = _segment_test(part, label, model, None, "the default")
        selection.segments.append(tested)
        if not tested.accepted:
            for size in part:
                selection.choices[size.rows] = _default_choice(size, selection, model, tested)
            continue
        winner, won = label, tested
        simpler = sorted(
            (
                e
                for e in challengers
                if e != label
                and all(e in s.eligible for s in part)
                and _rank(part[0].eligible[e], standard, order)
                < _rank(part[0].eligible[label], standard, order)
            ),
            key=lambda e: _rank(part[0].eligible[e], standard, order),
        )
        for other in simpler:
            own = _segment_test(part, other, model, None, "the default")
            if not own.accepted:
                continue
            versus = _segment_test(part, label, model, other, entry_label(other))
            selection.segments += [own, versus]
            if not versus.accepted:
                winner, won = other, own
                break
        for size in part:
            timing = size.eligible[winner]
            reason = f"{entry_label(winner)} runs {describe_run(timing.run)}; {won.why}"
            if winner != label:
                reason += (
                    f"; {entry_label(label)} was faster but not beyond noise, so the simpler "
                    "entry wins the tie"
                )
            selection.choices[size.rows] = Choice(
                size.rows, timing, reason, size.default.entry, size.default_is_standard, won
            )
    _note_narrow_wins(selection, chain, challengers, model)


def _default_choice(
    size: _Size, selection: Selection, model: NoiseModel, rejected: Segment | None = None
) -> Choice:
    label = "standard default" if size.default_is_standard else "default (no standard entry)"
    default = size.default
    reason = f"{label} {entry_label(default.entry)} runs {describe_run(default.run)}"
    if rejected is not None:
        reason += (
            f"; {entry_label(rejected.entry)} was tested over sizes "
            f"{rejected.sizes[0]}-{rejected.sizes[-1]}: {rejected.why}"
        )
    else:
        others = [e for e in size.eligible if e != default.entry]
        if others:
            best = max(others, key=lambda e: size.log_gain(e))
            gain = 1.0 - math.exp(-size.log_gain(best))
            reason += (
                f"; best other {entry_label(best)} ({gain:+.1%} here) does not win a run of "
                "neighbouring sizes beyond noise"
            )
        else:
            reason += "; the only eligible entry"
    return Choice(size.rows, default, reason, default.entry, size.default_is_standard)


def _note_narrow_wins(
    selection: Selection, chain: list[_Size], challengers: list[Entry], model: NoiseModel
) -> None:
    """Sizes where a challenger beats what was chosen beyond noise at that size alone, but
    that no accepted segment covers: refinement measures their neighbourhood."""
    for size in chain:
        choice = selection.choices[size.rows]
        for entry in challengers:
            if entry == choice.entry or not size.challenges(entry):
                continue
            gain = size.log_gain(entry) - size.log_gain(choice.entry)
            sigma = math.sqrt(size.variance(model, entry) + model.drift**2)
            if gain >= noise.Z * sigma and 1.0 - math.exp(-gain) >= MIN_GAIN:
                selection.narrow_wins[size.rows] = (
                    f"{entry_label(entry)} {1.0 - math.exp(-gain):.1%} faster here alone "
                    f"(z = {gain / sigma:.2f}); fewer than {MIN_RUN} neighbouring sizes confirm it"
                )
                break


# ---- refinement ------------------------------------------------------------------------------


def _what_runs(selection: Selection, rows: int) -> tuple[Any, ...] | None:
    choice = selection.choices.get(rows)
    if choice is None:
        return None
    return (choice.entry, choice.run.variant, choice.run.fused)


def stop_points(selection: Selection, largest: int) -> list[int]:
    """Both sides of every size limit of the consumer below `largest`: where some entry's run
    changes, the config needs a key on each side so the lookup never carries an entry across."""
    if selection.state is None:
        return []
    state = selection.state
    points = set()
    for entry in state.profile.entries:
        for stop in state.profile.stops(entry, state.server):
            if stop.max_rows < largest:
                points |= {stop.max_rows, stop.max_rows + 1}
    return sorted(points)


def refinement_points(selection: Selection, measured: Iterable[int], largest: int) -> list[int]:
    """Sizes to measure next, ascending (none of them in `measured`):

    - both sides of every consumer size limit below `largest`;
    - the midpoint of every pair of neighbouring considered sizes that run different things
      (a size without a winner counts as its own value, so the edge of a region nobody
      covers is located too), while the pair is wider than the resolution and the change
      between them is resolved (`change_resolved`);
    - the midpoints of the gaps beside a narrow win (see `Selection.narrow_wins`), so that
      a real speed-up gets neighbours that can confirm it, under the same resolution.
    """
    measured = set(measured)
    splits = set()
    sizes = selection.batch_sizes
    for lo, hi in itertools.pairwise(sizes):
        if _what_runs(selection, lo) != _what_runs(selection, hi) and change_resolved(
            selection, lo, hi
        ):
            splits.add((lo + hi) // 2)
    for rows in selection.narrow_wins:
        i = sizes.index(rows)
        if i > 0:
            splits.add((sizes[i - 1] + rows) // 2)
        if i + 1 < len(sizes):
            splits.add((rows + sizes[i + 1]) // 2)
    points = {p for p in splits if worth_splitting(measured, p)}
    points |= set(stop_points(selection, largest))
    return sorted(points - measured)


def change_resolved(selection: Selection, lo: int, hi: int) -> bool:
    """Whether the change of choice between neighbouring sizes `lo` and `hi` is beyond noise:
    the log ratio of the two chosen entries moves between the sizes by more than Z times the
    noise of the two sizes' ratios (`NoiseModel.size_variance`).

    Where it does not, the data cannot tell where between the two sizes one entry overtakes
    the other, and a midpoint would be decided by noise alone: bisection there only moves the
    config's keys from run to run (it did on the CPU, by up to 520 tokens between runs).
    The keys stay on the two measured sizes, whose choices stand. A change with no ratio to
    test (a size without a winner, one entry on both sides whose run changes, an entry not
    timed at both sizes) is always taken as resolved."""
    first, second = selection.choices.get(lo), selection.choices.get(hi)
    model = selection.noise
    if first is None or second is None or model is None or first.entry == second.entry:
        return True  # no winner on one side, or one entry whose run changes (a limit)
    ratios = []
    for rows in (lo, hi):
        timed = {t.entry: t for t in selection.timings.get(rows, ()) if t.eligible}
        a, b = timed.get(first.entry), timed.get(second.entry)
        if a is None or b is None or not a.median_us or not b.median_us:
            return True
        variance = model.size_variance(a.se, b.se, a.run.variant, b.run.variant)
        ratios.append((math.log(b.median_us / a.median_us), variance))
    (at_lo, var_lo), (at_hi, var_hi) = ratios
    return abs(at_lo - at_hi) > noise.Z * math.sqrt(var_lo + var_hi)


def unsettled_sizes(selection: Selection) -> dict[int, Unsettled]:
    """Sizes beside a change of entry (on either side of it) where the choice between the
    two entries meeting there is within the sampling noise of their samples at that size.

    What decides such a size is the segmentation's per-size score: a challenger's log gain
    over the default less WORTH, the default's 0. Between the entries A and B meeting at a
    change, the score difference at a size is ``ln(t_B / t_A)``, less WORTH for each side
    that is a challenger there; the choice is settled where that clears Z times the
    standard error of the two medians (`noise.log_median_se`). Anything else (a slow
    neighbour, the drift of the whole run) moves both sides of a choice alike and more
    samples here cannot remove it; the sampling error is what makes two runs land on either
    side. A change of one entry's run (a consumer size limit) decides nothing and is skipped.
    """
    found: dict[int, Unsettled] = {}
    sizes = sorted(selection.choices)
    for lo, hi in itertools.pairwise(sizes):
        first, second = selection.choices[lo], selection.choices[hi]
        if first.entry == second.entry:
            continue
        for rows in (lo, hi):
            timed = {t.entry: t for t in selection.timings.get(rows, ()) if t.eligible}
            a, b = timed.get(first.entry), timed.get(second.entry)
            default = timed.get(selection.choices[rows].default)
            if a is None or b is None or default is None or not a.median_us or not b.median_us:
                continue
            runs_default = (default.run.variant, default.run.fused)
            a_challenges = (a.run.variant, a.run.fused) != runs_default
            b_challenges = (b.run.variant, b.run.fused) != runs_default
            if not (a_challenges or b_challenges):
                continue  # both run the default's path: no choice is made here
            margin = math.log(b.median_us / a.median_us)
            margin += WORTH * (int(b_challenges) - int(a_challenges))
            if rows == hi:
                margin = -margin  # positive: the side chosen here is the one its score favours
            sigma = math.hypot(a.se, b.se)
            if abs(margin) < noise.Z * sigma:
                found[rows] = Unsettled(
                    rows,
                    (a.run.variant, b.run.variant),
                    margin,
                    sigma,
                    min(len(a.samples_us), len(b.samples_us)),
                )
    return found


def worth_splitting(measured: Iterable[int], point: int) -> bool:
    """Whether `point` splits an interval of measured sizes still wider than the resolution."""
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
    settle: Callable[[list[Unsettled]], list[int]] = lambda unsettled: [],
) -> Selection:
    """Select, then measure the sizes refinement asks for, settle the unsettled ones and
    select again, until nothing is left to refine or settle, or the rounds run out.
    `measure_size(rows)` runs every check and timing at `rows`; `settle(unsettled)` times the
    entries of each again, adding samples, and returns the sizes where it did (none once
    the samples reach their cap); `agree` makes all ranks of a torchrun job measure the same
    sizes. Consumer size limits are refined up to the largest size the plan timed."""
    chosen = select(store, key)
    largest = max(store.batch_sizes(key), default=0)
    # A size whose measurement gave no timing (every variant failed a check there) is not
    # timed, but it was tried: it must not be asked for again.
    tried = set(store.batch_sizes(key))
    for _ in range(MAX_BISECTION_ROUNDS):
        points = agree(refinement_points(chosen, tried, largest))
        settled = settle(list(unsettled_sizes(chosen).values()))
        if not points and not settled:
            break
        for rows in points:
            measure_size(rows)
        tried |= set(points) | set(store.batch_sizes(key))
        chosen = select(store, key)
    chosen.unsettled = unsettled_sizes(chosen)
    return chosen
