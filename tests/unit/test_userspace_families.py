"""The userspace proxier's IP families: one listener per served family a service port has
virtual addresses in, all on one proxy port, each balancing over its own family's endpoints."""

from __future__ import annotations

from tests.unit.test_userspace_proxier import FakePortals
from uproxy.model import Endpoint, Protocol, ProxyState, ServicePort, ServicePortName
from uproxy.proxier.userspace import UserspaceProxier, family_address, served_families

WEB = ServicePortName("default", "web", "http")
V4_EP, V6_EP = Endpoint("10.1.0.1", 8080), Endpoint("fd00:1::1", 8080)


def proxier(portals: FakePortals, bind_address: str) -> UserspaceProxier:
    return UserspaceProxier(
        bind_address=bind_address,
        port_range=None,
        node_name="node-a",
        udp_timeout=0.25,
        udp_max_sessions=10,
        portals=portals,
    )


def state(*cluster_ips: str, protocol: Protocol = Protocol.TCP) -> ProxyState:
    service = ServicePort(WEB, protocol, 80, cluster_ips=cluster_ips)
    return ProxyState(services={WEB: service}, endpoints={WEB: (V4_EP, V6_EP)})


def test_a_wildcard_serves_both_families_a_specific_address_its_own() -> None:
    assert served_families("0.0.0.0") == served_families("::") == (4, 6)
    assert served_families("10.10.0.1") == (4,)
    assert served_families("fd00:10::1") == (6,)
    assert (family_address("::", 4), family_address("0.0.0.0", 6)) == ("0.0.0.0", "::")
    assert family_address("fd00:10::1", 6) == "fd00:10::1"


async def test_dual_stack_listeners_share_one_port_and_keep_to_their_family() -> None:
    for protocol in (Protocol.TCP, Protocol.UDP):
        portals = FakePortals()
        p = proxier(portals, "::")
        try:
            await p.sync(state("10.96.0.60", "fd00:96::60", protocol=protocol))
            listeners = p._active[WEB].cluster
            assert set(listeners) == {4, 6}
            assert listeners[4].port == listeners[6].port == portals.installed[WEB].proxy_port
            assert listeners[4].balancer.endpoints == (V4_EP,)
            assert listeners[6].balancer.endpoints == (V6_EP,)
            (view,) = p.view()
            assert view.in_use == {V4_EP, V6_EP}
        finally:
            await p.shutdown(0)


async def test_a_single_stack_service_gets_its_familys_listener_only() -> None:
    portals = FakePortals()
    p = proxier(portals, "0.0.0.0")
    try:
        await p.sync(state("fd00:96::60"))
        listeners = p._active[WEB].cluster
        assert set(listeners) == {6}
        assert listeners[6].balancer.endpoints == (V6_EP,)
        # Becoming dual stack: listeners of both families, on one port again.
        await p.sync(state("10.96.0.60", "fd00:96::60"))
        listeners = p._active[WEB].cluster
        assert set(listeners) == {4, 6} and listeners[4].port == listeners[6].port
    finally:
        await p.shutdown(0)


async def test_no_virtual_address_of_the_bind_family_bridges_to_every_endpoint() -> None:
    # A sidecar on 127.0.0.1 still reaches an IPv6-only service through its proxy port.
    portals = FakePortals()
    p = proxier(portals, "127.0.0.1")
    try:
        await p.sync(state("fd00:96::60"))
        listeners = p._active[WEB].cluster
        assert set(listeners) == {4}
        assert set(listeners[4].balancer.endpoints) == {V4_EP, V6_EP}
    finally:
        await p.shutdown(0)
