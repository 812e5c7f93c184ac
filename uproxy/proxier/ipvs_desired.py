"""IPVS mode, the pure part: the service model -> virtual servers, addresses and rules."""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from uproxy.endpoints import categorize_endpoints
from uproxy.kernel.ipvs import (
    RealServer,
    ServiceConfig,
    VirtualServer,
    ip_family,
)
from uproxy.kernel.netfilter import Family, Jump, save_quote
from uproxy.model import Endpoint, Protocol, ProxyState, ServicePort, ServicePortName
from uproxy.source_ranges import Network, allowed_sources

STATE_FILE = Path("/run/uproxy/ipvs-virtual-servers")
CHAIN_PREFIX = "UPROXY-IPVS-"
POSTROUTING_CHAIN = "UPROXY-IPVS-POSTROUTING"
NAT = "nat"
FILTER = "filter"
POSTROUTING_JUMP = Jump("POSTROUTING", POSTROUTING_CHAIN, "uproxy IPVS masquerade")
# loadBalancerSourceRanges: IPVS's LOCAL_IN hook runs after filter INPUT, so a drop there stops
# a connection before IPVS schedules it.
FIREWALL_CHAIN = "UPROXY-IPVS-FIREWALL"
FIREWALL_JUMP = Jump("INPUT", FIREWALL_CHAIN, "uproxy IPVS load balancer firewall", new_only=True)
WEIGHT = 1

FAMILIES: tuple[Family, ...] = (4, 6)
# The net.ipv4.vs sysctls govern IPv6 virtual servers too.
REQUIRED_SYSCTLS = (
    ("net.ipv4.vs.conntrack", "1"),
    ("net.ipv4.vs.expire_nodest_conn", "1"),
    ("net.ipv4.vs.expire_quiescent_template", "1"),
    ("net.ipv4.ip_forward", "1"),
)
STRICT_ARP_SYSCTLS = (
    ("net.ipv4.conf.all.arp_ignore", "1"),
    ("net.ipv4.conf.all.arp_announce", "2"),
)
# Checked, never set: turning it on makes the node ignore router advertisements (accept_ra=1),
# which can take its IPv6 default route away. Without it replies from real servers to clients
# elsewhere are not forwarded back.
IPV6_FORWARDING = "net.ipv6.conf.all.forwarding"

# Rule specs exactly as iptables-save prints them (measured with iptables-nft 1.8.9), so "is this
# rule there?" is a string comparison. --vdir ORIGINAL --vmethod MASQ: packets IPVS masqueraded,
# in the client-to-server direction, after IPVS changed their destination to the real server.
_VDIR = "--vdir ORIGINAL --vmethod MASQ"
_IPVS_MASQ = f"-m ipvs {_VDIR}"
LOCAL_CLIENT_RULE = (
    f"{_IPVS_MASQ} -m addrtype --src-type LOCAL "
    f"-m comment --comment {save_quote('uproxy IPVS: node-local client')} -j MASQUERADE"
)


class Kind(enum.StrEnum):
    CLUSTER = "cluster"  # a ClusterIP
    EXTERNAL = "external"  # an externalIP or a LoadBalancer IP
    NODEPORT = "nodeport"  # a node address with the NodePort


@dataclass(frozen=True, slots=True)
class DesiredServer:
    vs: VirtualServer
    config: ServiceConfig
    dests: frozenset[RealServer]
    owner: ServicePortName
    kind: Kind
    local_only: bool = False  # externalTrafficPolicy Local on external traffic: no masquerade


@dataclass(frozen=True, slots=True)
class Desired:
    servers: Mapping[VirtualServer, DesiredServer]
    addresses: frozenset[str]  # for uproxy-ipvs0
    conflicts: tuple[str, ...] = ()
    # UPROXY-IPVS-FIREWALL's rules in iptables (4) and ip6tables (6); none: no chain at all.
    firewall: Mapping[Family, tuple[str, ...]] = field(default_factory=dict)

    def firewall_of(self, family: Family) -> tuple[str, ...]:
        return self.firewall.get(family, ())

    def has_family(self, family: Family) -> bool:
        return any(ip_family(vs.ip) == family for vs in self.servers)


# -- the pure part: the service model -> virtual servers and rules -------------------------------


def normal_ip(text: str) -> str | None:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def nodeport_ips(node_ips: Iterable[str], cidrs: Sequence[str]) -> list[str]:
    """The node addresses NodePorts get virtual servers on: all of them, or those inside one of
    the --nodeport-addresses CIDRs."""
    networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    out: list[str] = []
    for text in node_ips:
        ip = ipaddress.ip_address(text)
        if networks and not any(ip.version == n.version and ip in n for n in networks):
            continue
        if str(ip) not in out:
            out.append(str(ip))
    return sorted(out, key=lambda a: (ip_family(a), ipaddress.ip_address(a).packed))


def _dests(endpoints: Iterable[Endpoint], family: Family) -> frozenset[RealServer]:
    out = set()
    for endpoint in endpoints:
        ip = normal_ip(endpoint.ip)
        # IPVS masquerading cannot cross address families.
        if ip is not None and ip_family(ip) == family:
            out.add(RealServer(ip, endpoint.port))
    return frozenset(out)


def _families_of(svc: ServicePort) -> set[Family]:
    """The families a service's NodePort serves: those of its ClusterIPs, as kube-proxy's
    per-family proxiers do (an IPv4-only service has no IPv6 NodePort); all without one."""
    found = {ip_family(ip) for ip in map(normal_ip, svc.cluster_ips) if ip is not None}
    return found or set(FAMILIES)


def compute_desired(
    state: ProxyState,
    *,
    scheduler: str,
    node_name: str,
    node_ips: Sequence[str],
    node_addresses: Sequence[str] = (),
    families: Collection[Family] = FAMILIES,
) -> Desired:
    """Every virtual server (with its real servers) and every address `state` calls for, in
    `families` only (each virtual server gets its own family's real servers).
    `node_addresses`: all of the node's, for loadBalancerSourceRanges' allowFromNode."""
    servers: dict[VirtualServer, DesiredServer] = {}
    addresses: set[str] = set()
    conflicts: list[str] = []
    firewall: dict[Family, list[str]] = {f: [] for f in families}

    def add(vs: VirtualServer, svc: ServicePort, kind: Kind, endpoints: Iterable[Endpoint]) -> bool:
        if ip_family(vs.ip) not in families:
            return False
        taken = servers.get(vs)
        if taken is not None:
            # Services are visited in name order, so the same one wins every sync.
            conflicts.append(f"{vs} of {svc.name} is already {taken.owner}'s")
            return False
        servers[vs] = DesiredServer(
            vs=vs,
            config=ServiceConfig(scheduler, svc.affinity_timeout),
            dests=_dests(endpoints, ip_family(vs.ip)),
            owner=svc.name,
            kind=kind,
            local_only=kind is not Kind.CLUSTER and svc.external_traffic_local,
        )
        if kind is not Kind.NODEPORT:
            addresses.add(vs.ip)
        return True

    for name in sorted(state.services):
        svc = state.services[name]
        chosen = categorize_endpoints(
            state.endpoints.get(name, ()), svc, node_name, state.node_zone
        )
        internal, external = chosen.internal, chosen.external
        for text in svc.cluster_ips:
            if (ip := normal_ip(text)) is not None:
                add(VirtualServer(svc.protocol, ip, svc.port), svc, Kind.CLUSTER, internal)
        for text in svc.external_ips:
            if (ip := normal_ip(text)) is not None:
                add(VirtualServer(svc.protocol, ip, svc.port), svc, Kind.EXTERNAL, external)
        sources = {f: allowed_sources(svc, f, node_addresses) for f in families}
        for text in svc.load_balancer_ips:
            if (ip := normal_ip(text)) is not None:
                vs = VirtualServer(svc.protocol, ip, svc.port)
                family = ip_family(ip)
                if add(vs, svc, Kind.EXTERNAL, external) and sources[family]:
                    firewall[family] += firewall_rules(svc, vs, sources[family])
        if svc.node_port:
            served = _families_of(svc)
            for ip in node_ips:
                if ip_family(ip) in served:
                    vs = VirtualServer(svc.protocol, ip, svc.node_port)
                    add(vs, svc, Kind.NODEPORT, external)
    rules = {f: tuple(r) for f, r in firewall.items() if r}
    return Desired(servers, frozenset(addresses), tuple(conflicts), rules)


def _host_cidr(ip: str) -> str:
    """`ip` as a one-address network, as iptables-save and ip6tables-save print it."""
    return f"{ip}/{32 if ip_family(ip) == 4 else 128}"


def firewall_rules(svc: ServicePort, vs: VirtualServer, sources: Iterable[Network]) -> list[str]:
    """One LoadBalancer virtual server's firewall: allowed sources return (on to IPVS), the
    rest of its new connections are dropped."""
    proto = "tcp" if vs.protocol is Protocol.TCP else "udp"

    def match(comment: str) -> str:
        return f"-d {_host_cidr(vs.ip)} -p {proto} {_comment(comment)} -m {proto} --dport {vs.port}"

    rules = []
    for net in sources:
        # iptables-save leaves out a match on any source.
        source = f"-s {net.with_prefixlen} " if net.prefixlen else ""
        rules.append(f"{source}{match(f'{svc.name} loadbalancer IP')} -j RETURN")
    rules.append(f"{match(f'{svc.name} traffic not in loadBalancerSourceRanges')} -j DROP")
    return rules


def ip_sort_key(ip: str) -> tuple[int, bytes]:
    address = ipaddress.ip_address(ip)
    return (address.version, address.packed)


def _comment(text: str) -> str:
    return f"-m comment --comment {save_quote(text[:255])}"


def masquerade_rules(desired: Desired, family: Family = 4) -> list[str]:
    """UPROXY-IPVS-POSTROUTING's rules in iptables (4) or ip6tables (6), in order: those of
    that family's virtual servers."""
    servers = [s for s in desired.servers.values() if ip_family(s.vs.ip) == family]
    rules = [LOCAL_CLIENT_RULE]
    for ip in sorted({rs.ip for s in servers for rs in s.dests}, key=ip_sort_key):
        host = _host_cidr(ip)
        rules.append(
            f"-s {host} -d {host} {_IPVS_MASQ} {_comment('uproxy IPVS: hairpin')} -j MASQUERADE"
        )
    external = sorted((s for s in servers if s.kind is not Kind.CLUSTER), key=lambda s: s.vs)
    for s in external:
        if s.local_only:
            proto = 6 if s.vs.protocol is Protocol.TCP else 17
            rules.append(
                f"-m ipvs --vproto {proto} --vaddr {s.vs.ip} --vport {s.vs.port} "
                f"{_VDIR} {_comment(f'{s.owner}: Local policy')} -j RETURN"
            )
    masqueraded = {s.vs.ip for s in external if not s.local_only}
    for ip in sorted(masqueraded, key=ip_sort_key):
        rules.append(
            f"-m ipvs --vaddr {ip} {_VDIR} "
            f"{_comment('uproxy IPVS: external traffic')} -j MASQUERADE"
        )
    return rules
