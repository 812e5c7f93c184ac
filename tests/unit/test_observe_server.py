"""The small HTTP servers behind /healthz and /metrics, spoken to over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import re
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
    port = server.ports["metrics"]
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


# --- kube-proxy's answers ------------------------------------------------------------------

# Go's time.Time String(): "2006-01-02 15:04:05.999999999 -0700 MST", then " m=+S.NNNNNNNNN"
# for a clock reading; what kube-proxy's /healthz carries in lastUpdated and currentTime.
GO_TIME = r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d{1,9})? [+-]\d{4} [A-Z]+(?: m=[+-]\d+\.\d{9})?"
HEALTHZ = re.compile(
    rf'\{{"lastUpdated": "({GO_TIME})","currentTime": "({GO_TIME})", '
    r'"nodeEligible": (true|false)\}'
)
LIVEZ = re.compile(rf'\{{"lastUpdated": "({GO_TIME})","currentTime": "({GO_TIME})"\}}')


class Clock:
    def __init__(self) -> None:
        self.now = 50.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def both() -> AsyncIterator[tuple[ObserveServer, Health, Clock]]:
    clock = Clock()
    health = Health(30, monotonic=clock, wall=lambda: 1_764_612_000.25 + clock.now)
    server = ObserveServer(
        ObserveConfig(
            healthz=("127.0.0.1", 0), metrics=("127.0.0.1", 0), mode="iptables", max_connections=2
        ),
        health,
        Metrics(list),
        list,
    )
    await server.start()
    try:
        yield server, health, clock
    finally:
        await server.stop()


def split(answer: bytes) -> tuple[int, dict[str, str], bytes]:
    head, body = answer.split(b"\r\n\r\n", 1)
    lines = head.decode().split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), headers, body


async def get(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    return split(await ask(port, f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode()))


async def test_healthz_and_livez_answer_as_kube_proxy(
    both: tuple[ObserveServer, Health, Clock],
) -> None:
    server, health, clock = both
    port = server.ports["healthz"]
    # Before the first sync: 503, lastUpdated Go's zero time.
    status, headers, body = await get(port, "/healthz")
    assert status == 503
    match = HEALTHZ.fullmatch(body.decode())
    assert match is not None, body
    assert match.group(1) == "0001-01-01 00:00:00 +0000 UTC"
    assert match.group(3) == "true"
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Content-Type-Options"] == "nosniff"

    health.sources_synced()
    health.sync_succeeded(None)
    clock.now += 1.5
    status, _, body = await get(port, "/healthz")
    assert status == 200
    match = HEALTHZ.fullmatch(body.decode())
    assert match is not None, body
    # Healthy: lastUpdated is "now", as kube-proxy answers; uptime in the monotonic reading.
    assert match.group(1) == match.group(2) == "2025-12-01 18:00:51.75 +0000 UTC m=+1.500000000"
    status, _, body = await get(port, "/livez")
    assert status == 200 and LIVEZ.fullmatch(body.decode()) is not None

    # A node being deleted: /healthz fails (nodeEligible false), /livez does not.
    health.set_node_eligible(False)
    status, _, body = await get(port, "/healthz")
    assert status == 503 and body.decode().endswith('"nodeEligible": false}')
    assert (await get(port, "/livez"))[0] == 200

    # Changes stuck for longer than twice the sync period: lastUpdated is the last success.
    health.set_node_eligible(True)
    health.change_queued()
    clock.now += 61
    status, headers, body = await get(port, "/healthz")
    assert status == 503 and "unapplied" in headers["X-Uproxy-Reason"]
    match = HEALTHZ.fullmatch(body.decode())
    assert match is not None and match.group(1) == "2025-12-01 18:00:50.25 +0000 UTC m=+0.000000000"


async def test_metrics_port_serves_healthz_and_kube_proxy_metrics(
    both: tuple[ObserveServer, Health, Clock],
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    server, _, _ = both
    port = server.ports["metrics"]
    assert await get(port, "/healthz") == (
        200,
        {
            "Content-Type": "text/plain; charset=utf-8",
            "X-Content-Type-Options": "nosniff",
            "Content-Length": "2",
            "Connection": "close",
        },
        b"ok",
    )
    await get(server.ports["healthz"], "/healthz")
    await get(server.ports["healthz"], "/livez")
    status, _, body = await get(port, "/metrics")
    assert status == 200
    text = body.decode()
    assert "_created" not in text
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    names = {name for name, _ in samples}
    for name in (
        "kubeproxy_sync_proxy_rules_duration_seconds_bucket",
        "kubeproxy_sync_full_proxy_rules_duration_seconds_count",
        "kubeproxy_sync_partial_proxy_rules_duration_seconds_count",
        "kubeproxy_network_programming_duration_seconds_bucket",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds_total",
    ):
        assert name in names, name
    assert samples[("kubeproxy_proxy_healthz_total", (("code", "503"),))] == 1
    assert samples[("kubeproxy_proxy_livez_total", (("code", "503"),))] == 1
    for policy in ("internal", "external"):
        key = ("kubeproxy_sync_proxy_rules_no_local_endpoints_total", (("traffic_policy", policy),))
        assert samples[key] == 0
    # kube-proxy's buckets: 15 exponential from 1 ms for syncs.
    buckets = [
        dict(labels)["le"]
        for name, labels in samples
        if name == "kubeproxy_sync_proxy_rules_duration_seconds_bucket"
    ]
    assert buckets[0] == "0.001" and buckets[-2] == "16.384" and len(buckets) == 16


async def test_at_the_cap_a_newcomer_takes_the_oldest_idle_connections_slot(
    both: tuple[ObserveServer, Health, Clock],
) -> None:
    server, _, _ = both
    port = server.ports["metrics"]
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    try:
        # Both slots hold connections that have not asked yet (idle, or slowloris): a probe
        # still gets its answer, in the slot of the oldest, which is closed unanswered.
        while server.caps["metrics"].open < 2:
            await asyncio.sleep(0.01)
        assert (await get(port, "/proxyMode"))[2] == b"iptables"
        oldest_reader, _ = held[0]
        assert await asyncio.wait_for(oldest_reader.read(), 5) == b""
        assert server.caps["metrics"].open <= server.caps["metrics"].limit
        # The younger held connection is still answered.
        reader, writer = held[1]
        writer.write(b"GET /proxyMode HTTP/1.1\r\n\r\n")
        assert (await reader.read()).endswith(b"iptables")
    finally:
        for _, writer in held:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
    while server.caps["metrics"].open:
        await asyncio.sleep(0.01)
    assert (await get(port, "/proxyMode"))[2] == b"iptables"


async def ask_tolerant(port: int, raw: bytes) -> bytes:
    """Like ask(), but a reset counts as no answer."""
    try:
        return await ask(port, raw)
    except ConnectionError:
        return b""


async def test_renderings_run_in_a_thread_and_concurrent_requests_share_one() -> None:
    import threading

    from uproxy.observe.server import SharedRender

    loop_thread = threading.get_ident()
    release = threading.Event()
    rendered_in: list[int] = []
    snapshots = 0

    def snapshot() -> int:
        nonlocal snapshots
        snapshots += 1
        return snapshots

    def render(taken: int) -> bytes:
        rendered_in.append(threading.get_ident())
        release.wait(10)
        return f"rendering {taken}".encode()

    shared = SharedRender()
    waiting = [asyncio.ensure_future(shared.get(snapshot, render)) for _ in range(5)]
    while not rendered_in:
        await asyncio.sleep(0.01)
    # The event loop is free while the rendering runs.
    assert not any(task.done() for task in waiting)
    release.set()
    assert await asyncio.gather(*waiting) == [b"rendering 1"] * 5
    assert snapshots == 1 and len(rendered_in) == 1 and rendered_in[0] != loop_thread
    # A later request takes a fresh snapshot.
    assert await shared.get(snapshot, render) == b"rendering 2"
