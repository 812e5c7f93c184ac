"""Socket options the data plane needs that the standard library does not wrap."""

from __future__ import annotations

import contextlib
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


def own_family_only(sock: socket.socket) -> None:
    """An IPv6 socket takes IPv6 only (before bind): the IPv4 listener on the same port is a
    socket of its own, and a dual-stack one would take its port and its traffic."""
    if sock.family == socket.AF_INET6:
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)


def ipv6_available() -> bool:
    """Whether this kernel (or network namespace) can open IPv6 sockets at all."""
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_DGRAM).close()
    except OSError:
        return False
    return True


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


SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Linux's value


def raise_receive_buffer(sock: socket.socket, size: int) -> int:
    """Ask for a `size`-byte receive buffer; returns what the kernel granted (it doubles it).

    SO_RCVBUFFORCE passes net.core.rmem_max when we have CAP_NET_ADMIN; without it SO_RCVBUF
    is capped there silently. Never lowers the buffer, never fails: a smaller buffer still works.
    """
    if sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF) < size:
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
        except OSError:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, size)
    granted: int = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    return granted


def arrival_ifindex(ancdata: list[tuple[int, int, bytes]]) -> int:
    """The interface an IPv6 datagram to a link-local address arrived on, for its reply (a
    link-local source is ambiguous without it); 0 for anything else: the route decides."""
    for level, kind, data in ancdata:
        if (
            level == socket.IPPROTO_IPV6
            and kind == socket.IPV6_PKTINFO
            and len(data) >= _IN6_PKTINFO.size
        ):
            addr, ifindex = _IN6_PKTINFO.unpack_from(data)
            return int(ifindex) if addr[:2] == b"\xfe\x80" else 0
    return 0


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


def source_cmsg(
    family: socket.AddressFamily, local: bytes, ifindex: int = 0
) -> list[tuple[int, int, bytes]]:
    """Ancillary data that makes sendmsg use `local` as the source address (IPv6: out of
    `ifindex` when not 0, which a link-local source needs).

    Replying from the exact address a datagram was redirected to is what lets conntrack map the
    reply back to the virtual IP the client sent to.
    """
    if family == socket.AF_INET6:
        return [(socket.IPPROTO_IPV6, socket.IPV6_PKTINFO, _IN6_PKTINFO.pack(local, ifindex))]
    return [(socket.IPPROTO_IP, IP_PKTINFO, _IN_PKTINFO.pack(0, local, b"\0\0\0\0"))]


# --- TCP: end of stream and dead peers ----------------------------------------------------------
# The helpers below act on a socket object its transport was made from (so the transport owns
# it): once the transport has closed it, they fail harmlessly (EBADF), never on a reused number.

TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", 18)  # Linux's value
_PEEK_FLAGS = socket.MSG_PEEK | socket.MSG_DONTWAIT
_SEND_FLAGS = socket.MSG_DONTWAIT | getattr(socket, "MSG_MORE", 0)


class BorrowedSocket(socket.socket):
    """A socket object around a descriptor someone else owns (an event loop's transport).

    Garbage collection detaches it instead of closing the descriptor: a leg whose transport
    never reported connection_lost (a dial attempt abandoned half-way) must not close a number
    the kernel may already have handed to another connection.
    """

    __slots__ = ()

    def __del__(self) -> None:
        self.detach()


def eof_pending(sock: socket.socket) -> bool:
    """True when the peer's FIN is the next thing to read (all its data has been read)."""
    try:
        return sock.recv(1, _PEEK_FLAGS) == b""
    except OSError:  # nothing pending (EAGAIN), or an error the transport reports itself
        return False


def send_last(sock: socket.socket, data: bytes) -> int:
    """Send the last bytes of a stream with its FIN, in one segment where they fit.

    MSG_MORE holds the tail back until shutdown() attaches the FIN to it. Returns how many bytes
    were sent; the write side is shut down only when all of them were.
    """
    try:
        sent = sock.send(data, _SEND_FLAGS) if data else 0
    except OSError:  # full (EAGAIN), or an error the transport reports on its next write
        return 0
    if sent == len(data):
        shutdown_write(sock)
    return sent


def shutdown_write(sock: socket.socket) -> bool:
    """shutdown(SHUT_WR) now; False if the socket is already gone (the transport reports it)."""
    try:
        sock.shutdown(socket.SHUT_WR)
        return True
    except OSError:
        return False


def set_keepalive(sock: Any, idle: int, interval: int, count: int) -> None:
    """TCP keepalive with these probes; TCP_USER_TIMEOUT set to the same total, so a dead peer
    with data in flight (where keepalive never probes) is given up at the same time."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, idle)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, count)
    sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, (idle + interval * count) * 1000)
