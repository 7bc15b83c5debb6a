"""The timing mechanism, on simulated devices: skew removal, rotation, equal samples, late
rounds; and the timing plan's parsing. (Per-op invariance in microseconds needs the GPU:
benchmarks/timing_invariance.py.)"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest

from pytest_allreduce.timing import (
    MIN_OPS_PER_SAMPLE,
    SLEEP_FACTOR,
    SLEEP_MARGIN_US,
    TIMING_ENV,
    TimingPlan,
    rotation,
    run_rounds,
)

ALIGN_US = 3.0


class FakeDevices:
    """Simulated GPUs, one per rank thread. Each has its own clock; a collective starts when
    the last rank arrives and every rank leaves it at the same moment."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        self.now = [0.0] * world_size
        self._arrived = [0.0] * world_size
        self._values: list[Any] = [None] * world_size
        self._barrier = threading.Barrier(world_size, timeout=30)

    def collective(self, rank: int, duration_us: float) -> None:
        self._arrived[rank] = self.now[rank]
        self._barrier.wait()
        start = max(self._arrived)
        self._barrier.wait()  # nobody overwrites an arrival before everyone has read them
        self.now[rank] = start + duration_us

    def gather(self, rank: int) -> Callable[[Any], list[Any]]:
        def exchange(value: Any) -> list[Any]:
            self._values[rank] = value
            self._barrier.wait()
            everyone = list(self._values)
            self._barrier.wait()
            return everyone

        return exchange


class FakeClock:
    """The Clock protocol on a simulated device. `late_by(rank, round)` delays the rank's
    device at the start of each round (a host that launched late); `host_us(rank, round)` is
    the host's queueing time the clock reports for the round."""

    def __init__(
        self,
        devices: FakeDevices,
        rank: int,
        late_by: Callable[[int, int], float],
        host_us: Callable[[int, int], float] = lambda rank, r: 10.0,
        aligns: bool = True,
    ) -> None:
        self.devices, self.rank = devices, rank
        self.late_by, self.host_us, self.aligns = late_by, host_us, aligns
        self.sleep_us = 1000.0
        self.rounds_begun = 0
        self.sleeps: list[float] = []

    def begin_round(self) -> None:
        self.devices.now[self.rank] += self.late_by(self.rank, self.rounds_begun)
        self.sleeps.append(self.sleep_us)
        self.rounds_begun += 1

    def align(self) -> None:
        if self.aligns:
            self.devices.collective(self.rank, ALIGN_US)

    def mark(self) -> float:
        return self.devices.now[self.rank]

    def end_round(self, pairs: list[tuple[Any, Any]]) -> tuple[list[float], float]:
        return [stop - start for start, stop in pairs], self.host_us(
            self.rank, self.rounds_begun - 1
        )

    def calibrate(self, host_us: float) -> None:
        self.sleep_us = SLEEP_FACTOR * host_us + SLEEP_MARGIN_US


def _replays(
    devices: FakeDevices, rank: int, op_us: list[float], ops: int, instances: int, log: list
) -> list[list[Callable[[], None]]]:
    """Candidate c's instance i runs `ops` collectives of op_us[c] each and logs itself."""

    def replay(c: int, i: int) -> Callable[[], None]:
        def run() -> None:
            log.append((c, i))
            for _ in range(ops):
                devices.collective(rank, op_us[c])

        return run

    return [[replay(c, i) for i in range(instances)] for c in range(len(op_us))]


def _run_ranks(
    plan: TimingPlan, op_us: list[float], make_clock: Callable[[FakeDevices, int], FakeClock]
) -> tuple[list[list[float]], list[FakeClock], list[list], list[int]]:
    """Run run_rounds on two simulated ranks; (per-op samples max over ranks, clocks, each
    rank's replay log, each rank's count of rounds still late)."""
    devices = FakeDevices(2)
    clocks = [make_clock(devices, r) for r in range(2)]
    logs: list[list] = [[], []]
    results: list[Any] = [None, None]
    errors: list[BaseException] = []

    def rank_main(rank: int) -> None:
        try:
            replays = _replays(
                devices, rank, op_us, plan.ops_per_sample, plan.instances, logs[rank]
            )
            results[rank] = run_rounds(clocks[rank], replays, plan, devices.gather(rank))
        except BaseException as exc:  # surfaced below, not lost in the thread
            errors.append(exc)
            devices._barrier.abort()

    threads = [threading.Thread(target=rank_main, args=(r,)) for r in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    samples = [
        [max(results[r][0][c][i] for r in range(2)) for i in range(plan.samples)]
        for c in range(len(op_us))
    ]
    return samples, clocks, logs, [results[r][1] for r in range(2)]


# ---- skew ------------------------------------------------------------------------------------


def _skewed(rank: int, round_index: int) -> float:
    # Rank 1's device starts every round late, by an amount that varies from round to round.
    return 0.0 if rank == 0 else 40.0 + 7.0 * (round_index % 5)


@pytest.mark.parametrize("ops", [10, 1000])
def test_aligned_samples_are_the_op_time_whatever_the_skew_and_op_count(ops: int) -> None:
    op_us = [6.5, 9.25]
    plan = TimingPlan(samples=6, ops_per_sample=ops, warmup=1, instances=2)
    samples, _, _, _ = _run_ranks(plan, op_us, lambda d, r: FakeClock(d, r, _skewed))
    for c, op in enumerate(op_us):
        assert samples[c] == pytest.approx([op] * plan.samples, rel=1e-12)


def test_launches_per_sample_divide_the_span_by_every_op_run() -> None:
    # nccl-tests' shape (one graph launched several times per timing): each sample covers
    # ops x launches ops, every launch of the round's instance, and is still the op time.
    op_us = [6.5, 9.25]
    plan = TimingPlan(samples=4, ops_per_sample=10, warmup=1, instances=2, launches=3)
    samples, _, logs, _ = _run_ranks(plan, op_us, lambda d, r: FakeClock(d, r, _skewed))
    for c, op in enumerate(op_us):
        assert samples[c] == pytest.approx([op] * plan.samples, rel=1e-12)
    first_round = logs[0][: len(op_us) * plan.launches]
    # Warm-up round -1: candidate 1 goes first (rotation), instance 1 (-1 % 2), 3 times each.
    assert first_round == [(1, 1)] * 3 + [(0, 1)] * 3
    assert len(logs[0]) == (plan.warmup + plan.samples) * len(op_us) * plan.launches


def test_without_alignment_the_skew_lands_in_the_samples() -> None:
    # The control: the same simulated skew, with the clock's alignment switched off, shows up
    # as skew / ops on every sample, so the test above would catch a lost alignment.
    op_us, ops = [6.5], 10
    plan = TimingPlan(samples=5, ops_per_sample=ops, warmup=1, instances=1)
    samples, _, _, _ = _run_ranks(plan, op_us, lambda d, r: FakeClock(d, r, _skewed, aligns=False))
    assert all(s > op_us[0] + 40.0 / ops - 1e-9 for s in samples[0]), samples


# ---- interleaving -----------------------------------------------------------------------------


def test_rotation_gives_every_candidate_every_position_equally_often() -> None:
    for candidates in (1, 2, 3, 5):
        positions = Counter(
            (c, pos) for r in range(candidates * 4) for pos, c in enumerate(rotation(candidates, r))
        )
        assert set(positions.values()) == {4}, positions
        assert all(sorted(rotation(candidates, r)) == list(range(candidates)) for r in range(9))


def test_every_candidate_gets_equal_samples_in_rotating_order_over_its_instances() -> None:
    plan = TimingPlan(samples=7, ops_per_sample=2, warmup=2, instances=3)
    op_us = [5.0, 6.0, 7.0]
    samples, _, logs, _ = _run_ranks(plan, op_us, lambda d, r: FakeClock(d, r, _skewed))
    assert [len(s) for s in samples] == [plan.samples] * 3
    assert logs[0] == logs[1]  # both ranks replay the same things in the same order
    rounds = [logs[0][k : k + 3] for k in range(0, len(logs[0]), 3)]
    assert len(rounds) == plan.warmup + plan.samples
    firsts = [rnd[0][0] for rnd in rounds]
    assert firsts == [(r % 3) for r in range(-plan.warmup, plan.samples)]  # rotating order
    for r, rnd in zip(range(-plan.warmup, plan.samples), rounds, strict=True):
        assert {i for _, i in rnd} == {r % plan.instances}  # instances taken in turn
    timed = Counter(c for rnd in rounds[plan.warmup :] for c, _ in rnd)
    assert set(timed.values()) == {plan.samples}


# ---- the sleep ---------------------------------------------------------------------------------


def test_sleep_is_calibrated_from_the_slowest_rank_of_the_last_warmup_round() -> None:
    plan = TimingPlan(samples=3, ops_per_sample=1, warmup=2, instances=1)

    def host(rank: int, round_index: int) -> float:
        return {0: 900.0, 1: 50.0 + 10 * rank}.get(round_index, 20.0)

    _, clocks, _, late = _run_ranks(
        plan, [5.0], lambda d, r: FakeClock(d, r, _skewed, host_us=host)
    )
    expected = SLEEP_FACTOR * 60.0 + SLEEP_MARGIN_US  # round 1, rank 1; not round 0's upload
    assert all(c.sleep_us == expected for c in clocks)
    assert late == [0, 0]


def test_late_rounds_are_timed_again_with_a_longer_sleep_on_every_rank() -> None:
    plan = TimingPlan(samples=4, ops_per_sample=1, warmup=1, instances=1)
    # Round 3 of the clock (timed round 2): rank 1's host took 5 ms to queue the round.
    slow = {"rank": 1, "round": 3}

    def host(rank: int, round_index: int) -> float:
        return 5000.0 if (rank, round_index) == (slow["rank"], slow["round"]) else 20.0

    samples, clocks, logs, late = _run_ranks(
        plan, [5.0, 8.0], lambda d, r: FakeClock(d, r, _skewed, host_us=host)
    )
    # warm-up + 4 timed rounds + round 2 again, on both ranks alike.
    assert all(c.rounds_begun == plan.warmup + plan.samples + 1 for c in clocks)
    assert logs[0] == logs[1]
    assert clocks[0].sleeps[-1] == SLEEP_FACTOR * 5000.0 + SLEEP_MARGIN_US
    assert late == [0, 0]
    assert [len(s) for s in samples] == [plan.samples] * 2


def test_rounds_late_again_are_counted() -> None:
    # A host that gets slower every round outruns even the lengthened sleep.
    plan = TimingPlan(samples=3, ops_per_sample=1, warmup=0, instances=1)
    _, clocks, _, late = _run_ranks(
        plan,
        [5.0],
        lambda d, r: FakeClock(d, r, _skewed, host_us=lambda rank, rnd: 10.0 ** (rnd + 4)),
    )
    assert late == [3, 3]
    assert all(c.rounds_begun == 6 for c in clocks)


# ---- the plan ----------------------------------------------------------------------------------


def test_plan_defaults_and_the_environment_override() -> None:
    cuda = TimingPlan.for_device("cuda", {})
    cpu = TimingPlan.for_device("cpu", {})
    assert cuda.instances > 1 and cuda.ops_per_sample > 1 and cpu.instances == 1
    changed = TimingPlan.for_device("cuda", {TIMING_ENV: "ops=1000, samples=10, launches=2"})
    assert (changed.ops_per_sample, changed.samples, changed.launches) == (1000, 10, 2)
    assert (changed.warmup, changed.instances) == (cuda.warmup, cuda.instances)


def test_large_messages_get_fewer_ops_per_sample_down_to_the_floor() -> None:
    """The CUDA plan halves its 32 ops while a sample would move more than 128 MiB, never
    below MIN_OPS_PER_SAMPLE; an op count set in the environment holds at every size unless
    `sample` is set too; the CPU plan's single op never changes."""
    cuda = TimingPlan.for_device("cuda", {})
    sizes = (8 << 10, 4 << 20, 5 << 20, 8 << 20, 16 << 20, 32 << 20, 64 << 20)
    assert [cuda.ops_for(n) for n in sizes] == [32, 32, 16, 16, 8, 4, 4]
    assert MIN_OPS_PER_SAMPLE == 4
    fixed = cuda.at(8 << 20)
    assert (fixed.ops_per_sample, fixed.sample_bytes) == (16, 0) and fixed.ops_for(64 << 20) == 16
    asked = TimingPlan.for_device("cuda", {TIMING_ENV: "ops=50"})
    assert [asked.ops_for(n) for n in sizes] == [50] * len(sizes)
    scaled = TimingPlan.for_device("cuda", {TIMING_ENV: "ops=64,sample=1M"})
    assert [scaled.ops_for(n) for n in (8 << 10, 256 << 10, 1 << 20)] == [64, 4, 4]
    cpu = TimingPlan.for_device("cpu", {})
    assert [cpu.ops_for(n) for n in sizes] == [1] * len(sizes)


def test_rotate_takes_bytes_and_gives_each_op_its_own_buffers_up_to_the_op_count() -> None:
    plan = TimingPlan.for_device("cuda", {TIMING_ENV: "ops=50,rotate=64M"})
    assert plan.rotate_bytes == 64 << 20
    # nccl-tests' pattern: op k at (k % (64 MiB / size)); distinct sets never exceed the ops.
    assert [plan.buffer_sets(n) for n in (8 << 10, 1 << 20, 2 << 20, 32 << 20, 64 << 20)] == [
        50, 50, 32, 2, 1,
    ]  # fmt: skip
    assert plan.buffer_sets(128 << 20) == 1
    assert TimingPlan.for_device("cuda", {}).buffer_sets(8 << 10) == 1  # default: no rotation
    assert TimingPlan.for_device("cpu", {TIMING_ENV: "rotate=4096"}).rotate_bytes == 4096


def test_memory_is_torch_unless_nccl_memory_is_asked_for_on_cuda() -> None:
    assert TimingPlan.for_device("cuda", {}).memory == "torch"
    plan = TimingPlan.for_device("cuda", {TIMING_ENV: "memory=ncclmem,rotate=64M"})
    assert (plan.memory, plan.rotate_bytes) == ("ncclmem", 64 << 20)
    with pytest.raises(ValueError, match="memory=ncclmem needs CUDA"):
        TimingPlan.for_device("cpu", {TIMING_ENV: "memory=ncclmem"})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rotate=64Q", "bad part 'rotate=64Q'"),
        ("memory=cudamalloc", "bad part 'memory=cudamalloc'"),
        ("ops=4K", "bad part 'ops=4K'"),
        ("rotate=-1", "rotate_bytes must be an integer >= 0"),
        ("ops=0", "ops_per_sample must be an integer >= 1"),
        ("samples=ten", "bad part 'samples=ten'"),
        ("rounds=3", "bad part 'rounds=3'"),
        ("launches=0", "launches must be an integer >= 1"),
        ("ops", "bad part 'ops'"),
        ("warmup=-1", "warmup must be an integer >= 0"),
        ("sample=2X", "bad part 'sample=2X'"),
        ("sample=-1", "sample_bytes must be an integer >= 0"),
    ],
)
def test_bad_plan_overrides_name_the_variable(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=TIMING_ENV) as info:
        TimingPlan.for_device("cpu", {TIMING_ENV: text})
    assert message in str(info.value)
