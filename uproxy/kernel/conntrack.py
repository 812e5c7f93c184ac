"""Delete UDP conntrack entries that would pin clients to a service port or endpoint that is gone.

UDP has no connection to close: a client that keeps sending from the same port keeps refreshing
its conntrack entry, and with it the NAT decision made for its first datagram (redirected to a
proxy port that no longer listens, or not redirected at all because the portal did not exist
yet). Deleting the entry makes the next datagram take the current rules.

Why pyroute2 (netlink, in process) rather than the `conntrack` tool: one dump serves any number
of matches, where the tool dumps the whole table once per address (a mass service deletion on a
busy node would take seconds), and no extra package is needed. pyroute2's synchronous API runs on
whatever loop the global policy makes and cannot open its netlink socket on a uvloop loop
("invalid family 16"), so the asynchronous API runs here on a private stdlib selector loop, in a
worker thread (`asyncio.to_thread`), never on uproxy's event loop thread.
"""

from __future__ import annotations

import asyncio
import errno
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from uproxy.errors import KernelError

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class UdpFlow:
    """The parts of a UDP conntrack entry that matching looks at."""

    orig_src: str
    orig_sport: int
    orig_dst: str
    orig_dport: int
    reply_src: str
    reply_sport: int


@dataclass(frozen=True, slots=True)
class UdpFlowMatch:
    """UDP entries to delete: by original destination (a virtual address; `ip` None matches any
    address, for NodePorts) or, with `reply`, by reply source (an endpoint)."""

    port: int
    ip: str | None = None
    reply: bool = False

    @classmethod
    def destination(cls, ip: str | None, port: int) -> UdpFlowMatch:
        return cls(port, ip)

    @classmethod
    def endpoint(cls, ip: str, port: int) -> UdpFlowMatch:
        return cls(port, ip, reply=True)

    def matches(self, flow: UdpFlow) -> bool:
        if self.reply:
            return flow.reply_sport == self.port and flow.reply_src == self.ip
        return flow.orig_dport == self.port and (self.ip is None or flow.orig_dst == self.ip)


UdpFlowCleaner = Callable[[Sequence[UdpFlowMatch]], Awaitable[int]]


class _Index:
    """Constant-time matching of one flow against many matches."""

    def __init__(self, matches: Sequence[UdpFlowMatch]) -> None:
        self.any_ip = {m.port for m in matches if not m.reply and m.ip is None}
        self.dst = {(m.ip, m.port) for m in matches if not m.reply and m.ip is not None}
        self.reply = {(m.ip, m.port) for m in matches if m.reply}

    def matches(self, flow: UdpFlow) -> bool:
        return (
            flow.orig_dport in self.any_ip
            or (flow.orig_dst, flow.orig_dport) in self.dst
            or (flow.reply_src, flow.reply_sport) in self.reply
        )


def _flow(entry: Any) -> UdpFlow:
    orig, reply = entry.tuple_orig, entry.tuple_reply
    return UdpFlow(
        orig.saddr, orig.sport or 0, orig.daddr, orig.dport or 0, reply.saddr, reply.sport or 0
    )


async def _delete(matches: Sequence[UdpFlowMatch]) -> int:
    from pyroute2.conntrack import AsyncConntrack
    from pyroute2.netlink.exceptions import NetlinkError
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    index = _Index(matches)
    deleted = 0
    async with AsyncConntrack() as ct:
        dump = await ct.dump_entries(tuple_orig=NFCTAttrTuple(proto=socket.IPPROTO_UDP))
        victims = [entry async for entry in dump if index.matches(_flow(entry))]
        for entry in victims:
            try:
                await ct.delete(entry)
            except NetlinkError as exc:
                if exc.code != errno.ENOENT:  # expired meanwhile: already what we wanted
                    raise
            else:
                deleted += 1
    return deleted


def delete_udp_flows(matches: Sequence[UdpFlowMatch]) -> int:
    """Delete the IPv4 UDP conntrack entries any of `matches` selects; how many. Blocks: call it
    from a worker thread. Raises KernelError when netlink refuses."""
    if not matches:
        return 0
    from pyroute2.netlink.exceptions import NetlinkError

    loop = asyncio.SelectorEventLoop()  # private, and never uvloop (see the module docstring)
    try:
        return loop.run_until_complete(_delete(matches))
    except (OSError, NetlinkError) as exc:
        raise KernelError(f"conntrack: {exc}") from None
    finally:
        loop.close()


BlockingRunner = Callable[
    [Callable[[Sequence[UdpFlowMatch]], int], Sequence[UdpFlowMatch]], Awaitable[int]
]


async def _to_thread(
    func: Callable[[Sequence[UdpFlowMatch]], int], arg: Sequence[UdpFlowMatch]
) -> int:
    return await asyncio.to_thread(func, arg)


async def flush_udp_flows(
    matches: Sequence[UdpFlowMatch], run_blocking: BlockingRunner = _to_thread
) -> int:
    """`delete_udp_flows` off the event loop (on `run_blocking`'s thread). Best effort: a failure
    is logged, never raised, because stale flows expire on their own and must not fail a sync."""
    if not matches:
        return 0
    try:
        deleted = await run_blocking(delete_udp_flows, matches)
    except KernelError as exc:
        log.warning("conntrack_flush_failed", error=str(exc), matches=len(matches))
        return 0
    if deleted:
        log.info("conntrack_flushed", deleted=deleted, matches=len(matches))
    return deleted
