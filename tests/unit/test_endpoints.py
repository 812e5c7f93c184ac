"""Endpoint selection: merging slices, and kube-proxy's CategorizeEndpoints cases."""

from __future__ import annotations

from dataclasses import replace

import pytest

from uproxy.endpoints import categorize_endpoints, endpoints_for_port
from uproxy.model import (
    AddressType,
    Endpoint,
    EndpointSlice,
    ObjectKey,
    Protocol,
    ServicePort,
    ServicePortName,
    SliceEndpoint,
    SlicePort,
)

# --- endpoints_for_port: merging slices --------------------------------------------------

WEB_HTTP = ServicePortName("prod", "web", "http")


CLUSTER_SERVICE = ServicePort(WEB_HTTP, Protocol.TCP, 80, cluster_ips=("10.96.0.10",))


def cluster_choice(endpoints: list[Endpoint]) -> tuple[Endpoint, ...]:
    return categorize_endpoints(endpoints, CLUSTER_SERVICE, "node-a").cluster


def make_slice(
    name: str,
    ports: list[tuple[str, int, Protocol]],
    endpoints: list[SliceEndpoint],
    *,
    service_name: str = "web",
    address_type: AddressType = AddressType.IPV4,
) -> EndpointSlice:
    return EndpointSlice(
        key=ObjectKey("prod", name),
        service=ObjectKey("prod", service_name),
        address_type=address_type,
        ports=tuple(SlicePort(*p) for p in ports),
        endpoints=tuple(endpoints),
    )


def test_endpoints_merged_across_slices_and_sorted() -> None:
    a = make_slice("web-a", [("http", 8080, Protocol.TCP)], [SliceEndpoint(("10.0.0.10",))])
    b = make_slice(
        "web-b",
        [("http", 8080, Protocol.TCP)],
        [SliceEndpoint(("10.0.0.9",)), SliceEndpoint(("10.0.0.2", "10.0.0.3"))],
    )
    result = endpoints_for_port([a, b], WEB_HTTP, Protocol.TCP)
    assert [str(e) for e in result] == ["10.0.0.2:8080", "10.0.0.9:8080", "10.0.0.10:8080"]


def test_endpoints_matched_by_port_name_and_protocol() -> None:
    s = make_slice(
        "web-a",
        [
            ("http", 8080, Protocol.TCP),
            ("http", 8053, Protocol.UDP),
            ("metrics", 9090, Protocol.TCP),
            ("", 7000, Protocol.TCP),
        ],
        [SliceEndpoint(("10.0.0.1",))],
    )
    assert [e.port for e in endpoints_for_port([s], WEB_HTTP, Protocol.TCP)] == [8080]
    assert [e.port for e in endpoints_for_port([s], WEB_HTTP, Protocol.UDP)] == [8053]
    unnamed = ServicePortName("prod", "web", "")
    assert [e.port for e in endpoints_for_port([s], unnamed, Protocol.TCP)] == [7000]
    missing = ServicePortName("prod", "web", "grpc")
    assert endpoints_for_port([s], missing, Protocol.TCP) == ()


def test_endpoints_only_from_the_services_slices() -> None:
    mine = make_slice("web-a", [("http", 80, Protocol.TCP)], [SliceEndpoint(("10.0.0.1",))])
    other = make_slice(
        "api-a", [("http", 80, Protocol.TCP)], [SliceEndpoint(("10.0.0.2",))], service_name="api"
    )
    assert [e.ip for e in endpoints_for_port([mine, other], WEB_HTTP, Protocol.TCP)] == ["10.0.0.1"]


def test_endpoint_fields_carried_over() -> None:
    ep = SliceEndpoint(("10.0.0.1",), False, True, True, "node-a", "z1")
    s = make_slice("web-a", [("http", 80, Protocol.TCP)], [ep])
    assert endpoints_for_port([s], WEB_HTTP, Protocol.TCP) == (
        Endpoint("10.0.0.1", 80, False, True, True, "node-a", "z1"),
    )


def test_duplicate_endpoints_keep_the_healthiest() -> None:
    sick = make_slice(
        "web-a", [("http", 80, Protocol.TCP)], [SliceEndpoint(("10.0.0.1",), ready=False)]
    )
    well = make_slice("web-b", [("http", 80, Protocol.TCP)], [SliceEndpoint(("10.0.0.1",))])
    for order in ([sick, well], [well, sick]):
        result = endpoints_for_port(order, WEB_HTTP, Protocol.TCP)
        assert len(result) == 1 and result[0].ready


def test_fqdn_slices_skipped_unless_asked() -> None:
    s = make_slice(
        "web-a",
        [("http", 80, Protocol.TCP)],
        [SliceEndpoint(("web-1",))],
        address_type=AddressType.FQDN,
    )
    assert endpoints_for_port([s], WEB_HTTP, Protocol.TCP) == ()
    shown = endpoints_for_port([s], WEB_HTTP, Protocol.TCP, include_fqdn=True)
    assert [str(e) for e in shown] == ["web-1:80"]


def test_ipv4_sorted_before_ipv6() -> None:
    v6 = make_slice(
        "web-6",
        [("http", 80, Protocol.TCP)],
        [SliceEndpoint(("fd00::1",))],
        address_type=AddressType.IPV6,
    )
    v4 = make_slice("web-4", [("http", 80, Protocol.TCP)], [SliceEndpoint(("10.0.0.1",))])
    assert [e.ip for e in endpoints_for_port([v6, v4], WEB_HTTP, Protocol.TCP)] == [
        "10.0.0.1",
        "fd00::1",
    ]


def ep(ip: str, *, ready: bool, serving: bool, terminating: bool) -> Endpoint:
    return Endpoint(ip, 80, ready=ready, serving=serving, terminating=terminating)


def test_select_ready_endpoints() -> None:
    ready = ep("10.0.0.1", ready=True, serving=True, terminating=False)
    draining = ep("10.0.0.2", ready=False, serving=True, terminating=True)
    dead = ep("10.0.0.3", ready=False, serving=False, terminating=False)
    assert cluster_choice([ready, draining, dead]) == (ready,)


def test_select_falls_back_to_serving_terminating() -> None:
    draining = ep("10.0.0.2", ready=False, serving=True, terminating=True)
    stopped = ep("10.0.0.3", ready=False, serving=False, terminating=True)
    starting = ep("10.0.0.4", ready=False, serving=True, terminating=False)
    assert cluster_choice([draining, stopped, starting]) == (draining,)
    assert cluster_choice([stopped, starting]) == ()
    assert cluster_choice([]) == ()


# --- categorize_endpoints: kube-proxy's pkg/proxy/topology_test.go cases -----------------------

NODE = "node-a"


def ept(
    ip: str,
    *,
    local: bool = False,
    ready: bool = True,
    serving: bool | None = None,
    terminating: bool = False,
) -> Endpoint:
    return Endpoint(
        ip,
        80,
        ready=ready,
        serving=ready if serving is None else serving,
        terminating=terminating,
        node_name=NODE if local else "node-b",
    )


def svc(*, itp_local: bool = False, etp_local: bool = False, external: bool = True) -> ServicePort:
    return ServicePort(
        WEB_HTTP,
        Protocol.TCP,
        80,
        cluster_ips=("10.96.0.10",),
        node_port=30080 if external else None,
        internal_traffic_local=itp_local,
        external_traffic_local=etp_local,
    )


L1 = ept("10.0.0.1", local=True)
L2 = ept("10.0.0.2", local=True)
R3 = ept("10.0.0.3")
R4 = ept("10.0.0.4")
L1_TERM = ept("10.0.0.1", local=True, ready=False, serving=True, terminating=True)
L2_TERM_DEAD = ept("10.0.0.2", local=True, ready=False, serving=False, terminating=True)
R3_TERM = ept("10.0.0.3", ready=False, serving=True, terminating=True)

Case = tuple[str, ServicePort, list[Endpoint], set[Endpoint] | None, set[Endpoint] | None, bool]

# (name, service, endpoints, cluster or None when unused, local or None when unused, has_any)
CASES: list[Case] = [
    ("cluster policies: every ready endpoint", svc(), [L1, R3, R4], {L1, R3, R4}, None, True),
    (
        "internal Local: only this node's",
        svc(itp_local=True, external=False),
        [L1, L2, R3],
        None,
        {L1, L2},
        True,
    ),
    (
        "internal Local, none here: nothing, but has_any",
        svc(itp_local=True, external=False),
        [R3, R4],
        None,
        set(),
        True,
    ),
    ("external Local: cluster and local both", svc(etp_local=True), [L1, R3], {L1, R3}, {L1}, True),
    ("internal Local, external Cluster", svc(itp_local=True), [L1, R3], {L1, R3}, {L1}, True),
    ("both Local", svc(itp_local=True, etp_local=True), [L1, R3], None, {L1}, True),
    (
        "external Local without external traffic is Cluster",
        svc(etp_local=True, external=False),
        [L1, R3],
        {L1, R3},
        None,
        True,
    ),
    (
        "no ready anywhere: serving terminating ones",
        svc(),
        [L1_TERM, R3_TERM, L2_TERM_DEAD],
        {L1_TERM, R3_TERM},
        None,
        True,
    ),
    (
        "local fallback on its own: local terminating while remote ready",
        svc(etp_local=True),
        [L1_TERM, R3],
        {R3},
        {L1_TERM},
        True,
    ),
    (
        "local ready preferred over local terminating",
        svc(itp_local=True, external=False),
        [L1, ept("10.0.0.9", local=True, ready=False, serving=True, terminating=True)],
        None,
        {L1},
        True,
    ),
    ("nothing serving", svc(etp_local=True), [L2_TERM_DEAD], set(), set(), False),
    ("no endpoints", svc(), [], set(), None, False),
]


@pytest.mark.parametrize(
    ("service", "endpoints", "cluster", "local", "has_any"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_categorize_endpoints_like_kube_proxy(
    service: ServicePort,
    endpoints: list[Endpoint],
    cluster: set[Endpoint] | None,
    local: set[Endpoint] | None,
    has_any: bool,
) -> None:
    chosen = categorize_endpoints(endpoints, service, NODE)
    assert set(chosen.cluster) == (cluster or set())
    assert set(chosen.local) == (local or set())
    assert chosen.has_any is has_any
    assert set(chosen.internal) == set(
        chosen.local if service.internal_traffic_local else chosen.cluster
    )
    assert set(chosen.reachable) == set(chosen.cluster) | set(chosen.local)


def test_internal_local_external_cluster_sends_external_traffic_everywhere() -> None:
    # kube-proxy: ClusterIP traffic stays on this node, NodePort traffic goes to every endpoint.
    chosen = categorize_endpoints([L1, R3], svc(itp_local=True), NODE)
    assert set(chosen.internal) == {L1}
    assert set(chosen.external) == {L1, R3}


def test_external_local_with_only_terminating_local_endpoints() -> None:
    # kube-proxy applies the serving-terminating fallback to the local endpoints on their own.
    chosen = categorize_endpoints([L1_TERM, R3], svc(etp_local=True), NODE)
    assert chosen.external == (L1_TERM,)
    assert chosen.internal == (R3,)


def test_policy_flags_without_external_addresses() -> None:
    service = replace(svc(etp_local=True), node_port=None, external_ips=("192.0.2.1",))
    assert set(categorize_endpoints([L1, R3], service, NODE).external) == {L1}


# --- duplicates across slices: this node's copy wins (kube-proxy's EndpointSliceCache) --------


def test_local_copy_of_a_duplicate_endpoint_wins_over_a_healthier_remote_copy() -> None:
    remote = make_slice(
        "web-a", [("http", 8080, Protocol.TCP)], [SliceEndpoint(("10.0.0.1",), node_name="node-b")]
    )
    local = make_slice(
        "web-b",
        [("http", 8080, Protocol.TCP)],
        [
            SliceEndpoint(
                ("10.0.0.1",), ready=False, serving=True, terminating=True, node_name="node-a"
            )
        ],
    )
    for order in ([remote, local], [local, remote]):
        (chosen,) = endpoints_for_port(order, WEB_HTTP, Protocol.TCP, node_name="node-a")
        assert chosen.node_name == "node-a"
    # With no node to prefer, the healthier report wins, whatever the slice order.
    (healthier,) = endpoints_for_port([local, remote], WEB_HTTP, Protocol.TCP)
    assert healthier.node_name == "node-b"


# --- topology hints: kube-proxy's topology_test.go cases (PreferSameZone / PreferSameNode) -----


def hinted(
    last_octet: int,
    zones: tuple[str, ...] = (),
    *,
    nodes: tuple[str, ...] = (),
    ready: bool = True,
    local: bool = False,
) -> Endpoint:
    return Endpoint(
        f"10.1.2.{last_octet}",
        80,
        ready=ready,
        serving=ready,
        node_name=NODE if local else "node-b",
        zone_hints=tuple(sorted(zones)),
        node_hints=nodes,
    )


def ips(endpoints: tuple[Endpoint, ...]) -> set[int]:
    return {int(e.ip.rsplit(".", 1)[1]) for e in endpoints}


ZONED = [
    hinted(3, ("zone-a",)),
    hinted(4, ("zone-b",)),
    hinted(5, ("zone-c",)),
    hinted(6, ("zone-a",)),
]

# (name, node zone, service, endpoints, cluster, local or None, reachable)
HINT_CASES: list[tuple[str, str, ServicePort, list[Endpoint], set[int], set[int] | None]] = [
    ("normal zone filtering", "zone-a", svc(external=False), ZONED, {3, 6}, None),
    ("node without a zone: no filtering", "", svc(external=False), ZONED[:1], {3}, None),
    ("node in another zone: no filtering", "zone-b", svc(external=False), ZONED[:1], {3}, None),
    (
        "unready endpoint left out",
        "zone-a",
        svc(external=False),
        [*ZONED[:3], hinted(6, ("zone-a",), ready=False)],
        {3},
        None,
    ),
    (
        "only unready endpoints in this zone: no filtering",
        "zone-a",
        svc(external=False),
        [
            hinted(3, ("zone-a",), ready=False),
            hinted(4, ("zone-b",)),
            hinted(5, ("zone-c",)),
            hinted(6, ("zone-a",), ready=False),
        ],
        {4, 5},
        None,
    ),
    (
        "an endpoint without hints: no filtering",
        "zone-a",
        svc(external=False),
        [*ZONED[:2], hinted(5), ZONED[3]],
        {3, 4, 5, 6},
        None,
    ),
    (
        "several hints per endpoint",
        "zone-c",
        svc(external=False),
        [
            hinted(3, ("zone-a", "zone-b", "zone-c")),
            hinted(4, ("zone-b", "zone-c")),
            hinted(5, ("zone-b", "zone-d")),
            hinted(6, ("zone-c",)),
        ],
        {3, 4, 6},
        None,
    ),
    (
        "externalTrafficPolicy Local: topology ignored for local endpoints",
        "zone-a",
        svc(etp_local=True),
        [
            hinted(3, ("zone-a",), local=True),
            hinted(4, ("zone-b",), local=True),
            *ZONED[2:],
        ],
        {3, 6},
        {3, 4},
    ),
    (
        "internalTrafficPolicy Local: topology ignored for local endpoints",
        "zone-a",
        svc(itp_local=True),
        [
            hinted(3, ("zone-a",), local=True),
            hinted(4, ("zone-b",), local=True),
            *ZONED[2:],
        ],
        {3, 6},
        {3, 4},
    ),
    (
        "PreferSameNode: every endpoint has node hints, one for this node",
        "zone-a",
        svc(external=False),
        [
            hinted(3, ("zone-a",), nodes=(NODE,)),
            hinted(4, ("zone-a",), nodes=("node-b",)),
            hinted(5, ("zone-b",), nodes=("node-c",)),
        ],
        {3},
        None,
    ),
    (
        "node hints missing on one endpoint: zone hints apply",
        "zone-a",
        svc(external=False),
        [
            hinted(3, ("zone-a",), nodes=(NODE,)),
            hinted(4, ("zone-a",)),
            hinted(5, ("zone-b",), nodes=("node-c",)),
        ],
        {3, 4},
        None,
    ),
    (
        "node hints for other nodes only: zone hints apply",
        "zone-b",
        svc(external=False),
        [
            hinted(3, ("zone-a",), nodes=("node-x",)),
            hinted(5, ("zone-b",), nodes=("node-c",)),
        ],
        {5},
        None,
    ),
]


@pytest.mark.parametrize(
    ("zone", "service", "endpoints", "cluster", "local"),
    [c[1:] for c in HINT_CASES],
    ids=[c[0] for c in HINT_CASES],
)
def test_topology_hints_like_kube_proxy(
    zone: str,
    service: ServicePort,
    endpoints: list[Endpoint],
    cluster: set[int],
    local: set[int] | None,
) -> None:
    chosen = categorize_endpoints(endpoints, service, NODE, zone)
    assert ips(chosen.cluster) == cluster
    assert ips(chosen.local) == (local or set())
    assert ips(chosen.reachable) == cluster | (local or set())


def test_hints_ignored_without_ready_endpoints_terminating_fallback_everywhere() -> None:
    terminating = Endpoint(
        "10.1.2.7", 80, ready=False, serving=True, terminating=True, zone_hints=("zone-b",)
    )
    chosen = categorize_endpoints([terminating], svc(external=False), NODE, "zone-a")
    assert chosen.cluster == (terminating,)
