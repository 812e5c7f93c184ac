"""Socket options the data plane needs that the standard library does not wrap."""

from __future__ import annotations

import ipaddress
import resource
import socket
import struct
from typing import Any

import structlog

log = structlog.get_logger(__name__)

# Linux's IP_PKTINFO; Python's socket module only exports it on some platforms.
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)
_IN_PKTINFO = struct.Struct("=I4s4s")  # ifindex, spec_dst, addr
_IN6_PKTINFO = struct.Struct("=16sI")  # addr, ifindex
_LINGER_RESET = struct.pack("ii", 1, 0)
PKTINFO_CMSG_SPACE = socket.CMSG_SPACE(_IN6_PKTINFO.size)
MAX_DATAGRAM = 65535  # a UDP payload never exceeds this, so nothing is ever truncated


def raise_nofile_limit() -> tuple[int, int]:
    """Raise RLIMIT_NOFILE's soft limit to the hard limit; returns (old soft, new soft)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as exc:
            log.warning("nofile_limit_unchanged", soft=soft, hard=hard, error=str(exc))
            return soft, soft
    return soft, hard


def family_of(address: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET


def set_reset_on_close(sock: Any) -> None:
    """Make the next close send RST instead of FIN, to pass a reset on to the other leg."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
    except OSError:
        pass


def enable_pktinfo(sock: socket.socket) -> None:
    """Ask the kernel to report each datagram's local destination address."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_RECVPKTINFO, 1)
    else:
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)


def local_address(ancdata: list[tuple[int, int, bytes]]) -> bytes | None:
    """The packed local address a datagram arrived at, from recvmsg's ancillary data."""
    for level, kind, data in ancdata:
        if level == socket.IPPROTO_IP and kind == IP_PKTINFO and len(data) >= _IN_PKTINFO.size:
            addr: bytes = _IN_PKTINFO.unpack_from(data)[2]
            return addr
        if (
            level == socket.IPPROTO_IPV6
            and kind == socket.IPV6_PKTINFO
            and len(data) >= _IN6_PKTINFO.size
        ):
            addr6: bytes = _IN6_PKTINFO.unpack_from(data)[0]
            return addr6
    return None


def source_cmsg(family: socket.AddressFamily, local: bytes) -> list[tuple[int, int, bytes]]:
    """Ancillary data that makes sendmsg use `local` as the source address.

    Replying from the exact address a datagram was redirected to is what lets conntrack map the
    reply back to the virtual IP the client sent to.
    """
    if family == socket.AF_INET6:
        return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(local, 0))]
    return [(socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, local, b"\0\0\0\0"))]
