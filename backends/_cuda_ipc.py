"""CUDA IPC buffers for the custom-allreduce backends (sgl-kernel's and FlashInfer's port).

Each rank cudaMallocs a buffer, exports its IPC handle, the ranks exchange handles over the
CPU group, and each opens its peers' handles. The result is one device pointer per rank.
The CUDA runtime is reached through ctypes on the libcudart that torch already loaded, so
the runtime, the driver context and torch's allocator are the same ones.

Failures are agreed on by all ranks before anyone raises, so one rank's failed cudaMalloc
cannot leave the others waiting inside an exchange.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from pytest_allreduce.backend import Backend, Limits

from . import _gpu

if TYPE_CHECKING:
    import torch

    from pytest_allreduce.context import RankContext

IPC_HANDLE_BYTES = 64  # sizeof(cudaIpcMemHandle_t)
_IPC_LAZY_ENABLE_PEER_ACCESS = 1  # cudaIpcMemLazyEnablePeerAccess


class _IpcHandle(ctypes.Structure):
    _fields_ = [("reserved", ctypes.c_char * IPC_HANDLE_BYTES)]


def find_cudart() -> str:
    """The CUDA runtime library torch uses (loaded copy first, then installed copies)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.init()
    found = _gpu.loaded_library("libcudart.so")
    if found:
        return found
    for root in {os.path.dirname(os.path.dirname(torch.__file__))}:
        pattern = os.path.join(root, "nvidia", "**", "libcudart.so*")
        matches = sorted(glob.glob(pattern, recursive=True))
        if matches:
            return matches[-1]
    return ctypes.util.find_library("cudart") or "libcudart.so"


class CudaRuntime:
    """The handful of CUDA runtime calls IPC buffers need, checked."""

    def __init__(self, path: str | None = None) -> None:
        self.path = path or find_cudart()
        self.lib = ctypes.CDLL(self.path)
        lib = self.lib
        lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        lib.cudaGetErrorString.restype = ctypes.c_char_p
        lib.cudaMalloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        lib.cudaFree.argtypes = [ctypes.c_void_p]
        lib.cudaMemset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
        lib.cudaDeviceSynchronize.argtypes = []
        lib.cudaIpcGetMemHandle.argtypes = [ctypes.POINTER(_IpcHandle), ctypes.c_void_p]
        lib.cudaIpcOpenMemHandle.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            _IpcHandle,
            ctypes.c_uint,
        ]
        lib.cudaIpcCloseMemHandle.argtypes = [ctypes.c_void_p]
        for name in (
            "cudaMalloc",
            "cudaFree",
            "cudaMemset",
            "cudaDeviceSynchronize",
            "cudaIpcGetMemHandle",
            "cudaIpcOpenMemHandle",
            "cudaIpcCloseMemHandle",
        ):
            getattr(lib, name).restype = ctypes.c_int

    def _check(self, result: int, call: str) -> None:
        if result != 0:
            text = self.lib.cudaGetErrorString(result)
            message = text.decode() if text else "unknown error"
            raise RuntimeError(f"{call} failed: CUDA error {result} ({message})")

    def malloc(self, nbytes: int) -> int:
        ptr = ctypes.c_void_p()
        self._check(self.lib.cudaMalloc(ctypes.byref(ptr), nbytes), f"cudaMalloc({nbytes})")
        assert ptr.value is not None
        return ptr.value

    def free(self, ptr: int) -> None:
        self._check(self.lib.cudaFree(ctypes.c_void_p(ptr)), "cudaFree")

    def memset(self, ptr: int, value: int, nbytes: int) -> None:
        self._check(self.lib.cudaMemset(ctypes.c_void_p(ptr), value, nbytes), "cudaMemset")

    def synchronize(self) -> None:
        self._check(self.lib.cudaDeviceSynchronize(), "cudaDeviceSynchronize")

    def ipc_handle(self, ptr: int) -> bytes:
        handle = _IpcHandle()
        self._check(
            self.lib.cudaIpcGetMemHandle(ctypes.byref(handle), ctypes.c_void_p(ptr)),
            "cudaIpcGetMemHandle",
        )
        return bytes(ctypes.string_at(ctypes.byref(handle), IPC_HANDLE_BYTES))

    def ipc_open(self, handle: bytes) -> int:
        if len(handle) != IPC_HANDLE_BYTES:
            raise ValueError(f"an IPC handle has {IPC_HANDLE_BYTES} bytes, got {len(handle)}")
        ptr = ctypes.c_void_p()
        self._check(
            self.lib.cudaIpcOpenMemHandle(
                ctypes.byref(ptr),
                _IpcHandle.from_buffer_copy(handle),
                _IPC_LAZY_ENABLE_PEER_ACCESS,
            ),
            "cudaIpcOpenMemHandle",
        )
        assert ptr.value is not None
        return ptr.value

    def ipc_close(self, ptr: int) -> None:
        self._check(self.lib.cudaIpcCloseMemHandle(ctypes.c_void_p(ptr)), "cudaIpcCloseMemHandle")


@functools.lru_cache(maxsize=1)
def cuda_runtime() -> CudaRuntime:
    return CudaRuntime()


def _agree(ctx: RankContext, error: str | None, step: str) -> None:
    """Every rank learns every rank's error for `step`; all raise if any rank failed."""
    errors = ctx.all_gather_object(error)
    failed = [f"rank {r}: {e}" for r, e in enumerate(errors) if e]
    if failed:
        raise RuntimeError(f"{step} failed on " + "; ".join(failed))


@dataclass
class SharedBuffer:
    """One device buffer per rank, every rank holding pointers to all of them."""

    ptrs: list[int]
    nbytes: int
    rank: int

    @property
    def local(self) -> int:
        return self.ptrs[self.rank]


def open_shared_buffer(ctx: RankContext, nbytes: int) -> SharedBuffer:
    """Collective: allocate `nbytes` (zeroed) on every rank and map every peer's buffer."""
    import torch

    rt = cuda_runtime()
    own: int | None = None
    handle: bytes | None = None
    error: str | None = None
    with torch.cuda.device(ctx.device):
        try:
            own = rt.malloc(nbytes)
            rt.memset(own, 0, nbytes)  # custom-allreduce signal counters must start equal
            rt.synchronize()
            handle = rt.ipc_handle(own)
        except Exception as exc:
            error = str(exc)
        handles = ctx.all_gather_object(handle if error is None else None)
        try:
            _agree(ctx, error, "allocating an IPC buffer")
        except RuntimeError:
            if own is not None:
                rt.free(own)
            raise
        assert own is not None
        ptrs: list[int] = []
        opened: list[int] = []
        error = None
        try:
            for peer, peer_handle in enumerate(handles):
                if peer == ctx.rank:
                    ptrs.append(own)
                else:
                    ptr = rt.ipc_open(peer_handle)
                    opened.append(ptr)
                    ptrs.append(ptr)
        except Exception as exc:
            error = str(exc)
        try:
            _agree(ctx, error, "opening peers' IPC buffers")
        except RuntimeError:
            for ptr in opened:
                rt.ipc_close(ptr)
            ctx.barrier()
            rt.free(own)
            raise
    return SharedBuffer(ptrs=ptrs, nbytes=nbytes, rank=ctx.rank)


def close_shared_buffer(ctx: RankContext, buffer: SharedBuffer) -> None:
    """Collective: unmap peers' buffers, wait for every rank, then free the own buffer."""
    import torch

    rt = cuda_runtime()
    with torch.cuda.device(ctx.device):
        for peer, ptr in enumerate(buffer.ptrs):
            if peer != buffer.rank:
                rt.ipc_close(ptr)
        ctx.barrier()
        rt.free(buffer.local)


def gather_graph_buffers(
    ctx: RankContext, handle_bytes: list[int], offsets: list[int]
) -> tuple[list[list[int]], list[list[int]]]:
    """Exchange every rank's captured-buffer IPC metadata (returned by the kernels' library).

    The caller registers the result; ranks must have captured the same number of buffers.
    """
    gathered = ctx.all_gather_object((list(handle_bytes), list(offsets)))
    counts = [len(o) for _, o in gathered]
    if len(set(counts)) != 1:
        raise RuntimeError(f"ranks captured different numbers of allreduce buffers: {counts}")
    return [h for h, _ in gathered], [o for _, o in gathered]


# ---- the custom-allreduce backends (sgl-kernel's and FlashInfer's port) ----------------------

# Servers' defaults: inputs strictly below 8 MiB, an 8 MiB eager staging buffer, and 8 MiB of
# rank data (64 bytes per registered or captured buffer).
CUSTOM_AR_BUFFER_BYTES = 8 * 1024 * 1024
CUSTOM_AR_RANK_DATA_BYTES = 8 * 1024 * 1024
CUSTOM_AR_WORLD_SIZES: tuple[int, ...] = (2, 4, 6, 8)
CUSTOM_AR_ALIGNMENT = 16
# The entry points every custom-allreduce kernel build exports, before its prefix.
KERNEL_FUNCTIONS: tuple[str, ...] = (
    "init_custom_ar",
    "register_buffer",
    "all_reduce",
    "get_graph_buffer_ipc_meta",
    "register_graph_buffers",
    "dispose",
    "meta_size",
)


def custom_ar_limits() -> Limits:
    """Custom allreduce as servers gate it: bytes % 16 == 0 and bytes < 8 MiB (strict)."""
    return Limits(
        device="cuda",
        dtypes=("float32", "float16", "bfloat16"),
        world_sizes=CUSTOM_AR_WORLD_SIZES,
        max_bytes=CUSTOM_AR_BUFFER_BYTES - CUSTOM_AR_ALIGNMENT,
        alignment_bytes=CUSTOM_AR_ALIGNMENT,
        graph_capturable=True,
    )


class CustomAllReduceBase(Backend):
    """vLLM-style custom allreduce over cudaIpc buffers; a subclass names its kernel build.

    The two builds (sgl-kernel's and FlashInfer's port) export the same seven functions,
    FlashInfer's with a `vllm_` prefix and a CTA count as the kernel's last argument, so a
    subclass only declares where they live.

    Set-up (collective): a shared meta buffer (signal + 2-stage scratch), a shared staging
    buffer for eager calls, uint8 rank data, init, and registration of the staging buffer.
    Eager calls copy the input into the staging buffer (reg_buffer = its pointer). Calls
    captured inside `capture()` pass reg_buffer = 0, so the kernel records the captured input
    pointer; `after_capture()` exchanges those pointers' IPC metadata and registers them.
    """

    simplicity = 30
    library_module: ClassVar[str]  # the module exporting the kernels
    package: ClassVar[str]  # what probe answers call it
    distribution: ClassVar[str]  # its pip distribution, for the version in the evidence
    prefix: ClassVar[str] = ""  # the functions' name prefix in that module
    kernel_extra_args: ClassVar[tuple[Any, ...]] = ()  # appended to every kernel call
    min_capability: ClassVar[tuple[int, int] | None] = None

    @classmethod
    def _library(cls) -> Any:
        import importlib

        return importlib.import_module(cls.library_module)

    def _fn(self, name: str) -> Any:
        return getattr(self.lib, self.prefix + name)

    @classmethod
    def limits(cls, variant: str, world_size: int) -> Limits:
        return custom_ar_limits()

    @classmethod
    def probe(cls, ctx: RankContext, variant: str) -> str | None:
        if reason := _gpu.cuda_refusal(ctx):
            return reason
        if reason := _gpu.one_node_refusal(ctx):
            return reason
        if cls.min_capability and (reason := _gpu.min_capability_refusal(ctx, cls.min_capability)):
            return reason
        if reason := _gpu.module_refusal(cls.library_module, cls.package):
            return reason
        lib = cls._library()
        missing = [cls.prefix + f for f in KERNEL_FUNCTIONS if not hasattr(lib, cls.prefix + f)]
        if missing:
            return f"{cls.package} lacks {', '.join(missing)}"
        if reason := _gpu.full_nvlink_refusal(ctx):
            return reason
        return _gpu.peer_access_refusal(ctx)

    def setup(self) -> None:
        import torch

        self.lib = self._library()
        self.fa: int | None = None
        self._capturing = False
        self.meta: SharedBuffer | None = None
        self.staging: SharedBuffer | None = None
        # ws > 2 only runs with full NVLink (the probe refused otherwise); for ws 2 the
        # kernel always takes the 1-stage path, so the flag only records the topology.
        self.full_nvlink = self.ctx.world_size > 2 or _gpu.full_nvlink(self.ctx)[0]
        meta_size = int(self._fn("meta_size")())
        self.meta = open_shared_buffer(self.ctx, meta_size + CUSTOM_AR_BUFFER_BYTES)
        self.staging = open_shared_buffer(self.ctx, CUSTOM_AR_BUFFER_BYTES)
        with torch.cuda.device(self.ctx.device):
            self.rank_data = torch.empty(
                CUSTOM_AR_RANK_DATA_BYTES, dtype=torch.uint8, device=self.ctx.device
            )
            self.fa = int(
                self._fn("init_custom_ar")(
                    self.meta.ptrs, self.rank_data, self.ctx.rank, self.full_nvlink
                )
            )
            self._fn("register_buffer")(self.fa, self.staging.ptrs)
        self.ctx.barrier()

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        import torch

        assert self.staging is not None
        if torch.cuda.is_current_stream_capturing():
            if not self._capturing:
                raise RuntimeError(
                    f"{self.full_name} was captured outside its capture() context, so its "
                    "graph buffers would never be registered"
                )
            reg_ptr, reg_bytes = 0, 0
        else:
            reg_ptr, reg_bytes = self.staging.local, self.staging.nbytes
        self._fn("all_reduce")(self.fa, inp, out, reg_ptr, reg_bytes, *self.kernel_extra_args)

    @contextlib.contextmanager
    def _capture_context(self) -> Iterator[None]:
        self._capturing = True
        try:
            yield
        finally:
            self._capturing = False

    def capture(self) -> contextlib.AbstractContextManager[None]:
        return self._capture_context()

    def after_capture(self) -> int:
        handle_bytes, offsets = self._fn("get_graph_buffer_ipc_meta")(self.fa)
        handles, all_offsets = gather_graph_buffers(self.ctx, list(handle_bytes), list(offsets))
        self._fn("register_graph_buffers")(self.fa, handles, all_offsets)
        return len(offsets)

    def engaged(self) -> str:
        nvlink = "full NVLink" if self.full_nvlink else "no full NVLink"
        return (
            f"{self.spec.summary} ({nvlink}; {self.package} "
            f"{_gpu.package_version(self.distribution)}); eager: copy-in to the registered "
            "staging buffer; graphs: captured input buffers registered after capture"
        )

    def release(self) -> None:
        if self.fa is not None:
            self._fn("dispose")(self.fa)
            self.fa = None
        for name in ("staging", "meta"):
            buffer = getattr(self, name, None)
            if buffer is not None:
                close_shared_buffer(self.ctx, buffer)
                setattr(self, name, None)
