"""A tiny HTTP/1.1 server for the admin and health check endpoints, on asyncio's own streams.

Why not aiohttp: importing it costs about 11 MB resident for the life of a proxy whose budget is
50 MB with 1,000 idle connections, to serve a handful of GET paths to probes, scrapers and
people. GET and HEAD only (unless told otherwise), bounded request size and time, one request
per connection (`Connection: close`), and a cap on concurrent connections: these servers share
the process's descriptors and event loop with the data plane, so a burst of scrapers or a
misbehaving client must not be able to take either away from forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import socket
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from http import HTTPStatus

import structlog

from uproxy.backoff import Backoff
from uproxy.observe.reserve import OUT_OF_DESCRIPTORS, DescriptorReserve

log = structlog.get_logger(__name__)

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0
# Concurrent connections one admin server answers; beyond that a connection is closed at once.
DEFAULT_MAX_CONNECTIONS = 64
LISTEN_BACKLOG = 128
ACCEPT_BATCH = 16
ACCEPT_BACKOFF = (0.05, 1.0)  # first and longest pause when out of descriptors and spares


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"
    headers: tuple[tuple[str, str], ...] = ()


Route = Callable[[], Awaitable[Response]]


class ConnectionCap:
    """How many connections may be open at once across the servers sharing it."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError("a connection cap must allow at least one connection")
        self.limit = limit
        self.open = 0
        self.refused = 0  # connections closed at once because the cap was reached

    def try_take(self) -> bool:
        if self.open >= self.limit:
            self.refused += 1
            return False
        self.open += 1
        return True

    def give_back(self) -> None:
        self.open -= 1


class HttpServer:
    """Answers `routes` (path -> route; `fallback` for any other path) on the sockets it is
    given, and owns every handler task it starts: `close` cancels what is still answering.

    Accepting is ours, not the loop's: uvloop closes a listening server for good on EMFILE, and
    a health endpoint must outlive the data plane running out of descriptors. With a `reserve`,
    an accept that fails for want of a descriptor gives a spare back and accepts into it."""

    def __init__(
        self,
        name: str,
        routes: Mapping[str, Route],
        cap: ConnectionCap,
        *,
        fallback: Route | None = None,
        any_method: bool = False,
        reserve: DescriptorReserve | None = None,
    ) -> None:
        self.name = name
        self._routes = routes
        self._fallback = fallback
        self._any_method = any_method
        self._cap = cap
        # Connections still waiting for their request, oldest first: at the cap, a newcomer
        # takes the slot of the oldest of them, so idle or slowloris connections can never
        # lock a liveness probe out. Evicted ones hand their slot over instead of returning it.
        self._waiting: dict[asyncio.StreamWriter, None] = {}
        self._evicted: set[asyncio.StreamWriter] = set()
        self._reserve = reserve
        self._listening: list[socket.socket] = []
        self._resumes: dict[socket.socket, asyncio.TimerHandle] = {}
        self._backoff = Backoff(*ACCEPT_BACKOFF)
        self._handlers: set[asyncio.Task[None]] = set()

    async def serve(self, sock: socket.socket) -> None:
        """Serve on a bound socket (it is listened on here; the server owns it from now)."""
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        self._listening.append(sock)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_ready, sock)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for timer in self._resumes.values():
            timer.cancel()
        self._resumes.clear()
        for sock in self._listening:
            if sock.fileno() >= 0:
                loop.remove_reader(sock.fileno())
                sock.close()
        self._listening.clear()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)

    # --- accepting -----------------------------------------------------------------------------

    def _accept_ready(self, sock: socket.socket) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except ConnectionAbortedError:
                continue
            except OSError as exc:
                if exc.errno not in OUT_OF_DESCRIPTORS:
                    log.warning("admin_accept_failed", server=self.name, error=str(exc))
                    return
                if self._reserve is not None and self._reserve.release_one():
                    continue  # the spare's descriptor is free now: accept into it
                self._pause(sock, exc)
                return
            self._backoff.reset()
            self._start(conn)

    def _pause(self, sock: socket.socket, exc: OSError) -> None:
        # No spare left: the connections wait in the kernel backlog until one comes back.
        delay = self._backoff.next_delay()
        log.error("admin_accept_paused", server=self.name, error=exc.strerror, retry_in=delay)
        loop = asyncio.get_running_loop()
        loop.remove_reader(sock.fileno())
        self._resumes[sock] = loop.call_later(delay, self._resume, sock)

    def _resume(self, sock: socket.socket) -> None:
        del self._resumes[sock]
        if sock.fileno() >= 0:
            if self._reserve is not None:
                self._reserve.refill()
            asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_ready, sock)
            self._accept_ready(sock)

    def _start(self, conn: socket.socket) -> None:
        conn.setblocking(False)
        task = asyncio.get_running_loop().create_task(self._connection(conn))
        self._handlers.add(task)  # owned: close() cancels whatever is still answering
        task.add_done_callback(functools.partial(self._connection_done, conn))

    def _connection_done(self, conn: socket.socket, task: asyncio.Task[None]) -> None:
        self._handlers.discard(task)
        conn.close()  # a no-op once its transport closed it; not so if cancelled before
        if self._reserve is not None:
            self._reserve.refill()  # take the descriptor back before the data plane can

    async def _connection(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_connection(sock=conn, limit=MAX_REQUEST_HEAD)
        except OSError:
            return
        await self._handle(reader, writer)

    # --- answering -----------------------------------------------------------------------------

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._cap.try_take() and not self._evict_oldest_waiting():
            # Over the cap with every slot answering: close without reading.
            writer.transport.abort()
            if self._cap.refused == 1 or self._cap.refused % 1000 == 0:
                log.warning(
                    "admin_connection_cap_reached",
                    server=self.name,
                    limit=self._cap.limit,
                    refused=self._cap.refused,
                )
            return
        self._waiting[writer] = None
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                await self._answer(reader, writer)
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a client that went away or never finished asking gets nothing
        except Exception as exc:
            # A bug in a view must not take the endpoint down: answer 500 and say why.
            log.error("observe_request_failed", server=self.name, error=str(exc), exc_info=exc)
            if not writer.is_closing():
                writer.write(b"HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\n\r\n")
        finally:
            self._waiting.pop(writer, None)
            if writer in self._evicted:
                self._evicted.discard(writer)  # its slot went to the newcomer
            else:
                self._cap.give_back()
            writer.close()
        # The descriptor is free only once the transport has closed it.
        with contextlib.suppress(Exception):
            await writer.wait_closed()

    def _evict_oldest_waiting(self) -> bool:
        """Close the oldest connection that has not sent its request; its slot is ours."""
        if not self._waiting:
            return False
        oldest = next(iter(self._waiting))
        del self._waiting[oldest]
        self._evicted.add(oldest)
        oldest.transport.abort()
        return True

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            self._waiting.pop(writer, None)  # asked: no longer evictable
        except asyncio.LimitOverrunError:
            await _send(writer, "GET", Response(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, b""))
            return
        request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = request_line.split()
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            await _send(writer, "GET", Response(HTTPStatus.BAD_REQUEST, b"bad request\n"))
            return
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD") and not self._any_method:
            await _send(writer, method, Response(HTTPStatus.METHOD_NOT_ALLOWED, b"GET or HEAD\n"))
            return
        route = self._routes.get(target.split("?", 1)[0], self._fallback)
        response = await route() if route else Response(HTTPStatus.NOT_FOUND, b"not found\n")
        await _send(writer, method, response)


async def _send(writer: asyncio.StreamWriter, method: str, response: Response) -> None:
    reason = HTTPStatus(response.status).phrase
    extra = "".join(f"{name}: {value}\r\n" for name, value in response.headers)
    head = (
        f"HTTP/1.1 {response.status} {reason}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"{extra}"
        f"Content-Length: {len(response.body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    writer.write(head if method == "HEAD" else head + response.body)
    await writer.drain()


def bound_socket(host: str, port: int, *, dual_stack: bool = False) -> socket.socket:
    """A TCP socket bound to host:port (SO_REUSEADDR), not yet listening; OSError when the
    address cannot be had. `dual_stack` with "::" also takes IPv4 (as Go's "0.0.0.0" does)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if dual_stack else 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock
