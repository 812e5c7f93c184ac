"""The service model every source produces and every proxier consumes.

All types are immutable so that a snapshot handed to a sync can never change under it, and so that
"did this change?" is a plain equality test.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_AFFINITY_TIMEOUT = 10800  # seconds; Kubernetes' default for ClientIP affinity
MAX_AFFINITY_TIMEOUT = 86400


class Protocol(enum.StrEnum):
    TCP = "TCP"
    UDP = "UDP"


@dataclass(frozen=True, slots=True, order=True)
class ObjectKey:
    """namespace/name of a Kubernetes object."""

    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass(frozen=True, slots=True, order=True)
class ServicePortName:
    """`namespace/name:port`, or `namespace/name` for an unnamed port (kube-proxy's spelling)."""

    namespace: str
    name: str
    port: str = ""

    @property
    def service(self) -> ObjectKey:
        return ObjectKey(self.namespace, self.name)

    def __str__(self) -> str:
        base = f"{self.namespace}/{self.name}"
        return f"{base}:{self.port}" if self.port else base


@dataclass(frozen=True, slots=True)
class ServicePort:
    """One port of one Service, with every virtual address that leads to it."""

    name: ServicePortName
    protocol: Protocol
    port: int
    cluster_ips: tuple[str, ...] = ()
    external_ips: tuple[str, ...] = ()
    load_balancer_ips: tuple[str, ...] = ()
    node_port: int | None = None
    # None means no affinity; otherwise ClientIP affinity with this timeout in seconds.
    affinity_timeout: int | None = None
    internal_traffic_local: bool = False
    external_traffic_local: bool = False
    # CIDRs allowed to reach the LoadBalancer IPs (spec.loadBalancerSourceRanges, normalised to
    # networks, both families as given); empty means anyone.
    load_balancer_source_ranges: tuple[str, ...] = ()
    # The node port on which kube-proxy's service health check answers for an
    # externalTrafficPolicy: Local LoadBalancer (spec.healthCheckNodePort); None otherwise.
    health_check_node_port: int | None = None

    @property
    def has_affinity(self) -> bool:
        return self.affinity_timeout is not None


@dataclass(frozen=True, slots=True, order=True)
class Endpoint:
    """One backend address of one service port."""

    ip: str
    port: int
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    # Topology hints (hints.forZones / hints.forNodes), sorted; empty when the slice gave none.
    zone_hints: tuple[str, ...] = ()
    node_hints: tuple[str, ...] = ()

    @property
    def address(self) -> tuple[str, int]:
        return (self.ip, self.port)

    def __str__(self) -> str:
        host = f"[{self.ip}]" if ":" in self.ip else self.ip
        return f"{host}:{self.port}"


class AddressType(enum.StrEnum):
    IPV4 = "IPv4"
    IPV6 = "IPv6"
    FQDN = "FQDN"


@dataclass(frozen=True, slots=True)
class SlicePort:
    name: str
    port: int
    protocol: Protocol


@dataclass(frozen=True, slots=True)
class SliceEndpoint:
    """An EndpointSlice endpoint before it is matched to a port (addresses may be hostnames)."""

    addresses: tuple[str, ...]
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    node_name: str | None = None
    zone: str | None = None
    zone_hints: tuple[str, ...] = ()
    node_hints: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class EndpointSlice:
    """A converted discovery.k8s.io/v1 EndpointSlice."""

    key: ObjectKey  # the slice's own namespace/name
    service: ObjectKey  # from the kubernetes.io/service-name label
    address_type: AddressType
    ports: tuple[SlicePort, ...]
    endpoints: tuple[SliceEndpoint, ...]


@dataclass(frozen=True, slots=True)
class NodeInfo:
    """What uproxy reads of a Node: its name, topology.kubernetes.io/zone label and eligibility."""

    name: str
    zone: str = ""
    # kube-proxy's node eligibility: false once the Node is being deleted or tainted
    # ToBeDeletedByClusterAutoscaler, so load balancers drain it (/healthz nodeEligible).
    eligible: bool = True


@dataclass(frozen=True, slots=True)
class ProxyState:
    """A complete, consistent snapshot of what the proxy should do."""

    services: Mapping[ServicePortName, ServicePort] = field(default_factory=dict)
    endpoints: Mapping[ServicePortName, tuple[Endpoint, ...]] = field(default_factory=dict)
    # This node's topology.kubernetes.io/zone ("" when unknown), for topology-aware routing.
    node_zone: str = ""
