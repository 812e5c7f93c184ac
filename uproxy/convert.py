"""The one converter from Kubernetes objects (API camelCase dicts) to the service model.

Every source goes through here, so the rules about what uproxy skips and what it rejects live in
one place. Input is untrusted: anything malformed raises `ConversionError` with a dotted field path,
never `TypeError` or `KeyError`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any, NoReturn

from uproxy.errors import ConversionError
from uproxy.model import (
    DEFAULT_AFFINITY_TIMEOUT,
    MAX_AFFINITY_TIMEOUT,
    AddressType,
    EndpointSlice,
    NodeInfo,
    ObjectKey,
    Protocol,
    ServicePort,
    ServicePortName,
    SliceEndpoint,
    SlicePort,
)

SERVICE_NAME_LABEL = "kubernetes.io/service-name"
ZONE_LABEL = "topology.kubernetes.io/zone"
DRAIN_TAINT = "ToBeDeletedByClusterAutoscaler"
# Services carrying these labels belong to another proxy (or are headless); kube-proxy skips them.
SKIP_LABELS = ("service.kubernetes.io/service-proxy-name", "service.kubernetes.io/headless")

_SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer", "ExternalName")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
_HOST_LABEL = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9]*[A-Za-z0-9])?$")
_SCTP_MESSAGE = "SCTP is not supported by uproxy (only TCP and UDP)"


@dataclass(frozen=True, slots=True)
class ServiceResult:
    key: ObjectKey
    ports: tuple[ServicePort, ...]


@dataclass(frozen=True, slots=True)
class SliceResult:
    endpoint_slice: EndpointSlice

    @property
    def key(self) -> ObjectKey:
        return self.endpoint_slice.key


@dataclass(frozen=True, slots=True)
class SkippedObject:
    """A well-formed object uproxy deliberately does not proxy (headless, ExternalName, ...)."""

    kind: str
    key: ObjectKey
    reason: str


@dataclass(frozen=True, slots=True)
class NodeResult:
    node: NodeInfo

    @property
    def key(self) -> ObjectKey:
        return ObjectKey("", self.node.name)  # Nodes have no namespace


Converted = ServiceResult | SliceResult | SkippedObject | NodeResult


# --- low-level readers ------------------------------------------------------------------------


def _type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, Mapping):
        return "object"
    if isinstance(value, list | tuple):
        return "list"
    return type(value).__name__


@dataclass(frozen=True, slots=True)
class _Reader:
    """Typed access to one object's fields, raising errors that name the object and the field."""

    kind: str
    name: str

    def fail(self, field: str, message: str) -> NoReturn:
        raise ConversionError(kind=self.kind, name=self.name, field=field, message=message)

    def mapping(self, value: object, field: str) -> Mapping[str, Any]:
        if value is None:
            return {}
        if not isinstance(value, Mapping):
            self.fail(field, f"must be an object, got {_type_name(value)}")
        return value

    def items(self, value: object, field: str) -> Sequence[Any]:
        if value is None:
            return ()
        if not isinstance(value, list | tuple):
            self.fail(field, f"must be a list, got {_type_name(value)}")
        return value

    def string(self, value: object, field: str, default: str = "") -> str:
        if value is None:
            return default
        if not isinstance(value, str):
            self.fail(field, f"must be a string, got {_type_name(value)}")
        return value

    def optional_string(self, value: object, field: str) -> str | None:
        return None if value is None else self.string(value, field)

    def boolean(self, value: object, field: str, default: bool) -> bool:
        if value is None:
            return default
        if not isinstance(value, bool):
            self.fail(field, f"must be true or false, got {_type_name(value)}")
        return value

    def integer(self, value: object, field: str, low: int, high: int) -> int:
        # bool is an int subclass; `port: true` is a mistake, not port 1.
        if isinstance(value, bool) or not isinstance(value, int):
            self.fail(field, f"must be an integer, got {_type_name(value)}")
        if not low <= value <= high:
            self.fail(field, f"must be between {low} and {high}, got {value}")
        return value

    def ip(self, value: object, field: str, family: AddressType | None = None) -> str:
        text = self.string(value, field)
        try:
            address = ipaddress.ip_address(text)
        except ValueError:
            self.fail(field, f"{text!r} is not a valid IP address")
        if family is AddressType.IPV4 and address.version != 4:
            self.fail(field, f"{text!r} is not an IPv4 address")
        if family is AddressType.IPV6 and address.version != 6:
            self.fail(field, f"{text!r} is not an IPv6 address")
        # Normalised so that "::0001" and "::1" compare equal.
        return str(address)

    def hostname(self, value: object, field: str) -> str:
        text = self.string(value, field)
        if not _is_hostname(text):
            self.fail(field, f"{text!r} is not a valid DNS name")
        return text

    def protocol(self, value: object, field: str) -> Protocol:
        text = self.string(value, field, default="TCP")
        if text == "SCTP":
            self.fail(field, _SCTP_MESSAGE)
        try:
            return Protocol(text)
        except ValueError:
            self.fail(field, f"unsupported protocol {text!r} (must be TCP or UDP)")

    def choice(self, value: object, field: str, choices: Sequence[str], default: str) -> str:
        text = self.string(value, field, default=default) or default
        if text not in choices:
            self.fail(field, f"must be one of {', '.join(choices)}, got {text!r}")
        return text


def _is_hostname(text: str) -> bool:
    name = text[:-1] if text.endswith(".") else text
    if not name or len(name) > 253:
        return False
    return all(len(label) <= 63 and _HOST_LABEL.match(label) for label in name.split("."))


@dataclass(frozen=True, slots=True)
class _Meta:
    key: ObjectKey
    labels: Mapping[str, Any]
    reader: _Reader


def _metadata(obj: object, kind: str) -> _Meta:
    if not isinstance(obj, Mapping):
        raise ConversionError(kind, "<unknown>", "metadata", f"object is a {_type_name(obj)}")
    anonymous = _Reader(kind, "<unknown>")
    meta = anonymous.mapping(obj.get("metadata"), "metadata")
    namespace = anonymous.string(meta.get("namespace"), "metadata.namespace") or "default"
    name = _Reader(kind, f"{namespace}/<unknown>").string(meta.get("name"), "metadata.name")
    reader = _Reader(kind, f"{namespace}/{name or '<unknown>'}")
    if not name:
        reader.fail("metadata.name", "is required")
    labels = reader.mapping(meta.get("labels"), "metadata.labels")
    return _Meta(ObjectKey(namespace, name), labels, reader)


# --- Services ---------------------------------------------------------------------------------


def _is_headless(spec: Mapping[str, Any]) -> bool:
    if spec.get("clusterIP") == "None":
        return True
    ips = spec.get("clusterIPs")
    return isinstance(ips, list | tuple) and len(ips) > 0 and ips[0] == "None"


def service_skip_reason(obj: Mapping[str, Any]) -> str | None:
    """Why uproxy does not proxy this Service, or None when it does."""
    meta = _metadata(obj, "Service")
    for label in SKIP_LABELS:
        if label in meta.labels:
            return f"labelled {label}"
    spec = meta.reader.mapping(obj.get("spec"), "spec")
    if spec.get("type") == "ExternalName":
        return "type ExternalName"
    if _is_headless(spec):
        return "headless (clusterIP: None)"
    return None


def _cluster_ips(r: _Reader, spec: Mapping[str, Any]) -> tuple[str, ...]:
    single = spec.get("clusterIP")
    single_ip = r.ip(single, "spec.clusterIP") if single not in (None, "") else None
    many = r.items(spec.get("clusterIPs"), "spec.clusterIPs")
    if not many:
        return (single_ip,) if single_ip else ()
    if len(many) > 2:
        r.fail("spec.clusterIPs", f"at most two addresses (one per family), got {len(many)}")
    ips = tuple(r.ip(ip, f"spec.clusterIPs[{i}]") for i, ip in enumerate(many))
    if (
        len(ips) == 2
        and ipaddress.ip_address(ips[0]).version == ipaddress.ip_address(ips[1]).version
    ):
        r.fail("spec.clusterIPs[1]", "dual-stack addresses must be one IPv4 and one IPv6")
    return ips


def _unique(values: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(values))


def _external_ips(r: _Reader, spec: Mapping[str, Any]) -> tuple[str, ...]:
    raw = r.items(spec.get("externalIPs"), "spec.externalIPs")
    return _unique(r.ip(ip, f"spec.externalIPs[{i}]") for i, ip in enumerate(raw))


def _load_balancer_ips(r: _Reader, obj: Mapping[str, Any]) -> tuple[str, ...]:
    status = r.mapping(obj.get("status"), "status")
    lb = r.mapping(status.get("loadBalancer"), "status.loadBalancer")
    ingress = r.items(lb.get("ingress"), "status.loadBalancer.ingress")
    ips: list[str] = []
    for i, entry in enumerate(ingress):
        field = f"status.loadBalancer.ingress[{i}]"
        item = r.mapping(entry, field)
        ip = item.get("ip")
        # ipMode Proxy: the address is the load balancer's own, which proxies to the node
        # ports; a node that claimed it would short-circuit the load balancer (kube-proxy
        # leaves such addresses alone since 1.32).
        mode = r.choice(item.get("ipMode"), f"{field}.ipMode", ("VIP", "Proxy"), "VIP")
        # Hostname-only ingress entries (AWS ELB style) have nothing for a proxy to bind.
        if ip not in (None, "") and mode == "VIP":
            ips.append(r.ip(ip, f"{field}.ip"))
    return _unique(ips)


def _source_ranges(r: _Reader, spec: Mapping[str, Any]) -> tuple[str, ...]:
    raw = r.items(spec.get("loadBalancerSourceRanges"), "spec.loadBalancerSourceRanges")
    ranges: list[str] = []
    for i, value in enumerate(raw):
        field = f"spec.loadBalancerSourceRanges[{i}]"
        text = r.string(value, field).strip()
        try:
            # The API server accepts host bits (Go's ParseCIDR), and so does kube-proxy.
            ranges.append(str(ipaddress.ip_network(text, strict=False)))
        except ValueError:
            r.fail(field, f"{text!r} is not a CIDR (such as 203.0.113.0/24)")
    return _unique(ranges)


def _health_check_node_port(
    r: _Reader, spec: Mapping[str, Any], external_local: bool
) -> int | None:
    # kube-proxy's NeedsHealthCheck: only a LoadBalancer with externalTrafficPolicy Local.
    if spec.get("type") != "LoadBalancer" or not external_local:
        return None
    raw = spec.get("healthCheckNodePort")
    if raw in (None, 0):
        return None
    return r.integer(raw, "spec.healthCheckNodePort", 1, 65535)


def _of_families(ips: tuple[str, ...], families: AbstractSet[int]) -> tuple[str, ...]:
    if not families:  # a manifest Service without a ClusterIP: nothing to judge by
        return ips
    return tuple(ip for ip in ips if ipaddress.ip_address(ip).version in families)


def _affinity_timeout(r: _Reader, spec: Mapping[str, Any]) -> int | None:
    affinity = r.choice(
        spec.get("sessionAffinity"), "spec.sessionAffinity", ("None", "ClientIP"), "None"
    )
    if affinity == "None":
        return None
    config = r.mapping(spec.get("sessionAffinityConfig"), "spec.sessionAffinityConfig")
    client_ip = r.mapping(config.get("clientIP"), "spec.sessionAffinityConfig.clientIP")
    timeout = client_ip.get("timeoutSeconds")
    if timeout is None:
        return DEFAULT_AFFINITY_TIMEOUT
    field = "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
    return r.integer(timeout, field, 1, MAX_AFFINITY_TIMEOUT)


def _is_local(r: _Reader, spec: Mapping[str, Any], field: str) -> bool:
    return r.choice(spec.get(field), f"spec.{field}", ("Cluster", "Local"), "Cluster") == "Local"


@dataclass(frozen=True, slots=True)
class _PortSpec:
    name: str
    protocol: Protocol
    port: int
    node_port: int | None


def _port_spec(r: _Reader, raw: object, field: str, named: bool) -> _PortSpec:
    entry = r.mapping(raw, field)
    name = r.string(entry.get("name"), f"{field}.name")
    if named and not name:
        r.fail(f"{field}.name", "is required when the Service has more than one port")
    if name and not (len(name) <= 63 and _DNS_LABEL.match(name)):
        r.fail(f"{field}.name", f"{name!r} is not a valid port name (lowercase DNS label)")
    protocol = r.protocol(entry.get("protocol"), f"{field}.protocol")
    if entry.get("port") is None:
        r.fail(f"{field}.port", "is required")
    port = r.integer(entry.get("port"), f"{field}.port", 1, 65535)
    raw_node_port = entry.get("nodePort")
    # The API reports an unallocated nodePort as 0 or leaves it out.
    node_port = (
        None
        if raw_node_port in (None, 0)
        else r.integer(raw_node_port, f"{field}.nodePort", 1, 65535)
    )
    return _PortSpec(name, protocol, port, node_port)


def _port_specs(r: _Reader, spec: Mapping[str, Any]) -> list[_PortSpec]:
    raw = r.items(spec.get("ports"), "spec.ports")
    if not raw:
        r.fail("spec.ports", "at least one port is required")
    ports: list[_PortSpec] = []
    names: dict[str, int] = {}
    numbers: dict[tuple[int, Protocol], int] = {}
    for i, entry in enumerate(raw):
        field = f"spec.ports[{i}]"
        port = _port_spec(r, entry, field, named=len(raw) > 1)
        if port.name in names:
            r.fail(
                f"{field}.name",
                f"duplicate port name {port.name!r} (spec.ports[{names[port.name]}])",
            )
        if (port.port, port.protocol) in numbers:
            first = numbers[(port.port, port.protocol)]
            r.fail(field, f"duplicate port {port.port}/{port.protocol} (spec.ports[{first}])")
        names[port.name] = i
        numbers[(port.port, port.protocol)] = i
        ports.append(port)
    return ports


def _convert_service(obj: Mapping[str, Any], meta: _Meta) -> tuple[ServicePort, ...]:
    r = meta.reader
    spec = r.mapping(obj.get("spec"), "spec")
    r.choice(spec.get("type"), "spec.type", _SERVICE_TYPES, "ClusterIP")
    cluster_ips = _cluster_ips(r, spec)
    # kube-proxy runs one proxier per IP family, and a family's proxier takes only the
    # Services of its family: an externalIP or LoadBalancer IP of another family than the
    # Service's ClusterIPs leads nowhere (there are no endpoints of that family to send it to).
    families = {ipaddress.ip_address(ip).version for ip in cluster_ips}
    external_ips = _of_families(_external_ips(r, spec), families)
    lb_ips = _of_families(_load_balancer_ips(r, obj), families)
    affinity = _affinity_timeout(r, spec)
    internal_local = _is_local(r, spec, "internalTrafficPolicy")
    external_local = _is_local(r, spec, "externalTrafficPolicy")
    source_ranges = _source_ranges(r, spec)
    health_check_node_port = _health_check_node_port(r, spec, external_local)
    return tuple(
        ServicePort(
            name=ServicePortName(meta.key.namespace, meta.key.name, p.name),
            protocol=p.protocol,
            port=p.port,
            cluster_ips=cluster_ips,
            external_ips=external_ips,
            load_balancer_ips=lb_ips,
            node_port=p.node_port,
            affinity_timeout=affinity,
            internal_traffic_local=internal_local,
            external_traffic_local=external_local,
            load_balancer_source_ranges=source_ranges,
            health_check_node_port=health_check_node_port,
        )
        for p in _port_specs(r, spec)
    )


def convert_service(obj: Mapping[str, Any]) -> tuple[ServicePort, ...] | None:
    """A v1 Service as its ports, or None for a Service uproxy does not proxy."""
    if service_skip_reason(obj) is not None:
        return None
    return _convert_service(obj, _metadata(obj, "Service"))


# --- EndpointSlices ---------------------------------------------------------------------------


def _slice_ports(r: _Reader, obj: Mapping[str, Any]) -> tuple[SlicePort, ...]:
    ports: list[SlicePort] = []
    for i, raw in enumerate(r.items(obj.get("ports"), "ports")):
        field = f"ports[{i}]"
        entry = r.mapping(raw, field)
        name = r.string(entry.get("name"), f"{field}.name")
        protocol = r.protocol(entry.get("protocol"), f"{field}.protocol")
        # A nil port means "all ports" in Kubernetes; a userspace proxy has nothing to dial.
        if entry.get("port") is None:
            continue
        port = r.integer(entry.get("port"), f"{field}.port", 1, 65535)
        ports.append(SlicePort(name, port, protocol))
    return tuple(ports)


def _slice_addresses(r: _Reader, raw: object, field: str, family: AddressType) -> tuple[str, ...]:
    addresses = r.items(raw, field)
    if not addresses:
        r.fail(field, "at least one address is required")
    if family is AddressType.FQDN:
        return tuple(r.hostname(a, f"{field}[{i}]") for i, a in enumerate(addresses))
    return tuple(r.ip(a, f"{field}[{i}]", family) for i, a in enumerate(addresses))


def _slice_endpoint(r: _Reader, raw: object, field: str, family: AddressType) -> SliceEndpoint:
    entry = r.mapping(raw, field)
    addresses = _slice_addresses(r, entry.get("addresses"), f"{field}.addresses", family)
    conditions = r.mapping(entry.get("conditions"), f"{field}.conditions")
    ready = r.boolean(conditions.get("ready"), f"{field}.conditions.ready", True)
    serving = r.boolean(conditions.get("serving"), f"{field}.conditions.serving", ready)
    terminating = r.boolean(conditions.get("terminating"), f"{field}.conditions.terminating", False)
    hints = r.mapping(entry.get("hints"), f"{field}.hints")
    return SliceEndpoint(
        addresses=addresses,
        ready=ready,
        serving=serving,
        terminating=terminating,
        node_name=r.optional_string(entry.get("nodeName"), f"{field}.nodeName"),
        zone=r.optional_string(entry.get("zone"), f"{field}.zone"),
        zone_hints=_hint_names(r, hints.get("forZones"), f"{field}.hints.forZones"),
        node_hints=_hint_names(r, hints.get("forNodes"), f"{field}.hints.forNodes"),
    )


def _hint_names(r: _Reader, raw: object, field: str) -> tuple[str, ...]:
    names = (
        r.string(r.mapping(item, f"{field}[{i}]").get("name"), f"{field}[{i}].name")
        for i, item in enumerate(r.items(raw, field))
    )
    return tuple(sorted({name for name in names if name}))


def _service_of_slice(meta: _Meta) -> str:
    return meta.reader.string(
        meta.labels.get(SERVICE_NAME_LABEL), f"metadata.labels.{SERVICE_NAME_LABEL}"
    )


def _convert_slice(obj: Mapping[str, Any], meta: _Meta, service: str) -> EndpointSlice:
    r = meta.reader
    if obj.get("addressType") is None:
        r.fail("addressType", "is required (IPv4, IPv6 or FQDN)")
    family = AddressType(r.choice(obj.get("addressType"), "addressType", list(AddressType), ""))
    ports = _slice_ports(r, obj)
    raw_endpoints = r.items(obj.get("endpoints"), "endpoints")
    endpoints = tuple(
        _slice_endpoint(r, raw, f"endpoints[{i}]", family) for i, raw in enumerate(raw_endpoints)
    )
    return EndpointSlice(
        key=meta.key,
        service=ObjectKey(meta.key.namespace, service),
        address_type=family,
        ports=ports,
        endpoints=endpoints,
    )


def convert_endpoint_slice(obj: Mapping[str, Any]) -> EndpointSlice | None:
    """A discovery.k8s.io/v1 EndpointSlice, or None when it belongs to no Service."""
    meta = _metadata(obj, "EndpointSlice")
    service = _service_of_slice(meta)
    if not service:
        return None
    return _convert_slice(obj, meta, service)


# --- Nodes ------------------------------------------------------------------------------------


def convert_node(obj: Mapping[str, Any]) -> NodeInfo:
    """A v1 Node as the topology uproxy needs of it."""
    meta = _metadata(obj, "Node")
    r = meta.reader
    zone = r.string(meta.labels.get(ZONE_LABEL), f"metadata.labels.{ZONE_LABEL}")
    deleting = r.mapping(obj.get("metadata"), "metadata").get("deletionTimestamp") is not None
    spec = r.mapping(obj.get("spec"), "spec")
    taints = r.items(spec.get("taints"), "spec.taints")
    draining = any(
        r.mapping(t, f"spec.taints[{i}]").get("key") == DRAIN_TAINT for i, t in enumerate(taints)
    )
    return NodeInfo(meta.key.name, zone, eligible=not (deleting or draining))


# --- dispatch ---------------------------------------------------------------------------------


def _object_result(obj: Mapping[str, Any], kind: str) -> Converted:
    meta = _metadata(obj, kind)
    if kind == "Service":
        reason = service_skip_reason(obj)
        if reason is not None:
            return SkippedObject(kind, meta.key, reason)
        return ServiceResult(meta.key, _convert_service(obj, meta))
    service = _service_of_slice(meta)
    if not service:
        return SkippedObject(kind, meta.key, f"no {SERVICE_NAME_LABEL} label")
    return SliceResult(_convert_slice(obj, meta, service))


def convert_object(obj: Mapping[str, Any]) -> Converted | None:
    """Convert a v1 Service, a discovery.k8s.io/v1 EndpointSlice or a v1 Node (for its zone);
    None for any other kind."""
    match (obj.get("apiVersion"), obj.get("kind")):
        case ("v1", "Service"):
            return _object_result(obj, "Service")
        case ("v1", "Node"):
            return NodeResult(convert_node(obj))
        case ("discovery.k8s.io/v1", "EndpointSlice"):
            return _object_result(obj, "EndpointSlice")
        case _:
            return None
