"""Raw NCCL calls through ctypes on torch's current stream, as servers call NCCL in graphs.

It binds the libnccl torch itself loaded (so the version matches torch's), creates its own
communicator with ncclCommInitRank (unique id from rank 0, exchanged over the CPU group),
and calls ncclAllReduce(inp -> out) out of place on torch's current stream.
"""

from __future__ import annotations

import ctypes
import functools
import glob
import os
from typing import TYPE_CHECKING

from pytest_allreduce.backend import Backend, Limits, VariantSpec
from pytest_allreduce.nccl_env import NCCL_GRAPH_MIXING

from . import _gpu

if TYPE_CHECKING:
    import torch

    from pytest_allreduce.context import RankContext

NCCL_UNIQUE_ID_BYTES = 128
NCCL_SUM = 0  # ncclRedOp_t ncclSum
# ncclDataType_t values of the dtypes this backend accepts.
NCCL_DTYPES: dict[str, int] = {"float16": 6, "float32": 7, "bfloat16": 9}
# Set to a libnccl path to override the library found next to torch.
NCCL_LIBRARY_ENV = "PYTEST_ALLREDUCE_NCCL_LIBRARY"


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_char * NCCL_UNIQUE_ID_BYTES)]


def nccl_dtype(dtype: torch.dtype) -> int:
    try:
        return NCCL_DTYPES[str(dtype).removeprefix("torch.")]
    except KeyError:
        raise ValueError(f"pynccl does not handle {dtype}") from None


def find_libnccl() -> str:
    """The NCCL library: the override, the copy torch loaded, the nvidia wheel, the system."""
    import torch

    override = os.environ.get(NCCL_LIBRARY_ENV)
    if override:
        return override
    if torch.cuda.is_available():
        torch.cuda.init()
    loaded = _gpu.loaded_library("libnccl.so")
    if loaded:
        return loaded
    site = os.path.dirname(os.path.dirname(torch.__file__))
    matches = sorted(glob.glob(os.path.join(site, "nvidia", "**", "libnccl.so*"), recursive=True))
    if matches:
        return matches[-1]
    return "libnccl.so.2"


class NcclLibrary:
    """The few NCCL entry points this backend calls, with their C signatures."""

    def __init__(self, path: str) -> None:
        self.path = path
        lib = ctypes.CDLL(path)
        self.lib = lib
        lib.ncclGetErrorString.argtypes = [ctypes.c_int]
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        lib.ncclGetVersion.argtypes = [ctypes.POINTER(ctypes.c_int)]
        lib.ncclGetUniqueId.argtypes = [ctypes.POINTER(_UniqueId)]
        lib.ncclCommInitRank.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_int,
            _UniqueId,
            ctypes.c_int,
        ]
        lib.ncclAllReduce.argtypes = [
            ctypes.c_void_p,  # sendbuff
            ctypes.c_void_p,  # recvbuff
            ctypes.c_size_t,  # count
            ctypes.c_int,  # datatype
            ctypes.c_int,  # op
            ctypes.c_void_p,  # comm
            ctypes.c_void_p,  # cudaStream_t
        ]
        lib.ncclCommDestroy.argtypes = [ctypes.c_void_p]
        lib.ncclMemAlloc.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_size_t]
        lib.ncclMemFree.argtypes = [ctypes.c_void_p]
        for fn in ("ncclGetVersion", "ncclGetUniqueId", "ncclCommInitRank", "ncclAllReduce"):
            getattr(lib, fn).restype = ctypes.c_int
        lib.ncclMemAlloc.restype = lib.ncclMemFree.restype = ctypes.c_int
        lib.ncclCommDestroy.restype = ctypes.c_int

    def check(self, result: int, call: str) -> None:
        if result != 0:
            text = self.lib.ncclGetErrorString(result)
            message = text.decode() if text else "unknown error"
            raise RuntimeError(f"{call} failed: ncclResult_t {result} ({message})")

    def version(self) -> str:
        code = ctypes.c_int()
        self.check(self.lib.ncclGetVersion(ctypes.byref(code)), "ncclGetVersion")
        value = code.value
        # NCCL >= 2.9 encodes major*10000 + minor*100 + patch.
        return f"{value // 10000}.{value % 10000 // 100}.{value % 100}"

    def unique_id(self) -> bytes:
        uid = _UniqueId()
        self.check(self.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        return bytes(ctypes.string_at(ctypes.byref(uid), NCCL_UNIQUE_ID_BYTES))

    def init_rank(self, world_size: int, uid: bytes, rank: int) -> int:
        comm = ctypes.c_void_p()
        self.check(
            self.lib.ncclCommInitRank(
                ctypes.byref(comm), world_size, _UniqueId.from_buffer_copy(uid), rank
            ),
            "ncclCommInitRank",
        )
        assert comm.value is not None
        return comm.value

    def all_reduce(
        self, send: int, recv: int, count: int, dtype: int, comm: int, stream: int
    ) -> None:
        self.check(
            self.lib.ncclAllReduce(
                ctypes.c_void_p(send),
                ctypes.c_void_p(recv),
                count,
                dtype,
                NCCL_SUM,
                ctypes.c_void_p(comm),
                ctypes.c_void_p(stream),
            ),
            "ncclAllReduce",
        )

    def destroy(self, comm: int) -> None:
        self.check(self.lib.ncclCommDestroy(ctypes.c_void_p(comm)), "ncclCommDestroy")

    def mem_alloc(self, nbytes: int) -> int:
        """Device memory from NCCL's allocator (cuMem), on the current device."""
        ptr = ctypes.c_void_p()
        self.check(self.lib.ncclMemAlloc(ctypes.byref(ptr), nbytes), "ncclMemAlloc")
        assert ptr.value is not None
        return ptr.value

    def mem_free(self, ptr: int) -> None:
        self.check(self.lib.ncclMemFree(ctypes.c_void_p(ptr)), "ncclMemFree")


def graph_mixing() -> str:
    """NCCL's graph-mixing setting in this rank (pytest_allreduce.nccl_env says why it matters
    for captured back-to-back calls)."""
    value = os.environ.get(NCCL_GRAPH_MIXING)
    return f"{NCCL_GRAPH_MIXING}={value}" if value is not None else "NCCL graph mixing default"


@functools.lru_cache(maxsize=1)
def nccl_library() -> NcclLibrary:
    return NcclLibrary(find_libnccl())


class PyncclBackend(Backend):
    name = "pynccl"
    variants = (
        VariantSpec(server_type="nccl", summary="raw ncclAllReduce on torch's current stream"),
    )
    simplicity = 5

    @classmethod
    def limits(cls, variant: str, world_size: int) -> Limits:
        return Limits(
            device="cuda",
            dtypes=("float32", "float16", "bfloat16"),
            world_sizes=None,
            graph_capturable=True,
        )

    @classmethod
    def probe(cls, ctx: RankContext, variant: str) -> str | None:
        if reason := _gpu.cuda_refusal(ctx):
            return reason
        try:
            nccl_library().version()
        except Exception as exc:
            return f"libnccl not usable ({type(exc).__name__}: {exc})"[:200]
        return None

    def setup(self) -> None:
        import torch

        self.nccl = nccl_library()
        self.comm: int | None = None
        uid = self.nccl.unique_id() if self.ctx.rank == 0 else None
        uid = self.ctx.all_gather_object(uid)[0]
        with torch.cuda.device(self.ctx.device):
            # Collective: blocks until every rank of the group has called it.
            self.comm = self.nccl.init_rank(self.ctx.world_size, uid, self.ctx.rank)
        self.nccl_dtype = nccl_dtype(self.dtype)

    def _all_reduce(self, inp: torch.Tensor, out: torch.Tensor) -> None:
        import torch

        assert self.comm is not None
        self.nccl.all_reduce(
            inp.data_ptr(),
            out.data_ptr(),
            inp.numel(),
            self.nccl_dtype,
            self.comm,
            torch.cuda.current_stream(inp.device).cuda_stream,
        )

    def engaged(self) -> str:
        return (
            f"raw ncclAllReduce (NCCL {self.nccl.version()}, {graph_mixing()}) "
            "on torch's current stream"
        )

    def release(self) -> None:
        if self.comm is None:
            return
        comm, self.comm = self.comm, None
        self.nccl.destroy(comm)
