"""CPU-only checks of the GPU backends' declared logic: limits, types, probes, imports.

Nothing here needs a GPU, FlashInfer or sgl-kernel; CUDA facts are simulated with monkeypatch.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import sys
import types
from typing import Any

import pytest
import torch

from pytest_allreduce.backend import GPU_CONFIG_TYPES, Backend, Limits, UnsupportedInput
from pytest_allreduce.context import MULTICAST_OFF_SWITCHES, RankContext
from pytest_allreduce.registry import BUILTIN_BACKENDS, BackendRegistry

MiB = 1 << 20
GPU_MODULES = (
    "nccl",
    "pynccl",
    "torch_symm_mem",
    "custom_ar",
    "vllm_custom_ar",
    "flashinfer",
    "flashinfer_fusion",
    "mscclpp",
    "quick_ar",
    "mixed_comm",
)
GPU_LIBRARIES = ("flashinfer", "sgl_kernel", "pynvml", "nvidia.nvshmem")


def _cls(module: str) -> type[Backend]:
    line = next(b for b in BUILTIN_BACKENDS if b.split(":")[0].endswith("." + module))
    mod, _, attr = line.partition(":")
    return getattr(importlib.import_module(mod), attr)


def _ctx(
    device: str = "cuda:0", world_size: int = 2, local_world_size: int | None = None
) -> RankContext:
    return RankContext(
        rank=0,
        world_size=world_size,
        local_rank=0,
        local_world_size=world_size if local_world_size is None else local_world_size,
        device=torch.device(device),
        group=None,
        cpu_group=None,
        timeout_s=10.0,
    )


# ---- registry and imports -------------------------------------------------------------------


class _BlockGpuLibraries(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> None:
        if name.split(".")[0] in {lib.split(".")[0] for lib in GPU_LIBRARIES}:
            raise ImportError(f"blocked for the test: {name}")
        return None


def test_every_gpu_module_imports_without_gpu_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(sys.modules):
        if name.startswith("pytest_allreduce.backends.") or name.split(".")[0] in {
            "flashinfer",
            "sgl_kernel",
            "pynvml",
        }:
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [_BlockGpuLibraries(), *sys.meta_path])
    for module in GPU_MODULES:
        mod = importlib.import_module(f"pytest_allreduce.backends.{module}")
        assert mod.__name__.endswith(module)
    assert not [m for m in sys.modules if m.split(".")[0] in ("flashinfer", "sgl_kernel")]


def test_builtin_lines_put_gpu_backends_after_cpu_ones() -> None:
    modules = [line.split(":")[0].rsplit(".", 1)[1] for line in BUILTIN_BACKENDS]
    assert modules[:2] == ["gloo", "cpu_shm"]
    assert modules[2:] == list(GPU_MODULES)


def test_registry_knows_every_variant_name() -> None:
    registry = BackendRegistry()
    for module in GPU_MODULES:
        registry.register(_cls(module))
    names = {v.name for v in registry.variants()}
    assert names == {
        "nccl",
        "pynccl",
        "torch_symm_mem_one_shot",
        "torch_symm_mem_two_shot",
        "torch_symm_mem_multimem",
        "custom_ar",
        "vllm_custom_ar",
        "flashinfer_trtllm",
        "flashinfer_mnnvl",
        "flashinfer_auto",
        "flashinfer_fusion_one_shot",
        "flashinfer_fusion_two_shot",
        "flashinfer_fusion_one_shot_fp8",
        "flashinfer_fusion_one_shot_fp4",
        "mscclpp",
        "quick_ar",
        "mixed_comm",
    }
    assert [v.name for v in registry.resolve(["flashinfer_fusion"])] == [
        "flashinfer_fusion_one_shot",
        "flashinfer_fusion_two_shot",
        "flashinfer_fusion_one_shot_fp8",
        "flashinfer_fusion_one_shot_fp4",
    ]


# ---- declarations ---------------------------------------------------------------------------


def test_declared_server_types_are_gpu_config_types_and_only_fusion_fuses() -> None:
    for module in GPU_MODULES:
        cls = _cls(module)
        for spec in cls.variants:
            assert spec.server_type is None or spec.server_type in GPU_CONFIG_TYPES, spec
            assert cls.limits(spec.suffix, 2).device == "cuda"
            assert spec.fused == (module == "flashinfer_fusion"), (module, spec)
            # The consumer fuses residual add + RMSNorm only through flashinfer_fusion.
            if spec.fused and spec.server_type:
                assert spec.server_type == "flashinfer_fusion"
        overrides = cls._fused is not Backend._fused
        assert overrides == (module == "flashinfer_fusion"), module


# ---- multicast ---------------------------------------------------------------------------------

NEEDS_MULTICAST = {
    ("torch_symm_mem", "multimem"),
    ("flashinfer", "mnnvl"),
    ("flashinfer", "auto"),
    ("mixed_comm", ""),
}


ALL_VARIANTS = sorted(
    (module, spec.suffix) for module in GPU_MODULES for spec in _cls(module).variants
)


@pytest.mark.parametrize(("module", "variant"), ALL_VARIANTS)
def test_needs_multicast_flags(module: str, variant: str) -> None:
    for ws in (2, 4, 8):
        assert _cls(module).limits(variant, ws).needs_multicast == (
            (module, variant) in NEEDS_MULTICAST
        )


@pytest.mark.parametrize(("module", "variant"), sorted(NEEDS_MULTICAST))
def test_multicast_backends_refuse_when_multicast_is_off(
    module: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _simulate_cuda(monkeypatch, (9, 0))
    monkeypatch.setenv("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")
    reason = _cls(module).probe(_ctx(), variant)
    assert reason is not None and "multicast" in reason


# ---- size, world-size and dtype gates --------------------------------------------------------


def _accepts(limits: Limits, rows: int, hidden: int, dtype: str, ws: int) -> bool:
    return limits.shape_refusal(rows, hidden, dtype, ws) is None


@pytest.mark.parametrize(
    ("ws", "max_bytes"), [(2, 64 * MiB), (4, 64 * MiB), (6, 128 * MiB), (8, 128 * MiB)]
)
@pytest.mark.parametrize("variant", ["one_shot", "two_shot", "multimem"])
def test_symm_mem_size_gate(variant: str, ws: int, max_bytes: int) -> None:
    limits = _cls("torch_symm_mem").limits(variant, ws)
    hidden = 4096
    top = max_bytes // (hidden * 2)
    assert limits.largest_rows(hidden, "bfloat16") == top
    assert _accepts(limits, top - 1, hidden, "bfloat16", ws)
    assert _accepts(limits, top, hidden, "bfloat16", ws)
    assert not _accepts(limits, top + 1, hidden, "bfloat16", ws)
    # byte granularity: hidden 2 bf16 = 4 bytes a row, the alignment
    assert _accepts(limits, max_bytes // 4, 2, "bfloat16", ws)
    assert not _accepts(limits, max_bytes // 4 + 1, 2, "bfloat16", ws)
    # fp32 at max bytes too, no fp16
    assert _accepts(limits, max_bytes // (hidden * 4), hidden, "float32", ws)
    assert not _accepts(limits, 1, hidden, "float16", ws)
    # bf16 needs 4-byte sizes: an odd element count is refused
    assert not _accepts(limits, 1, 3, "bfloat16", ws)


def test_symm_mem_world_sizes() -> None:
    limits = _cls("torch_symm_mem").limits("two_shot", 2)
    assert limits.world_sizes == (2, 4, 6, 8)
    assert limits.world_size_refusal(3) is not None
    assert limits.world_size_refusal(16) is not None


@pytest.mark.parametrize("module", ["custom_ar", "vllm_custom_ar"])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_custom_ar_gate_is_strictly_below_8_mib(module: str, dtype: str) -> None:
    limits = _cls(module).limits("", 2)
    itemsize = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    hidden = 16 // itemsize  # one row = 16 bytes, the alignment
    top = (8 * MiB - 16) // 16
    assert limits.largest_rows(hidden, dtype) == top
    assert _accepts(limits, top - 1, hidden, dtype, 2)
    assert _accepts(limits, top, hidden, dtype, 2)
    assert not _accepts(limits, top + 1, hidden, dtype, 2)  # exactly 8 MiB: refused
    # 16-byte alignment
    assert not _accepts(limits, 1, hidden + 1, dtype, 2)
    assert limits.graph_capturable


@pytest.mark.parametrize("module", ["custom_ar", "vllm_custom_ar"])
def test_custom_ar_world_sizes(module: str) -> None:
    limits = _cls(module).limits("", 2)
    for ws in (2, 4, 6, 8):
        assert limits.world_size_refusal(ws) is None
    for ws in (3, 5, 16):
        assert limits.world_size_refusal(ws) is not None


def test_custom_ar_check_input_refuses_8_mib_before_the_kernel() -> None:
    cls = _cls("custom_ar")
    backend = object.__new__(cls)  # no set-up: check_input runs before any collective
    backend.ctx = _ctx("cpu")
    backend.variant = ""
    backend.hidden = 8
    backend.dtype = torch.bfloat16
    backend.max_rows = 1 << 20
    backend.limits_ = cls.limits("", 2)
    ok = torch.empty((8 * MiB - 16) // 16, 8, dtype=torch.bfloat16, device="meta")
    backend.check_input(ok)
    with pytest.raises(UnsupportedInput, match="exceeds"):
        backend.check_input(torch.empty(8 * MiB // 16, 8, dtype=torch.bfloat16, device="meta"))


@pytest.mark.parametrize("ws", [2, 4, 8, 16])
@pytest.mark.parametrize("variant", ["one_shot", "two_shot", "one_shot_fp8", "one_shot_fp4"])
def test_flashinfer_fusion_row_gate(variant: str, ws: int) -> None:
    limits = _cls("flashinfer_fusion").limits(variant, ws)
    hidden = 4096
    assert limits.largest_rows(hidden, "bfloat16") == 2048
    assert _accepts(limits, 2047, hidden, "bfloat16", ws)
    assert _accepts(limits, 2048, hidden, "bfloat16", ws)
    assert not _accepts(limits, 2049, hidden, "bfloat16", ws)
    assert _accepts(limits, 2048, hidden, "float16", ws)
    assert not _accepts(limits, 16, hidden, "float32", ws)  # no fp32 workspace, as servers
    assert not _accepts(limits, 16, hidden + 4, "bfloat16", ws)  # H % 8
    if variant == "two_shot":
        assert not _accepts(limits, ws, hidden, "bfloat16", ws)  # two-shot needs rows > ws
        assert _accepts(limits, ws + 1, hidden, "bfloat16", ws)
    else:
        assert _accepts(limits, 1, hidden, "bfloat16", ws)
    if variant == "one_shot_fp4":
        assert not _accepts(limits, 16, hidden + 8, "bfloat16", ws)  # NVFP4 blocks of 16


def test_flashinfer_fusion_world_sizes() -> None:
    limits = _cls("flashinfer_fusion").limits("one_shot", 2)
    assert limits.world_sizes == (2, 4, 8, 16)
    for ws in (3, 6, 32):
        assert limits.world_size_refusal(ws) is not None


def test_flashinfer_fusion_one_shot_byte_cap_prevents_silent_two_shot() -> None:
    from pytest_allreduce.backends import _flashinfer

    limits = _cls("flashinfer_fusion").limits("one_shot", 16)
    assert limits.max_bytes is not None
    assert limits.max_bytes * 16 <= _flashinfer.MAX_LAMPORT_BYTES
    # e.g. hidden 65536 bf16 at ws 16: 1023 rows fit the Lamport buffer, 2048 do not
    top = limits.largest_rows(65536, "bfloat16")
    assert top is not None and top < 2048
    assert top * 65536 * 2 * 16 <= _flashinfer.MAX_LAMPORT_BYTES
    assert (top + 1) * 65536 * 2 * 16 > _flashinfer.MAX_LAMPORT_BYTES


@pytest.mark.parametrize("variant", ["trtllm", "mnnvl", "auto"])
def test_flashinfer_standalone_limits(variant: str) -> None:
    limits = _cls("flashinfer").limits(variant, 4)
    assert limits.max_rows == 2048
    assert not _accepts(limits, 2049, 4096, "bfloat16", 4)
    assert _accepts(limits, 2048, 4096, "bfloat16", 4)
    assert limits.dtypes == ("bfloat16", "float16")
    assert limits.graph_capturable == (variant == "trtllm")
    if variant == "mnnvl":
        assert limits.world_size_refusal(6) is None
    else:
        assert limits.world_size_refusal(6) is not None


def test_trtllm_oneshot_choice() -> None:
    from pytest_allreduce.backends._flashinfer import trtllm_use_oneshot

    # tiny batches must be one-shot (two-shot needs rows > world size)
    assert trtllm_use_oneshot(8, 4096, 2, 8)
    assert trtllm_use_oneshot(16, 4096, 2, 16)  # world size 16: no KeyError
    # FlashInfer's thresholds: ws 8 -> 42 MiB of rows*hidden*2*ws
    rows_at_42 = 42 * MiB // (4096 * 2 * 8)
    assert trtllm_use_oneshot(rows_at_42, 4096, 2, 8)
    assert not trtllm_use_oneshot(rows_at_42 + 1, 4096, 2, 8)
    assert trtllm_use_oneshot(2048, 4096, 2, 2)  # 32 MiB <= 512 MiB at ws 2


@pytest.mark.parametrize("ws", [8, 16])
def test_mscclpp_gates(ws: int) -> None:
    limits = _cls("mscclpp").limits("", ws)
    assert limits.alignment_bytes == 8 * ws
    # fp32 rows of 8*ws bytes
    hidden = 2 * ws
    top = MiB // (8 * ws)
    assert limits.largest_rows(hidden, "float32") == top
    assert _accepts(limits, top - 1, hidden, "float32", ws)
    assert _accepts(limits, top, hidden, "float32", ws)
    assert not _accepts(limits, top + 1, hidden, "float32", ws)
    assert not _accepts(limits, 1, hidden + 1, "float32", ws)  # tail would go unreduced
    assert limits.world_size_refusal(4) is not None


def test_quick_ar_gates() -> None:
    limits = _cls("quick_ar").limits("", 4)
    assert limits.world_sizes == (2, 4, 8)
    assert limits.dtypes == ("float16", "bfloat16")
    assert limits.alignment_bytes == 16
    assert limits.max_bytes == 2 * 1024 * MiB
    assert not _accepts(limits, 1, 4, "bfloat16", 4)  # 8 bytes: not a 16-byte multiple


@pytest.mark.parametrize("module", ["nccl", "pynccl"])
def test_nccl_limits_are_open(module: str) -> None:
    limits = _cls(module).limits("", 3)
    assert limits.world_sizes is None
    assert limits.max_bytes is None and limits.max_rows is None
    assert limits.graph_capturable
    assert _accepts(limits, 1 << 16, 8192, "float32", 3)


def test_mixed_comm_limits() -> None:
    limits = _cls("mixed_comm").limits("", 8)
    assert limits.dtypes == ("float16", "bfloat16")
    assert not limits.graph_capturable
    assert limits.needs_multicast


# ---- probes on this CPU machine ------------------------------------------------------------


@pytest.mark.parametrize(("module", "variant"), ALL_VARIANTS)
def test_every_probe_refuses_a_cpu_rank(module: str, variant: str) -> None:
    reason = _cls(module).probe(_ctx("cpu"), variant)
    assert isinstance(reason, str) and reason


def _simulate_cuda(
    monkeypatch: pytest.MonkeyPatch, capability: tuple[int, int], hip: str | None = None
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.version, "hip", hip)
    for name in MULTICAST_OFF_SWITCHES:
        monkeypatch.delenv(name, raising=False)


def _hide(monkeypatch: pytest.MonkeyPatch, *modules: str) -> None:
    """Make `modules` look uninstalled to the probes."""
    real = importlib.util.find_spec

    def find_spec(name: str, *args: Any, **kwargs: Any) -> Any:
        if name.split(".")[0] in modules or name in modules:
            return None
        return real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("variant", ["one_shot", "two_shot", "multimem"])
def test_symm_mem_probe_needs_sm90(variant: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate_cuda(monkeypatch, (8, 0))
    assert _cls("torch_symm_mem").probe(_ctx(), variant) == "compute capability 8.0 < 9.0"


def test_symm_mem_probe_accepts_sm90_with_the_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate_cuda(monkeypatch, (9, 0))
    # this CPU torch registers the op schemas, so the probe finds them
    assert _cls("torch_symm_mem").probe(_ctx(), "two_shot") is None


@pytest.mark.parametrize(
    ("module", "variant", "package"),
    [
        ("custom_ar", "", "sgl-kernel"),
        ("mscclpp", "", "sgl-kernel"),
        ("vllm_custom_ar", "", "flashinfer"),
        ("flashinfer", "trtllm", "flashinfer"),
        ("flashinfer_fusion", "one_shot", "flashinfer"),
        ("flashinfer_fusion", "two_shot", "flashinfer"),
        ("flashinfer_fusion", "one_shot_fp8", "flashinfer"),
    ],
)
def test_probe_names_the_missing_package(
    module: str, variant: str, package: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _simulate_cuda(monkeypatch, (9, 0))
    _hide(monkeypatch, "flashinfer", "sgl_kernel")
    assert _cls(module).probe(_ctx(), variant) == f"{package} not installed"


def test_probe_reports_a_package_that_fails_to_import(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_allreduce.backends import _gpu

    _simulate_cuda(monkeypatch, (9, 0))
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a, **k: object() if name == "sgl_kernel" else None,
    )
    _gpu._import_outcome.cache_clear()
    broken = types.ModuleType("sgl_kernel")  # a package whose submodule import fails
    broken.__path__ = []  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sgl_kernel", broken)
    try:
        reason = _cls("custom_ar").probe(_ctx(), "")
    finally:
        _gpu._import_outcome.cache_clear()
    assert reason is not None and reason.startswith("sgl-kernel failed to import")


def test_flashinfer_fusion_fp4_needs_sm100(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate_cuda(monkeypatch, (9, 0))
    reason = _cls("flashinfer_fusion").probe(_ctx(), "one_shot_fp4")
    assert reason is not None and reason.startswith("FP4 output needs compute capability >= 10.0")
    assert "have 9.0" in reason


def test_flashinfer_refuses_sm80(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate_cuda(monkeypatch, (8, 0))
    reason = _cls("flashinfer_fusion").probe(_ctx(), "one_shot")
    assert reason is not None and "have 8.0" in reason


@pytest.mark.parametrize(
    ("module", "variant"), [("custom_ar", ""), ("flashinfer_fusion", "one_shot")]
)
def test_single_node_backends_refuse_two_nodes(
    module: str, variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _simulate_cuda(monkeypatch, (9, 0))
    ctx = _ctx(world_size=16, local_world_size=8)
    assert _cls(module).probe(ctx, variant) == "needs every rank on one node"


def test_quick_ar_probe_on_cuda_says_rocm_only(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate_cuda(monkeypatch, (9, 0))
    assert _cls("quick_ar").probe(_ctx(), "") == "ROCm only"


def test_quick_ar_probe_on_rocm_needs_the_quantization_switch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _simulate_cuda(monkeypatch, (9, 4), hip="6.3")
    props = types.SimpleNamespace(gcnArchName="gfx942:sramecc+:xnack-")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.delenv("ROCM_QUICK_REDUCE_QUANTIZATION", raising=False)
    reason = _cls("quick_ar").probe(_ctx(), "")
    assert reason is not None and "ROCM_QUICK_REDUCE_QUANTIZATION" in reason
    monkeypatch.setenv("ROCM_QUICK_REDUCE_QUANTIZATION", "INT8")
    _hide(monkeypatch, "sgl_kernel")
    assert _cls("quick_ar").probe(_ctx(), "") == "sgl-kernel not installed"
    props.gcnArchName = "gfx90a"
    assert "MI300" in (_cls("quick_ar").probe(_ctx(), "") or "")


def test_custom_ar_rocm_build_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate_cuda(monkeypatch, (9, 4), hip="6.3")
    reason = _cls("custom_ar").probe(_ctx(), "")
    assert reason is not None and "ROCm" in reason


def test_mixed_comm_probe_checks_nvshmem(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate_cuda(monkeypatch, (9, 0))
    _hide(monkeypatch, "nvidia")
    assert _cls("mixed_comm").probe(_ctx(), "") == "nvidia-nvshmem not installed"


def test_mixed_comm_probe_refuses_sm80(monkeypatch: pytest.MonkeyPatch) -> None:
    _simulate_cuda(monkeypatch, (8, 0))
    reason = _cls("mixed_comm").probe(_ctx(), "")
    assert reason is not None and "have 8.0" in reason


def test_mscclpp_probe_says_only_0_3_ships_it(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_allreduce.backends import _gpu

    _simulate_cuda(monkeypatch, (9, 0))
    fake = types.ModuleType("sgl_kernel")
    fake.__path__ = []  # type: ignore[attr-defined]
    fake_ar = types.ModuleType("sgl_kernel.allreduce")
    fake_ar.init_custom_ar = lambda *a: 0  # type: ignore[attr-defined]
    fake.allreduce = fake_ar  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "sgl_kernel", fake)
    monkeypatch.setitem(sys.modules, "sgl_kernel.allreduce", fake_ar)
    monkeypatch.setattr(_gpu, "module_refusal", lambda module, package: None)
    reason = _cls("mscclpp").probe(_ctx(world_size=8), "")
    assert reason is not None and "only sgl-kernel 0.3.x ships it" in reason


# ---- NVLink gate for custom allreduce with more than 2 ranks ---------------------------------


def _fake_nvml(nvlink_ok: bool) -> types.ModuleType:
    nvml = types.ModuleType("pynvml")
    nvml.NVML_P2P_CAPS_INDEX_NVLINK = 2  # type: ignore[attr-defined]
    nvml.NVML_P2P_STATUS_OK = 0  # type: ignore[attr-defined]
    nvml.nvmlInit = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlShutdown = lambda: None  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetHandleByUUID = lambda uuid: uuid  # type: ignore[attr-defined]
    nvml.nvmlDeviceGetP2PStatus = lambda a, b, cap: 0 if nvlink_ok else 5  # type: ignore[attr-defined]
    return nvml


@pytest.mark.parametrize("nvlink_ok", [True, False])
def test_full_nvlink_gate(nvlink_ok: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_allreduce.backends import _gpu

    _simulate_cuda(monkeypatch, (9, 0))
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(nvlink_ok))
    monkeypatch.setattr(
        torch.cuda, "get_device_properties", lambda i: types.SimpleNamespace(uuid=f"uuid-{i}")
    )
    reason = _gpu.full_nvlink_refusal(_ctx(world_size=4))
    if nvlink_ok:
        assert reason is None
    else:
        assert reason is not None and reason.startswith("needs full NVLink for world size 4")
    assert _gpu.full_nvlink_refusal(_ctx(world_size=2)) is None  # ws 2 needs no NVLink


def test_full_nvlink_gate_without_pynvml(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_allreduce.backends import _gpu

    _simulate_cuda(monkeypatch, (9, 0))
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import raises ImportError
    reason = _gpu.full_nvlink_refusal(_ctx(world_size=8))
    assert reason is not None and reason.startswith("needs full NVLink for world size 8")


def test_full_nvlink_gate_when_peers_are_invisible(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_allreduce.backends import _gpu

    _simulate_cuda(monkeypatch, (9, 0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    reason = _gpu.full_nvlink_refusal(_ctx(world_size=4))
    assert reason is not None and "not visible" in reason


# ---- pynccl's C mapping ------------------------------------------------------------------------


def test_pynccl_dtype_codes() -> None:
    from pytest_allreduce.backends.pynccl import nccl_dtype

    assert nccl_dtype(torch.float16) == 6
    assert nccl_dtype(torch.float32) == 7
    assert nccl_dtype(torch.bfloat16) == 9
    with pytest.raises(ValueError):
        nccl_dtype(torch.int8)


def test_pynccl_library_override(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_allreduce.backends import pynccl

    monkeypatch.setenv(pynccl.NCCL_LIBRARY_ENV, "/opt/nccl/libnccl.so.2")
    assert pynccl.find_libnccl() == "/opt/nccl/libnccl.so.2"


def test_pynccl_probe_reports_a_missing_library(monkeypatch: pytest.MonkeyPatch) -> None:
    from pytest_allreduce.backends import pynccl

    _simulate_cuda(monkeypatch, (9, 0))
    monkeypatch.setenv(pynccl.NCCL_LIBRARY_ENV, "/nonexistent/libnccl.so.2")
    pynccl.nccl_library.cache_clear()
    try:
        reason = pynccl.PyncclBackend.probe(_ctx(), "")
    finally:
        pynccl.nccl_library.cache_clear()
    assert reason is not None and reason.startswith("libnccl not usable")


# ---- FlashInfer call wiring, against a fake flashinfer.comm ----------------------------------


class _FakeWorkspace:
    backend = "trtllm"

    def __init__(self) -> None:
        self.destroyed = False

    def destroy(self) -> None:
        self.destroyed = True


def _fake_flashinfer(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[dict[str, Any]]]:
    calls: dict[str, list[dict[str, Any]]] = {"create": [], "call": []}
    comm = types.ModuleType("flashinfer.comm")
    comm.AllReduceFusionPattern = types.SimpleNamespace(  # type: ignore[attr-defined]
        kAllReduce=0,
        kARResidualRMSNorm=1,
        kARResidualRMSNormOutFP8Quant=4,
        kARResidualRMSNormOutFP4Quant=5,
    )
    comm.QuantizationSFLayout = types.SimpleNamespace(SWIZZLED_128x4=0)  # type: ignore[attr-defined]
    comm.compute_fp4_swizzled_layout_sf_size = (  # type: ignore[attr-defined]
        lambda rows, cols: -(-rows // 128) * 128 * (-(-cols // 4) * 4)
    )

    def create(**kwargs: Any) -> _FakeWorkspace:
        calls["create"].append(kwargs)
        return _FakeWorkspace()

    def allreduce_fusion(**kwargs: Any) -> None:
        calls["call"].append(kwargs)

    comm.create_allreduce_fusion_workspace = create  # type: ignore[attr-defined]
    comm.allreduce_fusion = allreduce_fusion  # type: ignore[attr-defined]
    package = types.ModuleType("flashinfer")
    package.__path__ = []  # type: ignore[attr-defined]
    package.comm = comm  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "flashinfer", package)
    monkeypatch.setitem(sys.modules, "flashinfer.comm", comm)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    monkeypatch.setattr(RankContext, "barrier", lambda self: None)
    return calls


def _tensors(rows: int, hidden: int) -> dict[str, torch.Tensor]:
    make = lambda: torch.zeros(rows, hidden, dtype=torch.bfloat16)  # noqa: E731
    return {
        "inp": make(),
        "residual": make(),
        "weight": torch.ones(hidden, dtype=torch.bfloat16),
        "out": make(),
        "residual_out": make(),
    }


@pytest.mark.parametrize(
    ("variant", "oneshot", "fused_pattern"),
    [("one_shot", True, 1), ("two_shot", False, 1), ("one_shot_fp8", True, 4)],
)
def test_flashinfer_fusion_passes_explicit_mode_and_outputs(
    variant: str, oneshot: bool, fused_pattern: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_flashinfer(monkeypatch)
    cls = _cls("flashinfer_fusion")
    ctx = _ctx("cpu", world_size=2)
    backend = cls(ctx, variant, 64, torch.bfloat16, 32)
    (create,) = calls["create"]
    assert create["backend"] == "trtllm" and create["max_token_num"] == 32
    assert create["world_size"] == 2 and create["hidden_dim"] == 64
    t = _tensors(8, 64)
    backend.all_reduce(t["inp"], t["out"])
    plain = calls["call"][-1]
    assert plain["pattern"] == 0 and plain["output"] is t["out"]
    assert plain["use_oneshot"] is oneshot
    backend.fused_add_rms_norm(
        t["inp"], t["residual"], t["weight"], 1e-6, t["out"], t["residual_out"]
    )
    fused = calls["call"][-1]
    assert fused["pattern"] == fused_pattern and fused["use_oneshot"] is oneshot
    assert fused["norm_out"] is t["out"] and fused["residual_out"] is t["residual_out"]
    assert fused["residual_in"] is t["residual"] and fused["rms_gamma"] is t["weight"]
    assert fused["rms_eps"] == 1e-6
    if variant == "one_shot_fp8":
        assert fused["quant_out"].dtype == torch.float8_e4m3fn
        assert fused["quant_out"].shape == (8, 64)
        assert isinstance(fused["scale_factor"], torch.Tensor)
    else:
        assert "quant_out" not in fused
    assert ("FP8" in backend.engaged()) == (variant == "one_shot_fp8")
    workspace = backend.workspace
    backend.close()
    assert workspace.destroyed


def test_flashinfer_fusion_refuses_two_shot_rows_at_world_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls = _fake_flashinfer(monkeypatch)
    backend = _cls("flashinfer_fusion")(
        _ctx("cpu", world_size=2), "two_shot", 64, torch.bfloat16, 32
    )
    t = _tensors(2, 64)
    with pytest.raises(UnsupportedInput, match="minimum"):
        backend.all_reduce(t["inp"], t["out"])
    assert calls["call"] == []


@pytest.mark.parametrize("variant", ["mnnvl", "auto"])
def test_flashinfer_never_creates_multicast_workspace_when_off(
    variant: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_flashinfer(monkeypatch)
    monkeypatch.setenv("NCCL_NVLS_ENABLE", "0")
    with pytest.raises(RuntimeError, match="multicast"):
        _cls("flashinfer")(_ctx("cpu"), variant, 64, torch.bfloat16, 32)
    assert calls["create"] == []


def test_flashinfer_trtllm_passes_explicit_oneshot(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_flashinfer(monkeypatch)
    backend = _cls("flashinfer")(_ctx("cpu", world_size=2), "trtllm", 64, torch.bfloat16, 32)
    t = _tensors(1, 64)
    backend.all_reduce(t["inp"], t["out"])
    call = calls["call"][-1]
    assert call["pattern"] == 0 and call["use_oneshot"] is True and call["output"] is t["out"]
    assert "comm_backend" not in calls["create"][0]
    assert calls["create"][0]["group"] is None  # ctx.group, passed through
