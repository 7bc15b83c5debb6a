"""The machine fingerprint on the CPU, and its resilience to missing tools."""

from __future__ import annotations

import json
import subprocess
import sys
import types

import torch

from pytest_allreduce import fingerprint
from pytest_allreduce.config import device_label
from pytest_allreduce.context import RankContext


def cpu_ctx() -> RankContext:
    return RankContext(
        rank=0,
        world_size=2,
        local_rank=0,
        local_world_size=2,
        device=torch.device("cpu"),
        group=None,
        cpu_group=None,
        timeout_s=10.0,
    )


def test_collect_on_the_cpu() -> None:
    fp = fingerprint.collect(cpu_ctx())
    json.dumps(fp)  # plain data, ready for the evidence
    assert fp["device_type"] == "cpu"
    assert fp["device_name"] == "cpu"
    assert fp["world_size"] == 2
    assert fp["torch_version"] == torch.__version__
    assert fp["python_version"].count(".") == 2
    assert isinstance(fp["cpu_count"], int) and fp["cpu_count"] > 0
    assert fp["hostname"]
    assert fp["cpu_model"]
    for key in ("compute_capability", "driver_version", "topology"):
        assert fp[key].startswith("unavailable: device is cpu")
    for key in ("flashinfer_version", "sgl_kernel_version", "cuda_version", "nccl_version"):
        assert isinstance(fp[key], str) and fp[key]
    assert fingerprint.device_name(fp) == "cpu"


def test_library_version_falls_back_to_module_version(monkeypatch) -> None:
    module = types.ModuleType("fake_kernel_lib")
    module.__version__ = "9.9.9"
    monkeypatch.setitem(sys.modules, "fake_kernel_lib", module)
    assert fingerprint._library_version(("no-such-dist-xyz",), "fake_kernel_lib") == "9.9.9"
    missing = fingerprint._library_version(("no-such-dist-xyz",), "no_such_module_xyz")
    assert missing.startswith("unavailable: not installed")


def test_missing_tools_are_recorded_not_raised(monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise subprocess.TimeoutExpired("nvidia-smi", 15)

    monkeypatch.setattr(fingerprint.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(fingerprint.subprocess, "run", broken)
    assert fingerprint._driver_version().startswith("unavailable:")
    monkeypatch.setattr(fingerprint.shutil, "which", lambda name: None)
    assert "not found" in fingerprint._driver_version()


def test_collect_survives_a_failing_probe(monkeypatch) -> None:
    def boom() -> int:
        raise RuntimeError("no cuda here")

    monkeypatch.setattr(torch.cuda, "device_count", boom)
    fp = fingerprint.collect(cpu_ctx())
    assert fp["device_count"] == "unavailable: RuntimeError: no cuda here"


def test_device_name_and_its_label() -> None:
    assert fingerprint.device_name({"device_type": "cpu", "device_name": "cpu"}) == "cpu"
    name = fingerprint.device_name({"device_type": "cuda", "device_name": "NVIDIA H100 80GB HBM3"})
    assert device_label(name) == "NVIDIA_H100_80GB_HBM3"
    assert fingerprint.device_name({"device_type": "cuda", "device_name": "unavailable: x"}) == (
        "unknown device"
    )
    assert device_label(fingerprint.device_name({})) == "unknown_device"
