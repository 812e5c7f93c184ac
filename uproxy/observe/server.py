"""The health and metrics HTTP endpoints, on kube-proxy's ports and paths."""

from __future__ import annotations

import json
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from uproxy.errors import SettingsError
from uproxy.observe.health import Health
from uproxy.observe.metrics import Metrics
from uproxy.observe.status import render_page, status_document
from uproxy.proxier.base import PortView

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class ObserveConfig:
    healthz: tuple[str, int] | None
    metrics: tuple[str, int] | None
    mode: str


class ObserveServer:
    """Owns the aiohttp runners; `start` binds (failing loudly), `stop` closes."""

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
        self._runners: list[web.AppRunner] = []

    async def start(self) -> None:
        if self._config.healthz is not None:
            app = web.Application()
            app.router.add_get("/healthz", self._healthz)
            app.router.add_get("/livez", self._healthz)
            await self._serve(app, self._config.healthz, "healthz")
        if self._config.metrics is not None:
            app = web.Application()
            app.router.add_get("/metrics", self._prometheus)
            app.router.add_get("/proxyMode", self._proxy_mode)
            app.router.add_get("/status", self._status_json)
            app.router.add_get("/", self._status_page)
            await self._serve(app, self._config.metrics, "metrics")

    async def stop(self) -> None:
        for runner in self._runners:
            await runner.cleanup()
        self._runners.clear()

    async def _serve(self, app: web.Application, address: tuple[str, int], name: str) -> None:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, port = address
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((host, port))
        except OSError as exc:
            sock.close()
            await runner.cleanup()
            raise SettingsError(f"cannot serve {name} on {host}:{port}: {exc.strerror}") from None
        site = web.SockSite(runner, sock)
        await site.start()
        self._runners.append(runner)
        log.info(f"{name}_listening", address=host, port=sock.getsockname()[1])

    async def _healthz(self, request: web.Request) -> web.Response:
        report = self._health.report()
        body = {
            "lastUpdated": report.last_updated,
            "currentTime": report.current_time,
            "healthy": report.healthy,
            "reason": report.reason,
        }
        return web.json_response(body, status=200 if report.healthy else 503)

    async def _prometheus(self, request: web.Request) -> web.Response:
        body = generate_latest(self._metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _proxy_mode(self, request: web.Request) -> web.Response:
        return web.Response(text=self._config.mode)

    async def _status_json(self, request: web.Request) -> web.Response:
        document = status_document(self._views(), self._config.mode)
        return web.Response(text=json.dumps(document, indent=2), content_type="application/json")

    async def _status_page(self, request: web.Request) -> web.Response:
        document = status_document(self._views(), self._config.mode)
        return web.Response(text=render_page(document), content_type="text/html")
