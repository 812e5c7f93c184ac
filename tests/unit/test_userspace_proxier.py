"""The userspace proxier's sync logic, with listeners on loopback and a stateful fake of portals."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from uproxy.model import Endpoint, Protocol, ProxyState, ServicePort, ServicePortName
from uproxy.proxier.base import Changed
from uproxy.proxier.portals import Portal
from uproxy.proxier.userspace import UserspaceProxier

WEB = ServicePortName("default", "web", "http")
HERE, THERE = "node-a", "node-b"
LOCAL_EP = Endpoint("10.1.0.1", 8080, node_name=HERE)
REMOTE_EP = Endpoint("10.1.0.2", 8080, node_name=THERE)


class FakePortals:
    """Holds the portal set the kernel would have."""

    def __init__(self) -> None:
        self.installed: dict[ServicePortName, Portal] = {}

    async def flush_at_start(self) -> None:
        self.installed = {}

    async def sync(
        self, portals: Mapping[ServicePortName, Portal], changed: Changed = None
    ) -> None:
        self.installed = dict(portals)

    async def cleanup(self) -> None:
        self.installed = {}


def proxier(portals: FakePortals) -> UserspaceProxier:
    return UserspaceProxier(
        bind_address="127.0.0.1",
        port_range=None,
        node_name=HERE,
        udp_timeout=0.25,
        udp_max_sessions=10,
        portals=portals,
    )


def web(**changes: object) -> ServicePort:
    base = ServicePort(WEB, Protocol.TCP, 80, cluster_ips=("10.96.0.10",), node_port=30080)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def state(service: ServicePort, *endpoints: Endpoint) -> ProxyState:
    return ProxyState(services={service.name: service}, endpoints={service.name: endpoints})


def in_use(p: UserspaceProxier) -> frozenset[Endpoint]:
    (view,) = p.view()
    return view.in_use


async def test_unchanged_sync_keeps_listener_and_port() -> None:
    portals = FakePortals()
    p = proxier(portals)
    try:
        await p.sync(state(web(), LOCAL_EP))
        first = portals.installed[WEB].proxy_port
        await p.sync(state(web(cluster_ips=("10.96.0.11",)), LOCAL_EP, REMOTE_EP))
        assert portals.installed[WEB].proxy_port == first
        assert portals.installed[WEB].service.cluster_ips == ("10.96.0.11",)
        assert in_use(p) == {LOCAL_EP, REMOTE_EP}
    finally:
        await p.shutdown(0)


async def test_protocol_change_gets_a_new_listener() -> None:
    portals = FakePortals()
    p = proxier(portals)
    try:
        await p.sync(state(web(), LOCAL_EP))
        await p.sync(state(web(protocol=Protocol.UDP), LOCAL_EP))
        assert portals.installed[WEB].service.protocol is Protocol.UDP
    finally:
        await p.shutdown(0)


async def test_removed_port_loses_its_portal() -> None:
    portals = FakePortals()
    p = proxier(portals)
    try:
        await p.sync(state(web(), LOCAL_EP))
        await p.sync(ProxyState())
        assert portals.installed == {}
        assert p.view() == []
    finally:
        await p.shutdown(0)


async def test_internal_traffic_local_uses_only_this_nodes_endpoints() -> None:
    portals = FakePortals()
    p = proxier(portals)
    try:
        await p.sync(state(web(internal_traffic_local=True, node_port=None), LOCAL_EP, REMOTE_EP))
        assert in_use(p) == {LOCAL_EP}
    finally:
        await p.shutdown(0)


async def test_internal_local_external_cluster_sends_external_traffic_everywhere() -> None:
    # kube-proxy: ClusterIP traffic stays on this node, NodePort traffic reaches every endpoint.
    portals = FakePortals()
    p = proxier(portals)
    try:
        await p.sync(state(web(internal_traffic_local=True), LOCAL_EP, REMOTE_EP))
        listeners = p._active[WEB]
        assert set(listeners.listener.balancer.endpoints) == {LOCAL_EP}
        assert listeners.external is not None
        assert set(listeners.external.balancer.endpoints) == {LOCAL_EP, REMOTE_EP}
        assert portals.installed[WEB].external_port == listeners.external.port
    finally:
        await p.shutdown(0)


async def test_external_traffic_local_gets_its_own_listener() -> None:
    portals = FakePortals()
    p = proxier(portals)
    try:
        await p.sync(state(web(external_traffic_local=True), LOCAL_EP, REMOTE_EP))
        portal = portals.installed[WEB]
        assert portal.external_proxy_port is not None
        assert portal.external_proxy_port != portal.proxy_port
        # Cluster traffic still reaches every endpoint; external traffic only local ones.
        listeners = p._active[WEB]
        assert set(listeners.listener.balancer.endpoints) == {LOCAL_EP, REMOTE_EP}
        assert listeners.external is not None
        assert set(listeners.external.balancer.endpoints) == {LOCAL_EP}
        # Back to Cluster: the external listener goes, external traffic shares the main one.
        await p.sync(state(web(), LOCAL_EP, REMOTE_EP))
        assert portals.installed[WEB].external_proxy_port is None
        assert portals.installed[WEB].external_port == portal.proxy_port
    finally:
        await p.shutdown(0)


async def test_external_traffic_local_without_external_addresses_needs_no_listener() -> None:
    portals = FakePortals()
    p = proxier(portals)
    try:
        await p.sync(state(web(external_traffic_local=True, node_port=None), LOCAL_EP))
        assert portals.installed[WEB].external_proxy_port is None
    finally:
        await p.shutdown(0)


async def test_terminating_endpoints_serve_only_when_none_is_ready() -> None:
    portals = FakePortals()
    p = proxier(portals)
    leaving = Endpoint("10.1.0.3", 8080, ready=False, serving=True, terminating=True)
    try:
        await p.sync(state(web(), leaving, LOCAL_EP))
        assert in_use(p) == {LOCAL_EP}
        await p.sync(state(web(), leaving))
        assert in_use(p) == {leaving}
    finally:
        await p.shutdown(0)


API = ServicePortName("default", "api", "http")


def api(**changes: object) -> ServicePort:
    base = ServicePort(API, Protocol.TCP, 81, cluster_ips=("10.96.0.11",))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


async def test_a_sync_told_what_changed_touches_only_those_ports() -> None:
    portals = FakePortals()
    p = proxier(portals)
    try:
        both = ProxyState(
            services={WEB: web(), API: api()}, endpoints={WEB: (LOCAL_EP,), API: (LOCAL_EP,)}
        )
        await p.sync(both, None)
        web_port = portals.installed[WEB].proxy_port
        moved = ProxyState(
            services={WEB: web(), API: api()}, endpoints={WEB: (REMOTE_EP,), API: (REMOTE_EP,)}
        )
        await p.sync(moved, frozenset({API}))
        assert set(p._active[API].listener.balancer.endpoints) == {REMOTE_EP}
        # WEB was not named: its listener is left exactly as it was.
        assert set(p._active[WEB].listener.balancer.endpoints) == {LOCAL_EP}
        assert portals.installed[WEB].proxy_port == web_port
        only_web = ProxyState(services={WEB: web()}, endpoints={WEB: (REMOTE_EP,)})
        await p.sync(only_web, frozenset({API, WEB}))
        assert set(portals.installed) == {WEB}
        assert set(p._active[WEB].listener.balancer.endpoints) == {REMOTE_EP}
    finally:
        await p.shutdown(0)
