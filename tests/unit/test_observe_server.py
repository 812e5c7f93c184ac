"""The small HTTP servers behind /healthz and /metrics, spoken to over real loopback sockets."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from uproxy.observe.health import Health
from uproxy.observe.metrics import Metrics
from uproxy.observe.server import ObserveConfig, ObserveServer


@pytest.fixture
async def metrics_port() -> AsyncIterator[int]:
    health = Health(30)
    server = ObserveServer(
        ObserveConfig(healthz=None, metrics=("127.0.0.1", 0), mode="userspace"),
        health,
        Metrics(list),
        list,
    )
    await server.start()
    port = server._servers[0].sockets[0].getsockname()[1]
    try:
        yield port
    finally:
        await server.stop()


async def ask(port: int, raw: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(raw)
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


async def test_get_serves_routes_and_closes(metrics_port: int) -> None:
    answer = await ask(metrics_port, b"GET /proxyMode HTTP/1.1\r\nHost: x\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"Connection: close" in answer and answer.endswith(b"\r\n\r\nuserspace")


async def test_head_has_no_body(metrics_port: int) -> None:
    answer = await ask(metrics_port, b"HEAD /proxyMode HTTP/1.1\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"\r\n\r\n")


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GET /nothing HTTP/1.1\r\n\r\n", b"404"),
        (b"POST /metrics HTTP/1.1\r\n\r\n", b"405"),
        (b"garbage\r\n\r\n", b"400"),
        (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n", b"431"),
    ],
)
async def test_bad_requests_get_clear_statuses(
    metrics_port: int, request_bytes: bytes, status: bytes
) -> None:
    answer = await ask(metrics_port, request_bytes)
    assert answer.split(b" ", 2)[1] == status


async def test_query_strings_are_ignored_and_metrics_parse(metrics_port: int) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    answer = await ask(metrics_port, b"GET /metrics?x=1 HTTP/1.1\r\n\r\n")
    body = answer.split(b"\r\n\r\n", 1)[1].decode()
    names = {family.name for family in text_string_to_metric_families(body)}
    assert "kubeproxy_sync_proxy_rules_duration_seconds" in names
