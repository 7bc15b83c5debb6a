"""Engine-level availability: decided before any rank is asked where the reason is known."""

from __future__ import annotations

from pathlib import Path

import pytest

from pytest_allreduce.backend import Backend, Limits, VariantSpec
from pytest_allreduce.model import Target
from pytest_allreduce.options import Options
from pytest_allreduce.plan import Plan
from pytest_allreduce.registry import BackendRegistry
from pytest_allreduce.selection import worth_splitting
from pytest_allreduce.session import AllreduceSession


class _NeedsMulticast(Backend):
    name = "needs_multicast_test"
    variants = (VariantSpec(),)

    @classmethod
    def limits(cls, variant, world_size):
        return Limits(device="cpu", dtypes=("bfloat16",), needs_multicast=True)

    @classmethod
    def probe(cls, ctx, variant):
        raise AssertionError("a multicast backend was probed while multicast is off")

    def setup(self):
        raise AssertionError("a multicast backend was set up while multicast is off")

    def _all_reduce(self, inp, out):
        raise AssertionError("unreachable")


def _session(backends: tuple[str, ...], world_sizes: tuple[int, ...] = (2,)) -> AllreduceSession:
    registry = BackendRegistry()
    registry.load_builtins()
    registry.register(_NeedsMulticast)
    options = Options(
        backends=backends,
        device="cpu",
        world_sizes=world_sizes,
        hidden_sizes=(64,),
        batch_sizes=(1,),
        dtypes=("bfloat16",),
        output_dir=Path("unused"),
        timeout_s=10,
        baseline=None,
        save_baseline=None,
    )
    return AllreduceSession(options, Plan.build(options, registry), registry)


@pytest.mark.parametrize(
    "switch",
    ["NCCL_NVLS_ENABLE=0", "TORCH_SYMM_MEM_DISABLE_MULTICAST=1", "NVSHMEM_DISABLE_NVLS=1"],
)
def test_multicast_backends_are_refused_without_being_probed(
    monkeypatch: pytest.MonkeyPatch, switch: str
) -> None:
    for name in ("NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS"):
        monkeypatch.delenv(name, raising=False)
    name, value = switch.split("=")
    monkeypatch.setenv(name, value)
    session = _session(("needs_multicast_test",))
    verdict = session.engine.known_availability(Target("needs_multicast_test", 2, 64, "bfloat16"))
    assert not verdict.available
    assert "needs NVLink multicast" in verdict.reason and switch in verdict.reason
    # Recorded for the backend matrix, and no pool was started to find this out.
    assert session.store.availability[("needs_multicast_test", 2)] is verdict
    assert session.engine.pool_starts == 0


def test_device_mismatch_is_refused_by_the_engine() -> None:
    session = _session(("nccl", "gloo"))
    nccl = session.engine.known_availability(Target("nccl", 2, 64, "bfloat16"))
    assert not nccl.available and nccl.reason == "a cuda backend; this session runs on cpu"
    assert session.engine.known_availability(Target("gloo", 2, 64, "bfloat16")).available


def test_bisection_resolution() -> None:
    assert worth_splitting([128, 512], 320)
    assert not worth_splitting([128, 512], 128)  # already measured
    assert worth_splitting([128, 140], 134)  # 12 rows > 128 / 16
    assert not worth_splitting([128, 134], 131)  # 6 rows <= 8
    assert not worth_splitting([1, 3], 2)  # never below 2 rows
