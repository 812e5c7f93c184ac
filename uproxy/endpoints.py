"""Which endpoints a service port's traffic goes to: one selection for every proxy mode.

Two steps, both after kube-proxy:

* `endpoints_for_port` merges a service's EndpointSlices into the endpoints of one of its ports
  (kube-proxy's EndpointSliceCache).
* `categorize_endpoints` picks, from those, the endpoints cluster traffic and node-local traffic
  may use, applying the traffic policies and the serving-terminating fallback
  (kube-proxy's `CategorizeEndpoints` in pkg/proxy/topology.go).

Every proxier calls these two and nothing else decides, so the modes cannot drift apart.
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from uproxy.model import (
    AddressType,
    Endpoint,
    EndpointSlice,
    Protocol,
    ServicePort,
    ServicePortName,
)


def _ip_sort_key(ip: str) -> tuple[int, int, str]:
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:  # hostnames, when showing FQDN slices unresolved
        return (9, 0, ip)
    return (address.version, int(address), ip)


def _rank(endpoint: Endpoint, node_name: str) -> tuple[bool, bool, bool, bool]:
    local = bool(node_name) and endpoint.node_name == node_name
    return (local, endpoint.ready, endpoint.serving, not endpoint.terminating)


def endpoints_for_port(
    slices: Iterable[EndpointSlice],
    port_name: ServicePortName,
    protocol: Protocol,
    *,
    node_name: str = "",
    include_fqdn: bool = False,
) -> tuple[Endpoint, ...]:
    """Every endpoint of one service port across all of the service's slices, sorted by address.

    Only the first address of each slice endpoint counts (Kubernetes treats the rest as
    interchangeable). FQDN slices are skipped unless `include_fqdn`, in which case their hostnames
    stand in for IPs; that is only useful for display.

    The same address can sit in two slices while they are being rewritten. As in kube-proxy's
    slice cache, the copy on this node (`node_name`) wins, since the Local traffic policies
    depend on it; between copies equally local, the healthier report wins.
    """
    found: dict[tuple[str, int], Endpoint] = {}
    for slice_ in sorted(slices, key=lambda s: s.key):
        if slice_.service != port_name.service:
            continue
        if slice_.address_type is AddressType.FQDN and not include_fqdn:
            continue
        for slice_port in slice_.ports:
            if slice_port.name != port_name.port or slice_port.protocol != protocol:
                continue
            for ep in slice_.endpoints:
                candidate = Endpoint(
                    ip=ep.addresses[0],
                    port=slice_port.port,
                    ready=ep.ready,
                    serving=ep.serving,
                    terminating=ep.terminating,
                    node_name=ep.node_name,
                    zone=ep.zone,
                    zone_hints=ep.zone_hints,
                    node_hints=ep.node_hints,
                )
                known = found.get(candidate.address)
                if known is None or _rank(candidate, node_name) > _rank(known, node_name):
                    found[candidate.address] = candidate
    return tuple(sorted(found.values(), key=lambda e: (_ip_sort_key(e.ip), e.port)))


def externally_accessible(service: ServicePort) -> bool:
    """Whether traffic can reach the port from outside the cluster network (kube-proxy's
    ExternallyAccessible): a NodePort, an externalIP or a LoadBalancer IP."""
    return bool(service.node_port or service.external_ips or service.load_balancer_ips)


def external_policy_local(service: ServicePort) -> bool:
    """externalTrafficPolicy: Local, where there is external traffic for it to apply to."""
    return service.external_traffic_local and externally_accessible(service)


def uses_cluster_endpoints(service: ServicePort) -> bool:
    return not service.internal_traffic_local or (
        externally_accessible(service) and not service.external_traffic_local
    )


def uses_local_endpoints(service: ServicePort) -> bool:
    return service.internal_traffic_local or external_policy_local(service)


def external_endpoints_differ(service: ServicePort) -> bool:
    """Whether external traffic may go to other endpoints than ClusterIP traffic: exactly one
    of the two traffic policies is Local."""
    return externally_accessible(service) and (
        service.internal_traffic_local != service.external_traffic_local
    )


@dataclass(frozen=True, slots=True)
class EndpointSelection:
    """The endpoints of one service port, as each kind of traffic may use them.

    `cluster`: what traffic under the Cluster policy uses (ready endpoints anywhere, else the
    serving terminating ones); empty when no traffic uses the Cluster policy.
    `local`: this node's ready endpoints, else this node's serving terminating ones; empty when
    no traffic uses the Local policy.
    `internal` / `external`: which of the two ClusterIP traffic and external traffic (NodePort,
    externalIPs, LoadBalancer IPs) use.
    `reachable`: every endpoint any traffic may reach (for UDP conntrack cleanup and status).
    `has_any`: whether the service has any usable endpoint anywhere, even if this node's traffic
    cannot use it (kube-proxy then drops instead of rejecting).
    """

    cluster: tuple[Endpoint, ...] = ()
    local: tuple[Endpoint, ...] = ()
    internal_local: bool = False
    external_local: bool = False
    has_any: bool = False

    @property
    def internal(self) -> tuple[Endpoint, ...]:
        return self.local if self.internal_local else self.cluster

    @property
    def external(self) -> tuple[Endpoint, ...]:
        return self.local if self.external_local else self.cluster

    @property
    def reachable(self) -> tuple[Endpoint, ...]:
        seen = dict.fromkeys(self.cluster)
        seen.update(dict.fromkeys(self.local))
        return tuple(seen)


def _serving_terminating(endpoint: Endpoint) -> bool:
    return endpoint.serving and endpoint.terminating


class Topology(enum.Enum):
    """Which topology hints Cluster-policy traffic follows (kube-proxy's topology modes)."""

    NONE = ""
    SAME_NODE = "PreferSameNode"
    SAME_ZONE = "PreferSameZone"


def topology_mode(endpoints: Sequence[Endpoint], node_name: str, zone: str) -> Topology:
    """kube-proxy's topologyModeFromHints.

    Hints are followed only when every ready endpoint carries them and at least one is hinted
    for this node (or its zone); otherwise traffic goes everywhere, so a half-rolled-out hint
    or a node without a zone label never leaves a service with no endpoints.
    """
    ready = [e for e in endpoints if e.ready]
    if not ready:
        return Topology.NONE
    if all(e.node_hints for e in ready) and any(node_name in e.node_hints for e in ready):
        return Topology.SAME_NODE
    if all(e.zone_hints for e in ready) and any(zone in e.zone_hints for e in ready):
        return Topology.SAME_ZONE
    return Topology.NONE


def _available_for_topology(endpoint: Endpoint, mode: Topology, node_name: str, zone: str) -> bool:
    if mode is Topology.SAME_NODE:
        return node_name in endpoint.node_hints
    if mode is Topology.SAME_ZONE:
        return zone in endpoint.zone_hints
    return True


def categorize_endpoints(
    endpoints: Sequence[Endpoint], service: ServicePort, node_name: str, node_zone: str = ""
) -> EndpointSelection:
    """kube-proxy's CategorizeEndpoints: the endpoints each kind of traffic goes to.

    Cluster-policy traffic follows topology hints (`topology_mode`) for this node and its zone
    (`node_zone`, from the node's topology.kubernetes.io/zone label). The serving-terminating
    fallback applies to cluster and local endpoints separately: a node whose only local
    endpoints are terminating still sends Local-policy traffic to them while they serve, even
    when ready endpoints exist elsewhere.
    """
    internal_local = service.internal_traffic_local
    external_local = external_policy_local(service)
    cluster: tuple[Endpoint, ...] = ()
    local: tuple[Endpoint, ...] = ()
    if uses_cluster_endpoints(service):
        mode = topology_mode(endpoints, node_name, node_zone)
        cluster = tuple(
            e
            for e in endpoints
            if e.ready and _available_for_topology(e, mode, node_name, node_zone)
        )
        if not cluster:
            cluster = tuple(e for e in endpoints if _serving_terminating(e))
    if uses_local_endpoints(service):
        mine = [e for e in endpoints if e.node_name == node_name]
        local = tuple(e for e in mine if e.ready)
        if not local:
            local = tuple(e for e in mine if _serving_terminating(e))
    has_any = any(e.ready or _serving_terminating(e) for e in endpoints)
    return EndpointSelection(
        cluster=cluster,
        local=local,
        internal_local=internal_local,
        external_local=external_local,
        has_any=has_any,
    )
