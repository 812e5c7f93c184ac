"""UDP: per-client sessions from a proxy port to a connected socket per backend flow.

Design notes (the why):
- Raw non-blocking sockets with reader callbacks, not DatagramProtocol: replies must leave from
  the exact local address each datagram arrived at (IP_PKTINFO; IPv6: IPV6_PKTINFO, with the
  arrival interface when that address is link-local), which asyncio's datagram
  transports cannot express, and after a REDIRECT that is what lets conntrack map the reply's
  source back to the virtual IP the client used.
- Buffers are the maximum datagram size, so nothing is truncated (kube-proxy cut at 4 KiB).
- Idle sessions expire after `timeout`; the timer is not reset per datagram, it re-arms itself for
  the remaining time when it fires, which keeps the per-datagram path to a clock read.
- A session is keyed by the client's address and the local address the datagram arrived at
  (the raw IP_PKTINFO bytes, compared without parsing): one client port talking to two
  addresses of the node gets two sessions, each answered from its own address. Behind the
  REDIRECT portals conntrack already tells such flows apart (its clash resolution gives the
  second flow another client port); without portals, or with portals that DNAT to one bind
  address, only this key does. The reply's source-address cmsg is built once per session.
- UDP has no backpressure: a datagram that cannot be sent right now is dropped and counted.
- Floods: the listener asks for an 8 MiB receive buffer (SO_RCVBUFFORCE as root), so a burst
  or a slow moment of the loop queues instead of being dropped by the kernel in front of every
  client alike, and each wake-up drains up to READ_BATCH datagrams. At --udp-max-sessions a datagram
  that would open a session is refused (dropped, counted in `udp_refused`), never given a slot
  by evicting the idlest session: a refusal costs one dict miss, where eviction would cost a
  socket close, open and connect per flood datagram, the very work that overloads the loop, and
  would let a flood push out established clients that are merely quiet between requests.
  Sessions with traffic keep their slot; flood sessions free theirs after `timeout`. With a
  backlog in the receive buffer, idleness counts only up to the last moment the queue was
  empty: a session's next datagram may be waiting in it, and without this the bigger buffer
  (its queueing delay can exceed `timeout`) would expire busy sessions, whose next datagram
  would then be refused at the cap.
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
    arrival_ifindex,
    enable_pktinfo,
    local_address,
    own_family_only,
    raise_receive_buffer,
    source_cmsg,
)
from uproxy.dataplane.stats import PortStats
from uproxy.model import Endpoint, ServicePortName

log = structlog.get_logger(__name__)

READ_BATCH = 64  # datagrams handled per wake-up before yielding to other sockets
RECEIVE_BUFFER = 8 << 20  # bytes asked (the kernel doubles it): about 20,000 small datagrams
CAP_LOG_INTERVAL = 1.0  # seconds between udp_session_cap_reached lines of one listener
_SEND_DROP = (BlockingIOError, InterruptedError, ConnectionRefusedError)


SessionKey = tuple[tuple[str, int], bytes]  # client address, raw IP_PKTINFO of the local one


class _Session:
    __slots__ = (
        "client",
        "cmsg",
        "endpoint",
        "key",
        "last_active",
        "listener",
        "local",
        "sock",
        "timer",
    )

    def __init__(
        self,
        listener: UdpListener,
        key: SessionKey,
        anc: list[tuple[int, int, bytes]],
        endpoint: Endpoint,
        sock: socket.socket,
    ) -> None:
        self.listener = listener
        self.key = key
        self.client = key[0]
        self.local = local_address(anc)
        self.cmsg = (
            []
            if self.local is None
            else source_cmsg(listener.family, self.local, arrival_ifindex(anc))
        )
        self.endpoint = endpoint
        self.sock = sock
        self.last_active = listener.clock()
        self.timer: asyncio.TimerHandle | None = None

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
        self._sessions: dict[SessionKey, _Session] = {}
        self._cap_logged_at = -CAP_LOG_INTERVAL
        # While datagrams wait unread in the socket's queue, a session's last datagram may be
        # among them: idleness is then measured up to the last moment the queue was empty.
        self._backlog = False
        self._caught_up_at = clock()
        self._cap_refused = 0  # refusals since the last udp_session_cap_reached line
        self.port: int = sock.getsockname()[1]
        sock.setblocking(False)
        enable_pktinfo(sock)
        raise_receive_buffer(sock, RECEIVE_BUFFER)
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
        self._backlog = True  # until the queue is seen empty
        for _ in range(READ_BATCH):
            try:
                data, ancdata, _flags, client = sock.recvmsg(MAX_DATAGRAM, PKTINFO_CMSG_SPACE)
            except (BlockingIOError, InterruptedError):
                self._backlog = False
                self._caught_up_at = clock()
                return
            except OSError as exc:
                log.warning("udp_receive_failed", service=str(self.name), error=str(exc))
                return
            if len(client) != 2:
                client = (client[0], client[1])
            key = (client, ancdata[0][2] if ancdata else b"")
            session = sessions.get(key)
            if session is None:
                if len(sessions) >= self._max_sessions:
                    self._refuse()
                    continue
                session = self._open_session(key, ancdata)
                if session is None:
                    continue
            else:
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

    def _refuse(self) -> None:
        """A new session at the cap: drop the datagram, count it, say so at most once a second."""
        stats = self.stats
        stats.dropped += 1
        stats.udp_refused += 1
        self._cap_refused += 1
        now = self.clock()
        if now - self._cap_logged_at >= CAP_LOG_INTERVAL:
            self._cap_logged_at = now
            log.warning(
                "udp_session_cap_reached",
                service=str(self.name),
                limit=self._max_sessions,
                refused=self._cap_refused,
                refused_total=stats.udp_refused,
                hint="raise --udp-max-sessions or lower --udp-timeout",
            )
            self._cap_refused = 0

    def _open_session(self, key: SessionKey, anc: list[tuple[int, int, bytes]]) -> _Session | None:
        endpoint = self.balancer.pick(key[0][0])
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
        session = _Session(self, key, anc, endpoint, sock)
        self._sessions[key] = session
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
        now = self._caught_up_at if self._backlog else self.clock()
        idle = now - session.last_active
        if idle >= self._timeout:
            self.end_session(session)
        else:
            session.timer = self._loop.call_later(self._timeout - idle, self._expire, session)

    def end_session(self, session: _Session) -> None:
        if self._sessions.get(session.key) is not session:
            return
        del self._sessions[session.key]
        self.stats.active -= 1
        if session.timer is not None:
            session.timer.cancel()
        self._loop.remove_reader(session.sock.fileno())
        session.sock.close()


def open_udp_socket(host: str, port: int, family: socket.AddressFamily) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_DGRAM)
    try:
        own_family_only(sock)
        sock.bind((host, port))
    except BaseException:
        sock.close()
        raise
    return sock
