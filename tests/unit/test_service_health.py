"""kube-proxy's service health checks (healthCheckNodePort), against a stateful fake of the
listeners: what is open where, and what each answers."""

from __future__ import annotations

import json

import pytest
import structlog.testing

from tests.unit.test_app import NoSource, TrustingProxier
from uproxy.app import App
from uproxy.model import (
    AddressType,
    Endpoint,
    EndpointSlice,
    ObjectKey,
    Protocol,
    ProxyState,
    ServicePort,
    ServicePortName,
    SliceEndpoint,
    SlicePort,
)
from uproxy.observe.fake_listeners import FakeListeners
from uproxy.observe.service_health import (
    ALL_ADDRESSES,
    ServiceHealthServer,
    answer_body,
    health_check_addresses,
    health_check_ports,
    local_ready_endpoints,
)
from uproxy.proxier.portals import NoPortals
from uproxy.settings import Settings

WEB = ObjectKey("default", "web")
NODE = "node-a"


def lb(name: str = "web", port: str = "http", hc: int | None = 32000) -> ServicePort:
    return ServicePort(
        ServicePortName("default", name, port),
        Protocol.TCP,
        80,
        cluster_ips=("10.96.0.10",),
        load_balancer_ips=("192.0.2.80",),
        node_port=30080,
        external_traffic_local=True,
        health_check_node_port=hc,
    )


def ep(
    ip: str,
    node: str | None = NODE,
    *,
    port: int = 8080,
    ready: bool = True,
    serving: bool = True,
    terminating: bool = False,
) -> Endpoint:
    return Endpoint(ip, port, ready=ready, serving=serving, terminating=terminating, node_name=node)


class Healthy:
    def __init__(self) -> None:
        self.value = True

    def __call__(self) -> bool:
        return self.value


def make(
    addresses: tuple[str, ...] = (ALL_ADDRESSES,),
) -> tuple[ServiceHealthServer, FakeListeners, Healthy]:
    listeners, healthy = FakeListeners(), Healthy()
    return ServiceHealthServer(listeners, addresses, healthy), listeners, healthy


async def test_answers_like_kube_proxy_200_with_local_endpoints() -> None:
    server, listeners, _ = make()
    await server.sync({WEB: 32000}, {WEB: 2})
    response = await listeners.ask(ALL_ADDRESSES, 32000)
    assert response.status == 200
    assert response.content_type == "application/json"
    assert dict(response.headers) == {
        "X-Content-Type-Options": "nosniff",
        "X-Load-Balancing-Endpoint-Weight": "2",
    }
    assert response.body == (
        b'{\n\t"service": {\n\t\t"namespace": "default",\n\t\t"name": "web"\n\t},\n'
        b'\t"localEndpoints": 2,\n\t"serviceProxyHealthy": true\n}'
    )
    assert json.loads(response.body) == {
        "service": {"namespace": "default", "name": "web"},
        "localEndpoints": 2,
        "serviceProxyHealthy": True,
    }


async def test_503_without_local_endpoints_or_when_the_proxy_is_unhealthy() -> None:
    server, listeners, healthy = make()
    await server.sync({WEB: 32000}, {})
    response = await listeners.ask(ALL_ADDRESSES, 32000)
    assert response.status == 503
    assert dict(response.headers)["X-Load-Balancing-Endpoint-Weight"] == "0"
    assert json.loads(response.body)["localEndpoints"] == 0

    await server.sync({WEB: 32000}, {WEB: 1})
    assert (await listeners.ask(ALL_ADDRESSES, 32000)).status == 200
    healthy.value = False
    response = await listeners.ask(ALL_ADDRESSES, 32000)
    assert response.status == 503
    assert json.loads(response.body) == {
        "service": {"namespace": "default", "name": "web"},
        "localEndpoints": 1,
        "serviceProxyHealthy": False,
    }


async def test_checks_open_close_and_move_with_services() -> None:
    server, listeners, _ = make(("10.0.0.1", "192.168.1.1"))
    other = ObjectKey("shop", "api")
    await server.sync({WEB: 32000, other: 32001}, {WEB: 1})
    assert set(listeners.listening) == {
        ("10.0.0.1", 32000),
        ("192.168.1.1", 32000),
        ("10.0.0.1", 32001),
        ("192.168.1.1", 32001),
    }
    assert server.serving == {WEB: 32000, other: 32001}
    # Unchanged checks are left alone across syncs.
    opened = listeners.opened_total
    await server.sync({WEB: 32000, other: 32001}, {WEB: 1})
    assert listeners.opened_total == opened
    # A moved port closes the old listeners and opens the new; a gone service closes.
    await server.sync({WEB: 32005}, {WEB: 1})
    assert set(listeners.listening) == {("10.0.0.1", 32005), ("192.168.1.1", 32005)}
    assert (await listeners.ask("10.0.0.1", 32005)).status == 200
    await server.sync({}, {})
    assert listeners.listening == {}
    assert server.serving == {}


async def test_counts_update_at_each_sync_and_drop_for_vanished_endpoints() -> None:
    server, listeners, _ = make()
    await server.sync({WEB: 32000}, {WEB: 3})
    assert json.loads((await listeners.ask(ALL_ADDRESSES, 32000)).body)["localEndpoints"] == 3
    await server.sync({WEB: 32000}, {})
    assert json.loads((await listeners.ask(ALL_ADDRESSES, 32000)).body)["localEndpoints"] == 0


async def test_a_port_held_elsewhere_is_logged_once_and_retried_at_each_sync() -> None:
    server, listeners, _ = make(("10.0.0.1", "192.168.1.1"))
    listeners.held_elsewhere.add(32000)
    with structlog.testing.capture_logs() as logs:
        await server.sync({WEB: 32000}, {WEB: 1})
        await server.sync({WEB: 32000}, {WEB: 1})
        await server.sync({WEB: 32000}, {WEB: 1})
    failures = [e for e in logs if e["event"] == "service_health_check_failed"]
    assert len(failures) == 1
    assert failures[0]["service"] == "default/web" and failures[0]["port"] == 32000
    assert "in use" in failures[0]["error"]
    assert listeners.listening == {}  # nothing half-open
    assert server.serving == {}

    listeners.held_elsewhere.clear()
    await server.sync({WEB: 32000}, {WEB: 1})
    assert (await listeners.ask("192.168.1.1", 32000)).status == 200


async def test_two_services_on_one_port_the_second_waits() -> None:
    server, listeners, _ = make()
    second = ObjectKey("default", "zzz")
    await server.sync({WEB: 32000, second: 32000}, {WEB: 1, second: 1})
    assert server.serving == {WEB: 32000}
    await server.sync({second: 32000}, {second: 1})
    assert server.serving == {second: 32000}
    assert json.loads((await listeners.ask(ALL_ADDRESSES, 32000)).body)["service"]["name"] == "zzz"


def test_body_quotes_names_as_go_does() -> None:
    body = answer_body(ObjectKey("kube-system", "a.b-c"), 0, False).decode()
    assert '"namespace": "kube-system"' in body and '"name": "a.b-c"' in body
    assert body.startswith("{\n\t") and body.endswith("false\n}")


def test_local_ready_endpoints_counts_distinct_ready_ips_on_this_node() -> None:
    http, https = lb(port="http"), lb(port="https")
    state = ProxyState(
        services={http.name: http, https.name: https},
        endpoints={
            # One pod serving two ports counts once (kube-proxy squashes by IP).
            http.name: (
                ep("10.1.0.1"),
                ep("10.1.0.2", ready=False, serving=True, terminating=True),
                ep("10.1.0.3", node="node-b"),
                ep("10.1.0.4", ready=False),
            ),
            https.name: (ep("10.1.0.1", port=8443), ep("10.1.0.5", port=8443)),
        },
    )
    assert health_check_ports(state) == {WEB: 32000}
    assert local_ready_endpoints(state, NODE, {WEB}) == {WEB: 2}
    assert local_ready_endpoints(state, "node-b", {WEB}) == {WEB: 1}
    assert local_ready_endpoints(state, "node-c", {WEB}) == {}
    assert local_ready_endpoints(state, NODE, set()) == {}


def test_only_local_load_balancers_have_health_check_ports() -> None:
    plain = lb(name="plain", hc=None)
    state = ProxyState(services={plain.name: plain})
    assert health_check_ports(state) == {}


@pytest.mark.parametrize(
    ("cidrs", "expected"),
    [
        ((), [ALL_ADDRESSES]),
        (("10.0.0.0/8",), ["10.0.0.1"]),
        (("10.0.0.0/8", "fd00::/64"), ["10.0.0.1", "fd00::1"]),
        (("172.16.0.0/12",), []),
    ],
)
def test_addresses_follow_nodeport_addresses(cidrs: tuple[str, ...], expected: list[str]) -> None:
    node_ips = ["127.0.0.1", "10.0.0.1", "192.168.1.1", "fd00::1", "::1"]
    assert health_check_addresses(cidrs, node_ips) == expected


def web_slice(node: str) -> EndpointSlice:
    return EndpointSlice(
        key=ObjectKey("default", "web-1"),
        service=WEB,
        address_type=AddressType.IPV4,
        ports=(SlicePort("http", 8080, Protocol.TCP),),
        endpoints=(SliceEndpoint(("10.1.0.1",), node_name=node),),
    )


async def test_the_app_feeds_checks_after_each_sync_and_closes_them_at_exit() -> None:
    settings = Settings(
        healthz_bind_address=None,
        metrics_bind_address=None,
        sync_period=3600,
        hostname=NODE,
    )
    listeners = FakeListeners()
    app = App(
        settings,
        [NoSource()],
        NoPortals(),
        TrustingProxier(),
        health_check_listeners=listeners,
        health_check_addresses=[ALL_ADDRESSES],
    )
    no_local = app.metrics.no_local_endpoints.labels(traffic_policy="external")
    app.tracker.service_updated(WEB, (lb(),))
    app.tracker.slice_updated(web_slice(NODE))
    app.tracker.source_synced("files")
    assert app.service_health is not None
    await app._sync()
    response = await listeners.ask(ALL_ADDRESSES, 32000)
    assert response.status == 200 and json.loads(response.body)["localEndpoints"] == 1
    assert no_local._value.get() == 0

    # The endpoint moves to another node: this node's check fails after the next sync.
    app.tracker.slice_updated(web_slice("node-b"))
    await app._sync()
    response = await listeners.ask(ALL_ADDRESSES, 32000)
    assert response.status == 503 and json.loads(response.body)["localEndpoints"] == 0
    assert no_local._value.get() == 1

    app.tracker.service_deleted(WEB)
    await app._sync()
    assert listeners.listening == {}
    app.tracker.service_updated(WEB, (lb(),))
    await app._sync()
    await app.service_health.close()
    assert listeners.listening == {}
