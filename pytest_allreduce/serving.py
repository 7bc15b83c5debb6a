"""The server a config is written for, as the consumer profile sees it.

`consumer.py` says what the config's reader runs for an entry on a given `Server`. This module
builds that `Server` for a session from what the session knows (the machine fingerprint and
the backends' availability), and lists every server state the profile distinguishes, which
the plan (how far its tail must reach) and the loader (which names an entry may carry) use.
It imports no torch.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cache
from typing import Any

from . import consumer
from .consumer import ConsumerProfile, Entry, Run, Server
from .model import GroupKey
from .results import ResultStore

# The engine times every job as CUDA-graph replays (timing.py), as servers replay their
# decode steps, so the server is modelled inside a graph. SGLang runs forwards larger than its
# captured batch sizes (prefill) eagerly; there its NCCL call is torch.distributed's instead of
# pynccl's (the same NCCL kernels) and its own custom allreduce copies the input in.
IN_CUDA_GRAPH = True

# Server facts that change what the SGLang profile runs, beyond the token count: every value
# its rules name, plus one just outside them (world size 3, capability 8 and 11), and a hidden
# size that breaks every alignment and the fusion's hidden multiple.
_WORLD_SIZES = tuple(
    sorted(
        {3}
        | set(consumer.CUSTOM_AR_WORLD_SIZES)
        | set(consumer.FUSION_WORLD_SIZES)
        | {ws for sizes in consumer.SYMM_MEM_MAX_BYTES.values() for ws in sizes}
    )
)
_MAJORS = tuple(
    sorted(
        {consumer.SYMM_MEM_MIN_MAJOR - 1, max(consumer.SYMM_MEM_MAX_BYTES) + 1}
        | set(consumer.SYMM_MEM_MAX_BYTES)
        | set(consumer.FUSION_MAJORS)
    )
)
_HIDDEN = (4096, 4097)


@dataclass(frozen=True)
class ServerState:
    """The consumer's server for one selection, and where each fact came from."""

    profile: ConsumerProfile
    server: Server
    facts: dict[str, str]  # fact -> how it was decided, for the evidence

    def runs(self, entry: Entry, tokens: int) -> Run:
        return self.profile.runs(entry, self.server, tokens)

    def to_json(self) -> dict[str, Any]:
        s = self.server
        return {
            "profile": self.profile.name,
            "device": s.device,
            "world_size": s.world_size,
            "dtype": s.dtype,
            "hidden": s.hidden,
            "capability": list(s.capability) if s.capability else None,
            "multicast": s.multicast,
            "full_nvlink": s.full_nvlink,
            "in_cuda_graph": s.in_cuda_graph,
            "facts": dict(self.facts),
            "entries": [
                {"backend_type": e.backend_type, "use_residual_rmsnorm_fusion": e.fused}
                for e in self.profile.entries
            ],
        }


class UnknownServer(ValueError):
    """The session does not know a fact the consumer's dispatch depends on."""


def session_server(store: ResultStore, key: GroupKey) -> ServerState:
    """The server a config for `key` is written for, from what this session measured.

    Raises `UnknownServer` when a CUDA fingerprint lacks the compute capability.
    """
    profile = consumer.profile_for(store.device)
    if store.device != "cuda":
        server = Server.cpu(world_size=key.world_size, dtype=key.dtype, hidden=key.hidden)
        return ServerState(profile, server, {})
    capability = _capability(store.machine.get("compute_capability"))
    multicast, multicast_why = _multicast(store, key.world_size)
    nvlink, nvlink_why = _full_nvlink(store, key.world_size)
    server = Server.cuda(
        world_size=key.world_size,
        capability=capability,
        multicast=multicast,
        full_nvlink=nvlink,
        dtype=key.dtype,
        hidden=key.hidden,
        in_cuda_graph=IN_CUDA_GRAPH,
    )
    facts = {
        "capability": "from the machine fingerprint",
        "multicast": multicast_why,
        "full_nvlink": nvlink_why,
        "in_cuda_graph": "the engine times CUDA-graph replays, as servers replay decode steps",
    }
    return ServerState(profile, server, facts)


def _capability(text: object) -> tuple[int, int]:
    try:
        major, minor = str(text).split(".")
        return int(major), int(minor)
    except ValueError:
        raise UnknownServer(
            f"the machine fingerprint has no compute capability ({text!r}), and what the "
            "consumer runs depends on it"
        ) from None


def _multicast(store: ResultStore, world_size: int) -> tuple[bool, str]:
    """On only with proof: a backend that needs multicast passed a check at this world size.

    Assuming it wrongly would credit torch_symm_mem entries with kernels that a server
    without multicast never runs (it falls back to NCCL); assuming it off only forgoes them.
    """
    switches = store.machine.get("multicast_disabled_by")
    if isinstance(switches, list) and switches:
        return False, f"off: {', '.join(map(str, switches))}"
    proven = sorted(
        {
            case.target.backend
            for case, suites in store.verdicts.items()
            if case.target.world_size == world_size
            and _needs_multicast(store, case.target.backend, world_size)
            and any(v.outcome == "passed" for verdicts in suites.values() for v in verdicts)
        }
    )
    if proven:
        return True, f"on: {', '.join(proven)} passed a check at world size {world_size}"
    return False, "taken as off: no backend that needs multicast passed a check here"


def _needs_multicast(store: ResultStore, backend: str, world_size: int) -> bool:
    availability = store.availability.get((backend, world_size))
    return bool(availability and availability.limits.get("needs_multicast"))


def _full_nvlink(store: ResultStore, world_size: int) -> tuple[bool, str]:
    """Only custom allreduce asks, and only above 2 ranks; its probe checks full NVLink."""
    if world_size <= 2:
        return True, "not asked at 2 ranks"
    availability = store.availability.get(("custom_ar", world_size))
    if availability is not None and availability.available:
        return True, "custom_ar (whose probe needs full NVLink above 2 ranks) is available"
    why = availability.reason if availability is not None else "custom_ar was not probed"
    return False, f"taken as absent: {why}"


# ---- every server state the profile distinguishes ------------------------------------------


def possible_servers(device: str, world_size: int, dtype: str, hidden: int) -> list[Server]:
    """Every server state of `device` for this shape that the profile's rules tell apart."""
    if device != "cuda":
        return [Server.cpu(world_size=world_size, dtype=dtype, hidden=hidden)]
    return [
        Server.cuda(
            world_size=world_size,
            capability=(major, 0),
            multicast=multicast,
            full_nvlink=nvlink,
            dtype=dtype,
            hidden=hidden,
            in_cuda_graph=graph,
        )
        for major, multicast, nvlink, graph in itertools.product(
            _MAJORS, (False, True), (False, True), (False, True)
        )
    ]


def _probe_sizes(profile: ConsumerProfile, entry: Entry, server: Server) -> set[int]:
    """Token counts that show every run of `entry` on `server`: one, and each side of every
    size limit (between limits nothing a dispatch depends on changes), plus an odd count for
    the alignment rules."""
    sizes = {1, 3}
    for stop in profile.stops(entry, server):
        sizes |= {stop.max_rows, stop.max_rows + 1}
    return sizes


@cache
def runnable_variants(profile: ConsumerProfile, entry: Entry) -> frozenset[str]:
    """Every variant `profile` may run for `entry` on some server, hazards excluded.

    This is the one list of names a config may give an entry: the writer names the variant
    the consumer runs (so what it writes is in here) and the loader refuses anything else.
    """
    if entry not in profile.entries:
        return frozenset()
    shapes = itertools.product(_WORLD_SIZES, consumer.ITEMSIZE, _HIDDEN)
    names = set()
    for ws, dtype, hidden in shapes:
        for server in possible_servers(profile.device, ws, dtype, hidden):
            for tokens in _probe_sizes(profile, entry, server):
                run = profile.runs(entry, server, tokens)
                if run.hazard is None:
                    names.add(run.variant)
    return frozenset(names)


def writable_variants(profile: ConsumerProfile) -> frozenset[str]:
    """Every variant a config written for `profile` may name (for any entry)."""
    names: set[str] = set()
    for entry in profile.entries:
        names |= runnable_variants(profile, entry)
    return frozenset(names)


def decision_horizon(profile: ConsumerProfile, servers: list[Server], max_tokens: int) -> int:
    """The token count past which no config choice changes what runs, capped at max_tokens.

    Above every size limit of the profile, each entry runs its fallback; where those
    fallbacks are one and the same (apart from entries that would be unsafe there), every
    config runs the same thing, and measuring larger sizes decides nothing.
    """
    horizon = 1
    for server in servers:
        last = max(
            (s.max_rows + 1 for e in profile.entries for s in profile.stops(e, server)),
            default=1,
        )
        beyond = {
            (run.variant, run.fused)
            for e in profile.entries
            if (run := profile.runs(e, server, last)).hazard is None
        }
        if len(beyond) > 1:
            return max_tokens
        horizon = max(horizon, last)
    return min(horizon, max_tokens)
