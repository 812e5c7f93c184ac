"""IPVS mode, the pure part: the service model -> virtual servers, addresses and rules."""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from uproxy.endpoints import categorize_endpoints
from uproxy.kernel.ipvs import (
    RealServer,
    ServiceConfig,
    VirtualServer,
    ip_family,
)
from uproxy.kernel.netfilter import Jump, save_quote
from uproxy.model import Endpoint, Protocol, ProxyState, ServicePort, ServicePortName

STATE_FILE = Path("/run/uproxy/ipvs-virtual-servers")
CHAIN_PREFIX = "UPROXY-IPVS-"
POSTROUTING_CHAIN = "UPROXY-IPVS-POSTROUTING"
NAT = "nat"
FILTER = "filter"
POSTROUTING_JUMP = Jump("POSTROUTING", POSTROUTING_CHAIN, "uproxy IPVS masquerade")
WEIGHT = 1

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


def _dests(endpoints: Iterable[Endpoint], family: int) -> frozenset[RealServer]:
    out = set()
    for endpoint in endpoints:
        ip = normal_ip(endpoint.ip)
        # IPVS masquerading cannot cross address families.
        if ip is not None and ip_family(ip) == family:
            out.add(RealServer(ip, endpoint.port))
    return frozenset(out)


def compute_desired(
    state: ProxyState, *, scheduler: str, node_name: str, node_ips: Sequence[str]
) -> Desired:
    """Every virtual server (with its real servers) and every address `state` calls for."""
    servers: dict[VirtualServer, DesiredServer] = {}
    addresses: set[str] = set()
    conflicts: list[str] = []

    def add(vs: VirtualServer, svc: ServicePort, kind: Kind, endpoints: Iterable[Endpoint]) -> None:
        taken = servers.get(vs)
        if taken is not None:
            # Services are visited in name order, so the same one wins every sync.
            conflicts.append(f"{vs} of {svc.name} is already {taken.owner}'s")
            return
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

    for name in sorted(state.services):
        svc = state.services[name]
        chosen = categorize_endpoints(state.endpoints.get(name, ()), svc, node_name)
        internal, external = chosen.internal, chosen.external
        for text in svc.cluster_ips:
            if (ip := normal_ip(text)) is not None:
                add(VirtualServer(svc.protocol, ip, svc.port), svc, Kind.CLUSTER, internal)
        for text in (*svc.external_ips, *svc.load_balancer_ips):
            if (ip := normal_ip(text)) is not None:
                add(VirtualServer(svc.protocol, ip, svc.port), svc, Kind.EXTERNAL, external)
        if svc.node_port:
            for ip in node_ips:
                add(VirtualServer(svc.protocol, ip, svc.node_port), svc, Kind.NODEPORT, external)
    return Desired(servers, frozenset(addresses), tuple(conflicts))


def ip_sort_key(ip: str) -> tuple[int, bytes]:
    address = ipaddress.ip_address(ip)
    return (address.version, address.packed)


def _comment(text: str) -> str:
    return f"-m comment --comment {save_quote(text[:255])}"


def masquerade_rules(desired: Desired) -> list[str]:
    """UPROXY-IPVS-POSTROUTING's rules, in order (IPv4 only: they are iptables rules)."""
    servers = [s for s in desired.servers.values() if ip_family(s.vs.ip) == 4]
    rules = [LOCAL_CLIENT_RULE]
    for ip in sorted({rs.ip for s in servers for rs in s.dests}, key=ip_sort_key):
        rules.append(
            f"-s {ip}/32 -d {ip}/32 {_IPVS_MASQ} {_comment('uproxy IPVS: hairpin')} -j MASQUERADE"
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
