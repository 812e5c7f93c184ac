"""iptables mode, the pure part: the service model -> uproxy's nat and filter chains.

kube-proxy's iptables rule structure (pkg/proxy/iptables/proxier.go), under uproxy's own names so
that uproxy can run beside a real kube-proxy:

  nat    UPROXY-SERVICES        <- PREROUTING, OUTPUT. One rule per ClusterIP (to the internal
                                   traffic chain), externalIP and LoadBalancer IP (to the EXT
                                   chain); last, `-m addrtype --dst-type LOCAL` -> UPROXY-NODEPORTS.
  nat    UPROXY-NODEPORTS       one rule per NodePort, to the EXT chain.
  nat    UPROXY-SVC-<hash>      the Cluster-policy endpoints; UPROXY-SVL-<hash> the Local-policy
                                   ones (this node's). ClientIP affinity (`-m recent --rcheck`)
                                   first, then `-m statistic --mode random` over the endpoints.
  nat    UPROXY-EXT-<hash>      external traffic (NodePort, externalIPs, LoadBalancer IPs):
                                   masquerade and go to SVC (Cluster policy), or keep the client's
                                   address and go to SVL (Local policy; node-local and, with
                                   --cluster-cidr, pod clients short-circuit to SVC as kube-proxy).
  nat    UPROXY-FW-<hash>       loadBalancerSourceRanges: the LoadBalancer IPs' rules go here
                                   first; allowed sources go on to the EXT chain, the rest fall
                                   through un-NATed into filter UPROXY-LB-FIREWALL.
  nat    UPROXY-SEP-<hash>      one endpoint: mark hairpin traffic, then DNAT to it.
  nat    UPROXY-MARK-MASQ       sets the mark 0x4000; UPROXY-POSTROUTING (<- POSTROUTING)
                                   masquerades what carries it.
  filter UPROXY-SERVICES        <- FORWARD, OUTPUT (new connections): ClusterIPs without
                                   endpoints are rejected at once (DROP for internalTrafficPolicy
                                   Local with endpoints only elsewhere).
  filter UPROXY-EXTERNAL-SERVICES <- INPUT, FORWARD (new connections): the same for external
                                   addresses and NodePorts.
  filter UPROXY-FORWARD         <- FORWARD: accepts marked and established service traffic.
  filter UPROXY-LB-FIREWALL  <- INPUT, FORWARD, OUTPUT (new connections, first): drops what
                                   is still addressed to a firewalled LoadBalancer IP (it was
                                   not DNATed, so its source is not in the ranges).

Every rule spec is written exactly as iptables-save prints it (checked on iptables-nft and
iptables-legacy 1.8.9), so reading the kernel back is a string comparison. Everything a service
port contributes is rendered by `render_port` alone, so a sync re-renders only the ports that
changed.

One family per ruleset, as kube-proxy runs one proxier per family: `RuleContext.family` 4 renders
iptables rules, 6 ip6tables rules (the same chains and hashes; /128 hosts, the IPv6 affinity mask,
`icmp6-port-unreachable`, loopback ::1). A family takes only the service ports with a ClusterIP of
its own (see `serves`), and only its own addresses and endpoints of those.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from uproxy.addresses import of_family
from uproxy.endpoints import (
    EndpointSelection,
    categorize_endpoints,
    external_policy_local,
    externally_accessible,
)
from uproxy.kernel.netfilter import Family, Jump, normalize_cidr, save_quote
from uproxy.model import Endpoint, Protocol, ServicePort, ServicePortName
from uproxy.source_ranges import Network, allowed_sources

NAT = "nat"
FILTER = "filter"
TABLES = (NAT, FILTER)

SERVICES = "UPROXY-SERVICES"  # in nat and in filter, as kube-proxy's KUBE-SERVICES
NODEPORTS = "UPROXY-NODEPORTS"
EXTERNAL_SERVICES = "UPROXY-EXTERNAL-SERVICES"
FORWARD = "UPROXY-FORWARD"
LB_FIREWALL = "UPROXY-LB-FIREWALL"
MARK_MASQ = "UPROXY-MARK-MASQ"
POSTROUTING = "UPROXY-POSTROUTING"
SVC_PREFIX = "UPROXY-SVC-"
SVL_PREFIX = "UPROXY-SVL-"
EXT_PREFIX = "UPROXY-EXT-"
FW_PREFIX = "UPROXY-FW-"
SEP_PREFIX = "UPROXY-SEP-"

MASQ_MARK = "0x4000"
_MARKED = f"-m mark --mark {MASQ_MARK}/{MASQ_MARK}"
# ip6tables refuses icmp-port-unreachable; each family has its own "port unreachable".
_REJECT = {
    4: "REJECT --reject-with icmp-port-unreachable",
    6: "REJECT --reject-with icmp6-port-unreachable",
}
_HOST_PREFIX = {4: 32, 6: 128}
_AFFINITY_MASK = {4: "255.255.255.255", 6: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"}
# DNAT from loopback to another host is a martian; IPv6 has no route_localnet to allow it.
_LOOPBACK = {4: "127.0.0.0/8", 6: "::1/128"}
_ANY = {4: "0.0.0.0/0", 6: "::/0"}
NODEPORTS_COMMENT = "uproxy service nodeports; must be last"

RuleKey = tuple[str, str, str]  # (table, chain, spec)
DesiredChains = dict[str, dict[str, list[str]]]  # table -> chain -> specs, in order


@dataclass(frozen=True, slots=True)
class RuleContext:
    """What the rules depend on besides the services: the node's settings."""

    node_name: str = ""
    cluster_cidr: str | None = None  # of `family`; traffic from outside it to a ClusterIP is
    # masqueraded
    masquerade_all: bool = False
    nodeport_destinations: tuple[str | None, ...] = (None,)  # None: every local address
    random_fully: bool = True  # MASQUERADE --random-fully (iptables >= 1.6.2)
    node_ips: tuple[str, ...] = ()  # for loadBalancerSourceRanges' allowFromNode
    family: Family = 4  # 4: iptables rules; 6: ip6tables rules


@dataclass(frozen=True, slots=True)
class PortRules:
    """Everything one service port puts in the kernel.

    `dispatch`: its rules in the shared chains (UPROXY-SERVICES, UPROXY-NODEPORTS, the filter
    chains), where rules are a set. `chains`: its own nat chains, each in order."""

    dispatch: tuple[RuleKey, ...] = ()
    chains: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Ruleset:
    """The complete desired state: uproxy's chains with their rules, and the jumps into them."""

    chains: DesiredChains
    jumps: Mapping[str, tuple[Jump, ...]]


# -- names ---------------------------------------------------------------------------------------


def _hash(text: str) -> str:
    """kube-proxy's chain hash: sha256, base32, the first 16 characters."""
    return base64.b32encode(hashlib.sha256(text.encode()).digest()).decode()[:16]


def _proto(protocol: Protocol) -> str:
    return "tcp" if protocol is Protocol.TCP else "udp"


def port_chain(prefix: str, name: ServicePortName, protocol: Protocol) -> str:
    """UPROXY-SVC-/SVL-/EXT-/FW-<hash> of a service port (kube-proxy's portProtoHash)."""
    return prefix + _hash(str(name) + _proto(protocol))


def endpoint_chain(name: ServicePortName, protocol: Protocol, endpoint: Endpoint) -> str:
    """UPROXY-SEP-<hash> (kube-proxy's servicePortEndpointChainName)."""
    return SEP_PREFIX + _hash(str(name) + _proto(protocol) + str(endpoint))


def probability(n: int) -> str:
    """The chance of taking the first of `n` remaining endpoints, as kube-proxy writes it
    (1/n to 10 decimals), spelled as iptables-save prints it back: the kernel keeps
    round(p * 2^31) and the save tools print that over 2^31 with 11 decimals."""
    written = float(f"{1.0 / n:0.10f}")
    kept = math.floor(written * 0x80000000 + 0.5)
    return f"{kept / 0x80000000:0.11f}"


def _comment(text: str) -> str:
    return f"-m comment --comment {save_quote(text[:255])}"


def _host(ip: str, family: Family) -> str:
    return f"{ip}/{_HOST_PREFIX[family]}"


def reject(family: Family) -> str:
    return _REJECT[family]


def serves(service: ServicePort, family: Family) -> bool:
    """Whether `family`'s rules take this service port: it has a ClusterIP of that family, as
    kube-proxy's per-family proxiers decide (a port without any ClusterIP stays IPv4's)."""
    if not service.cluster_ips:
        return family == 4
    return bool(of_family(service.cluster_ips, family))


def family_endpoints(endpoints: Iterable[Endpoint], family: Family) -> tuple[Endpoint, ...]:
    """The endpoints one family's rules can reach (a DNAT across families cannot be written)."""
    return tuple(e for e in endpoints if of_family([e.ip], family))


def select(
    endpoints: Sequence[Endpoint],
    service: ServicePort,
    node_name: str,
    node_zone: str = "",
    family: Family = 4,
) -> EndpointSelection:
    """The one endpoint selection every mode uses, over one address family."""
    return categorize_endpoints(family_endpoints(endpoints, family), service, node_name, node_zone)


# -- one service port ------------------------------------------------------------------------


def _endpoint_rules(
    svc: ServicePort, endpoints: Sequence[Endpoint], first: Sequence[str], family: Family
) -> tuple[str, ...]:
    """A SVC or SVL chain: `first` (masquerade rules), affinity, then an equal random share."""
    name = str(svc.name)
    rules = list(first)
    seps = [(e, endpoint_chain(svc.name, svc.protocol, e)) for e in endpoints]
    if svc.affinity_timeout is not None:
        for endpoint, sep in seps:
            rules.append(
                f"{_comment(f'{name} -> {endpoint}')} -m recent --rcheck "
                f"--seconds {svc.affinity_timeout} --reap --name {sep} "
                f"--mask {_AFFINITY_MASK[family]} --rsource -j {sep}"
            )
    for i, (endpoint, sep) in enumerate(seps):
        chance = ""
        if i < len(seps) - 1:
            chance = f" -m statistic --mode random --probability {probability(len(seps) - i)}"
        rules.append(f"{_comment(f'{name} -> {endpoint}')}{chance} -j {sep}")
    return tuple(rules)


def _sep_rules(svc: ServicePort, endpoint: Endpoint, sep: str, family: Family) -> tuple[str, ...]:
    comment = _comment(str(svc.name))
    affinity = ""
    if svc.affinity_timeout is not None:
        affinity = f" -m recent --set --name {sep} --mask {_AFFINITY_MASK[family]} --rsource"
    return (
        # Hairpin: an endpoint calling its own service would get its own packets back unNATed.
        f"-s {_host(endpoint.ip, family)} {comment} -j {MARK_MASQ}",
        f"-p {_proto(svc.protocol)} {comment}{affinity} -j DNAT --to-destination {endpoint}",
    )


def render_port(svc: ServicePort, chosen: EndpointSelection, ctx: RuleContext) -> PortRules:
    """Every rule of one service port, given its endpoint selection (see `select`)."""
    name, proto, port = str(svc.name), _proto(svc.protocol), svc.port
    cluster, local = chosen.cluster, chosen.local
    has_endpoints = chosen.has_any
    svc_chain = port_chain(SVC_PREFIX, svc.name, svc.protocol)
    svl_chain = port_chain(SVL_PREFIX, svc.name, svc.protocol)
    ext_chain = port_chain(EXT_PREFIX, svc.name, svc.protocol)
    fw_chain = port_chain(FW_PREFIX, svc.name, svc.protocol)

    internal_chain, has_internal = svc_chain, has_endpoints
    if svc.internal_traffic_local:
        internal_chain, has_internal = svl_chain, has_endpoints and bool(local)
    ext_local = external_policy_local(svc)
    external_chain, has_external = svc_chain, has_endpoints
    if ext_local:
        external_chain, has_external = svl_chain, has_endpoints and bool(local)
    uses_ext_chain = has_endpoints and externally_accessible(svc)
    family = ctx.family
    sources = allowed_sources(svc, family, ctx.node_ips)
    uses_fw_chain = has_endpoints and bool(sources)
    lb_chain = fw_chain if uses_fw_chain else ext_chain

    # Where nothing can answer: REJECT (no endpoint anywhere: the client learns at once) or DROP
    # (a Local policy whose endpoints are all on other nodes: kube-proxy's choice).
    no_endpoints = f"{name} has {'no endpoints' if not has_endpoints else 'no local endpoints'}"
    refuse = reject(family) if not has_endpoints else "DROP"

    def match(ip: str | None, dport: int, comment: str, extra: str = "") -> str:
        dest = f"-d {_host(ip, family)} " if ip is not None else ""
        return f"{dest}-p {proto} {_comment(comment)}{extra} -m {proto} --dport {dport}"

    dispatch: list[RuleKey] = []
    cluster_ips = of_family(svc.cluster_ips, family)
    for ip in cluster_ips:
        if has_internal:
            spec = f"{match(ip, port, f'{name} cluster IP')} -j {internal_chain}"
            dispatch.append((NAT, SERVICES, spec))
        else:
            dispatch.append((FILTER, SERVICES, f"{match(ip, port, no_endpoints)} -j {refuse}"))
    for kind, ips, target in (
        ("external IP", svc.external_ips, ext_chain),
        ("loadbalancer IP", svc.load_balancer_ips, lb_chain),
    ):
        for ip in of_family(ips, family):
            if has_endpoints:
                spec = f"{match(ip, port, f'{name} {kind}')} -j {target}"
                dispatch.append((NAT, SERVICES, spec))
            if uses_fw_chain and target == fw_chain:
                comment = f"{name} traffic not accepted by {fw_chain}"
                dispatch.append((FILTER, LB_FIREWALL, f"{match(ip, port, comment)} -j DROP"))
            if not has_external:
                spec = f"{match(ip, port, no_endpoints)} -j {refuse}"
                dispatch.append((FILTER, EXTERNAL_SERVICES, spec))
    if svc.node_port:
        if has_endpoints:
            dispatch.append((NAT, NODEPORTS, f"{match(None, svc.node_port, name)} -j {ext_chain}"))
        if not has_external:
            local_dst = " -m addrtype --dst-type LOCAL"
            spec = f"{match(None, svc.node_port, no_endpoints, local_dst)} -j {refuse}"
            dispatch.append((FILTER, EXTERNAL_SERVICES, spec))

    chains: dict[str, tuple[str, ...]] = {}
    if uses_ext_chain:
        chains[ext_chain] = _ext_rules(svc, ctx, cluster, local, svc_chain, svl_chain)
        if has_external:
            chains[ext_chain] += (f"{_comment(name)} -j {external_chain}",)

    if uses_fw_chain:
        chains[fw_chain] = _fw_rules(svc, sources, ext_chain)

    masquerade: list[str] = []
    if has_internal and (ctx.masquerade_all or ctx.cluster_cidr is not None):
        source = "" if ctx.masquerade_all else f"! -s {ctx.cluster_cidr} "
        for ip in cluster_ips:
            masquerade.append(f"{source}{match(ip, port, f'{name} cluster IP')} -j {MARK_MASQ}")
    if cluster:
        first = masquerade if internal_chain == svc_chain else []
        chains[svc_chain] = _endpoint_rules(svc, cluster, first, family)
    if local:
        first = masquerade if internal_chain == svl_chain else []
        chains[svl_chain] = _endpoint_rules(svc, local, first, family)
    for endpoint in chosen.reachable:
        sep = endpoint_chain(svc.name, svc.protocol, endpoint)
        chains[sep] = _sep_rules(svc, endpoint, sep, family)
    return PortRules(tuple(dispatch), chains)


def _fw_rules(svc: ServicePort, sources: Sequence[Network], ext_chain: str) -> tuple[str, ...]:
    """The FW chain: allowed sources go on to the EXT chain. The rest return un-NATed, still
    addressed to the LoadBalancer IP, which filter UPROXY-LB-FIREWALL drops."""
    comment = _comment(f"{svc.name} loadbalancer IP")
    rules = []
    for net in sources:
        # iptables-save leaves out a match on any source.
        source = f"-s {net.with_prefixlen} " if net.prefixlen else ""
        rules.append(f"{source}{comment} -j {ext_chain}")
    rules.append(_comment(f"other traffic to {svc.name} will be dropped by {LB_FIREWALL}"))
    return tuple(rules)


def _ext_rules(
    svc: ServicePort,
    ctx: RuleContext,
    cluster: Sequence[Endpoint],
    local: Sequence[Endpoint],
    svc_chain: str,
    svl_chain: str,
) -> tuple[str, ...]:
    """The EXT chain's rules before the final jump to the external policy chain."""
    name = str(svc.name)
    if not external_policy_local(svc):
        # The endpoint may be on another node: its reply must come back through this one.
        return (
            f"{_comment(f'masquerade traffic for {name} external destinations')} -j {MARK_MASQ}",
        )
    # Local policy keeps the client's address. Clients on this node and pods are not "external"
    # (kube-proxy): they go to the Cluster-policy endpoints, when this port has any.
    short_circuit = svc_chain if cluster else svl_chain if local else None
    if short_circuit is None:
        return ()
    rules = []
    if ctx.cluster_cidr is not None:
        pods = _comment(f"pod traffic for {name} external destinations")
        rules.append(f"-s {ctx.cluster_cidr} {pods} -j {short_circuit}")
    # A node-local client's source is a node address the endpoint may not route back to us.
    rules.append(
        f"{_comment(f'masquerade LOCAL traffic for {name} external destinations')} "
        f"-m addrtype --src-type LOCAL -j {MARK_MASQ}"
    )
    rules.append(
        f"{_comment(f'route LOCAL traffic for {name} external destinations')} "
        f"-m addrtype --src-type LOCAL -j {short_circuit}"
    )
    return tuple(rules)


# -- the node-wide part ----------------------------------------------------------------------


def nodeport_destinations(
    nodeport_addresses: Sequence[str], family: Family = 4
) -> tuple[str | None, ...]:
    """The `-d` of each jump to UPROXY-NODEPORTS in `family`'s rules: None (any local address but
    loopback) unless --nodeport-addresses narrows them; none at all when it names only the other
    family's CIDRs."""
    if not nodeport_addresses:
        return (None,)
    mine = [
        c
        for c in map(normalize_cidr, nodeport_addresses)
        if ipaddress.ip_network(c).version == family
    ]
    return (None,) if _ANY[family] in mine else tuple(dict.fromkeys(mine))


def nodeports_tail(ctx: RuleContext) -> tuple[str, ...]:
    """The last rules of nat UPROXY-SERVICES: whatever no service address took, to a local
    address, may be a NodePort."""
    rules = []
    for destination in ctx.nodeport_destinations:
        # DNAT from loopback to another host is a martian (route_localnet; IPv6 has none).
        dest = f"! -d {_LOOPBACK[ctx.family]}" if destination is None else f"-d {destination}"
        rules.append(
            f"{dest} {_comment(NODEPORTS_COMMENT)} -m addrtype --dst-type LOCAL -j {NODEPORTS}"
        )
    return tuple(rules)


# Chains whose rules are a set, except that these rules must stay last.
def tails(ctx: RuleContext) -> dict[tuple[str, str], tuple[str, ...]]:
    return {(NAT, SERVICES): nodeports_tail(ctx)}


SET_CHAINS = frozenset(
    {
        (NAT, SERVICES),
        (NAT, NODEPORTS),
        (FILTER, SERVICES),
        (FILTER, EXTERNAL_SERVICES),
        (FILTER, LB_FIREWALL),
    }
)


def static_chains(ctx: RuleContext) -> DesiredChains:
    """Every node-wide chain with its fixed rules; the shared chains start empty."""
    masquerade = "-j MASQUERADE --random-fully" if ctx.random_fully else "-j MASQUERADE"
    nat: dict[str, list[str]] = {
        SERVICES: [],
        NODEPORTS: [],
        MARK_MASQ: [f"-j MARK --set-xmark {MASQ_MARK}/{MASQ_MARK}"],
        POSTROUTING: [
            f"-m mark ! --mark {MASQ_MARK}/{MASQ_MARK} -j RETURN",
            # Clear the mark, so a packet that goes through netfilter again is judged anew.
            f"-j MARK --set-xmark {MASQ_MARK}/0x0",
            f"{_comment('uproxy service traffic requiring SNAT')} {masquerade}",
        ],
    }
    filter_: dict[str, list[str]] = {
        SERVICES: [],
        EXTERNAL_SERVICES: [],
        LB_FIREWALL: [],
        FORWARD: [
            # Out-of-window packets conntrack marks INVALID would escape the NAT and reach the
            # endpoint unNATed, which answers with a reset (kube-proxy's rule).
            "-m conntrack --ctstate INVALID -j DROP",
            f"{_comment('uproxy forwarding rules')} {_MARKED} -j ACCEPT",
            f"{_comment('uproxy forwarding conntrack rule')} "
            "-m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT",
        ],
    }
    return {NAT: nat, FILTER: filter_}


def jumps() -> dict[str, tuple[Jump, ...]]:
    portals = "uproxy service portals"
    external = "uproxy externally visible service portals"
    firewall = "uproxy load balancer firewall"
    return {
        NAT: (
            Jump("PREROUTING", SERVICES, portals),
            Jump("OUTPUT", SERVICES, portals),
            Jump("POSTROUTING", POSTROUTING, "uproxy postrouting rules"),
        ),
        FILTER: (
            # First, as kube-proxy's KUBE-PROXY-FIREWALL: nothing may accept it before.
            Jump("INPUT", LB_FIREWALL, firewall, new_only=True),
            Jump("FORWARD", LB_FIREWALL, firewall, new_only=True),
            Jump("OUTPUT", LB_FIREWALL, firewall, new_only=True),
            Jump("INPUT", EXTERNAL_SERVICES, external, new_only=True),
            Jump("FORWARD", FORWARD, "uproxy forwarding rules"),
            Jump("FORWARD", SERVICES, portals, new_only=True),
            Jump("FORWARD", EXTERNAL_SERVICES, external, new_only=True),
            Jump("OUTPUT", SERVICES, portals, new_only=True),
        ),
    }


def assemble(rendered: Iterable[PortRules], ctx: RuleContext) -> DesiredChains:
    """The complete desired chains from every port's rules."""
    chains = static_chains(ctx)
    for rules in rendered:
        for table, chain, spec in rules.dispatch:
            chains[table][chain].append(spec)
        for chain, specs in rules.chains.items():
            chains[NAT][chain] = list(specs)
    for (table, chain), tail in tails(ctx).items():
        chains[table][chain].extend(tail)
    return chains


def compute_rules(
    services: Mapping[ServicePortName, ServicePort],
    endpoints: Mapping[ServicePortName, Sequence[Endpoint]],
    ctx: RuleContext,
    node_zone: str = "",
) -> Ruleset:
    """The complete desired state, from scratch; pure, for tests and the full sync alike."""
    rendered = (
        render_port(
            services[n],
            select(endpoints.get(n, ()), services[n], ctx.node_name, node_zone, ctx.family),
            ctx,
        )
        for n in sorted(services)
        if serves(services[n], ctx.family)
    )
    return Ruleset(assemble(rendered, ctx), jumps())
