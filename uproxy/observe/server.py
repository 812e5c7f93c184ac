"""The health and metrics HTTP endpoints, on kube-proxy's ports, paths and answers.

The healthz port answers /healthz and /livez exactly as kube-proxy does (the body, the Go time
format, the headers), so probes and scripts written for kube-proxy read them unchanged. The
metrics port answers kube-proxy's /metrics, /proxyMode and plain /healthz, plus uproxy's
/status and status page.

Large answers (/metrics and /status with thousands of service ports) are snapshotted on the
event loop, where the proxier's state is never half-updated, and rendered in a worker thread;
requests arriving while one rendering runs share it. Each server caps its concurrent
connections (see uproxy/observe/http.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import TypeVar

import structlog
from prometheus_client import CONTENT_TYPE_LATEST

from uproxy.errors import SettingsError
from uproxy.observe.gotime import ZERO_TIME, go_time
from uproxy.observe.health import Health, HealthReport
from uproxy.observe.http import (
    DEFAULT_MAX_CONNECTIONS,
    ConnectionCap,
    HttpServer,
    Response,
    Route,
    bound_socket,
)
from uproxy.observe.metrics import Metrics
from uproxy.observe.reserve import DescriptorReserve
from uproxy.observe.status import WorkerStatus, render_page, status_document
from uproxy.proxier.base import PortView

log = structlog.get_logger(__name__)

_T = TypeVar("_T")
_NOSNIFF = (("X-Content-Type-Options", "nosniff"),)
_JSON = "application/json"
# Set while the process is out of descriptors: the answer stays 200 (alive and forwarding what
# it holds; a restart would cut every connection and free nothing the clients hold).
DEGRADED_HEADER = "X-Uproxy-Degraded"
DESCRIPTORS_EXHAUSTED = "descriptors exhausted"


@dataclass(frozen=True, slots=True)
class ObserveConfig:
    healthz: tuple[str, int] | None
    metrics: tuple[str, int] | None
    mode: str
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # per server
    portals: bool = True  # whether the virtual IPs reach the proxy (see `uproxy status`)


class SharedRender:
    """At most one rendering of a kind at a time, in a worker thread; callers arriving while it
    runs get its result instead of starting another (a refreshing page times N viewers, or a
    scraper retrying, costs one rendering)."""

    def __init__(self) -> None:
        self._running: asyncio.Future[bytes] | None = None

    async def get(self, snapshot: Callable[[], _T], render: Callable[[_T], bytes]) -> bytes:
        if self._running is None:
            taken = snapshot()  # on the loop: a consistent copy
            future = asyncio.ensure_future(asyncio.to_thread(render, taken))
            self._running = future
            future.add_done_callback(self._done)
        # shield: a caller that gives up must not cancel the rendering others wait for.
        return await asyncio.shield(self._running)

    def _done(self, future: asyncio.Future[bytes]) -> None:
        if self._running is future:
            self._running = None


class ObserveServer:
    """Owns the listening servers; `start` binds (failing loudly), `stop` closes."""

    def __init__(
        self,
        config: ObserveConfig,
        health: Health,
        metrics: Metrics,
        views: Callable[[], Sequence[PortView]],
        *,
        reserve: DescriptorReserve | None = None,
    ) -> None:
        self._config = config
        self._reserve = reserve
        self._health = health
        self._metrics = metrics
        self._views = views
        # With --workers N > 1, the composition root points this at the supervisor.
        self.workers: Callable[[], Sequence[WorkerStatus]] = tuple
        self._servers: list[HttpServer] = []
        self._scrapes = SharedRender()
        self._status_json_render = SharedRender()
        self._status_page_render = SharedRender()
        self.caps: dict[str, ConnectionCap] = {}
        self.ports: dict[str, int] = {}  # server name -> the port it listens on

    async def start(self) -> None:
        if self._reserve is not None:
            self._reserve.refill()
        if self._config.healthz is not None:
            routes: dict[str, Route] = {"/healthz": self._healthz, "/livez": self._livez}
            await self._serve(routes, self._config.healthz, "healthz")
        if self._config.metrics is not None:
            routes = {
                "/metrics": self._prometheus,
                "/proxyMode": self._proxy_mode,
                "/healthz": self._ping,
                "/healthz/ping": self._ping,
                "/status": self._status_json,
                "/": self._status_page,
            }
            await self._serve(routes, self._config.metrics, "metrics")

    async def stop(self) -> None:
        for server in self._servers:
            await server.close()
        self._servers.clear()
        if self._reserve is not None:
            self._reserve.close()

    async def _serve(self, routes: dict[str, Route], address: tuple[str, int], name: str) -> None:
        host, port = address
        try:
            sock = bound_socket(host, port)
        except OSError as exc:
            raise SettingsError(f"cannot serve {name} on {host}:{port}: {exc.strerror}") from None
        cap = ConnectionCap(self._config.max_connections)
        self.caps[name] = cap
        server = HttpServer(name, routes, cap, reserve=self._reserve)
        await server.serve(sock)
        self._servers.append(server)
        self.ports[name] = sock.getsockname()[1]
        log.info(
            f"{name}_listening",
            address=host,
            port=sock.getsockname()[1],
            max_connections=cap.limit,
        )

    def _degraded(self) -> tuple[tuple[str, str], ...]:
        """The degraded header while the process is out of descriptors."""
        if self._reserve is None or not self._reserve.exhausted():
            return ()
        return ((DEGRADED_HEADER, DESCRIPTORS_EXHAUSTED),)

    # --- the healthz port: kube-proxy's ProxyHealthServer --------------------------------------

    async def _healthz(self) -> Response:
        report = self._health.report()
        eligible = self._health.node_eligible
        healthy = report.healthy and eligible
        last_updated, current = _times(report, healthy)
        body = (
            f'{{"lastUpdated": {json.dumps(last_updated)},"currentTime": {json.dumps(current)}, '
            f'"nodeEligible": {"true" if eligible else "false"}}}'
        )
        status = HTTPStatus.OK if healthy else HTTPStatus.SERVICE_UNAVAILABLE
        self._metrics.healthz_total.labels(code=str(int(status))).inc()
        reason = report.reason if eligible or not report.healthy else "node not eligible"
        headers = (*_NOSNIFF, ("X-Uproxy-Reason", reason), *self._degraded())
        return Response(status, body.encode(), _JSON, headers)

    async def _livez(self) -> Response:
        report = self._health.report()
        last_updated, current = _times(report, report.healthy)
        body = f'{{"lastUpdated": {json.dumps(last_updated)},"currentTime": {json.dumps(current)}}}'
        status = HTTPStatus.OK if report.healthy else HTTPStatus.SERVICE_UNAVAILABLE
        self._metrics.livez_total.labels(code=str(int(status))).inc()
        headers = (*_NOSNIFF, ("X-Uproxy-Reason", report.reason), *self._degraded())
        return Response(status, body.encode(), _JSON, headers)

    # --- the metrics port ----------------------------------------------------------------------

    async def _ping(self) -> Response:
        # kube-proxy installs the generic component healthz here: "ok" while the process runs.
        return Response(HTTPStatus.OK, b"ok", headers=(*_NOSNIFF, *self._degraded()))

    async def _prometheus(self) -> Response:
        body = await self._scrapes.get(self._metrics.snapshot, self._metrics.render)
        return Response(HTTPStatus.OK, body, CONTENT_TYPE_LATEST)

    async def _proxy_mode(self) -> Response:
        return Response(HTTPStatus.OK, self._config.mode.encode(), headers=_NOSNIFF)

    async def _status_json(self) -> Response:
        body = await self._status_json_render.get(self._view_snapshot, self._render_status_json)
        return Response(HTTPStatus.OK, body, _JSON)

    async def _status_page(self) -> Response:
        body = await self._status_page_render.get(self._view_snapshot, self._render_status_page)
        return Response(HTTPStatus.OK, body, "text/html; charset=utf-8")

    def _view_snapshot(self) -> tuple[list[PortView], list[WorkerStatus]]:
        return list(self._views()), list(self.workers())

    def _render_status_json(self, snapshot: tuple[list[PortView], list[WorkerStatus]]) -> bytes:
        return json.dumps(self._status(*snapshot), indent=2).encode()

    def _render_status_page(self, snapshot: tuple[list[PortView], list[WorkerStatus]]) -> bytes:
        return render_page(self._status(*snapshot)).encode()

    def _status(self, views: list[PortView], workers: list[WorkerStatus]) -> dict[str, object]:
        return status_document(
            views,
            self._config.mode,
            synced=self._health.synced,
            portals=self._config.portals,
            workers=workers,
        )


def _times(report: HealthReport, healthy: bool) -> tuple[str, str]:
    """kube-proxy's lastUpdated/currentTime: when healthy, lastUpdated is "now" (its compatibility
    rule: recent while healthy); otherwise the last successful sync, Go's zero time if none."""
    current = go_time(report.current_time, report.current_uptime)
    if healthy:
        return current, current
    if report.last_updated is None:
        return ZERO_TIME, current
    return go_time(report.last_updated, report.last_updated_uptime), current
