"""The registry (built-ins, entry points, name resolution) and the latency figures."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from pytest_allreduce import registry as registry_module
from pytest_allreduce.backend import Backend, Limits, VariantSpec
from pytest_allreduce.model import Latency, Target
from pytest_allreduce.registry import BackendRegistry


class _Plain(Backend):
    name = "plain_test"
    variants = (VariantSpec("fast", server_type="gloo"), VariantSpec("slow", server_type="gloo"))

    @classmethod
    def limits(cls, variant, world_size):
        return Limits(device="cpu", dtypes=("float32",))

    @classmethod
    def probe(cls, ctx, variant):
        return None

    def setup(self):
        pass

    def _all_reduce(self, inp, out):
        out.copy_(inp)


def test_builtins_resolve_by_backend_name_and_variant_name() -> None:
    registry = BackendRegistry()
    registry.load_builtins()
    names = [v.name for v in registry.resolve(["torch_symm_mem"])]
    assert names == [
        "torch_symm_mem_one_shot",
        "torch_symm_mem_two_shot",
        "torch_symm_mem_multimem",
    ]
    assert [v.name for v in registry.resolve(["torch_symm_mem_two_shot", "gloo"])] == [
        "gloo",
        "torch_symm_mem_two_shot",
    ]
    assert {"gloo", "cpu_shm", "nccl", "flashinfer_fusion_one_shot"} <= set(
        v.name for v in registry.resolve(["all"])
    )


def test_unknown_names_are_all_reported() -> None:
    registry = BackendRegistry()
    registry.load_builtins()
    with pytest.raises(ValueError, match="unknown backend\\(s\\): ncl, symm"):
        registry.resolve(["ncl", "gloo", "symm"])


def test_a_name_registered_twice_by_different_classes_is_refused() -> None:
    registry = BackendRegistry()
    registry.register(_Plain)
    registry.register(_Plain)  # the same class again is harmless

    class Other(_Plain):
        name = "plain_test"

    with pytest.raises(ValueError, match="registered twice"):
        registry.register(Other)
    with pytest.raises(TypeError, match="not a pytest_allreduce Backend"):
        registry.register(object)  # type: ignore[arg-type]

    class Undeclared(_Plain):
        name = "undeclared_test"
        variants = ("fast",)  # type: ignore[assignment]

    with pytest.raises(TypeError, match="tuple of VariantSpec"):
        registry.register(Undeclared)


def test_entry_points_register_backends(monkeypatch: pytest.MonkeyPatch) -> None:
    seen_groups = []

    def fake_entry_points(group: str) -> list[SimpleNamespace]:
        seen_groups.append(group)
        return [SimpleNamespace(load=lambda: _Plain)]

    monkeypatch.setattr(registry_module, "entry_points", fake_entry_points)
    registry = BackendRegistry()
    registry.load_entry_points()
    assert seen_groups == ["pytest_allreduce.backends"]
    assert [v.name for v in registry.resolve(["plain_test"])] == [
        "plain_test_fast",
        "plain_test_slow",
    ]


@pytest.mark.parametrize(("world_size", "factor"), [(2, 1.0), (4, 1.5), (8, 1.75)])
def test_bus_bandwidth_follows_nccl_tests(world_size: int, factor: float) -> None:
    case = Target("nccl", world_size, 4096, "bfloat16").at(128)
    lat = Latency(case, "allreduce", [10.0, 10.0, 12.0], 50, "cuda_graph", 1_000_000)
    assert lat.median_us == 10.0
    assert lat.algbw_gbps == pytest.approx(100.0)  # 1 MB in 10 us
    assert lat.busbw_gbps == pytest.approx(100.0 * factor)
    low, high = lat.spread_us
    assert low == pytest.approx(10.0) and high == pytest.approx(11.6)
