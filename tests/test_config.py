"""Tests of the server config: format, atomic writing, strict loading, lookup and dispatch."""

from __future__ import annotations

import json
import os
import random
import re
import socket
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pytest_allreduce.artifacts.config import write_config
from pytest_allreduce.backend import Backend, Limits, VariantSpec
from pytest_allreduce.config import (
    AdaptiveAllReduce,
    AllreduceConfig,
    ConfigEntry,
    ConfigError,
    config_path,
    config_paths,
    device_label,
    load_config,
)
from pytest_allreduce.context import RankContext
from pytest_allreduce.jobs import add_rms_norm
from pytest_allreduce.registry import BackendRegistry

GLOO = ConfigEntry("gloo", False, "gloo")
SHM = ConfigEntry("cpu_shm", False, "cpu_shm")
FUSION = ConfigEntry("flashinfer_fusion", True, "flashinfer_fusion_one_shot")
SYMM = ConfigEntry("torch_symm_mem", False, "torch_symm_mem_two_shot")
NCCL = ConfigEntry("nccl", False, "nccl")


def gpu_config() -> AllreduceConfig:
    return AllreduceConfig({1: FUSION, 2: FUSION, 32: FUSION, 128: SYMM, 504: NCCL})


def cpu_config() -> AllreduceConfig:
    return AllreduceConfig({1: SHM, 8: SHM, 64: GLOO, 512: SHM, 2048: GLOO})


def brute_force_key(keys: list[int], batch_size: int) -> int:
    """The consumer's rule stated directly: nearest by distance, ties to the smaller key."""
    return min(keys, key=lambda k: (abs(k - batch_size), k))


# ---- file name -----------------------------------------------------------------------------


def test_config_path_layout(tmp_path: Path) -> None:
    path = config_path(tmp_path, 8, 4096, "NVIDIA H200")
    assert path == tmp_path / "tp8" / "allreduce_config_hidden=4096,device=NVIDIA_H200.json"
    assert config_path(tmp_path, 2, 16, "cpu").name == "allreduce_config_hidden=16,device=cpu.json"
    assert device_label("cpu") == "cpu"


@pytest.mark.parametrize(
    "args", [(0, 16, "cpu"), (2, 0, "cpu"), (2, 16, ""), (2, 16, "a/b"), (True, 16, "cpu")]
)
def test_config_path_refuses_bad_parts(tmp_path: Path, args: tuple[Any, ...]) -> None:
    with pytest.raises(ValueError):
        config_path(tmp_path, *args)


# ---- write / load --------------------------------------------------------------------------


@pytest.mark.parametrize(("make", "device"), [(gpu_config, "cuda"), (cpu_config, "cpu")])
def test_round_trip(tmp_path: Path, make: Any, device: str) -> None:
    config = make()
    path = write_config(tmp_path / "deep" / "er" / "c.json", config, device)
    loaded = load_config(path)
    assert loaded == config
    assert loaded.device == device
    assert load_config(str(path)) == config
    assert load_config(path.read_text()) == config
    assert load_config(json.loads(path.read_text())) == config
    # Exactly the consumer's shape: three fields, in a fixed order, nothing else.
    raw = json.loads(path.read_text())
    for value in raw.values():
        assert list(value) == ["backend_type", "use_residual_rmsnorm_fusion", "backend_name"]


def test_written_keys_ascend_numerically(tmp_path: Path) -> None:
    entries = {k: GLOO for k in (100, 10, 2, 1, 1000, 20, 3)}
    path = write_config(tmp_path / "c.json", AllreduceConfig(entries), "cpu")
    keys = [k for k, _ in json.loads(path.read_text(), object_pairs_hook=list)]
    assert keys == ["1", "2", "3", "10", "20", "100", "1000"]
    text = path.read_text()
    assert text.index('"2"') < text.index('"10"')
    assert text.endswith("\n")


def test_write_refuses_types_of_the_other_device(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"CUDA config may only use .*cpu_shm"):
        write_config(tmp_path / "c.json", cpu_config(), "cuda")
    with pytest.raises(ConfigError, match=r"CPU config may only use .*flashinfer_fusion"):
        write_config(tmp_path / "c.json", gpu_config(), "cpu")
    with pytest.raises(ConfigError, match="'cuda' and 'cpu' only"):
        write_config(tmp_path / "c.json", cpu_config(), "meta")
    assert list(tmp_path.iterdir()) == []


def test_entries_enforce_the_consumer_rules() -> None:
    with pytest.raises(ConfigError, match="only 'flashinfer_fusion' may fuse"):
        ConfigEntry("torch_symm_mem", True, "torch_symm_mem")
    with pytest.raises(ConfigError, match="only 'flashinfer_fusion' may fuse"):
        ConfigEntry("gloo", True, "gloo")  # never on the CPU
    with pytest.raises(ConfigError, match="unknown backend_type 'mpi'"):
        ConfigEntry("mpi", False, "mpi")
    with pytest.raises(ConfigError, match="true or false"):
        ConfigEntry("nccl", 0, "nccl")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="mixes GPU and CPU"):
        AllreduceConfig({1: NCCL, 2: GLOO})
    with pytest.raises(ConfigError, match="at least one"):
        AllreduceConfig({})
    with pytest.raises(ConfigError, match="positive int"):
        AllreduceConfig({0: GLOO})
    with pytest.raises(ConfigError, match="positive int"):
        AllreduceConfig({True: GLOO})


@pytest.mark.parametrize(
    "fail_at", ["os.replace", "os.fsync", "os.chmod", "interrupt"], ids=lambda s: s
)
def test_failed_write_keeps_previous_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_at: str
) -> None:
    path = tmp_path / "c.json"
    write_config(path, cpu_config(), "cpu")
    before = path.read_bytes()
    newer = AllreduceConfig({1: GLOO, 4096: SHM})

    def boom(*args: Any, **kwargs: Any) -> None:
        if fail_at == "interrupt":
            raise KeyboardInterrupt
        raise OSError(28, "No space left on device")

    name = "replace" if fail_at == "interrupt" else fail_at.removeprefix("os.")
    monkeypatch.setattr(os, name, boom)
    with pytest.raises((OSError, KeyboardInterrupt)):
        write_config(path, newer, "cpu")
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]  # no temp file left behind
    assert load_config(path) == cpu_config()


def test_invalid_write_touches_nothing(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    write_config(path, cpu_config(), "cpu")
    before = path.read_bytes()
    with pytest.raises(ConfigError):
        write_config(path, gpu_config(), "cpu")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["c.json"]


def test_overwrite_keeps_mode(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.json", cpu_config(), "cpu")
    assert path.stat().st_mode & 0o777 == 0o644
    path.chmod(0o640)
    write_config(path, AllreduceConfig({1: GLOO}), "cpu")
    assert path.stat().st_mode & 0o777 == 0o640
    assert load_config(path) == AllreduceConfig({1: GLOO})


def _value(**overrides: Any) -> dict[str, Any]:
    value: dict[str, Any] = {
        "backend_type": "nccl",
        "use_residual_rmsnorm_fusion": False,
        "backend_name": "nccl",
    }
    value.update(overrides)
    return value


BAD_FILES: list[tuple[str, str, str]] = [
    ("invalid-json", '{"1": {', "invalid JSON at line 1"),
    ("trailing-comma", '{"1": ' + json.dumps(_value()) + ",}", "invalid JSON"),
    ("array", "[1, 2]", "top level must be a JSON object, got an array"),
    ("null", "null", "top level must be a JSON object, got null"),
    ("number", "8", "top level must be a JSON object, got a number"),
    ("empty-object", "{}", "config is empty"),
    ("empty-file", "", "invalid JSON"),
    ("float-key", json.dumps({"8.5": _value()}), "key '8.5' is not a batch size"),
    ("word-key", json.dumps({"abc": _value()}), "key 'abc' is not a batch size"),
    ("negative-key", json.dumps({"-1": _value()}), "key '-1' is not a batch size"),
    ("zero-key", json.dumps({"0": _value()}), "key '0' is not a batch size"),
    ("space-key", json.dumps({" 8": _value()}), "key ' 8' is not a batch size"),
    ("leading-zero", json.dumps({"08": _value()}), "key '08' is not a batch size"),
    ("plus-key", json.dumps({"+8": _value()}), "key '+8' is not a batch size"),
    ("exponent-key", json.dumps({"1e3": _value()}), "key '1e3' is not a batch size"),
    ("unicode-digit", json.dumps({"\u0663": _value()}), "is not a batch size"),
    (
        "duplicate-key",
        '{"8": ' + json.dumps(_value()) + ', "8": ' + json.dumps(_value()) + "}",
        "key '8' appears twice",
    ),
    ("value-list", json.dumps({"8": ["nccl"]}), "batch size 8: the value must be a JSON object"),
    ("value-str", json.dumps({"8": "nccl"}), "the value must be a JSON object, got a string"),
    ("extra-field", json.dumps({"8": _value(latency_us=3.1)}), "unknown field(s) 'latency_us'"),
    (
        "missing-field",
        json.dumps({"8": {"backend_type": "nccl", "backend_name": "nccl"}}),
        "missing field(s) 'use_residual_rmsnorm_fusion'",
    ),
    ("type-not-str", json.dumps({"8": _value(backend_type=3)}), "backend_type must be a string"),
    ("unknown-type", json.dumps({"8": _value(backend_type="mpi")}), "unknown backend_type 'mpi'"),
    ("fusion-int", json.dumps({"8": _value(use_residual_rmsnorm_fusion=1)}), "true or false"),
    ("fusion-str", json.dumps({"8": _value(use_residual_rmsnorm_fusion="false")}), "true or false"),
    (
        "fusion-wrong-type",
        json.dumps({"8": _value(use_residual_rmsnorm_fusion=True)}),
        "only 'flashinfer_fusion' may fuse",
    ),
    ("name-not-str", json.dumps({"8": _value(backend_name=None)}), "backend_name must be a string"),
    ("name-empty", json.dumps({"8": _value(backend_name="")}), "backend_name must be non-empty"),
    ("name-padded", json.dumps({"8": _value(backend_name=" nccl")}), "no surrounding whitespace"),
    (
        "mixed-devices",
        json.dumps({"8": _value(), "16": _value(backend_type="gloo")}),
        "mixes GPU and CPU",
    ),
    (
        "bad-late-entry",
        json.dumps({"1": _value(), "2": _value(), "3": {"backend_type": "x"}}),
        "batch size 3",
    ),
]


@pytest.mark.parametrize(
    ("text", "problem"), [c[1:] for c in BAD_FILES], ids=[c[0] for c in BAD_FILES]
)
def test_bad_file_is_refused_with_its_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = tmp_path / "allreduce_config_hidden=16,device=cpu.json"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith(str(path) + ": "), message
    assert problem in message, message


def test_unreadable_and_undecodable_files(tmp_path: Path) -> None:
    missing = tmp_path / "nope.json"
    with pytest.raises(ConfigError, match=r"nope\.json: cannot read the config"):
        load_config(missing)
    with pytest.raises(ConfigError, match="cannot read the config"):
        load_config(tmp_path)  # a directory
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(ConfigError, match=r"bin\.json: not UTF-8"):
        load_config(binary)
    # Never blocks on a FIFO nor reads a device until memory runs out.
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError, match=r"fifo\.json: cannot read the config: .*FIFO"):
        load_config(fifo)
    with pytest.raises(ConfigError, match=r"/dev/zero: cannot read the config"):
        load_config("/dev/zero")


def test_a_huge_key_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "huge.json"
    path.write_text(json.dumps({"7" * 5000: _value()}))
    with pytest.raises(ConfigError, match=r"huge\.json: key .*above the largest allowed value"):
        load_config(path)


def test_json_text_errors_name_the_source() -> None:
    with pytest.raises(ConfigError, match=r"^<json text>: the top level must be a JSON object"):
        load_config("[]")
    with pytest.raises(TypeError):
        load_config(42)  # type: ignore[arg-type]


def test_load_reports_and_can_require_the_device(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.json", gpu_config(), "cuda")
    assert load_config(path).device == "cuda"
    assert load_config(path, expect_device="cuda:0").device == "cuda"
    with pytest.raises(ConfigError, match=r"a CUDA config .* where a CPU config is expected"):
        load_config(path, expect_device="cpu")


def test_keys_must_ascend_on_load() -> None:
    # The consumer gives a tie to the key first in the file: only ascending files mean
    # "ties to the smaller key".
    with pytest.raises(ConfigError, match="key 1 comes after 64: keys must ascend"):
        load_config(json.dumps({"64": _value(), "1": _value(), "8": _value()}))
    assert load_config(json.dumps({"1": _value(), "8": _value()})).batch_sizes == (1, 8)


# ---- names: what the consumer can run for each entry ---------------------------------------


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (_value(backend_name="custom_ar"), None),  # SGLang's nccl path takes custom allreduce
        (_value(backend_name="pynccl"), None),  # ... and pynccl inside graphs past its buffer
        (
            _value(
                backend_type="flashinfer_fusion",
                use_residual_rmsnorm_fusion=True,
                backend_name="flashinfer_fusion_one_shot",
            ),
            None,
        ),
        (
            _value(
                backend_type="flashinfer_fusion",
                use_residual_rmsnorm_fusion=True,
                backend_name="flashinfer_fusion_two_shot",
            ),
            "never runs 'flashinfer_fusion_two_shot'",
        ),
        (
            _value(
                backend_type="flashinfer_fusion",
                use_residual_rmsnorm_fusion=True,
                backend_name="flashinfer_fusion_one_shot_fp8",
            ),
            "never runs 'flashinfer_fusion_one_shot_fp8'",
        ),
        (
            _value(backend_type="flashinfer_fusion", backend_name="flashinfer_fusion_one_shot"),
            "is not an entry SGLang adaptive allreduce configs hold",
        ),
        (
            _value(backend_type="torch_symm_mem", backend_name="torch_symm_mem_one_shot"),
            "never runs 'torch_symm_mem_one_shot'",
        ),
        (_value(backend_type="torch_symm_mem", backend_name="torch_symm_mem_multimem"), None),
        (_value(backend_name="vllm_custom_ar"), "never runs 'vllm_custom_ar'"),
        (_value(backend_name="flashinfer_trtllm"), "never runs 'flashinfer_trtllm'"),
        (_value(backend_type="cpu_shm", backend_name="gloo"), None),  # past cpu_shm's limit
        (_value(backend_type="gloo", backend_name="cpu_shm"), "never runs 'cpu_shm'"),
    ],
)
def test_names_are_what_the_consumer_runs_for_the_entry(
    value: dict[str, Any], problem: str | None
) -> None:
    text = json.dumps({"8": value})
    if problem is None:
        assert load_config(text)[8].backend_name == value["backend_name"]
        return
    with pytest.raises(ConfigError, match=re.escape(problem)):
        load_config(text)


def test_config_paths_name_both_generations_and_partial_files(tmp_path: Path) -> None:
    gen1, gen2 = config_paths(tmp_path, 2, 4096, "NVIDIA H200", "cuda")
    assert gen1 == config_path(tmp_path, 2, 4096, "NVIDIA H200")
    assert gen2 == tmp_path / "tp2" / "allreduce_config_hidden=4096,tp=2,device=NVIDIA_H200.json"
    (cpu,) = config_paths(tmp_path, 2, 16, "cpu", "cpu", partial=True)
    assert cpu.name == "allreduce_config_hidden=16,device=cpu.partial.json"


# ---- lookup --------------------------------------------------------------------------------


LOOKUP_GRIDS: list[list[int]] = [
    [1],
    [4096],
    [1, 2],
    [8, 64],  # tie at 36
    [1, 2, *range(32, 512, 8)],  # the consumer tuner's default grid
    [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096],
    [3, 5, 6, 100, 101, 999],
    sorted(random.Random(7).sample(range(1, 5000), 40)),
]


@pytest.mark.parametrize("keys", LOOKUP_GRIDS, ids=lambda keys: f"{len(keys)}keys")
def test_lookup_matches_the_rule_for_every_batch_size(keys: list[int]) -> None:
    names = {k: ConfigEntry("nccl", False, f"b{k}") for k in keys}
    config = AllreduceConfig(dict(reversed(list(names.items()))))
    for batch_size in range(1, 4097):
        expected = brute_force_key(keys, batch_size)
        assert config.lookup_key(batch_size) == expected, batch_size
        assert config.lookup(batch_size) is names[expected]


def test_lookup_edges() -> None:
    config = AllreduceConfig({8: GLOO, 64: SHM})
    assert config.lookup(36) == GLOO  # exact tie: the smaller key
    assert config.lookup(37) == SHM
    assert config.lookup(1) == GLOO
    assert config.lookup(10**9) == SHM
    for bad in (0, -3, 1.5, "8", True, None):
        with pytest.raises(ValueError, match="positive int"):
            config.lookup(bad)  # type: ignore[arg-type]


# ---- AdaptiveAllReduce in one process (fake backends, no process group) --------------------


class _OneRankContext(RankContext):
    """A group of one: exchanges need no process group."""

    def all_gather_object(self, obj: Any) -> list[Any]:
        return [obj]

    def barrier(self) -> None:
        pass


def _one_rank(device: str) -> RankContext:
    return _OneRankContext(0, 1, 0, 1, torch.device(device), None, None, timeout_s=5.0)


class _FakeFusion(Backend):
    """Plays flashinfer_fusion on CPU tensors for a group of one (the sum is the input)."""

    name = "flashinfer_fusion"
    variants = (VariantSpec("one_shot", server_type="flashinfer_fusion", fused=True),)
    fused_calls = 0

    @classmethod
    def limits(cls, variant: str, world_size: int) -> Limits:
        return Limits(device="cuda", dtypes=("float32",))

    @classmethod
    def probe(cls, ctx: RankContext, variant: str) -> str | None:
        return None

    def setup(self) -> None:
        pass

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        out.copy_(inp)

    def close(self) -> None:
        pass  # the "cuda" context is pretend: nothing to synchronise

    def _fused(self, inp, residual, weight, eps, out, residual_out) -> None:  # type: ignore[no-untyped-def]
        type(self).fused_calls += 1
        out.copy_(inp)
        residual_out.copy_(residual)
        add_rms_norm(inp.device).fn(out, residual_out, weight, eps)


class _FakeNccl(_FakeFusion):
    name = "nccl"
    variants = (VariantSpec(server_type="nccl"),)

    @classmethod
    def limits(cls, variant: str, world_size: int) -> Limits:
        return Limits(device="cuda", dtypes=("float32",))


class _RefusingNccl(_FakeNccl):
    @classmethod
    def probe(cls, ctx: RankContext, variant: str) -> str | None:
        return "no NCCL here"


def _registry(*classes: type[Backend]) -> BackendRegistry:
    registry = BackendRegistry()
    for cls in classes:
        registry.register(cls)
    return registry


def test_adaptive_fused_and_composed_paths() -> None:
    config = AllreduceConfig({1: FUSION, 64: NCCL})
    ar = AdaptiveAllReduce(
        _one_rank("cuda"), config, 8, torch.float32, 128, _registry(_FakeFusion, _FakeNccl)
    )
    assert sorted(ar.backends) == ["flashinfer_fusion_one_shot", "nccl"]
    gen = torch.Generator().manual_seed(0)
    weight = torch.rand(8, generator=gen)
    for rows, fused in ((2, True), (100, False)):
        x, residual = torch.randn(rows, 8, generator=gen), torch.randn(rows, 8, generator=gen)
        calls = _FakeFusion.fused_calls
        out, residual_out = ar.fused_add_rms_norm(x, residual, weight, 1e-6)
        assert (_FakeFusion.fused_calls - calls == 1) is fused
        total = x.double() + residual.double()
        expect = total / total.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * weight.double()
        torch.testing.assert_close(out, expect.float())  # float32's own tolerance
        torch.testing.assert_close(residual_out, x + residual)
        assert torch.equal(ar.all_reduce(x), x)
    ar.close()
    assert ar.backends == {}


def test_adaptive_composes_when_the_backend_does_not_fuse() -> None:
    class NotFused(_FakeFusion):
        variants = (VariantSpec("one_shot", server_type="flashinfer_fusion"),)

    with pytest.warns(RuntimeWarning, match="does not fuse here"):
        ar = AdaptiveAllReduce(
            _one_rank("cuda"),
            AllreduceConfig({1: FUSION}),
            8,
            torch.float32,
            4,
            _registry(NotFused),
        )
    assert ar.unfused == ["flashinfer_fusion_one_shot"]
    x, residual, weight = torch.ones(2, 8), torch.ones(2, 8), torch.full((8,), 3.0)
    out, residual_out = ar.fused_add_rms_norm(x, residual, weight, 0.0)
    assert torch.equal(out, torch.full((2, 8), 3.0))
    assert torch.equal(residual_out, torch.full((2, 8), 2.0))


def test_adaptive_refusals_before_any_set_up() -> None:
    ctx = _one_rank("cuda")
    with pytest.raises(ConfigError, match=r"batch size 64: backend_name 'nccl' is not a backend"):
        AdaptiveAllReduce(
            ctx, AllreduceConfig({1: FUSION, 64: NCCL}), 8, torch.float32, 4, _registry(_FakeFusion)
        )
    with pytest.raises(ConfigError, match=r"nccl on rank 0: no NCCL here"):
        AdaptiveAllReduce(
            ctx, AllreduceConfig({1: NCCL}), 8, torch.float32, 4, _registry(_RefusingNccl)
        )
    wrong = AllreduceConfig({1: ConfigEntry("torch_symm_mem", False, "flashinfer_fusion_one_shot")})
    with pytest.raises(ConfigError, match="never runs 'flashinfer_fusion_one_shot'"):
        AdaptiveAllReduce(ctx, wrong, 8, torch.float32, 4, _registry(_FakeFusion))
    with pytest.raises(ConfigError, match="CUDA config cannot run on device cpu"):
        AdaptiveAllReduce(_one_rank("cpu"), gpu_config(), 8, torch.float32, 4)
    with pytest.raises(ConfigError, match="'ghost' is not a backend"):
        AdaptiveAllReduce(
            _one_rank("cpu"),
            AllreduceConfig({1: ConfigEntry("gloo", False, "ghost")}),
            8,
            torch.float32,
            4,
        )


# ---- AdaptiveAllReduce with 2 real ranks on the CPU ----------------------------------------

HIDDEN = 16
MAX_ROWS = 4096
REDUCE_ROWS = (1, 4, 5, 8, 36, 37, 64, 100, 288, 289, 512, 1280, 1281, 2048, 4096)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_input(rank: int, rows: int) -> torch.Tensor:
    # Small integers: every summation order gives the exact same float sum.
    gen = torch.Generator().manual_seed(rows * 1000 + rank)
    return torch.randint(-8, 9, (rows, HIDDEN), generator=gen).float()


def _two_rank_worker(rank: int, world_size: int, port: int, config_file: str) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=30),
    )
    try:
        world = dist.group.WORLD
        ctx = RankContext(
            rank, world_size, rank, world_size, torch.device("cpu"), world, world, timeout_s=30.0
        )
        config = load_config(config_file, expect_device="cpu")
        ar = AdaptiveAllReduce(ctx, config, HIDDEN, torch.float32, MAX_ROWS)
        assert sorted(ar.backends) == ["cpu_shm", "gloo"]

        for rows in range(1, MAX_ROWS + 1):
            assert ar.backend_for(rows).full_name == config.lookup(rows).backend_name, rows

        # Count which backend really ran each call, not just which one was picked.
        ran: list[str] = []
        for name, backend in ar.backends.items():
            inner = backend._all_reduce

            def spy(inp: torch.Tensor, out: torch.Tensor, _n: str = name, _f: Any = inner) -> None:
                ran.append(_n)
                _f(inp, out)

            backend._all_reduce = spy  # type: ignore[method-assign]

        weight = torch.linspace(0.5, 1.5, HIDDEN)
        for rows in REDUCE_ROWS:
            x = _rank_input(rank, rows)
            expected = sum(_rank_input(r, rows) for r in range(world_size))
            got = ar.all_reduce(x)
            assert ran[-1] == config.lookup(rows).backend_name, (rows, ran[-1])
            assert torch.equal(got, expected), f"rank {rank}: wrong sum at {rows} rows"
            assert torch.equal(x, _rank_input(rank, rows)), "input was modified"

            residual = torch.full((rows, HIDDEN), float(rank + 1))  # differs per rank
            out, residual_out = ar.fused_add_rms_norm(x, residual, weight, 1e-5)
            ref_out, ref_res = expected.clone(), residual.clone()
            add_rms_norm(ref_out.device).fn(ref_out, ref_res, weight, 1e-5)
            assert torch.equal(residual_out, expected + residual)
            assert torch.equal(out, ref_out) and torch.equal(residual_out, ref_res)
        ar.close()
    finally:
        dist.destroy_process_group()


def test_adaptive_two_ranks_cpu(tmp_path: Path) -> None:
    pytest.importorskip("pytest_allreduce.backends.gloo")
    pytest.importorskip("pytest_allreduce.backends.cpu_shm")
    config = AllreduceConfig({1: SHM, 8: GLOO, 64: SHM, 512: GLOO, 2048: SHM})
    path = write_config(config_path(tmp_path, 2, HIDDEN, "cpu"), config, "cpu")
    context = mp.spawn(_two_rank_worker, args=(2, _free_port(), str(path)), nprocs=2, join=False)
    deadline = time.monotonic() + 60
    try:
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                pytest.fail("2-rank AdaptiveAllReduce test did not finish within 60 s")
    finally:
        for proc in context.processes:
            if proc.is_alive():
                proc.kill()
                proc.join(5)


def test_warnings_are_quiet_for_a_consistent_config() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        AdaptiveAllReduce(
            _one_rank("cuda"), AllreduceConfig({1: NCCL}), 8, torch.float32, 4, _registry(_FakeNccl)
        ).close()


# ---- the CPU runtime follows the CPU profile past cpu_shm's limit --------------------------

WIDE = 4096  # float32: 16 KiB a row, so cpu_shm's 16 MiB hold 1024 rows


def _past_the_limit_worker(rank: int, world_size: int, port: int) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=timedelta(seconds=30),
    )
    try:
        world = dist.group.WORLD
        ctx = RankContext(
            rank, world_size, rank, world_size, torch.device("cpu"), world, world, timeout_s=30.0
        )
        config = AllreduceConfig({1: SHM})
        ar = AdaptiveAllReduce(ctx, config, WIDE, torch.float32, 1100)
        assert sorted(ar.backends) == ["cpu_shm", "gloo"]
        assert ar.backends["cpu_shm"].max_rows == 1024  # never set up past its limit
        assert ar.variant_for(1024) == "cpu_shm" and ar.variant_for(1025) == "gloo"
        for rows in (1024, 1025, 1100):
            x = torch.full((rows, WIDE), float(rank + 1))
            assert torch.equal(ar.all_reduce(x), torch.full((rows, WIDE), 3.0)), rows
        ar.close()
    finally:
        dist.destroy_process_group()


def test_adaptive_cpu_runs_gloo_past_cpu_shms_limit() -> None:
    context = mp.spawn(_past_the_limit_worker, args=(2, _free_port()), nprocs=2, join=False)
    deadline = time.monotonic() + 90
    try:
        while not context.join(timeout=0.5):
            if time.monotonic() > deadline:
                pytest.fail("2-rank AdaptiveAllReduce test did not finish within 90 s")
    finally:
        for proc in context.processes:
            if proc.is_alive():
                proc.kill()
                proc.join(5)
