"""TCP: accept on a proxy port, dial an endpoint, splice both directions.

Design notes (the why):
- Accepting is ours, not the loop's: uvloop closes a listening server for good on EMFILE/ENFILE
  (libuv reports the error to the listen callback and uvloop treats it as fatal). We accept in a
  reader callback and, when out of descriptors, stop reading the socket for a while and log.
- The endpoint is dialled before the client socket is wrapped in a transport, so a client with
  no endpoint is closed at once and no data can arrive before there is somewhere to send it.
- Each direction ends on its own (half-close): EOF from one side becomes write_eof() on the other
  and the connection lives until both directions have ended; then both transports are closed
  explicitly. Leaving a half-shut transport to the garbage collector crashes uvloop (a
  use-after-free around pending shutdown requests), so no transport is ever left unclosed.
- Backpressure: when one side's write buffer passes the high-water mark, the other side stops
  reading until it drains, so memory per connection is bounded.
- A reset (connection lost with an error) is passed on as a reset (SO_LINGER 0, then abort).
- TCP_NODELAY is not set here: both uvloop (libuv's uv_tcp_nodelay on every TCP transport) and
  asyncio's selector transports already set it, and fetching the socket to set it again cost a
  socket object and a getsockname() per leg.
- A finished splice drops its references (legs <-> splice <-> transports form cycles), so it is
  freed by reference counting rather than left to the cyclic garbage collector, which was a
  noticeable share of the CPU per short connection.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import socket
from collections.abc import Callable
from typing import cast

import structlog

from uproxy.backoff import Backoff
from uproxy.balancer import LoadBalancer
from uproxy.dataplane.sockopt import (
    BorrowedSocket,
    eof_pending,
    own_family_only,
    send_last,
    set_reset_on_close,
    shutdown_write,
)
from uproxy.dataplane.stats import PortStats
from uproxy.dataplane.tcp_options import TcpOptions
from uproxy.model import Endpoint, ServicePortName

log = structlog.get_logger(__name__)

# kube-proxy's userspace dial schedule: each attempt goes to the next endpoint.
DIAL_TIMEOUTS = (0.25, 0.5, 1.0, 2.0)
ACCEPT_BATCH = 64
ACCEPT_BACKOFF = (0.05, 1.0)  # first and longest pause after running out of descriptors
WRITE_HIGH_WATER = 256 * 1024
WRITE_LOW_WATER = 64 * 1024
# Reads shorter than this may be a stream's last: peek whether its FIN follows. Bulk transfers
# mostly read more at once, and pay one peek per read when they do not.
PEEK_BELOW = 64 * 1024
_DEFAULT_OPTIONS = TcpOptions()
_OUT_OF_DESCRIPTORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}


class _Leg(asyncio.Protocol):
    """One side of a spliced connection; forwards what it reads to its peer leg."""

    __slots__ = (
        "_count_in",
        "early",
        "eof",
        "lost",
        "lost_exc",
        "peer",
        "shut",
        "sock",
        "splice",
        "transport",
    )

    def __init__(self, splice: Splice, count_in: bool) -> None:
        self.splice = splice
        self.transport: asyncio.Transport | None = None
        self.peer: _Leg
        self.eof = False  # this side will send nothing more
        self.shut = False  # our write side towards this side is shut down (FIN sent)
        self.lost = False  # this side's transport is gone
        self.lost_exc: Exception | None = None
        # For peeking and shutting down. The client leg's is the accepted socket its transport
        # was made from (and owns); the upstream's is borrowed (the loop connected it): a socket
        # object made around the transport's descriptor, detached as soon as the transport is
        # lost, so it never closes that descriptor itself.
        self.sock: socket.socket | None = None
        # Data that arrived before the peer leg was connected. uvloop starts reading right after
        # connection_made() returns, so pausing there is not enough: hold it, then pause.
        self.early: list[bytes] = []
        self._count_in = count_in

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        if not self._count_in:
            # One getsockname() (the socket module validates the descriptor), then no more
            # system calls than the options themselves.
            loop_sock = transport.get_extra_info("socket")
            self.sock = BorrowedSocket(loop_sock.family, socket.SOCK_STREAM, 0, loop_sock.fileno())
            self.splice.options.apply_keepalive(self.sock)
        transport.set_write_buffer_limits(WRITE_HIGH_WATER, WRITE_LOW_WATER)

    def data_received(self, data: bytes) -> None:
        splice = self.splice
        splice.active = True
        if self._count_in:
            splice.stats.bytes_in += len(data)
        else:
            splice.stats.bytes_out += len(data)
        peer = self.peer.transport
        if peer is None:
            self.early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()
        elif not peer.is_closing():
            # A short read may be the last one: if the FIN is already queued behind it, send it
            # with the data, rather than one loop iteration later (by then the client may have
            # closed first, and every connection would leave it a TIME_WAIT socket).
            sock = self.sock
            if len(data) < PEEK_BELOW and sock is not None and eof_pending(sock):
                self._last(data)
            else:
                peer.write(data)

    def _last(self, data: bytes) -> None:
        """`data` is all this side will ever send: pass it on together with the FIN."""
        self.eof = True
        peer, transport = self.peer, self.peer.transport
        assert transport is not None
        if transport.get_write_buffer_size() == 0 and peer.sock is not None and not peer.shut:
            sent = send_last(peer.sock, data)
            if sent == len(data):
                peer.shut = True
            else:
                transport.write(data[sent:])
        else:
            transport.write(data)
        self.splice.direction_ended(self)

    def eof_received(self) -> bool:
        if not self.eof:  # else seen ahead, with the last data
            self.eof = True
            if self.peer.transport is not None:
                self.splice.direction_ended(self)
        return True  # keep our write side open: the other direction may still be flowing

    def pause_writing(self) -> None:
        peer = self.peer.transport
        if peer is not None and not peer.is_closing():
            peer.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer.transport
        if peer is not None and not peer.is_closing():
            peer.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.lost_exc = exc
        if self.sock is not None and not self._count_in:
            self.sock.detach()
        self.sock = None
        self.splice.leg_lost(self, exc)


class Splice:
    """Two legs and the rules for ending them."""

    __slots__ = (
        "_idle_since",
        "_idle_timer",
        "_linger",
        "_on_done",
        "active",
        "client",
        "endpoint",
        "loop",
        "options",
        "stats",
        "upstream",
    )

    def __init__(
        self,
        stats: PortStats,
        on_done: Callable[[Splice], None],
        loop: asyncio.AbstractEventLoop | None = None,
        options: TcpOptions = _DEFAULT_OPTIONS,
    ) -> None:
        self.stats = stats
        self.endpoint: Endpoint | None = None
        self.loop = loop
        self.options = options
        self._on_done = on_done
        self._linger: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_since = 0.0
        self.active = False  # bytes moved since the idle timer last looked
        self.client = _Leg(self, count_in=True)
        self.upstream = self.new_upstream()

    def new_upstream(self) -> _Leg:
        """A fresh upstream leg for a dial attempt; a failed attempt's leg is never reused."""
        self.upstream = _Leg(self, count_in=False)
        self.client.peer = self.upstream
        self.upstream.peer = self.client
        return self.upstream

    def attached(self) -> None:
        """The client leg is connected: deliver what the upstream sent meanwhile, then splice."""
        upstream, client = self.upstream, self.client
        if upstream.early and client.transport is not None and not client.transport.is_closing():
            client.transport.writelines(upstream.early)
        upstream.early.clear()
        if upstream.lost:
            self.leg_lost(upstream, upstream.lost_exc)
            return
        if upstream.eof:
            self.direction_ended(upstream)
        if upstream.transport is not None and not upstream.transport.is_closing():
            upstream.transport.resume_reading()
        self._start_idle_timer()

    def direction_ended(self, leg: _Leg) -> None:
        """`leg` sent its FIN: pass it on at once, or once the peer's buffer has drained."""
        peer = leg.peer
        transport = peer.transport
        if peer.eof or transport is None:
            self.close()
        elif transport.is_closing() or peer.shut:
            return
        elif transport.get_write_buffer_size() == 0 and peer.sock is not None:
            # The transport's own write_eof() on uvloop shuts down one loop iteration later.
            shutdown_write(peer.sock)
            peer.shut = True
        elif transport.can_write_eof():
            transport.write_eof()  # the transport shuts down once its buffer has drained

    def leg_lost(self, leg: _Leg, exc: Exception | None) -> None:
        if leg is not self.client and leg is not self.upstream:
            return  # a dial attempt that was abandoned; it never carried data
        peer = leg.peer
        if peer.transport is not None and not peer.lost:
            if exc is not None:
                set_reset_on_close(peer.transport.get_extra_info("socket"))
                peer.transport.abort()
            elif not peer.transport.is_closing():
                peer.transport.close()
                self._arm_linger()
        if leg.lost and peer.lost:
            self._on_done(self)
            self._release()

    def _release(self) -> None:
        """Both legs are gone and nothing calls back any more: break the reference cycles."""
        for timer in (self._linger, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._linger = self._idle_timer = None
        client, upstream = self.client, self.upstream
        client.transport = upstream.transport = None
        client.sock = upstream.sock = None
        client.early.clear()
        upstream.early.clear()
        # The legs now point at an inert splice, so that an (unexpected) late callback still
        # finds every attribute it uses and does nothing.
        client.splice = upstream.splice = _DEAD_SPLICE
        client.peer = upstream.peer = _DEAD_SPLICE.client

    def close(self) -> None:
        """End both directions gracefully: buffered data is flushed, then the sockets close."""
        for leg in (self.client, self.upstream):
            if leg.transport is not None and not leg.transport.is_closing():
                leg.transport.close()
        self._arm_linger()

    def abort(self) -> None:
        for leg in (self.client, self.upstream):
            if leg.transport is not None and not leg.lost:
                leg.transport.abort()

    def _arm_linger(self) -> None:
        # Only data still held in user space can keep a closed transport (and its descriptor)
        # alive: a peer that never reads gets the linger time, then a reset.
        if self._linger is not None or self.loop is None:
            return
        for leg in (self.client, self.upstream):
            if leg.transport is not None and not leg.lost and leg.transport.get_write_buffer_size():
                self._linger = self.loop.call_later(self.options.linger_timeout, self._linger_over)
                return

    def _linger_over(self) -> None:
        self._linger = None
        log.debug("tcp_linger_expired", endpoint=str(self.endpoint))
        self.abort()

    def _start_idle_timer(self) -> None:
        timeout = self.options.idle_timeout
        if timeout is None or self.loop is None or self._idle_timer is not None:
            return
        self._idle_since = self.loop.time()
        # Looked at four times per timeout: bytes moved reset it, so the per-chunk cost is one
        # attribute store; a connection is closed between 1 and 1.25 timeouts of silence.
        self._idle_timer = self.loop.call_later(timeout / 4, self._idle_tick)

    def _idle_tick(self) -> None:
        loop, timeout = self.loop, self.options.idle_timeout
        assert loop is not None and timeout is not None
        self._idle_timer = None
        now = loop.time()
        if self.active:
            self.active = False
            self._idle_since = now
        elif now - self._idle_since >= timeout:
            log.debug("tcp_idle_timeout", endpoint=str(self.endpoint), timeout=timeout)
            self.close()
            return
        self._idle_timer = loop.call_later(timeout / 4, self._idle_tick)


def _nothing(_splice: Splice) -> None:
    pass


_DEAD_SPLICE = Splice(PortStats(), _nothing)


class TcpListener:
    """Owns one listening socket and every connection accepted on it."""

    def __init__(
        self,
        name: ServicePortName,
        sock: socket.socket,
        balancer: LoadBalancer,
        loop: asyncio.AbstractEventLoop,
        options: TcpOptions = _DEFAULT_OPTIONS,
    ) -> None:
        self.name = name
        self.balancer = balancer
        self.stats = PortStats()
        self._sock = sock
        self._loop = loop
        self._options = options
        # Accepted sockets inherit keepalive and TCP_USER_TIMEOUT from the listener, so the
        # client leg costs no system call for them.
        options.apply_keepalive(sock)
        self._splices: set[Splice] = set()
        self._dials: set[asyncio.Task[None]] = set()
        self.per_endpoint: dict[Endpoint, int] = {}  # open connections by endpoint
        self._backoff = Backoff(*ACCEPT_BACKOFF)
        self._resume: asyncio.TimerHandle | None = None
        self._idle = asyncio.Event()
        self._idle.set()
        self.port: int = sock.getsockname()[1]
        self._family = int(sock.family)
        sock.setblocking(False)
        loop.add_reader(sock.fileno(), self._accept_ready)

    @property
    def connections(self) -> int:
        return len(self._splices) + len(self._dials)

    def stop_accepting(self) -> None:
        """Close the listening socket; established connections carry on."""
        if self._resume is not None:
            self._resume.cancel()
            self._resume = None
        if self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
            self._sock.close()

    async def wait_idle(self) -> None:
        await self._idle.wait()

    def abort_all(self) -> None:
        """Reset whatever is still open (the shutdown grace period is over)."""
        for task in list(self._dials):
            task.cancel()
        for splice in list(self._splices):
            splice.abort()

    # --- accepting -----------------------------------------------------------------------------

    def _accept_ready(self) -> None:
        # socket.accept() minus its enum conversions of family and type (ints here); socket()
        # with a fileno applies the default timeout, as accept() does for a non-blocking listener.
        accept = self._sock._accept  # type: ignore[attr-defined]
        family = self._family
        for _ in range(ACCEPT_BATCH):
            try:
                fd, addr = accept()
            except (BlockingIOError, InterruptedError):
                break
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno in _OUT_OF_DESCRIPTORS:
                    self._pause_accepting(exc)
                    return
                log.warning("accept_failed", service=str(self.name), error=str(exc))
                break
            conn = socket.socket(family, socket.SOCK_STREAM, 0, fd)
            self._backoff.reset()
            self._start(conn, addr[0])

    def _pause_accepting(self, exc: OSError) -> None:
        # Pending connections wait in the kernel backlog until descriptors are free again.
        delay = self._backoff.next_delay()
        log.error(
            "accept_paused",
            service=str(self.name),
            error=exc.strerror,
            retry_in=delay,
            open_connections=self.connections,
        )
        self._loop.remove_reader(self._sock.fileno())
        self._resume = self._loop.call_later(delay, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self._resume = None
        if self._sock.fileno() >= 0:
            self._loop.add_reader(self._sock.fileno(), self._accept_ready)
            self._accept_ready()

    # --- one connection ------------------------------------------------------------------------

    def _start(self, conn: socket.socket, client_ip: str) -> None:
        self.stats.total += 1
        if not self.balancer.endpoints:
            self.stats.no_endpoint += 1
            conn.close()
            return
        task = self._loop.create_task(self._connect(conn, client_ip))
        self._dials.add(task)
        self._idle.clear()
        task.add_done_callback(self._dial_done)

    def _dial_done(self, task: asyncio.Task[None]) -> None:
        self._dials.discard(task)
        self._check_idle()

    async def _connect(self, conn: socket.socket, client_ip: str) -> None:
        splice = Splice(self.stats, self._splice_done, self._loop, self._options)
        try:
            if not await self._dial(splice, client_ip):
                conn.close()
                return
            self._register(splice)
            splice.client.sock = conn
            await self._loop.connect_accepted_socket(lambda: splice.client, conn)
        except asyncio.CancelledError:
            conn.close()
            splice.abort()
            self._splice_done(splice)
            raise
        except OSError as exc:
            # The client vanished while we dialled; the upstream leg must not outlive it.
            log.debug("client_attach_failed", service=str(self.name), error=str(exc))
            conn.close()
            splice.close()
            self._splice_done(splice)
            return
        splice.attached()

    async def _dial(self, splice: Splice, client_ip: str) -> bool:
        task = asyncio.current_task()
        assert task is not None
        cancelling = task.cancelling()
        tried: list[Endpoint] = []
        for attempt, timeout in enumerate(DIAL_TIMEOUTS):
            endpoint = self.balancer.pick(client_ip, tried=tried)
            if endpoint is None:
                self.stats.no_endpoint += 1
                return False
            leg = splice.new_upstream()
            # One timer handle instead of asyncio.timeout()'s context manager: on expiry it
            # cancels this task, and the cancellation is turned into a timeout below.
            fired: list[bool] = []
            timer = self._loop.call_later(timeout, _expire, task, fired)
            exc: Exception | None
            try:
                await self._loop.create_connection(
                    functools.partial(_same, leg), endpoint.ip, endpoint.port
                )
            except asyncio.CancelledError:
                if not fired or task.uncancel() > cancelling:
                    raise
                exc = TimeoutError()
            except OSError as err:
                exc = err
            else:
                exc = None
            finally:
                timer.cancel()
            if exc is not None:
                self.stats.dial_failures += 1
                log.debug(
                    "dial_failed",
                    service=str(self.name),
                    endpoint=str(endpoint),
                    attempt=attempt + 1,
                    error=str(exc) or type(exc).__name__,
                )
                tried.append(endpoint)
                if self.balancer.dial_failed(endpoint):
                    log.warning(
                        "endpoint_ejected",
                        service=str(self.name),
                        endpoint=str(endpoint),
                        error=str(exc) or type(exc).__name__,
                    )
                continue
            self.balancer.dial_succeeded(endpoint)
            if attempt:
                self.stats.dial_retries += 1
            splice.endpoint = endpoint
            return True
        log.warning("dial_gave_up", service=str(self.name), attempts=len(DIAL_TIMEOUTS))
        return False

    def _register(self, splice: Splice) -> None:
        self._splices.add(splice)
        self.stats.active += 1
        endpoint = splice.endpoint
        if endpoint is not None:
            self.per_endpoint[endpoint] = self.per_endpoint.get(endpoint, 0) + 1

    def _splice_done(self, splice: Splice) -> None:
        if splice in self._splices:
            self._splices.discard(splice)
            self.stats.active -= 1
            endpoint = splice.endpoint
            if endpoint is not None:
                left = self.per_endpoint.get(endpoint, 1) - 1
                if left:
                    self.per_endpoint[endpoint] = left
                else:
                    self.per_endpoint.pop(endpoint, None)
            self._check_idle()

    def _check_idle(self) -> None:
        if not self._splices and not self._dials:
            self._idle.set()


def _same(leg: _Leg) -> _Leg:
    return leg


def _expire(task: asyncio.Task[None], fired: list[bool]) -> None:
    fired.append(True)
    task.cancel()


def open_tcp_socket(host: str, port: int, family: socket.AddressFamily) -> socket.socket:
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        own_family_only(sock)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(socket.SOMAXCONN)
    except BaseException:
        sock.close()
        raise
    return sock
