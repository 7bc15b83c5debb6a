"""A pool is reachable from this host's loopback only.

Every TCP socket that the pool's processes listen on (gloo's, and none for the rendezvous,
which is a file) must be bound to loopback: a connection through any other address of this
machine must be refused, while the same port answers on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import os
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from pytest_allreduce.pool import RankPool

_SIOCGIFADDR = 0x8915
_TCP_LISTEN = "0A"


def rank_pid(ctx: object) -> int:
    return os.getpid()


def _listening(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket process `pid` listens on."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[8:-1])
    found = []
    for table, family in (("tcp", socket.AF_INET), ("tcp6", socket.AF_INET6)):
        with contextlib.suppress(FileNotFoundError):
            for line in Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]:
                fields = line.split()
                if fields[3] == _TCP_LISTEN and fields[9] in inodes:
                    address, port = fields[1].split(":")
                    found.append((_decode(address, family), int(port, 16)))
    return found


def _decode(hex_address: str, family: int) -> str:
    raw = bytes.fromhex(hex_address)
    # /proc prints the address as 32-bit words in host order.
    words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
    return socket.inet_ntop(family, words)


def _non_loopback_addresses() -> list[str]:
    addresses = []
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        for _, name in socket.if_nameindex():
            with contextlib.suppress(OSError):
                request = struct.pack("256s", name[:15].encode())
                reply = fcntl.ioctl(probe.fileno(), _SIOCGIFADDR, request)
                addresses.append(socket.inet_ntoa(reply[20:24]))
    with contextlib.suppress(FileNotFoundError):
        for line in Path("/proc/net/if_inet6").read_text().splitlines():
            hex_address, scope = line.split()[0], line.split()[3]
            if scope == "00":  # global scope: link-local ones need an interface index
                addresses.append(str(ipaddress.IPv6Address(bytes.fromhex(hex_address))))
    return [a for a in addresses if not ipaddress.ip_address(a).is_loopback]


def _refused(address: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(3)
        try:
            client.connect((address, port))
        except (ConnectionRefusedError, TimeoutError, OSError):
            return True
    return False


@pytest.fixture
def pool() -> Iterator[RankPool]:
    pool = RankPool(2, "cpu", 30.0).start()
    yield pool
    pool.close(force=True)


def test_pool_listens_on_loopback_only_and_refuses_other_addresses(pool: RankPool) -> None:
    outside = _non_loopback_addresses()
    if not outside:
        pytest.skip("this machine has no address other than loopback to connect through")
    pytest_listening = _listening(os.getpid())
    rank_pids = pool.run(rank_pid)
    listening = [(a, port) for pid in rank_pids for a, port in _listening(pid)]
    assert listening, "the ranks listen on no TCP socket: nothing to check"
    for address, _ in listening:
        assert ipaddress.ip_address(address).is_loopback, listening
    assert _listening(os.getpid()) == pytest_listening  # no store server in pytest
    for _, port in listening:
        for address in outside:
            assert _refused(address, port), f"{address}:{port} accepted a connection"
    # The same ports do answer on loopback: the refusals above are not vacuous.
    assert not all(_refused("127.0.0.1", port) for _, port in listening)
