from __future__ import annotations

import contextlib
import copy
import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from uproxy.convert import (
    ServiceResult,
    SkippedObject,
    SliceResult,
    convert_endpoint_slice,
    convert_node,
    convert_object,
    convert_service,
    service_skip_reason,
)
from uproxy.endpoints import categorize_endpoints, endpoints_for_port
from uproxy.errors import ConversionError
from uproxy.model import (
    AddressType,
    Endpoint,
    EndpointSlice,
    NodeInfo,
    ObjectKey,
    Protocol,
    ServicePort,
    ServicePortName,
    SliceEndpoint,
    SlicePort,
)


def service(**spec: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "web", "namespace": "prod"},
        "spec": {"clusterIP": "10.96.0.10", "ports": [{"name": "http", "port": 80}]},
    }
    base["spec"].update(spec)
    return base


def endpoint_slice(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "web-abc",
            "namespace": "prod",
            "labels": {"kubernetes.io/service-name": "web"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [{"addresses": ["10.0.0.1"]}],
    }
    base.update(fields)
    return base


def one_port(obj: dict[str, Any]) -> ServicePort:
    ports = convert_service(obj)
    assert ports is not None
    assert len(ports) == 1
    return ports[0]


def conversion_error(obj: Any, convert: Any = convert_service) -> ConversionError:
    with pytest.raises(ConversionError) as info:
        convert(obj)
    return info.value


# --- Services: the happy path -----------------------------------------------------------------


def test_minimal_service_defaults() -> None:
    port = one_port(service())
    assert port == ServicePort(
        name=ServicePortName("prod", "web", "http"),
        protocol=Protocol.TCP,
        port=80,
        cluster_ips=("10.96.0.10",),
    )
    assert port.affinity_timeout is None
    assert not port.internal_traffic_local
    assert not port.external_traffic_local


def test_namespace_defaults_to_default() -> None:
    obj = service()
    del obj["metadata"]["namespace"]
    assert one_port(obj).name == ServicePortName("default", "web", "http")


def test_unnamed_single_port() -> None:
    port = one_port(service(ports=[{"port": 53, "protocol": "UDP"}]))
    assert port.name == ServicePortName("prod", "web", "")
    assert port.protocol is Protocol.UDP
    assert str(port.name) == "prod/web"


def test_multiple_ports_in_order() -> None:
    ports = convert_service(
        service(
            ports=[
                {"name": "http", "port": 80},
                {"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053},
            ]
        )
    )
    assert ports is not None
    assert [(p.name.port, p.protocol, p.port, p.node_port) for p in ports] == [
        ("http", Protocol.TCP, 80, None),
        ("dns", Protocol.UDP, 53, 30053),
    ]


def test_same_port_number_for_tcp_and_udp_is_allowed() -> None:
    ports = convert_service(
        service(
            ports=[
                {"name": "dns-tcp", "port": 53, "protocol": "TCP"},
                {"name": "dns-udp", "port": 53, "protocol": "UDP"},
            ]
        )
    )
    assert ports is not None and len(ports) == 2


def test_target_port_is_ignored() -> None:
    assert one_port(service(ports=[{"port": 80, "targetPort": "http-alt"}])).port == 80


def test_dual_stack_cluster_ips_win_over_cluster_ip() -> None:
    port = one_port(service(clusterIP="10.96.0.10", clusterIPs=["10.96.0.10", "fd00::0010"]))
    assert port.cluster_ips == ("10.96.0.10", "fd00::10")


def test_ipv6_only_cluster_ip_is_normalised() -> None:
    assert one_port(service(clusterIP="FD00:0:0::1")).cluster_ips == ("fd00::1",)


@pytest.mark.parametrize("cluster_ip", ["", None])
def test_empty_cluster_ip_means_no_cluster_ips(cluster_ip: str | None) -> None:
    port = one_port(service(clusterIP=cluster_ip, externalIPs=["192.0.2.1"]))
    assert port.cluster_ips == ()
    assert port.external_ips == ("192.0.2.1",)


def test_missing_cluster_ip_means_no_cluster_ips() -> None:
    obj = service()
    del obj["spec"]["clusterIP"]
    assert one_port(obj).cluster_ips == ()


def test_external_ips_and_load_balancer_ingress() -> None:
    obj = service(type="LoadBalancer", externalIPs=["192.0.2.1", "2001:db8::1", "192.0.2.1"])
    obj["status"] = {
        "loadBalancer": {
            "ingress": [
                {"ip": "198.51.100.7"},
                {"hostname": "lb.example.com"},
                {"ip": "198.51.100.8", "hostname": "lb2.example.com"},
            ]
        }
    }
    port = one_port(obj)
    # Deduplicated; the IPv6 one is dropped: the Service's ClusterIP is IPv4 (kube-proxy's
    # per-family proxiers), see test_addresses_of_another_family_than_the_cluster_ips_...
    assert port.external_ips == ("192.0.2.1",)
    assert port.load_balancer_ips == ("198.51.100.7", "198.51.100.8")


def test_empty_status_is_fine() -> None:
    obj = service()
    obj["status"] = {"loadBalancer": {}}
    assert one_port(obj).load_balancer_ips == ()


def test_node_port_zero_means_unallocated() -> None:
    assert one_port(service(ports=[{"port": 80, "nodePort": 0}])).node_port is None


@pytest.mark.parametrize("node_port", [1, 30000, 32767, 65535])
def test_node_port_accepted_in_full_range(node_port: int) -> None:
    obj = service(type="NodePort", ports=[{"port": 80, "nodePort": node_port}])
    assert one_port(obj).node_port == node_port


def test_client_ip_affinity_default_timeout() -> None:
    assert one_port(service(sessionAffinity="ClientIP")).affinity_timeout == 10800


@pytest.mark.parametrize("timeout", [1, 600, 86400])
def test_client_ip_affinity_timeout(timeout: int) -> None:
    obj = service(
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": timeout}},
    )
    assert one_port(obj).affinity_timeout == timeout


def test_affinity_none_ignores_config() -> None:
    obj = service(sessionAffinity="None", sessionAffinityConfig={"clientIP": {"timeoutSeconds": 5}})
    assert one_port(obj).affinity_timeout is None


def test_traffic_policies() -> None:
    obj = service(internalTrafficPolicy="Local", externalTrafficPolicy="Local")
    port = one_port(obj)
    assert port.internal_traffic_local and port.external_traffic_local
    port = one_port(service(internalTrafficPolicy="Cluster", externalTrafficPolicy="Cluster"))
    assert not port.internal_traffic_local and not port.external_traffic_local


def test_mapping_not_dict_is_accepted() -> None:
    from types import MappingProxyType

    obj = service()
    obj["spec"] = MappingProxyType(obj["spec"])
    assert one_port(obj).port == 80


# --- Services: skip rules ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"clusterIP": "None"}, "headless (clusterIP: None)"),
        ({"clusterIP": "None", "clusterIPs": ["None"]}, "headless (clusterIP: None)"),
        ({"clusterIP": None, "clusterIPs": ["None"]}, "headless (clusterIP: None)"),
        ({"type": "ExternalName", "externalName": "example.com"}, "type ExternalName"),
    ],
)
def test_skipped_services(spec: dict[str, Any], reason: str) -> None:
    obj = service(**spec)
    assert convert_service(obj) is None
    assert service_skip_reason(obj) == reason


@pytest.mark.parametrize(
    "label", ["service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless"]
)
@pytest.mark.parametrize("value", ["", "other-proxy"])
def test_skip_labels(label: str, value: str) -> None:
    obj = service()
    obj["metadata"]["labels"] = {label: value}
    assert convert_service(obj) is None
    assert service_skip_reason(obj) == f"labelled {label}"


def test_skipped_service_with_bad_ports_is_still_skipped() -> None:
    assert convert_service(service(clusterIP="None", ports="garbage")) is None


def test_unrelated_labels_do_not_skip() -> None:
    obj = service()
    obj["metadata"]["labels"] = {"app": "web"}
    assert convert_service(obj) is not None
    assert service_skip_reason(obj) is None


# --- Services: errors -------------------------------------------------------------------------


def modified(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A deep copy of `obj` with the dotted `path` (list indexes as numbers) set to `value`."""
    result = copy.deepcopy(obj)
    parts = path.split(".")
    target: Any = result
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else target[part]
    last = parts[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value
    return result


TWO_PORTS = service(ports=[{"name": "http", "port": 80}, {"name": "https", "port": 443}])


@pytest.mark.parametrize(
    ("obj", "field", "message"),
    [
        (modified(TWO_PORTS, "spec.ports.1.protocol", "SCTP"), "spec.ports[1].protocol", "SCTP"),
        (modified(TWO_PORTS, "spec.ports.1.protocol", "tcp"), "spec.ports[1].protocol", "'tcp'"),
        (modified(TWO_PORTS, "spec.ports.1.protocol", 6), "spec.ports[1].protocol", "string"),
        (modified(TWO_PORTS, "spec.ports.0.port", "abc"), "spec.ports[0].port", "integer"),
        (modified(TWO_PORTS, "spec.ports.0.port", True), "spec.ports[0].port", "integer"),
        (modified(TWO_PORTS, "spec.ports.0.port", 1.5), "spec.ports[0].port", "integer"),
        (modified(TWO_PORTS, "spec.ports.0.port", 0), "spec.ports[0].port", "between 1 and 65535"),
        (modified(TWO_PORTS, "spec.ports.0.port", 65536), "spec.ports[0].port", "65536"),
        (modified(TWO_PORTS, "spec.ports.0.port", None), "spec.ports[0].port", "required"),
        (modified(TWO_PORTS, "spec.ports.1.nodePort", 70000), "spec.ports[1].nodePort", "between"),
        (modified(TWO_PORTS, "spec.ports.1.nodePort", "x"), "spec.ports[1].nodePort", "integer"),
        (modified(TWO_PORTS, "spec.ports.1.name", None), "spec.ports[1].name", "more than one"),
        (modified(TWO_PORTS, "spec.ports.1.name", ""), "spec.ports[1].name", "more than one"),
        (modified(TWO_PORTS, "spec.ports.1.name", "http"), "spec.ports[1].name", "duplicate"),
        (modified(TWO_PORTS, "spec.ports.1.name", "HTTPS"), "spec.ports[1].name", "port name"),
        (modified(TWO_PORTS, "spec.ports.1.name", 443), "spec.ports[1].name", "string"),
        (modified(TWO_PORTS, "spec.ports.1.port", 80), "spec.ports[1]", "duplicate port 80/TCP"),
        (modified(TWO_PORTS, "spec.ports.1", "https"), "spec.ports[1]", "object"),
        (service(ports="80"), "spec.ports", "must be a list"),
        (service(ports={"port": 80}), "spec.ports", "must be a list"),
        (service(ports=[]), "spec.ports", "at least one port"),
        (service(ports=None), "spec.ports", "at least one port"),
        (service(clusterIP="10.96.0.300"), "spec.clusterIP", "not a valid IP"),
        (service(clusterIP=167772160), "spec.clusterIP", "string"),
        (service(clusterIPs="10.0.0.1"), "spec.clusterIPs", "list"),
        (service(clusterIPs=["10.0.0.1", "bogus"]), "spec.clusterIPs[1]", "'bogus'"),
        (service(clusterIPs=["10.0.0.1", "10.0.0.2"]), "spec.clusterIPs[1]", "one IPv4 and one"),
        (service(clusterIPs=["10.0.0.1", "fd00::1", "fd00::2"]), "spec.clusterIPs", "two"),
        (service(externalIPs=["192.0.2.1", "nope"]), "spec.externalIPs[1]", "'nope'"),
        (service(externalIPs="192.0.2.1"), "spec.externalIPs", "list"),
        (service(type="Weird"), "spec.type", "ClusterIP, NodePort"),
        (service(sessionAffinity="Cookie"), "spec.sessionAffinity", "'Cookie'"),
        (service(internalTrafficPolicy="Nearby"), "spec.internalTrafficPolicy", "Cluster, Local"),
        (service(externalTrafficPolicy="Global"), "spec.externalTrafficPolicy", "'Global'"),
        (modified(service(), "spec", ["x"]), "spec", "must be an object, got list"),
        (modified(service(), "metadata.name", None), "metadata.name", "required"),
        (modified(service(), "metadata.name", ""), "metadata.name", "required"),
        (modified(service(), "metadata.name", 5), "metadata.name", "string"),
        (modified(service(), "metadata.namespace", 5), "metadata.namespace", "string"),
        (modified(service(), "metadata.labels", ["a"]), "metadata.labels", "object"),
        (modified(service(), "metadata", "web"), "metadata", "object"),
    ],
)
def test_service_errors(obj: dict[str, Any], field: str, message: str) -> None:
    error = conversion_error(obj)
    assert error.kind == "Service"
    assert error.field == field
    assert message in error.message
    assert str(error).startswith("Service ")


def test_sctp_message_is_clear() -> None:
    error = conversion_error(service(ports=[{"port": 80, "protocol": "SCTP"}]))
    assert str(error) == (
        "Service prod/web: spec.ports[0].protocol: "
        "SCTP is not supported by uproxy (only TCP and UDP)"
    )


def test_error_names_the_object() -> None:
    obj = service(ports=[{"port": "abc"}])
    del obj["metadata"]["namespace"]
    assert conversion_error(obj).name == "default/web"


def test_missing_name_error_names_namespace() -> None:
    obj = service()
    del obj["metadata"]["name"]
    error = conversion_error(obj)
    assert error.field == "metadata.name"
    assert error.name == "prod/<unknown>"


@pytest.mark.parametrize("timeout", [0, -1, 86401, "600", 1.5, True])
def test_affinity_timeout_bounds(timeout: Any) -> None:
    obj = service(
        sessionAffinity="ClientIP",
        sessionAffinityConfig={"clientIP": {"timeoutSeconds": timeout}},
    )
    assert conversion_error(obj).field == "spec.sessionAffinityConfig.clientIP.timeoutSeconds"


def test_affinity_config_type_errors() -> None:
    obj = service(sessionAffinity="ClientIP", sessionAffinityConfig={"clientIP": 5})
    assert conversion_error(obj).field == "spec.sessionAffinityConfig.clientIP"


def test_load_balancer_ingress_errors() -> None:
    obj = service()
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}, {"ip": "x"}]}}
    assert conversion_error(obj).field == "status.loadBalancer.ingress[1].ip"
    obj["status"] = {"loadBalancer": {"ingress": ["198.51.100.1"]}}
    assert conversion_error(obj).field == "status.loadBalancer.ingress[0]"


def test_not_a_mapping() -> None:
    assert conversion_error(["not", "an", "object"]).kind == "Service"


# --- EndpointSlices ---------------------------------------------------------------------------


def test_slice_conversion() -> None:
    obj = endpoint_slice(
        endpoints=[
            {
                "addresses": ["10.0.0.1", "10.0.0.99"],
                "conditions": {"ready": True},
                "nodeName": "node-a",
                "zone": "z1",
                "targetRef": {"kind": "Pod", "name": "web-1"},
            },
            {"addresses": ["10.0.0.2"], "conditions": {"ready": False, "terminating": True}},
        ]
    )
    result = convert_endpoint_slice(obj)
    assert result == EndpointSlice(
        key=ObjectKey("prod", "web-abc"),
        service=ObjectKey("prod", "web"),
        address_type=AddressType.IPV4,
        ports=(SlicePort("http", 8080, Protocol.TCP),),
        endpoints=(
            SliceEndpoint(("10.0.0.1", "10.0.0.99"), node_name="node-a", zone="z1"),
            SliceEndpoint(("10.0.0.2",), ready=False, serving=False, terminating=True),
        ),
    )


@pytest.mark.parametrize(
    ("conditions", "expected"),
    [
        (None, (True, True, False)),
        ({}, (True, True, False)),
        ({"ready": None, "serving": None, "terminating": None}, (True, True, False)),
        ({"ready": False}, (False, False, False)),
        ({"ready": False, "serving": True, "terminating": True}, (False, True, True)),
        ({"ready": True, "serving": False}, (True, False, False)),
    ],
)
def test_slice_condition_defaults(
    conditions: dict[str, Any] | None, expected: tuple[bool, bool, bool]
) -> None:
    result = convert_endpoint_slice(
        endpoint_slice(endpoints=[{"addresses": ["10.0.0.1"], "conditions": conditions}])
    )
    assert result is not None
    ep = result.endpoints[0]
    assert (ep.ready, ep.serving, ep.terminating) == expected


def test_slice_port_defaults_and_nil_port() -> None:
    result = convert_endpoint_slice(
        endpoint_slice(ports=[{"port": 8080}, {"name": "all", "port": None}, {"name": "any"}])
    )
    assert result is not None
    assert result.ports == (SlicePort("", 8080, Protocol.TCP),)


def test_slice_without_ports_or_endpoints() -> None:
    result = convert_endpoint_slice(endpoint_slice(ports=None, endpoints=None))
    assert result is not None
    assert result.ports == () and result.endpoints == ()


def test_slice_without_service_label_is_skipped() -> None:
    obj = endpoint_slice()
    obj["metadata"]["labels"] = {"app": "web"}
    assert convert_endpoint_slice(obj) is None
    del obj["metadata"]["labels"]
    assert convert_endpoint_slice(obj) is None


def test_slice_ipv6_and_fqdn() -> None:
    v6 = convert_endpoint_slice(
        endpoint_slice(addressType="IPv6", endpoints=[{"addresses": ["FD00::0001"]}])
    )
    assert v6 is not None and v6.endpoints[0].addresses == ("fd00::1",)
    fqdn = convert_endpoint_slice(
        endpoint_slice(addressType="FQDN", endpoints=[{"addresses": ["web-1.example.com."]}])
    )
    assert fqdn is not None
    assert fqdn.address_type is AddressType.FQDN
    assert fqdn.endpoints[0].addresses == ("web-1.example.com.",)


@pytest.mark.parametrize(
    ("fields", "field", "message"),
    [
        ({"addressType": None}, "addressType", "required"),
        ({"addressType": "IPv5"}, "addressType", "IPv4, IPv6, FQDN"),
        ({"ports": [{"port": 80, "protocol": "SCTP"}]}, "ports[0].protocol", "SCTP is not"),
        ({"ports": [{"port": 80}, {"port": 81, "protocol": "ICMP"}]}, "ports[1].protocol", "ICMP"),
        ({"ports": [{"port": "80"}]}, "ports[0].port", "integer"),
        ({"ports": [{"port": 0}]}, "ports[0].port", "between"),
        ({"ports": [{"name": 7, "port": 80}]}, "ports[0].name", "string"),
        ({"ports": "http"}, "ports", "list"),
        ({"ports": ["http"]}, "ports[0]", "object"),
        ({"endpoints": {"addresses": []}}, "endpoints", "list"),
        ({"endpoints": [{"addresses": []}]}, "endpoints[0].addresses", "at least one"),
        ({"endpoints": [{}]}, "endpoints[0].addresses", "at least one"),
        ({"endpoints": [{"addresses": "10.0.0.1"}]}, "endpoints[0].addresses", "list"),
        (
            {"endpoints": [{"addresses": ["10.0.0.1"]}] * 2 + [{"addresses": ["10.0.0.1", "x"]}]},
            "endpoints[2].addresses[1]",
            "'x'",
        ),
        ({"endpoints": [{"addresses": ["fd00::1"]}]}, "endpoints[0].addresses[0]", "not an IPv4"),
        (
            {"addressType": "IPv6", "endpoints": [{"addresses": ["10.0.0.1"]}]},
            "endpoints[0].addresses[0]",
            "not an IPv6",
        ),
        (
            {"addressType": "FQDN", "endpoints": [{"addresses": ["bad_name!"]}]},
            "endpoints[0].addresses[0]",
            "DNS name",
        ),
        (
            {"addressType": "FQDN", "endpoints": [{"addresses": ["a" * 64 + ".com"]}]},
            "endpoints[0].addresses[0]",
            "DNS name",
        ),
        (
            {"endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"ready": "yes"}}]},
            "endpoints[0].conditions.ready",
            "true or false",
        ),
        (
            {"endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"serving": 1}}]},
            "endpoints[0].conditions.serving",
            "true or false",
        ),
        (
            {"endpoints": [{"addresses": ["10.0.0.1"], "conditions": {"terminating": "no"}}]},
            "endpoints[0].conditions.terminating",
            "true or false",
        ),
        (
            {"endpoints": [{"addresses": ["10.0.0.1"], "conditions": []}]},
            "endpoints[0].conditions",
            "object",
        ),
        ({"endpoints": [{"addresses": ["10.0.0.1"], "nodeName": 3}]}, "endpoints[0].nodeName", ""),
        ({"endpoints": [{"addresses": ["10.0.0.1"], "zone": ["a"]}]}, "endpoints[0].zone", ""),
    ],
)
def test_slice_errors(fields: dict[str, Any], field: str, message: str) -> None:
    error = conversion_error(endpoint_slice(**fields), convert_endpoint_slice)
    assert error.kind == "EndpointSlice"
    assert error.name == "prod/web-abc"
    assert error.field == field
    assert message in error.message


def test_slice_service_label_must_be_a_string() -> None:
    obj = endpoint_slice()
    obj["metadata"]["labels"]["kubernetes.io/service-name"] = 5
    error = conversion_error(obj, convert_endpoint_slice)
    assert error.field == "metadata.labels.kubernetes.io/service-name"


# --- convert_object ---------------------------------------------------------------------------


def test_convert_object_dispatch() -> None:
    svc = convert_object(service())
    assert isinstance(svc, ServiceResult)
    assert svc.key == ObjectKey("prod", "web")
    sl = convert_object(endpoint_slice())
    assert isinstance(sl, SliceResult)
    assert sl.key == ObjectKey("prod", "web-abc")


@pytest.mark.parametrize(
    ("api_version", "kind"),
    [
        ("v1", "ConfigMap"),
        ("apps/v1", "Deployment"),
        ("discovery.k8s.io/v1beta1", "EndpointSlice"),
        ("v1", "Endpoints"),
        (None, "Service"),
    ],
)
def test_convert_object_ignores_other_kinds(api_version: str | None, kind: str) -> None:
    assert (
        convert_object({"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}}) is None
    )


def test_convert_object_reports_skips() -> None:
    headless = convert_object(service(clusterIP="None"))
    assert headless == SkippedObject(
        "Service", ObjectKey("prod", "web"), "headless (clusterIP: None)"
    )
    unlabelled = endpoint_slice()
    unlabelled["metadata"]["labels"] = {}
    skipped = convert_object(unlabelled)
    assert isinstance(skipped, SkippedObject)
    assert skipped.kind == "EndpointSlice"
    assert "kubernetes.io/service-name" in skipped.reason


def test_convert_object_raises_conversion_errors() -> None:
    with pytest.raises(ConversionError):
        convert_object(service(ports=[{"port": "abc"}]))


WEB_HTTP = ServicePortName("prod", "web", "http")
CLUSTER_SERVICE = ServicePort(WEB_HTTP, Protocol.TCP, 80, cluster_ips=("10.96.0.10",))


def cluster_choice(endpoints: tuple[Endpoint, ...]) -> tuple[Endpoint, ...]:
    return categorize_endpoints(endpoints, CLUSTER_SERVICE, "node-a").cluster


# --- properties -------------------------------------------------------------------------------

ipv4 = st.ip_addresses(v=4).map(str)
conditions = st.fixed_dictionaries(
    {},
    optional={
        "ready": st.none() | st.booleans(),
        "serving": st.none() | st.booleans(),
        "terminating": st.none() | st.booleans(),
    },
)


@given(
    st.lists(
        st.tuples(st.lists(ipv4, min_size=1, max_size=3), conditions), min_size=0, max_size=12
    ),
    st.integers(1, 65535),
)
def test_slice_roundtrip_property(
    raw: list[tuple[list[str], dict[str, bool | None]]], port: int
) -> None:
    obj = endpoint_slice(
        ports=[{"name": "http", "port": port}],
        endpoints=[{"addresses": a, "conditions": c} for a, c in raw],
    )
    converted = convert_endpoint_slice(obj)
    assert converted is not None
    result = endpoints_for_port([converted], WEB_HTTP, Protocol.TCP)
    # One endpoint per distinct first address, sorted numerically, all on the slice's port.
    assert {e.ip for e in result} == {a[0] for a, _ in raw}
    assert len(result) == len({a[0] for a, _ in raw})
    assert all(e.port == port for e in result)
    keys = [int(ipaddress.ip_address(e.ip)) for e in result]
    assert keys == sorted(keys)
    chosen = cluster_choice(result)
    assert set(chosen) <= set(result)
    if any(e.ready for e in result):
        assert all(e.ready for e in chosen)


garbage = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.text(max_size=4)
    | st.lists(st.integers() | st.text(max_size=4), max_size=2)
    | st.dictionaries(st.text(max_size=4), st.integers(), max_size=2)
)

SERVICE_PATHS = [
    "metadata",
    "metadata.name",
    "metadata.namespace",
    "metadata.labels",
    "spec",
    "spec.ports",
    "spec.ports.0",
    "spec.ports.0.name",
    "spec.ports.0.port",
    "spec.ports.0.protocol",
    "spec.ports.0.nodePort",
    "spec.clusterIP",
    "spec.clusterIPs",
    "spec.externalIPs",
    "spec.sessionAffinity",
    "spec.sessionAffinityConfig",
    "spec.internalTrafficPolicy",
    "spec.type",
]
SLICE_PATHS = [
    "metadata.labels",
    "addressType",
    "ports",
    "ports.0",
    "ports.0.port",
    "ports.0.protocol",
    "endpoints",
    "endpoints.0",
    "endpoints.0.addresses",
    "endpoints.0.addresses.0",
    "endpoints.0.conditions",
]


@given(st.sampled_from(SERVICE_PATHS), garbage)
def test_bad_service_fields_raise_only_conversion_error(path: str, value: Any) -> None:
    try:
        convert_service(modified(service(), path, value))
    except ConversionError as e:
        assert e.field.startswith(path.split(".")[0])


@given(st.sampled_from(SLICE_PATHS), garbage)
def test_bad_slice_fields_raise_only_conversion_error(path: str, value: Any) -> None:
    with contextlib.suppress(ConversionError):
        convert_endpoint_slice(modified(endpoint_slice(), path, value))


def test_addresses_of_another_family_than_the_cluster_ips_are_not_taken() -> None:
    obj = service(
        clusterIP="fd00::10",
        clusterIPs=["fd00::10"],
        externalIPs=["192.0.2.7", "2001:db8::7"],
        ports=[{"name": "http", "port": 80}],
    )
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}, {"ip": "2001:db8::1"}]}}
    ports = convert_service(obj)
    assert ports is not None
    (port,) = ports
    assert port.external_ips == ("2001:db8::7",)
    assert port.load_balancer_ips == ("2001:db8::1",)
    dual = service(
        clusterIP="10.96.0.10",
        clusterIPs=["10.96.0.10", "fd00::10"],
        externalIPs=["192.0.2.7", "2001:db8::7"],
        ports=[{"name": "http", "port": 80}],
    )
    converted = convert_service(dual)
    assert converted is not None
    assert converted[0].external_ips == ("192.0.2.7", "2001:db8::7")


# --- issue 14: ipMode, source ranges, health check node port, hints, Nodes ---------------------


def test_load_balancer_ip_with_ip_mode_proxy_is_not_taken() -> None:
    obj = service(type="LoadBalancer")
    obj["status"] = {
        "loadBalancer": {
            "ingress": [
                {"ip": "198.51.100.7", "ipMode": "Proxy"},
                {"ip": "198.51.100.8", "ipMode": "VIP"},
                {"ip": "198.51.100.9"},
            ]
        }
    }
    assert one_port(obj).load_balancer_ips == ("198.51.100.8", "198.51.100.9")


def test_unknown_ip_mode_is_an_error_naming_the_field() -> None:
    obj = service(type="LoadBalancer")
    obj["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.7", "ipMode": "proxy"}]}}
    assert conversion_error(obj).field == "status.loadBalancer.ingress[0].ipMode"


def test_load_balancer_source_ranges_are_normalised_networks() -> None:
    obj = service(
        type="LoadBalancer",
        loadBalancerSourceRanges=[" 203.0.113.7/24", "198.51.100.0/25", "2001:db8::1/64"],
    )
    assert one_port(obj).load_balancer_source_ranges == (
        "203.0.113.0/24",
        "198.51.100.0/25",
        "2001:db8::/64",
    )


def test_a_source_range_that_is_not_a_cidr_names_its_field() -> None:
    error = conversion_error(service(type="LoadBalancer", loadBalancerSourceRanges=["10.0.0.0/33"]))
    assert error.field == "spec.loadBalancerSourceRanges[0]"


def test_health_check_node_port_only_for_local_load_balancers() -> None:
    local_lb = service(
        type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=32000
    )
    assert one_port(local_lb).health_check_node_port == 32000
    cluster_lb = service(type="LoadBalancer", healthCheckNodePort=32000)
    assert one_port(cluster_lb).health_check_node_port is None
    node_port = service(type="NodePort", externalTrafficPolicy="Local", healthCheckNodePort=32000)
    assert one_port(node_port).health_check_node_port is None
    bad = service(type="LoadBalancer", externalTrafficPolicy="Local", healthCheckNodePort=70000)
    assert conversion_error(bad).field == "spec.healthCheckNodePort"


def test_topology_hints_reach_the_endpoints() -> None:
    obj = endpoint_slice(
        endpoints=[
            {
                "addresses": ["10.0.0.1"],
                "zone": "zone-a",
                "hints": {
                    "forZones": [{"name": "zone-b"}, {"name": "zone-a"}],
                    "forNodes": [{"name": "node-a"}],
                },
            },
            {"addresses": ["10.0.0.2"]},
        ]
    )
    converted = convert_endpoint_slice(obj)
    assert converted is not None
    first, second = endpoints_for_port([converted], WEB_HTTP, Protocol.TCP)
    assert first.zone_hints == ("zone-a", "zone-b")
    assert first.node_hints == ("node-a",)
    assert (second.zone_hints, second.node_hints) == ((), ())
    bad = endpoint_slice(endpoints=[{"addresses": ["10.0.0.1"], "hints": {"forZones": ["a"]}}])
    assert conversion_error(bad, convert_endpoint_slice).field == "endpoints[0].hints.forZones[0]"


def test_node_zone_from_its_label() -> None:
    node = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": "node-a", "labels": {"topology.kubernetes.io/zone": "zone-a"}},
    }
    assert convert_node(node) == NodeInfo("node-a", "zone-a")
    assert convert_node({"metadata": {"name": "node-b"}}) == NodeInfo("node-b", "")


def test_a_node_being_deleted_or_drained_is_not_eligible() -> None:
    deleting = {"metadata": {"name": "n", "deletionTimestamp": "2026-12-01T00:00:00Z"}}
    assert convert_node(deleting).eligible is False
    drained = {
        "metadata": {"name": "n"},
        "spec": {"taints": [{"key": "ToBeDeletedByClusterAutoscaler", "effect": "NoSchedule"}]},
    }
    assert convert_node(drained).eligible is False
    other_taint = {"metadata": {"name": "n"}, "spec": {"taints": [{"key": "x"}]}}
    assert convert_node(other_taint).eligible is True
