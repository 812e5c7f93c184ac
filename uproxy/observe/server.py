"""The health and metrics HTTP endpoints, on kube-proxy's ports and paths.

Why not aiohttp: importing it costs about 11 MB resident for the life of a proxy whose budget is
50 MB with 1,000 idle connections, to serve a handful of GET paths to probes, scrapers and
people. These are tiny HTTP/1.1 servers on asyncio's own streams: GET and HEAD only, bounded
request size and time, one request per connection (`Connection: close`), on the event loop so
that every view is read between two callbacks, never half-updated.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus

import structlog
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from uproxy.errors import SettingsError
from uproxy.observe.health import Health
from uproxy.observe.metrics import Metrics
from uproxy.observe.status import render_page, status_document
from uproxy.proxier.base import PortView

log = structlog.get_logger(__name__)

MAX_REQUEST_HEAD = 8192
REQUEST_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes
    content_type: str = "text/plain; charset=utf-8"


Route = Callable[[], Response]


@dataclass(frozen=True, slots=True)
class ObserveConfig:
    healthz: tuple[str, int] | None
    metrics: tuple[str, int] | None
    mode: str


class ObserveServer:
    """Owns the listening servers; `start` binds (failing loudly), `stop` closes."""

    def __init__(
        self,
        config: ObserveConfig,
        health: Health,
        metrics: Metrics,
        views: Callable[[], Sequence[PortView]],
    ) -> None:
        self._config = config
        self._health = health
        self._metrics = metrics
        self._views = views
        self._servers: list[asyncio.Server] = []
        self._handlers: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        if self._config.healthz is not None:
            routes = {"/healthz": self._healthz, "/livez": self._healthz}
            await self._serve(routes, self._config.healthz, "healthz")
        if self._config.metrics is not None:
            routes = {
                "/metrics": self._prometheus,
                "/proxyMode": self._proxy_mode,
                "/status": self._status_json,
                "/": self._status_page,
            }
            await self._serve(routes, self._config.metrics, "metrics")

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._handlers):
            task.cancel()
        if self._handlers:
            await asyncio.gather(*self._handlers, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def _serve(
        self, routes: Mapping[str, Route], address: tuple[str, int], name: str
    ) -> None:
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            raise SettingsError(f"cannot serve {name} on {host}:{port}: {exc.strerror}") from None
        server = await asyncio.start_server(
            self._connection_handler(routes), sock=sock, limit=MAX_REQUEST_HEAD
        )
        self._servers.append(server)
        log.info(f"{name}_listening", address=host, port=sock.getsockname()[1])

    def _connection_handler(
        self, routes: Mapping[str, Route]
    ) -> Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            self._handlers.add(task)  # owned: stop() cancels whatever is still answering
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    await _answer(reader, writer, routes)
            except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
                pass  # a client that went away or never finished asking gets nothing
            except Exception as exc:
                # A bug in a view must not take the endpoint down: answer 500 and say why.
                log.error("observe_request_failed", error=str(exc), exc_info=exc)
                if not writer.is_closing():
                    writer.write(b"HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\n\r\n")
            finally:
                self._handlers.discard(task)
                writer.close()

        return handle

    # --- routes --------------------------------------------------------------------------------

    def _healthz(self) -> Response:
        report = self._health.report()
        body = {
            "lastUpdated": report.last_updated,
            "currentTime": report.current_time,
            "healthy": report.healthy,
            "reason": report.reason,
        }
        status = HTTPStatus.OK if report.healthy else HTTPStatus.SERVICE_UNAVAILABLE
        return Response(status, json.dumps(body).encode(), "application/json")

    def _prometheus(self) -> Response:
        return Response(HTTPStatus.OK, generate_latest(self._metrics.registry), CONTENT_TYPE_LATEST)

    def _proxy_mode(self) -> Response:
        return Response(HTTPStatus.OK, self._config.mode.encode())

    def _status_json(self) -> Response:
        document = status_document(self._views(), self._config.mode)
        return Response(HTTPStatus.OK, json.dumps(document, indent=2).encode(), "application/json")

    def _status_page(self) -> Response:
        document = status_document(self._views(), self._config.mode)
        return Response(HTTPStatus.OK, render_page(document).encode(), "text/html; charset=utf-8")


async def _answer(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, routes: Mapping[str, Route]
) -> None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        await _send(writer, "GET", Response(HTTPStatus.REQUEST_HEADER_FIELDS_TOO_LARGE, b""))
        return
    request_line = head.split(b"\r\n", 1)[0].decode("latin-1")
    parts = request_line.split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        await _send(writer, "GET", Response(HTTPStatus.BAD_REQUEST, b"bad request\n"))
        return
    method, target = parts[0], parts[1]
    if method not in ("GET", "HEAD"):
        await _send(writer, method, Response(HTTPStatus.METHOD_NOT_ALLOWED, b"GET or HEAD\n"))
        return
    route = routes.get(target.split("?", 1)[0])
    response = route() if route else Response(HTTPStatus.NOT_FOUND, b"not found\n")
    await _send(writer, method, response)


async def _send(writer: asyncio.StreamWriter, method: str, response: Response) -> None:
    reason = HTTPStatus(response.status).phrase
    head = (
        f"HTTP/1.1 {response.status} {reason}\r\n"
        f"Content-Type: {response.content_type}\r\n"
        f"Content-Length: {len(response.body)}\r\n"
        "Connection: close\r\n\r\n"
    ).encode("latin-1")
    writer.write(head if method == "HEAD" else head + response.body)
    await writer.drain()
