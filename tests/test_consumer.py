"""Tests of the consumer profiles: what a server runs for each config entry, and its files."""

from __future__ import annotations

import itertools
import subprocess
import sys

import pytest

from pytest_allreduce.consumer import (
    CPU_RUNTIME,
    CPU_SHM_MAX_BYTES,
    CUSTOM_AR_ALIGNMENT,
    CUSTOM_AR_MAX_BYTES,
    DEFAULT_PROFILE,
    SGLANG_ADAPTIVE,
    SYMM_MEM_MAX_BYTES,
    Entry,
    Server,
    profile_for,
)

FUSION = Entry("flashinfer_fusion", True)
FUSION_OFF = Entry("flashinfer_fusion", False)
SYMM = Entry("torch_symm_mem", False)
CUSTOM = Entry("custom_allreduce", False)
NCCL = Entry("nccl", False)
SHM = Entry("cpu_shm", False)
GLOO = Entry("gloo", False)


def h200(
    world_size: int = 2,
    *,
    multicast: bool = False,
    graph: bool = True,
    dtype: str = "bfloat16",
    hidden: int = 4096,
    capability: tuple[int, int] = (9, 0),
    full_nvlink: bool = True,
) -> Server:
    return Server.cuda(
        world_size=world_size,
        capability=capability,
        multicast=multicast,
        full_nvlink=full_nvlink,
        dtype=dtype,
        hidden=hidden,
        in_cuda_graph=graph,
    )


def runs(entry: Entry, server: Server, tokens: int) -> tuple[str, bool, bool]:
    run = SGLANG_ADAPTIVE.runs(entry, server, tokens)
    return run.variant, run.fused, run.input_copied


def test_importing_the_profile_does_not_import_torch() -> None:
    code = "import sys, pytest_allreduce.consumer; sys.exit(1 if 'torch' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


# ---- flashinfer_fusion --------------------------------------------------------------------


def test_fusion_entry_runs_fused_one_shot_whatever_the_size_within_the_workspace() -> None:
    for tokens in (1, 128, 2048):
        assert runs(FUSION, h200(), tokens) == ("flashinfer_fusion_one_shot", True, False)


def test_fusion_flag_false_never_runs_flashinfer() -> None:
    run = SGLANG_ADAPTIVE.runs(FUSION_OFF, h200(graph=True), 64)
    assert (run.variant, run.fused) == ("custom_ar", False)
    assert run.declined == ("flashinfer_fusion: the fusion flag is false",)


@pytest.mark.parametrize(
    ("server", "why"),
    [
        (h200(world_size=6), "world size 6"),
        (h200(hidden=4100), "hidden 4100"),
        (h200(capability=(8, 0)), "capability 8.x"),
    ],
)
def test_fusion_where_flashinfer_raises_takes_the_nccl_path(server: Server, why: str) -> None:
    run = SGLANG_ADAPTIVE.runs(FUSION, server, 16)
    assert run.variant == "custom_ar" and not run.fused and run.hazard is None
    assert run.declined[0].startswith("flashinfer_fusion_one_shot: ")
    assert why in run.declined[0]


@pytest.mark.parametrize(("hidden", "last_safe"), [(4096, 2048), (7168, 1170), (8192, 1024)])
def test_fusion_beyond_the_workspace_is_unsafe_not_a_fallback(hidden: int, last_safe: int) -> None:
    server = h200(hidden=hidden)
    assert SGLANG_ADAPTIVE.runs(FUSION, server, last_safe).hazard is None
    beyond = SGLANG_ADAPTIVE.runs(FUSION, server, last_safe + 1)
    assert beyond.variant == "flashinfer_fusion_one_shot"
    assert beyond.hazard is not None and "workspace" in beyond.hazard
    (stop,) = SGLANG_ADAPTIVE.stops(FUSION, server)
    assert (stop.max_rows, stop.below.hazard, stop.above.hazard) == (last_safe, None, beyond.hazard)


def test_fusion_with_fp32_input_is_unsafe_at_any_size() -> None:
    run = SGLANG_ADAPTIVE.runs(FUSION, h200(dtype="float32"), 1)
    assert run.hazard is not None and "float32" in run.hazard


# ---- torch_symm_mem -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("world_size", "capability", "variant"),
    [
        (2, (9, 0), "torch_symm_mem_two_shot"),
        (4, (9, 0), "torch_symm_mem_multimem"),
        (8, (9, 0), "torch_symm_mem_multimem"),
        (4, (10, 0), "torch_symm_mem_two_shot"),
        (6, (10, 0), "torch_symm_mem_multimem"),
    ],
)
def test_symm_mem_runs_two_shot_or_multimem_by_capability_and_world_size(
    world_size: int, capability: tuple[int, int], variant: str
) -> None:
    server = h200(world_size, multicast=True, capability=capability)
    assert runs(SYMM, server, 512) == (variant, False, True)


def test_symm_mem_never_runs_one_shot() -> None:
    seen = {
        SGLANG_ADAPTIVE.runs(SYMM, h200(ws, multicast=True, capability=(major, 0)), 64).variant
        for ws, major in itertools.product((2, 4, 6, 8), (9, 10))
    }
    assert seen == {"torch_symm_mem_two_shot", "torch_symm_mem_multimem"}


def test_symm_mem_without_multicast_runs_the_nccl_path() -> None:
    run = SGLANG_ADAPTIVE.runs(SYMM, h200(multicast=False, graph=False), 512)
    assert (run.variant, run.input_copied) == ("custom_ar", True)
    assert "multicast" in run.declined[0]


@pytest.mark.parametrize(
    ("server", "why"),
    [
        (h200(multicast=True, dtype="float16"), "bfloat16 only"),
        (h200(multicast=True, capability=(8, 0)), "below compute capability 9.0"),
        (h200(multicast=True, capability=(12, 0)), "no size table"),
    ],
)
def test_symm_mem_refusals(server: Server, why: str) -> None:
    run = SGLANG_ADAPTIVE.runs(SYMM, server, 64)
    assert run.variant == "custom_ar" and why in run.declined[0]


def test_symm_mem_stops_strictly_below_its_limit_then_nccl() -> None:
    # 64 MiB at 2 ranks = 8192 rows of 4096 bf16; the limit is exclusive.
    server = h200(multicast=True, graph=False)
    assert runs(SYMM, server, 8191)[0] == "torch_symm_mem_two_shot"
    above = SGLANG_ADAPTIVE.runs(SYMM, server, 8192)
    assert above.variant == "nccl"
    assert [d.split(":")[0] for d in above.declined] == ["torch_symm_mem_two_shot", "custom_ar"]
    stops = SGLANG_ADAPTIVE.stops(SYMM, server)
    assert [(s.max_rows, s.below.variant, s.above.variant) for s in stops] == [
        (8191, "torch_symm_mem_two_shot", "nccl")
    ]


# ---- custom_allreduce and the nccl path ---------------------------------------------------


def test_custom_entry_copies_its_input_even_inside_graphs() -> None:
    assert runs(CUSTOM, h200(graph=True), 64) == ("custom_ar", False, True)
    assert runs(CUSTOM, h200(graph=False), 64) == ("custom_ar", False, True)


def test_nccl_entry_is_sglangs_dispatch_custom_ar_first() -> None:
    # SGLang's own custom allreduce: registered buffers in graphs, a staging copy in eager.
    assert runs(NCCL, h200(graph=True), 64) == ("custom_ar", False, False)
    assert runs(NCCL, h200(graph=False), 64) == ("custom_ar", False, True)


@pytest.mark.parametrize(("graph", "nccl"), [(True, "pynccl"), (False, "nccl")])
def test_above_the_custom_ar_buffer_the_nccl_path_is_pynccl_in_graphs_nccl_eager(
    graph: bool, nccl: str
) -> None:
    # 8 MiB exclusive = 1024 rows of 4096 bf16.
    for entry in (CUSTOM, NCCL):
        assert runs(entry, h200(graph=graph), 1023)[0] == "custom_ar"
        run = SGLANG_ADAPTIVE.runs(entry, h200(graph=graph), 1024)
        assert (run.variant, run.fused, run.input_copied) == (nccl, False, False)
        (stop,) = SGLANG_ADAPTIVE.stops(entry, h200(graph=graph))
        assert (stop.max_rows, stop.below.variant, stop.above.variant) == (1023, "custom_ar", nccl)


@pytest.mark.parametrize(
    ("server", "tokens", "why"),
    [
        (h200(4, full_nvlink=False), 8, "without full NVLink"),
        (h200(3), 8, "world size 3"),
        (h200(dtype="float16", hidden=4), 1, "not a multiple of 16"),
    ],
)
def test_custom_ar_refusals_fall_to_nccl(server: Server, tokens: int, why: str) -> None:
    run = SGLANG_ADAPTIVE.runs(CUSTOM, server, tokens)
    assert run.variant == "pynccl"
    assert len(run.declined) == 2 and all(why in d for d in run.declined)


def test_an_unknown_type_takes_the_nccl_path() -> None:
    assert runs(Entry("gloo", False), h200(), 64) == ("custom_ar", False, False)


def test_only_fusion_entries_fuse() -> None:
    for entry, ws, tokens in itertools.product(SGLANG_ADAPTIVE.entries, (2, 4, 8), (1, 9000)):
        run = SGLANG_ADAPTIVE.runs(entry, h200(ws, multicast=True), tokens)
        assert run.fused == (entry == FUSION)


def test_every_run_names_a_registered_variant() -> None:
    from pytest_allreduce.registry import BackendRegistry

    registry = BackendRegistry()
    registry.load_builtins()
    known = set(registry.allowed_names())
    servers = [
        h200(ws, multicast=mc, graph=g, capability=(major, 0))
        for ws, mc, g, major in itertools.product(
            (2, 4, 6, 8), (False, True), (False, True), (9, 10)
        )
    ]
    for entry, server, tokens in itertools.product(
        SGLANG_ADAPTIVE.entries, servers, (1, 1024, 8192, 20000)
    ):
        assert SGLANG_ADAPTIVE.runs(entry, server, tokens).variant in known


# ---- the no-file rule ---------------------------------------------------------------------


def test_no_file_rule_switches_at_128_tokens() -> None:
    assert SGLANG_ADAPTIVE.no_file_entry(128) == FUSION
    assert SGLANG_ADAPTIVE.no_file_entry(129) == SYMM


def test_no_file_rule_on_a_multicast_off_host_runs_nccl_above_128() -> None:
    server = h200(multicast=False)
    small = SGLANG_ADAPTIVE.runs(SGLANG_ADAPTIVE.no_file_entry(64), server, 64)
    large = SGLANG_ADAPTIVE.runs(SGLANG_ADAPTIVE.no_file_entry(4096), server, 4096)
    assert small.variant == "flashinfer_fusion_one_shot"
    assert large.variant == "pynccl"


# ---- file names ---------------------------------------------------------------------------


def test_two_generations_of_file_names_and_where_each_looks() -> None:
    gen1, gen2 = SGLANG_ADAPTIVE.config_files(4096, 2, "NVIDIA H200")
    assert (gen1.generation, gen1.name) == (
        1,
        "allreduce_config_hidden=4096,device=NVIDIA_H200.json",
    )
    assert gen1.env_var == "SGLANG_ALLREDUCE_CONFIG_DIR"
    assert (gen2.generation, gen2.name) == (
        2,
        "allreduce_config_hidden=4096,tp=2,device=NVIDIA_H200.json",
    )
    assert gen2.env_var is None
    assert gen1.package_dir == gen2.package_dir == "sglang/srt/layers/allreduce/configs"


@pytest.mark.parametrize(
    ("hidden", "world_size", "device"),
    [(0, 2, "NVIDIA H200"), (4096, 1, "NVIDIA H200"), (4096, 2, " "), (4096, 2, "a/b")],
)
def test_bad_file_name_parts_are_refused(hidden: int, world_size: int, device: str) -> None:
    with pytest.raises(ValueError):
        SGLANG_ADAPTIVE.config_files(hidden, world_size, device)


# ---- the CPU runtime ----------------------------------------------------------------------


def test_cpu_shm_runs_within_its_slots_else_gloo() -> None:
    server = Server.cpu(world_size=2, dtype="bfloat16", hidden=4096)
    assert CPU_RUNTIME.runs(SHM, server, 2048).variant == "cpu_shm"
    above = CPU_RUNTIME.runs(SHM, server, 2049)
    assert above.variant == "gloo" and above.declined[0].startswith("cpu_shm: ")
    assert CPU_RUNTIME.runs(GLOO, server, 10**6).variant == "gloo"
    (stop,) = CPU_RUNTIME.stops(SHM, server)
    assert (stop.max_rows, stop.below.variant, stop.above.variant) == (2048, "cpu_shm", "gloo")
    assert CPU_RUNTIME.no_file_entry(1) == GLOO


def test_cpu_runtime_refuses_a_type_it_does_not_have() -> None:
    with pytest.raises(ValueError, match="nccl"):
        CPU_RUNTIME.runs(NCCL, Server.cpu(world_size=2, dtype="float32", hidden=8), 1)


def test_cpu_config_file_is_the_generation_one_name() -> None:
    (only,) = CPU_RUNTIME.config_files(64, 2, "cpu")
    assert only.name == "allreduce_config_hidden=64,device=cpu.json"


def test_profiles_by_device() -> None:
    assert profile_for("cuda") is SGLANG_ADAPTIVE is DEFAULT_PROFILE
    assert profile_for("cpu") is CPU_RUNTIME
    with pytest.raises(ValueError, match="xpu"):
        profile_for("xpu")


# ---- bad input ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        lambda: h200(world_size=1),
        lambda: h200(dtype="int8"),
        lambda: h200(capability=(9,)),  # type: ignore[arg-type]
        lambda: Server("cpu", 2, "float32", 8, (9, 0), False, False, False),
        lambda: Server("tpu", 2, "float32", 8, None, False, False, False),
        lambda: Entry("", False),
        lambda: Entry("nccl", 1),  # type: ignore[arg-type]
    ],
)
def test_bad_states_and_entries_are_refused(make: object) -> None:
    with pytest.raises(ValueError):
        make()  # type: ignore[operator]


def test_a_profile_refuses_the_wrong_device_and_bad_token_counts() -> None:
    cpu = Server.cpu(world_size=2, dtype="float32", hidden=8)
    with pytest.raises(ValueError, match="cuda"):
        SGLANG_ADAPTIVE.runs(NCCL, cpu, 1)
    with pytest.raises(ValueError, match="tokens"):
        SGLANG_ADAPTIVE.runs(NCCL, h200(), 0)


# ---- agreement with this project's backends -------------------------------------------------


def test_consumer_limits_agree_with_the_backends_declared_limits() -> None:
    from pytest_allreduce.backends.cpu_shm import CpuShmBackend
    from pytest_allreduce.backends.custom_ar import CustomArBackend
    from pytest_allreduce.backends.torch_symm_mem import MAX_BYTES

    assert CpuShmBackend.limits("", 2).max_bytes == CPU_SHM_MAX_BYTES
    # The backend's limit is inclusive; the consumer's is exclusive at 16-byte steps.
    custom = CustomArBackend.limits("", 2).max_bytes
    assert custom == CUSTOM_AR_MAX_BYTES - CUSTOM_AR_ALIGNMENT
    assert SYMM_MEM_MAX_BYTES[9] == MAX_BYTES
