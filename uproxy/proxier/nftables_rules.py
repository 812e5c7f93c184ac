"""The nftables mode's desired table, rendered from the model: pure, no kernel access.

The structure is kube-proxy's nftables mode, in uproxy's own table `ip uproxy`:

  nat-prerouting / nat-output (nat hooks) -> services:
      ip daddr . meta l4proto . th dport vmap @service-ips      ClusterIPs, externalIPs, LB IPs
      fib daddr type local ... vmap @service-nodeports           NodePorts on local addresses
  service-<hash>-<ns>/<name>/<proto>/<port>    Cluster policy: affinity, then a random pick
  local-<hash>-...                             Local policy: this node's endpoints only
  external-<hash>-...                          external traffic: masquerade (Cluster policy) or
                                               keep the client's address (Local policy)
  endpoint-<hash>-<ns>/<name>/<proto>/<ip>/<port>   hairpin masquerade, affinity, DNAT
  affinity-<hash>-...                          per endpoint, a dynamic set of client addresses
  firewall-<hash>-...                          loadBalancerSourceRanges: drop other sources
  filter-prerouting / filter-output (before DNAT) -> firewall-check:
      ip daddr . meta l4proto . th dport vmap @firewall-ips      LB IPs with source ranges
  filter-input / filter-forward / filter-output -> service-endpoints-check:
      service ports with no endpoint: rejected at once (`reject-chain`), or dropped when
      endpoints exist but none this traffic may use (kube-proxy's choice)
  nat-postrouting -> masquerading: what was marked 0x4000 leaves with the node's address

Dispatch is by map lookup, so the first packet of a connection costs the same with 10 services
as with 10,000, and one changed service is a few element lines and its own chains.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

from uproxy.addresses import of_family
from uproxy.endpoints import EndpointSelection, externally_accessible
from uproxy.kernel.nft import Chain, Element, Map, Set
from uproxy.model import Endpoint, Protocol, ServicePort
from uproxy.source_ranges import Network, allowed_sources

MASQ_MARK = "0x4000"

SERVICES = "services"
SERVICE_IPS = "service-ips"
SERVICE_NODEPORTS = "service-nodeports"
NO_ENDPOINT_SERVICES = "no-endpoint-services"
NO_ENDPOINT_NODEPORTS = "no-endpoint-nodeports"
ENDPOINTS_CHECK = "service-endpoints-check"
FIREWALL_IPS = "firewall-ips"
FIREWALL_CHECK = "firewall-check"
MARK_MASQ = "mark-for-masquerade"
MASQUERADING = "masquerading"
REJECT = "reject-chain"

REJECT_VERDICT = f"goto {REJECT}"
DROP_VERDICT = "drop"

_PORT_MAP = "inet_proto . inet_service : verdict"


@dataclass(frozen=True, slots=True)
class NatConfig:
    """What, beyond the model, decides the rules (kube-proxy's flags)."""

    cluster_cidr: str | None = None  # masquerade traffic from outside it to ClusterIPs
    masquerade_all: bool = False
    nodeport_addresses: tuple[str, ...] = ()  # CIDRs; empty: every local address
    fully_random: bool = True  # masquerade's port choice
    family: int = 4  # which table this is: 4 (`ip uproxy`) or 6 (`ip6 uproxy`)
    node_ips: tuple[str, ...] = ()  # for loadBalancerSourceRanges' allowFromNode

    @property
    def keyword(self) -> str:
        return "ip" if self.family == 4 else "ip6"

    @property
    def address_type(self) -> str:
        return "ipv4_addr" if self.family == 4 else "ipv6_addr"

    def address_map(self) -> str:
        return f"{self.address_type} . inet_proto . inet_service : verdict"


@dataclass(frozen=True, slots=True)
class PortObjects:
    """Everything one service port adds to the table."""

    chains: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (name, rules), in creation order
    sets: tuple[Set, ...] = ()
    elements: tuple[Element, ...] = ()


def _hash(text: str) -> str:
    digest = hashlib.sha256(text.encode()).digest()
    return base64.b32encode(digest)[:8].decode()


def _proto(service: ServicePort) -> str:
    return "tcp" if service.protocol is Protocol.TCP else "udp"


def _identifier(text: str) -> str:
    """nft names take letters, digits and `/-_.`, not the colons of an IPv6 address."""
    return text.replace(":", "_")


class _Names:
    """Chain and set names of one service port: readable, and unique by their hash."""

    def __init__(self, service: ServicePort) -> None:
        name = service.name
        self.base = f"{name.namespace}/{name.name}/{_proto(service)}/{name.port or service.port}"
        self.hash = _hash(f"{name}/{service.protocol}")
        self.cluster = f"service-{self.hash}-{self.base}"
        self.local = f"local-{self.hash}-{self.base}"
        self.external = f"external-{self.hash}-{self.base}"
        self.firewall = f"firewall-{self.hash}-{self.base}"

    def endpoint(self, endpoint: Endpoint) -> str:
        ip = _identifier(endpoint.ip)
        return f"endpoint-{self._endpoint_hash(endpoint)}-{self.base}/{ip}/{endpoint.port}"

    def affinity(self, endpoint: Endpoint, timeout: int) -> str:
        # The timeout is part of the name: a set cannot change its timeout in place.
        ip = _identifier(endpoint.ip)
        return f"affinity-{self._endpoint_hash(endpoint)}-{timeout}s-{self.base}/{ip}"

    def _endpoint_hash(self, endpoint: Endpoint) -> str:
        return _hash(f"{self.hash}/{endpoint.ip}/{endpoint.port}")


def _balance(
    names: _Names, endpoints: Sequence[Endpoint], affinity: int | None, kw: str
) -> tuple[str, ...]:
    """Affinity first (a client seen within the timeout keeps its endpoint), then a random
    pick with every endpoint equally likely: rule i takes the connection with probability
    1/(N-i), each drawing its own number, so each of N endpoints gets 1/N.

    Not `numgen random mod N vmap { ... }`: every such map is an anonymous set, and nft 1.0.6
    (Debian 12) allocates each one by scanning the others, which made a 10,000-service
    transaction quadratic (measured: 4,000 services 2.0 s with vmaps, 0.38 s with these rules).
    Only a connection's first packet goes through NAT, so the extra rule per endpoint costs
    nothing afterwards.
    """
    if not endpoints:
        return ()
    rules = []
    if affinity is not None:
        rules += [
            f"{kw} saddr @{names.affinity(e, affinity)} goto {names.endpoint(e)}" for e in endpoints
        ]
    count = len(endpoints)
    for i, e in enumerate(endpoints[:-1]):
        rules.append(f"numgen random mod {count - i} == 0 goto {names.endpoint(e)}")
    rules.append(f"goto {names.endpoint(endpoints[-1])}")
    return tuple(rules)


def render_port(
    service: ServicePort, selection: EndpointSelection, config: NatConfig
) -> PortObjects:
    """The chains, affinity sets and map elements of one service port."""
    names = _Names(service)
    proto = _proto(service)
    kw = config.keyword
    comment = f'comment "{service.name}"'
    affinity = service.affinity_timeout
    chains: list[tuple[str, tuple[str, ...]]] = []
    sets: list[Set] = []
    endpoints = selection.reachable
    for e in endpoints:
        rules = [f"{kw} saddr {e.ip} jump {MARK_MASQ}"]  # hairpin: it calls its own service
        if affinity is not None:
            rules.append(f"update @{names.affinity(e, affinity)} {{ {kw} saddr }}")
            flags = ("dynamic", "timeout")
            sets.append(Set(names.affinity(e, affinity), config.address_type, flags, affinity))
        target = f"{e.ip}:{e.port}" if config.family == 4 else f"[{e.ip}]:{e.port}"
        rules.append(f"meta l4proto {proto} dnat to {target} {comment}")
        chains.append((names.endpoint(e), tuple(rules)))

    cluster_ips = of_family(service.cluster_ips, config.family)
    external_ips = of_family((*service.external_ips, *service.load_balancer_ips), config.family)
    masquerade: list[str] = []
    if config.masquerade_all:
        masquerade.append(f"jump {MARK_MASQ}")
    elif config.cluster_cidr and ipaddress.ip_network(config.cluster_cidr).version == config.family:
        masquerade.append(f"{kw} saddr != {config.cluster_cidr} jump {MARK_MASQ}")

    external = bool(external_ips or service.node_port) and externally_accessible(service)
    if not selection.internal_local or (external and not selection.external_local):
        chains.append(
            (names.cluster, (*masquerade, *_balance(names, selection.cluster, affinity, kw)))
        )
    if selection.internal_local or selection.external_local:
        chains.append((names.local, _balance(names, selection.local, affinity, kw)))
    internal_chain = names.local if selection.internal_local else names.cluster

    if external:
        if selection.external_local:
            # Local-origin traffic to an external address may use any endpoint (kube-proxy).
            short_circuit = names.local if selection.internal_local else names.cluster
            rules_ext: tuple[str, ...] = (
                f"fib saddr type local jump {MARK_MASQ}",
                f"fib saddr type local goto {short_circuit}",
                f"goto {names.local}",
            )
        else:
            rules_ext = (f"jump {MARK_MASQ}", f"goto {names.cluster}")
        chains.append((names.external, rules_ext))

    # kube-proxy's nftables mode firewalls LB IPs whether or not the port has endpoints.
    sources = allowed_sources(service, config.family, config.node_ips)
    if sources:
        chains.append((names.firewall, (f"{kw} saddr != {{ {_nft_sources(sources)} }} drop",)))

    elements: list[Element] = []

    def no_endpoint_verdict() -> str:
        return DROP_VERDICT if selection.has_any else REJECT_VERDICT

    for ip in cluster_ips:
        key = f"{ip} . {proto} . {service.port}"
        if selection.internal:
            elements.append(Element(SERVICE_IPS, key, f"goto {internal_chain}"))
        else:
            elements.append(Element(NO_ENDPOINT_SERVICES, key, no_endpoint_verdict()))
    for ip in external_ips:
        key = f"{ip} . {proto} . {service.port}"
        if selection.external:
            elements.append(Element(SERVICE_IPS, key, f"goto {names.external}"))
        else:
            elements.append(Element(NO_ENDPOINT_SERVICES, key, no_endpoint_verdict()))
    if sources:
        for ip in of_family(service.load_balancer_ips, config.family):
            key = f"{ip} . {proto} . {service.port}"
            elements.append(Element(FIREWALL_IPS, key, f"goto {names.firewall}"))
    if service.node_port:
        key = f"{proto} . {service.node_port}"
        if selection.external:
            elements.append(Element(SERVICE_NODEPORTS, key, f"goto {names.external}"))
        else:
            elements.append(Element(NO_ENDPOINT_NODEPORTS, key, no_endpoint_verdict()))
    return PortObjects(tuple(chains), tuple(sets), tuple(elements))


def _nft_sources(sources: Sequence[Network]) -> str:
    """An anonymous set's elements: networks, and single addresses as plain addresses."""
    return ", ".join(
        str(n.network_address) if n.prefixlen == n.max_prefixlen else str(n) for n in sources
    )


# -- what every table has ----------------------------------------------------------------------


def static_maps(config: NatConfig) -> tuple[Map, ...]:
    return (
        Map(SERVICE_IPS, config.address_map()),
        Map(SERVICE_NODEPORTS, _PORT_MAP),
        Map(NO_ENDPOINT_SERVICES, config.address_map()),
        Map(NO_ENDPOINT_NODEPORTS, _PORT_MAP),
        Map(FIREWALL_IPS, config.address_map()),
    )


def _nodeport_match(config: NatConfig) -> list[str]:
    """Where NodePorts answer: local addresses, on --nodeport-addresses when given. Loopback is
    left out, as kube-proxy does: a DNAT from 127.0.0.1 would need route_localnet."""
    kw = config.keyword
    loopback = "127.0.0.0/8" if config.family == 4 else "::1"
    local = f"fib daddr type local {kw} daddr != {loopback}"
    networks = [ipaddress.ip_network(c, strict=False) for c in config.nodeport_addresses]
    mine = [str(n) for n in networks if n.version == config.family]
    if not networks or any(ipaddress.ip_network(n).prefixlen == 0 for n in mine):
        return [local]
    if not mine:
        return []  # only the other family's CIDRs given: no NodePort in this table
    cidrs = ", ".join(mine)
    return [f"{local} {kw} daddr {{ {cidrs} }}"]


def static_chains(config: NatConfig) -> tuple[tuple[Chain, tuple[str, ...]], ...]:
    """The hooks and helper chains, with their rules, in creation order (targets first)."""
    masquerade = "masquerade fully-random" if config.fully_random else "masquerade"
    nodeports = [
        f"{m} meta l4proto . th dport vmap @{SERVICE_NODEPORTS}" for m in _nodeport_match(config)
    ]
    nodeports_check = [
        f"{m} meta l4proto . th dport vmap @{NO_ENDPOINT_NODEPORTS}"
        for m in _nodeport_match(config)
    ]
    return (
        (Chain(MARK_MASQ), (f"meta mark set meta mark or {MASQ_MARK}",)),
        (
            Chain(MASQUERADING),
            (
                f"meta mark & {MASQ_MARK} == 0 return",
                f"meta mark set meta mark xor {MASQ_MARK}",
                masquerade,
            ),
        ),
        (Chain(REJECT), ("meta l4proto tcp reject with tcp reset", "reject")),
        (
            Chain(SERVICES),
            (f"{config.keyword} daddr . meta l4proto . th dport vmap @{SERVICE_IPS}", *nodeports),
        ),
        (
            Chain(ENDPOINTS_CHECK),
            (
                f"{config.keyword} daddr . meta l4proto . th dport vmap @{NO_ENDPOINT_SERVICES}",
                *nodeports_check,
            ),
        ),
        (
            Chain(FIREWALL_CHECK),
            (f"{config.keyword} daddr . meta l4proto . th dport vmap @{FIREWALL_IPS}",),
        ),
        # Before DNAT (dstnat - 10), as kube-proxy: the destination is still the LB IP.
        (
            Chain("filter-prerouting", "type filter hook prerouting priority -110; policy accept;"),
            (f"ct state new jump {FIREWALL_CHECK}",),
        ),
        (
            Chain("nat-prerouting", "type nat hook prerouting priority dstnat; policy accept;"),
            (f"jump {SERVICES}",),
        ),
        (
            Chain("nat-output", "type nat hook output priority -100; policy accept;"),
            (f"jump {SERVICES}",),
        ),
        (
            Chain("nat-postrouting", "type nat hook postrouting priority srcnat; policy accept;"),
            (f"jump {MASQUERADING}",),
        ),
        *(
            (
                Chain(f"filter-{hook}", f"type filter hook {hook} priority -110; policy accept;"),
                (
                    *((f"ct state new jump {FIREWALL_CHECK}",) if hook == "output" else ()),
                    f"ct state new jump {ENDPOINTS_CHECK}",
                ),
            )
            for hook in ("input", "forward", "output")
        ),
    )
