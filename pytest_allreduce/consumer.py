"""What the server really runs for a config entry: the consumer profile.

A config is only worth what its reader does with it. The reader this project writes for is
SGLang's adaptive allreduce, which exists only in forks of SGLang; it often runs something
other than the variant an entry's ``backend_name`` names (the name is only logged). This
module states, as data and small rules, which of this project's variants that reader runs for
an entry ``(backend_type, use_residual_rmsnorm_fusion)`` on a given server at a given token
count, whether the residual add + RMSNorm is fused into that call, and where each backend
stops taking the input.

Sources, read as stored copies (the notes file of issue 11 has the details; "F1'" below is
i-love-debugging/sglang, manager.py @ea467f5f, with the rest of that fork @26e71b4a):

* fork dispatcher: python/sglang/srt/layers/allreduce/adaptive_allreduce.py, F1 @26e71b4a,
  dongs0104/sglang @cc6b901b, hxieustc/sglang @8f3159c0 (identical per-type dispatch);
* fork loader: .../allreduce/config.py, same commits (file names, directories, no-file rule);
* upstream SGLang (sgl-project/sglang): custom_all_reduce.py @004e6561 and @263bc85d,
  torch_symm_mem.py @5a7255c6, all_reduce_utils.py @25b38cc2, parallel_state.py @0005973a,
  flashinfer_comm_fusion.py @cc28b8ab; FlashInfer flashinfer/comm/trtllm_ar.py @01021e50.

What this profile assumes about the fork: the manager of F1' (the only stored version in which
every backend is really set up: it creates FlashInfer's workspace before building the layer
and gives custom allreduce the CPU group it requires); SGLang's default server flags (custom
allreduce on; torch symm mem, MSCCL++ and symmetric-memory NCCL off); CUDA, not ROCm.

SGLang's "nccl path" (``tensor_model_parallel_all_reduce``, also every fallback) is SGLang's
own dispatch: its custom allreduce when that accepts the bytes, else NCCL. Inside a captured
CUDA graph that NCCL call is pynccl's raw NCCL (``graph_capture`` enables pynccl), which this
project names ``pynccl``; outside graphs (prefill, eager decode) it is torch.distributed's
NCCL, named ``nccl`` here.

Importing this module must not import torch: selection and the config writer use it.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass

MiB = 1 << 20
ITEMSIZE: dict[str, int] = {"float32": 4, "float16": 2, "bfloat16": 2}

# ---- facts, each with where it was read ----------------------------------------------------

# CustomAllreduce as SGLang builds it (custom_all_reduce.py): world sizes, the default
# max_size (8 MiB, inputs strictly below it), and 16-byte alignment in should_custom_ar; above
# 2 ranks only with full NVLink (at 2 ranks it needs peer access, assumed here). sgl-kernel's
# kernels take all three dtypes of ITEMSIZE.
CUSTOM_AR_WORLD_SIZES: tuple[int, ...] = (2, 4, 6, 8)
CUSTOM_AR_MAX_BYTES = 8 * MiB  # exclusive
CUSTOM_AR_ALIGNMENT = 16

# TorchSymmMemCommunicator (torch_symm_mem.py, all_reduce_utils.py): bfloat16 only, 4-byte
# aligned, strictly below the per-(capability major, world size) size; multimem at the listed
# world sizes, two_shot otherwise, never one_shot. It disables itself below major 9 and when
# the symmetric buffer has no multicast address; a major missing from the table makes its
# constructor raise, which the fork's manager turns into "unavailable" or a failed start.
SYMM_MEM_MAX_BYTES: dict[int, dict[int, int]] = {
    9: {2: 64 * MiB, 4: 64 * MiB, 6: 128 * MiB, 8: 128 * MiB},
    10: {2: 64 * MiB, 4: 64 * MiB, 6: 128 * MiB, 8: 128 * MiB},
}
SYMM_MEM_MULTIMEM_WORLD_SIZES: dict[int, tuple[int, ...]] = {9: (4, 6, 8), 10: (6, 8)}
SYMM_MEM_DTYPE = "bfloat16"
SYMM_MEM_ALIGNMENT = 4
SYMM_MEM_MIN_MAJOR = 9

# The fork's FlashInfer call (adaptive_allreduce.py): always use_oneshot=True,
# launch_with_pdl=True, fp32_acc=True, pattern kARResidualRMSNorm, only with the fusion flag
# true. No size or dtype check: the bound is the workspace F1' creates (max_token_num 2048,
# hidden_dim 4096, 16-bit Lamport buffers), i.e. tokens * hidden elements per rank, and beyond
# it FlashInfer (given no workspace metadata) launches anyway: trtllm_ar.py's own validator
# calls that a possible illegal memory access. World sizes, capability majors and the hidden
# multiple are FlashInfer's kernel dispatch (this project's backends/_flashinfer.py); there
# FlashInfer raises, which the fork turns into the nccl path.
FUSION_WORKSPACE_ELEMENTS = 2048 * 4096
FUSION_DTYPES: tuple[str, ...] = ("bfloat16", "float16")
FUSION_WORLD_SIZES: tuple[int, ...] = (2, 4, 8, 16)
FUSION_MAJORS: tuple[int, ...] = (9, 10, 12)
FUSION_HIDDEN_MULTIPLE = 8

# The fork's no-file rule (config.py get_default_allreduce_config), also used for an empty file.
NO_FILE_FUSION_MAX_TOKENS = 128

# Where each generation of the fork looks for its file (config.py): generation 1 (F1) takes
# $SGLANG_ALLREDUCE_CONFIG_DIR, else the package directory; generation 2 (dongs0104, hxieustc)
# names the TP size and reads the package directory only.
CONFIG_DIR_ENV = "SGLANG_ALLREDUCE_CONFIG_DIR"
PACKAGE_CONFIG_DIR = "sglang/srt/layers/allreduce/configs"

# This project's CPU runtime: cpu_shm's declared limit (backends/cpu_shm.py), inclusive; it
# takes all three dtypes of ITEMSIZE.
CPU_SHM_MAX_BYTES = 16 * MiB


# ---- the questions and the answers -----------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One config value as the consumer reads it: its type and its fusion flag."""

    backend_type: str
    fused: bool  # use_residual_rmsnorm_fusion

    def __post_init__(self) -> None:
        if not isinstance(self.backend_type, str) or not self.backend_type:
            raise ValueError(f"backend_type must be a non-empty string, got {self.backend_type!r}")
        if not isinstance(self.fused, bool):
            raise ValueError(f"fused must be a bool, got {self.fused!r}")


@dataclass(frozen=True)
class Server:
    """The server state a dispatch depends on, apart from the token count.

    Build it with :meth:`cuda` or :meth:`cpu`; every CUDA fact must be stated.
    """

    device: str
    world_size: int
    dtype: str
    hidden: int
    capability: tuple[int, int] | None
    multicast: bool
    full_nvlink: bool
    in_cuda_graph: bool  # decode replays captured graphs; prefill runs eagerly

    @classmethod
    def cuda(
        cls,
        *,
        world_size: int,
        capability: tuple[int, int],
        multicast: bool,
        full_nvlink: bool,
        dtype: str,
        hidden: int,
        in_cuda_graph: bool,
    ) -> Server:
        return cls(
            "cuda", world_size, dtype, hidden, capability, multicast, full_nvlink, in_cuda_graph
        )

    @classmethod
    def cpu(cls, *, world_size: int, dtype: str, hidden: int) -> Server:
        return cls("cpu", world_size, dtype, hidden, None, False, False, False)

    def __post_init__(self) -> None:
        if self.device not in ("cuda", "cpu"):
            raise ValueError(f"device must be 'cuda' or 'cpu', got {self.device!r}")
        # A config is only read by a tensor-parallel group: one rank never looks it up.
        _check_int("world_size", self.world_size, minimum=2)
        _check_int("hidden", self.hidden, minimum=1)
        if self.dtype not in ITEMSIZE:
            raise ValueError(f"dtype must be one of {', '.join(ITEMSIZE)}, got {self.dtype!r}")
        for label in ("multicast", "full_nvlink", "in_cuda_graph"):
            if not isinstance(getattr(self, label), bool):
                raise ValueError(f"{label} must be a bool, got {getattr(self, label)!r}")
        if self.device == "cuda":
            cap = self.capability
            if not (
                isinstance(cap, tuple)
                and len(cap) == 2
                and all(isinstance(v, int) and not isinstance(v, bool) for v in cap)
            ):
                raise ValueError(f"capability must be a (major, minor) tuple, got {cap!r}")
        elif (
            self.capability is not None or self.multicast or self.full_nvlink or self.in_cuda_graph
        ):
            raise ValueError("a CPU server has no capability, multicast, NVLink or CUDA graphs")

    def nbytes(self, tokens: int) -> int:
        """Bytes per rank of one allreduce of `tokens` rows."""
        return tokens * self.hidden * ITEMSIZE[self.dtype]


@dataclass(frozen=True)
class Run:
    """What the consumer runs for one entry at one token count.

    `variant` is this project's variant name. `fused`: residual add + RMSNorm happen inside
    that call; otherwise the consumer composes them after the allreduce. `input_copied`: the
    consumer copies the input into the backend's own registered buffer in this call (so a
    measurement that skips the copy under-counts it). `declined` lists, in order, what the
    consumer tried first and why each did not take the input. `hazard` is set when the
    consumer makes a call nothing guards and that is not safe: such an entry must never be
    written for that size.
    """

    variant: str
    fused: bool
    input_copied: bool
    declined: tuple[str, ...] = ()
    hazard: str | None = None


@dataclass(frozen=True)
class Stop:
    """A size limit that changes what the consumer runs for an entry.

    At `max_rows` tokens the consumer runs `below`; at `max_rows + 1` it runs `above`.
    """

    max_rows: int
    below: Run
    above: Run


@dataclass(frozen=True)
class ConfigFile:
    """Where one generation of the consumer reads its file."""

    generation: int
    name: str
    env_var: str | None  # a directory named by this variable wins when set
    package_dir: str  # else (or always) this directory inside the installed package


class ConsumerProfile(abc.ABC):
    """A config reader: what it runs per entry, its no-file rule, and its file names."""

    name: str
    device: str
    # The entries a written config may hold: each runs something distinct and honest. The
    # reader accepts other pairs, but they either repeat one of these or name a fusion that
    # never happens.
    entries: tuple[Entry, ...]

    @abc.abstractmethod
    def runs(self, entry: Entry, server: Server, tokens: int) -> Run:
        """What the consumer runs for `entry` on `server` at `tokens` rows."""

    @abc.abstractmethod
    def no_file_entry(self, tokens: int) -> Entry:
        """The entry the consumer uses at `tokens` rows when it finds no (or an empty) file."""

    @abc.abstractmethod
    def _limits_rows(self, server: Server) -> tuple[int, ...]:
        """Largest row counts each of the profile's size limits still accepts on `server`."""

    @abc.abstractmethod
    def config_files(
        self, hidden: int, world_size: int, device_name: str
    ) -> tuple[ConfigFile, ...]:
        """The file name(s) each generation reads for this model, group and device."""

    def stops(self, entry: Entry, server: Server) -> tuple[Stop, ...]:
        """The token counts at which a size limit changes what runs for `entry`, ascending.

        Everything else a dispatch depends on is fixed per server, so each limit's last
        accepted row count is a candidate, and the ones where nothing changes drop out. (With a
        row size that is not a multiple of 16 bytes, custom allreduce also declines single
        counts in between; those are alignment, not stops.)
        """
        self._check_server(server)
        found = []
        for rows in sorted(set(self._limits_rows(server))):
            if rows < 1:
                continue
            below, above = self.runs(entry, server, rows), self.runs(entry, server, rows + 1)
            if _what(below) != _what(above):
                found.append(Stop(rows, below, above))
        return tuple(found)

    def _check_server(self, server: Server) -> None:
        if not isinstance(server, Server):
            raise TypeError(f"server must be a Server, got {type(server).__name__}")
        if server.device != self.device:
            raise ValueError(f"{self.name} serves {self.device}, not a {server.device} server")


def _what(run: Run) -> tuple[str, bool, bool]:
    return run.variant, run.fused, run.hazard is None


# ---- SGLang adaptive allreduce ---------------------------------------------------------------


class SglangAdaptive(ConsumerProfile):
    """SGLang's adaptive allreduce (forks only); see the module docstring for its sources."""

    name = "SGLang adaptive allreduce"
    device = "cuda"
    entries = (
        Entry("flashinfer_fusion", True),
        Entry("torch_symm_mem", False),
        Entry("custom_allreduce", False),
        Entry("nccl", False),
    )

    def runs(self, entry: Entry, server: Server, tokens: int) -> Run:
        self._check_server(server)
        _check_int("tokens", tokens, minimum=1)
        nbytes = server.nbytes(tokens)
        kind = entry.backend_type
        if kind == "flashinfer_fusion":
            if not entry.fused:
                return _nccl_path(server, nbytes, ("flashinfer_fusion: the fusion flag is false",))
            if reason := _fusion_refusal(server):
                return _nccl_path(server, nbytes, (f"flashinfer_fusion_one_shot: {reason}",))
            return Run(
                "flashinfer_fusion_one_shot",
                fused=True,
                input_copied=False,
                hazard=_fusion_hazard(server, tokens),
            )
        if kind == "torch_symm_mem":
            variant, reason = _symm_mem(server, nbytes)
            if reason:
                return _nccl_path(server, nbytes, (f"{variant}: {reason}",))
            return Run(variant, fused=False, input_copied=True)
        if kind == "custom_allreduce":
            if reason := _custom_ar_refusal(server, nbytes):
                return _nccl_path(server, nbytes, (f"custom_ar: {reason}",))
            # The fork's own instance never enters capture(): it copies in even inside graphs.
            return Run("custom_ar", fused=False, input_copied=True)
        # "nccl" and any type the fork does not know take the nccl path.
        return _nccl_path(server, nbytes, ())

    def no_file_entry(self, tokens: int) -> Entry:
        _check_int("tokens", tokens, minimum=1)
        if tokens <= NO_FILE_FUSION_MAX_TOKENS:
            return Entry("flashinfer_fusion", True)
        return Entry("torch_symm_mem", False)

    def _limits_rows(self, server: Server) -> tuple[int, ...]:
        assert server.capability is not None  # a CUDA server, checked by stops()
        per_row = server.hidden * ITEMSIZE[server.dtype]
        rows = [FUSION_WORKSPACE_ELEMENTS // server.hidden, (CUSTOM_AR_MAX_BYTES - 1) // per_row]
        symm = SYMM_MEM_MAX_BYTES.get(server.capability[0], {}).get(server.world_size)
        if symm is not None:
            rows.append((symm - 1) // per_row)
        return tuple(rows)

    def config_files(
        self, hidden: int, world_size: int, device_name: str
    ) -> tuple[ConfigFile, ...]:
        _check_int("hidden", hidden, minimum=1)
        _check_int("world_size", world_size, minimum=2)
        dev = _device_label(device_name)
        return (
            ConfigFile(
                1,
                f"allreduce_config_hidden={hidden},device={dev}.json",
                CONFIG_DIR_ENV,
                PACKAGE_CONFIG_DIR,
            ),
            ConfigFile(
                2,
                f"allreduce_config_hidden={hidden},tp={world_size},device={dev}.json",
                None,
                PACKAGE_CONFIG_DIR,
            ),
        )


def _nccl_path(server: Server, nbytes: int, declined: tuple[str, ...]) -> Run:
    """SGLang's default dispatch: its own custom allreduce if that takes the bytes, else NCCL."""
    if (reason := _custom_ar_refusal(server, nbytes)) is None:
        # SGLang's own instance: registered buffers inside graphs, a staging copy outside.
        return Run(
            "custom_ar", fused=False, input_copied=not server.in_cuda_graph, declined=declined
        )
    nccl = "pynccl" if server.in_cuda_graph else "nccl"
    return Run(nccl, fused=False, input_copied=False, declined=(*declined, f"custom_ar: {reason}"))


def _custom_ar_refusal(server: Server, nbytes: int) -> str | None:
    if server.world_size not in CUSTOM_AR_WORLD_SIZES:
        return f"world size {server.world_size} is not one of {CUSTOM_AR_WORLD_SIZES}"
    if server.world_size > 2 and not server.full_nvlink:
        return f"{server.world_size} ranks without full NVLink"
    if nbytes % CUSTOM_AR_ALIGNMENT:
        return f"{nbytes} bytes is not a multiple of {CUSTOM_AR_ALIGNMENT}"
    if nbytes >= CUSTOM_AR_MAX_BYTES:
        return f"{nbytes} bytes is not below its {CUSTOM_AR_MAX_BYTES}-byte buffer"
    return None


def _symm_mem(server: Server, nbytes: int) -> tuple[str, str | None]:
    """(the variant the communicator would run, why it declines or None)."""
    assert server.capability is not None  # a CUDA server, checked by the caller
    major = server.capability[0]
    multimem = server.world_size in SYMM_MEM_MULTIMEM_WORLD_SIZES.get(major, ())
    variant = "torch_symm_mem_multimem" if multimem else "torch_symm_mem_two_shot"
    if major < SYMM_MEM_MIN_MAJOR:
        return variant, f"disabled below compute capability {SYMM_MEM_MIN_MAJOR}.0"
    if major not in SYMM_MEM_MAX_BYTES:
        return variant, f"no size table for compute capability {major}.x (its set-up fails)"
    max_bytes = SYMM_MEM_MAX_BYTES[major].get(server.world_size)
    if max_bytes is None:
        return variant, f"disabled at world size {server.world_size}"
    if not server.multicast:
        return variant, "disabled: the symmetric buffer has no multicast address"
    if server.dtype != SYMM_MEM_DTYPE:
        return variant, f"takes {SYMM_MEM_DTYPE} only, not {server.dtype}"
    if nbytes % SYMM_MEM_ALIGNMENT:
        return variant, f"{nbytes} bytes is not a multiple of {SYMM_MEM_ALIGNMENT}"
    if nbytes >= max_bytes:
        return variant, f"{nbytes} bytes is not below its {max_bytes}-byte limit"
    return variant, None


def _fusion_refusal(server: Server) -> str | None:
    """Why FlashInfer raises for this server (the fork then takes the nccl path)."""
    assert server.capability is not None  # a CUDA server, checked by the caller
    if server.capability[0] not in FUSION_MAJORS:
        return f"no kernels for compute capability {server.capability[0]}.x"
    if server.world_size not in FUSION_WORLD_SIZES:
        return f"world size {server.world_size} is not one of {FUSION_WORLD_SIZES}"
    if server.hidden % FUSION_HIDDEN_MULTIPLE:
        return f"hidden {server.hidden} is not a multiple of {FUSION_HIDDEN_MULTIPLE}"
    return None


def _fusion_hazard(server: Server, tokens: int) -> str | None:
    """Why the fork's unguarded FlashInfer call is unsafe here, or None."""
    if server.dtype not in FUSION_DTYPES:
        return f"{server.dtype} input on a workspace built for 16-bit data"
    if tokens * server.hidden > FUSION_WORKSPACE_ELEMENTS:
        return (
            f"{tokens} x {server.hidden} elements exceed the workspace's "
            f"{FUSION_WORKSPACE_ELEMENTS}; nothing refuses the call"
        )
    return None


# ---- this project's CPU runtime --------------------------------------------------------------


class CpuRuntime(ConsumerProfile):
    """This project's own runtime on the CPU: the named backend, else gloo."""

    name = "pytest-allreduce CPU runtime"
    device = "cpu"
    entries = (Entry("cpu_shm", False), Entry("gloo", False))

    def runs(self, entry: Entry, server: Server, tokens: int) -> Run:
        self._check_server(server)
        _check_int("tokens", tokens, minimum=1)
        if entry.backend_type == "gloo":
            return Run("gloo", fused=False, input_copied=False)
        if entry.backend_type != "cpu_shm":
            raise ValueError(f"{self.name} has no backend type {entry.backend_type!r}")
        nbytes = server.nbytes(tokens)
        if nbytes <= CPU_SHM_MAX_BYTES:
            return Run("cpu_shm", fused=False, input_copied=True)
        reason = f"cpu_shm: {nbytes} bytes exceeds its {CPU_SHM_MAX_BYTES}-byte slots"
        return Run("gloo", fused=False, input_copied=False, declined=(reason,))

    def no_file_entry(self, tokens: int) -> Entry:
        _check_int("tokens", tokens, minimum=1)
        return Entry("gloo", False)

    def _limits_rows(self, server: Server) -> tuple[int, ...]:
        return (CPU_SHM_MAX_BYTES // (server.hidden * ITEMSIZE[server.dtype]),)

    def config_files(
        self, hidden: int, world_size: int, device_name: str
    ) -> tuple[ConfigFile, ...]:
        # The project's own loader takes any path; it is written under the generation-1 name.
        return SGLANG_ADAPTIVE.config_files(hidden, world_size, device_name)[:1]


SGLANG_ADAPTIVE = SglangAdaptive()
CPU_RUNTIME = CpuRuntime()
DEFAULT_PROFILE: ConsumerProfile = SGLANG_ADAPTIVE


def profile_for(device: str) -> ConsumerProfile:
    """The consumer of configs written for `device` ('cuda' or 'cpu')."""
    for profile in (SGLANG_ADAPTIVE, CPU_RUNTIME):
        if profile.device == device:
            return profile
    raise ValueError(f"no config consumer for device {device!r}; expected 'cuda' or 'cpu'")


def _check_int(label: str, value: object, *, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{label} must be an int >= {minimum}, got {value!r}")


def _device_label(device_name: str) -> str:
    """DEV as the consumer derives it: the device name with spaces made underscores."""
    if not isinstance(device_name, str) or not device_name.strip():
        raise ValueError(f"device_name must be a non-empty string, got {device_name!r}")
    dev = device_name.strip().replace(" ", "_")
    if "/" in dev or "\\" in dev or dev in (".", ".."):
        raise ValueError(f"device_name {device_name!r} cannot be part of a file name")
    return dev
