"""UDP: per-client sessions from a proxy port to a connected socket per backend flow.

Design notes (the why):
- Raw non-blocking sockets with reader callbacks, not DatagramProtocol: replies must leave from
  the exact local address each datagram arrived at (IP_PKTINFO), which asyncio's datagram
  transports cannot express, and after a REDIRECT that is what lets conntrack map the reply's
  source back to the virtual IP the client used.
- Buffers are the maximum datagram size, so nothing is truncated (kube-proxy cut at 4 KiB).
- Idle sessions expire after `timeout`; the timer is not reset per datagram, it re-arms itself for
  the remaining time when it fires, which keeps the per-datagram path to a clock read.
- Per datagram, the local address is re-parsed only when the raw ancillary bytes differ from the
  previous datagram's of that session, and the reply's source-address cmsg is built once per
  local address, not per reply.
- UDP has no backpressure: a datagram that cannot be sent right now is dropped and counted.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Callable

import structlog

from uproxy.balancer import LoadBalancer
from uproxy.dataplane.sockopt import (
    MAX_DATAGRAM,
    PKTINFO_CMSG_SPACE,
    enable_pktinfo,
    local_address,
    source_cmsg,
)
from uproxy.dataplane.stats import PortStats
from uproxy.model import Endpoint, ServicePortName

log = structlog.get_logger(__name__)

READ_BATCH = 64  # datagrams handled per wake-up before yielding to other sockets
_SEND_DROP = (BlockingIOError, InterruptedError, ConnectionRefusedError)


class _Session:
    __slots__ = (
        "anc",
        "client",
        "cmsg",
        "endpoint",
        "last_active",
        "listener",
        "local",
        "sock",
        "timer",
    )

    def __init__(
        self,
        listener: UdpListener,
        client: tuple[str, int],
        anc: list[tuple[int, int, bytes]],
        endpoint: Endpoint,
        sock: socket.socket,
    ) -> None:
        self.listener = listener
        self.client = client
        self.anc = b""
        self.local: bytes | None = None
        self.cmsg: list[tuple[int, int, bytes]] = []
        self.set_local(anc)
        self.endpoint = endpoint
        self.sock = sock
        self.last_active = listener.clock()
        self.timer: asyncio.TimerHandle | None = None

    def set_local(self, anc: list[tuple[int, int, bytes]]) -> None:
        """Note the local address from a datagram's ancillary data (parsed only if changed)."""
        raw = anc[0][2] if len(anc) == 1 else b""
        if raw and raw == self.anc:
            return
        self.anc = raw
        local = local_address(anc)
        if local != self.local or not self.cmsg:
            self.local = local
            self.cmsg = [] if local is None else source_cmsg(self.listener.family, local)

    def reply_ready(self) -> None:
        listener = self.listener
        stats = listener.stats
        for _ in range(READ_BATCH):
            try:
                data = self.sock.recv(MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # ICMP unreachable from the backend: end the session so the next datagram
                # picks an endpoint afresh.
                log.debug(
                    "udp_backend_error",
                    service=str(listener.name),
                    endpoint=str(self.endpoint),
                    error=str(exc),
                )
                listener.end_session(self)
                return
            self.last_active = listener.clock()
            stats.bytes_out += len(data)
            listener.reply(self, data)


class UdpListener:
    """Owns one UDP proxy port and its client sessions."""

    def __init__(
        self,
        name: ServicePortName,
        sock: socket.socket,
        balancer: LoadBalancer,
        loop: asyncio.AbstractEventLoop,
        *,
        timeout: float,
        max_sessions: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.balancer = balancer
        self.stats = PortStats()
        self.clock = clock
        self._sock = sock
        self.family = sock.family
        self._loop = loop
        self._timeout = timeout
        self._max_sessions = max_sessions
        self._sessions: dict[tuple[str, int], _Session] = {}
        self._limit_logged = False
        self.port: int = sock.getsockname()[1]
        sock.setblocking(False)
        enable_pktinfo(sock)
        loop.add_reader(sock.fileno(), self._datagrams_ready)

    @property
    def connections(self) -> int:
        return len(self._sessions)

    @property
    def per_endpoint(self) -> dict[Endpoint, int]:
        counts: dict[Endpoint, int] = {}
        for session in self._sessions.values():
            counts[session.endpoint] = counts.get(session.endpoint, 0) + 1
        return counts

    def stop_accepting(self) -> None:
        """UDP has nothing to drain: close every session and the socket."""
        for session in list(self._sessions.values()):
            self.end_session(session)
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()

    async def wait_idle(self) -> None:
        return None

    def abort_all(self) -> None:
        self.stop_accepting()

    def endpoints_changed(self) -> None:
        """Sessions pinned to an endpoint that is gone must not keep sending into the void."""
        alive = set(self.balancer.endpoints)
        for session in [s for s in self._sessions.values() if s.endpoint not in alive]:
            self.end_session(session)

    # --- client side ---------------------------------------------------------------------------

    def _datagrams_ready(self) -> None:
        sock = self._sock
        sessions = self._sessions
        clock = self.clock
        for _ in range(READ_BATCH):
            try:
                data, ancdata, _flags, client = sock.recvmsg(MAX_DATAGRAM, PKTINFO_CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("udp_receive_failed", service=str(self.name), error=str(exc))
                return
            if len(client) != 2:
                client = (client[0], client[1])
            session = sessions.get(client)
            if session is None:
                session = self._open_session(client, ancdata)
                if session is None:
                    continue
            else:
                if not ancdata or ancdata[0][2] != session.anc:
                    session.set_local(ancdata)
                session.last_active = clock()
            self.stats.bytes_in += len(data)
            try:
                session.sock.send(data)
            except _SEND_DROP:
                self.stats.dropped += 1
            except OSError as exc:
                log.debug("udp_forward_failed", service=str(self.name), error=str(exc))
                self.stats.dropped += 1
                self.end_session(session)

    def _open_session(
        self, client: tuple[str, int], anc: list[tuple[int, int, bytes]]
    ) -> _Session | None:
        if len(self._sessions) >= self._max_sessions:
            self.stats.dropped += 1
            if not self._limit_logged:
                self._limit_logged = True
                log.warning(
                    "udp_session_limit",
                    service=str(self.name),
                    limit=self._max_sessions,
                    hint="raise --udp-max-sessions or lower --udp-timeout",
                )
            return None
        endpoint = self.balancer.pick(client[0])
        if endpoint is None:
            self.stats.no_endpoint += 1
            return None
        try:
            sock = socket.socket(self._family_for(endpoint), socket.SOCK_DGRAM)
        except OSError as exc:
            log.error("udp_session_failed", service=str(self.name), error=str(exc))
            self.stats.dropped += 1
            return None
        try:
            sock.setblocking(False)
            sock.connect(endpoint.address)
        except OSError as exc:
            sock.close()
            log.debug("udp_connect_failed", service=str(self.name), error=str(exc))
            self.stats.dropped += 1
            return None
        session = _Session(self, client, anc, endpoint, sock)
        self._sessions[client] = session
        self.stats.total += 1
        self.stats.active += 1
        self._loop.add_reader(sock.fileno(), session.reply_ready)
        session.timer = self._loop.call_later(self._timeout, self._expire, session)
        return session

    def _family_for(self, endpoint: Endpoint) -> socket.AddressFamily:
        return socket.AF_INET6 if ":" in endpoint.ip else socket.AF_INET

    # --- backend side --------------------------------------------------------------------------

    def reply(self, session: _Session, data: bytes) -> None:
        try:
            if session.local is None:
                self._sock.sendto(data, session.client)
            else:
                self._sock.sendmsg([data], session.cmsg, 0, session.client)
        except _SEND_DROP:
            self.stats.dropped += 1
        except OSError as exc:
            log.debug("udp_reply_failed", service=str(self.name), error=str(exc))
            self.stats.dropped += 1

    def _expire(self, session: _Session) -> None:
        idle = self.clock() - session.last_active
        if idle >= self._timeout:
            self.end_session(session)
        else:
            session.timer = self._loop.call_later(self._timeout - idle, self._expire, session)

    def end_session(self, session: _Session) -> None:
        if self._sessions.get(session.client) is not session:
            return
        del self._sessions[session.client]
        self.stats.active -= 1
        if len(self._sessions) < self._max_sessions:
            self._limit_logged = False
        if session.timer is not None:
            session.timer.cancel()
        self._loop.remove_reader(session.sock.fileno())
        session.sock.close()


def open_udp_socket(host: str, port: int, family: socket.AddressFamily) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock
