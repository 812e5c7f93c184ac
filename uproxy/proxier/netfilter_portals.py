"""Portals as iptables rules: every virtual address of a service port leads to its listener.

Chains (all uproxy's own, never `KUBE-*`, so uproxy can sit beside a real kube-proxy):

  nat    UPROXY-PORTALS            <- PREROUTING (top) and OUTPUT (top)
         dispatches on the low 6 bits of the destination to UPROXY-PORTALS-00 .. -63, which hold
         the ClusterIPs and LoadBalancer IPs, and the externalIPs that are local addresses.
  nat    UPROXY-PORTALS-CONTAINER  <- PREROUTING (top)
         externalIPs for traffic that did not arrive through a bridge (kube-proxy's physdev rule).
  nat    UPROXY-NODEPORTS          <- PREROUTING and OUTPUT (bottom), `-m addrtype --dst-type
         LOCAL`, one jump per --nodeport-addresses CIDR: NodePorts on local addresses only.
  filter UPROXY-PROXY-PORTS        <- INPUT (top, new connections only): dispatches on protocol
         and port range (1024 ports each) to UPROXY-PROXY-PORTS-T00 .. -U63, which send each
         proxy port to UPROXY-PROXY-GUARD.
  filter UPROXY-PORTAL-FIREWALL    <- INPUT, FORWARD, OUTPUT (top, new connections only): drops
         what is still addressed to a LoadBalancer IP with loadBalancerSourceRanges: its portal
         only redirects the allowed sources, so the rest arrives here un-NATed.
  filter UPROXY-PROXY-GUARD        accepts what came through a portal (conntrack DNAT, which
         REDIRECT is too), lets node-local clients through to the admin's rules, rejects the rest.

kube-proxy's userspace mode kept separate "container" (PREROUTING) and "host" (OUTPUT) chains
because it DNATed node-local traffic to the node's IP: REDIRECT in OUTPUT lands on 127.0.0.1 and
its UDP replies then left from the wrong address. uproxy's UDP listener replies with IP_PKTINFO
from the exact address each datagram arrived at, so REDIRECT works in OUTPUT too, the rules of both
hooks are identical, and one chain serves both: half the rules and half the sync time.

Every service rule carries the comment `namespace/name:port`. Within the portal chains the rules
are a set (each matches its own address and port), so they are converged rule by rule: a changed
service costs a few `-D`/`-A` lines however many other services exist. Only the guard chain's
order matters; it is replaced whenever it differs.

Why shards: to delete one rule, iptables-nft loads every rule of its chain: ~90 ms in a chain of
10,000 rules, ~10 ms in a shard of ~150, which keeps one changed service near the 50 ms target
with 10,000 services. Packets gain too: a new connection walks at most 64 dispatch rules and one
shard instead of every service. NodePorts stay in one chain: there are at most a few thousand.

Syncs are level-triggered. A sync whose portals differ from the last one applies the difference
against what uproxy last wrote (fast: tens of milliseconds). At least once per `resync_period`,
and whenever a write failed or nothing is known yet, a full sync reads the kernel back and
converges to the complete desired state: it adds what is missing, removes what is stale (leftovers
of a killed run, rules an admin deleted or added inside uproxy's chains), and leaves every rule
outside uproxy's chains alone.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import structlog

from uproxy.addresses import of_family
from uproxy.errors import KernelError, SettingsError
from uproxy.kernel.conntrack import UdpFlowCleaner, UdpFlowMatch
from uproxy.kernel.netfilter import (
    BackendName,
    Family,
    Jump,
    Netfilter,
    TableUpdate,
    normalize_cidr,
    save_quote,
)
from uproxy.model import Protocol, ServicePortName
from uproxy.proxier.base import Changed
from uproxy.proxier.portals import Portal
from uproxy.source_ranges import allowed_sources
from uproxy.threads import in_thread

log = structlog.get_logger(__name__)

NAT = "nat"
FILTER = "filter"
TABLES = (NAT, FILTER)

PORTALS = "UPROXY-PORTALS"
PORTALS_CONTAINER = "UPROXY-PORTALS-CONTAINER"
NODEPORTS = "UPROXY-NODEPORTS"
PROXY_PORTS = "UPROXY-PROXY-PORTS"
PROXY_GUARD = "UPROXY-PROXY-GUARD"
LB_FIREWALL = "UPROXY-PORTAL-FIREWALL"  # not the iptables mode's name: no chain is shared

PORTAL_SHARDS = 64  # by destination address modulo 64 (its low 6 bits)
PORT_SHARD_BITS = 10  # proxy ports in ranges of 1024
PORT_SHARDS = 1 << (16 - PORT_SHARD_BITS)
ORDERED_CHAINS = frozenset({PROXY_GUARD})
BUILTIN_HOOKS = ("INPUT", "FORWARD", "OUTPUT")  # where the LB firewall is hooked, first

GUARD_RULES = (
    f"-m conntrack --ctstate DNAT -m comment --comment {save_quote('came through a portal')} "
    "-j ACCEPT",
    f"-i lo -m comment --comment {save_quote('node-local: left to the host rules')} -j RETURN",
    f"-p tcp -m comment --comment {save_quote('not through a portal')} "
    "-j REJECT --reject-with tcp-reset",
    f"-m comment --comment {save_quote('not through a portal')} -j DROP",
)

_COMMENT_JUNK = re.compile(r"[^A-Za-z0-9._:/-]")

RuleKey = tuple[str, str, str]  # (table, chain, spec)
DesiredChains = dict[str, dict[str, list[str]]]  # table -> chain -> specs


# -- the pure part: portals -> rules ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RuleContext:
    dnat_to: str | None = None  # None: REDIRECT to the proxy port; else DNAT to this address
    physdev: bool = True  # whether the kernel has the physdev match
    node_ips: tuple[str, ...] = ()  # for loadBalancerSourceRanges' allowFromNode
    family: Family = 4  # these rules take only this family's addresses


@dataclass(frozen=True, slots=True)
class Ruleset:
    """The complete desired state: uproxy's chains with their rules, and the jumps into them."""

    chains: DesiredChains
    jumps: Mapping[str, tuple[Jump, ...]]


def rule_comment(name: ServicePortName) -> str:
    return _COMMENT_JUNK.sub("", str(name))[:255]


def host(ip: str) -> str:
    """One address as a `-d`, exactly as iptables-save and ip6tables-save print it."""
    return f"{ip}/128" if ":" in ip else f"{ip}/32"


def portal_shard(ip: str) -> str:
    return f"{PORTALS}-{int(ipaddress.ip_address(ip)) % PORTAL_SHARDS:02d}"


def proxy_port_shard(proto: str, port: int) -> str:
    return f"{PROXY_PORTS}-{proto[0].upper()}{port >> PORT_SHARD_BITS:02d}"


def portal_rules(name: ServicePortName, portal: Portal, ctx: RuleContext) -> tuple[RuleKey, ...]:
    """The rules of one portal, each spec exactly as iptables-save prints it."""
    svc = portal.service
    proto = "tcp" if svc.protocol == Protocol.TCP else "udp"
    comment = save_quote(rule_comment(name))

    def match(port: int) -> str:
        return f"-p {proto} -m comment --comment {comment} -m {proto} --dport {port}"

    def to(port: int) -> str:
        if ctx.dnat_to is None:
            return f"-j REDIRECT --to-ports {port}"
        address = f"[{ctx.dnat_to}]" if ctx.family == 6 else ctx.dnat_to
        return f"-j DNAT --to-destination {address}:{port}"

    internal, external = to(portal.proxy_port), to(portal.external_port)
    physdev = " -m physdev ! --physdev-is-in" if ctx.physdev else ""
    rules: list[RuleKey] = []
    family = ctx.family
    for ip in of_family(svc.cluster_ips, family):
        rules.append((NAT, portal_shard(ip), f"-d {host(ip)} {match(svc.port)} {internal}"))
    sources = allowed_sources(svc, family, ctx.node_ips)
    for ip in of_family(svc.load_balancer_ips, family):
        if not sources:
            rules.append((NAT, portal_shard(ip), f"-d {host(ip)} {match(svc.port)} {external}"))
            continue
        for net in sources:
            # iptables-save leaves out a match on any source.
            source = f"-s {net.with_prefixlen} " if net.prefixlen else ""
            spec = f"{source}-d {host(ip)} {match(svc.port)} {external}"
            rules.append((NAT, portal_shard(ip), spec))
        rules.append((FILTER, LB_FIREWALL, f"-d {host(ip)} {match(svc.port)} -j DROP"))
    for ip in of_family(svc.external_ips, family):
        # kube-proxy's externalIP semantics: any client when the address is one of the node's,
        # else only traffic that was not bridged (it came from outside, routed to this node).
        local = f"-d {host(ip)} {match(svc.port)} -m addrtype --dst-type LOCAL {external}"
        rules.append((NAT, portal_shard(ip), local))
        outside = f"-d {host(ip)} {match(svc.port)}{physdev} {external}"
        rules.append((NAT, PORTALS_CONTAINER, outside))
    if svc.node_port:
        rules.append((NAT, NODEPORTS, f"{match(svc.node_port)} {external}"))
    for port in dict.fromkeys((portal.proxy_port, portal.external_port)):
        guard = f"{match(port)} -j {PROXY_GUARD}"
        rules.append((FILTER, proxy_port_shard(proto, port), guard))
    return tuple(rules)


def nodeport_destinations(
    nodeport_addresses: Sequence[str], family: Family = 4
) -> list[str | None]:
    """The `-d` of each NodePort jump: None (any local address) unless CIDRs restrict it.

    Each family takes its own CIDRs; with CIDRs of the other family only, none: no NodePorts.
    """
    if not nodeport_addresses:
        return [None]
    cidrs = [normalize_cidr(c) for c in nodeport_addresses]
    mine = [c for c in cidrs if ipaddress.ip_network(c).version == family]
    everything = "::/0" if family == 6 else "0.0.0.0/0"
    return [None] if everything in mine else list(dict.fromkeys(mine))


def ruleset_jumps(
    nodeport_addresses: Sequence[str] = (), family: Family = 4
) -> dict[str, tuple[Jump, ...]]:
    portals = "uproxy service portals"
    nodeports = "uproxy service NodePorts; must be last"
    nat = [
        Jump("PREROUTING", PORTALS, portals),
        Jump("PREROUTING", PORTALS_CONTAINER, "uproxy externalIPs, traffic from outside"),
        Jump("OUTPUT", PORTALS, portals),
    ]
    for chain in ("PREROUTING", "OUTPUT"):
        nat += [
            Jump(chain, NODEPORTS, nodeports, first=False, destination=d, dst_local=True)
            for d in nodeport_destinations(nodeport_addresses, family)
        ]
    # Not the iptables mode's comment: a switch of modes then re-inserts its jumps in order.
    firewall = "uproxy portals load balancer firewall"
    filter_ = [Jump(hook, LB_FIREWALL, firewall, new_only=True) for hook in BUILTIN_HOOKS]
    # New connections only: established traffic to the node skips the whole walk.
    filter_.append(Jump("INPUT", PROXY_PORTS, "uproxy proxy ports", new_only=True))
    return {NAT: tuple(nat), FILTER: tuple(filter_)}


def shard_match(k: int, family: Family) -> str:
    """The destinations of shard `k`: those whose low 6 bits are `k`, as the save tools print."""
    if family == 6:
        return f"-d ::{k:x}/::{PORTAL_SHARDS - 1:x}" if k else f"-d ::/::{PORTAL_SHARDS - 1:x}"
    return f"-d 0.0.0.{k}/0.0.0.{PORTAL_SHARDS - 1}"


def empty_chains(family: Family = 4) -> DesiredChains:
    """Every chain uproxy owns, with its static rules: shard dispatch and the guard."""
    nat: dict[str, list[str]] = {PORTALS: []}
    for k in range(PORTAL_SHARDS):
        shard = f"{PORTALS}-{k:02d}"
        nat[PORTALS].append(f"{shard_match(k, family)} -j {shard}")
        nat[shard] = []
    nat[PORTALS_CONTAINER] = []
    nat[NODEPORTS] = []
    filter_: dict[str, list[str]] = {PROXY_PORTS: []}
    for proto in ("tcp", "udp"):
        for k in range(PORT_SHARDS):
            shard = proxy_port_shard(proto, k << PORT_SHARD_BITS)
            low, high = k << PORT_SHARD_BITS, ((k + 1) << PORT_SHARD_BITS) - 1
            filter_[PROXY_PORTS].append(f"-p {proto} -m {proto} --dport {low}:{high} -j {shard}")
            filter_[shard] = []
    filter_[PROXY_GUARD] = list(GUARD_RULES)
    filter_[LB_FIREWALL] = []
    return {NAT: nat, FILTER: filter_}


def assemble(rendered: Iterable[tuple[RuleKey, ...]], family: Family = 4) -> DesiredChains:
    chains = empty_chains(family)
    for rules in rendered:
        for table, chain, spec in rules:
            chains[table][chain].append(spec)
    return chains


def rule_context(
    bind_address: str, physdev: bool, node_ips: tuple[str, ...] = (), family: Family = 4
) -> RuleContext:
    """REDIRECT for a wildcard bind address (either family's: each family's listeners bind their
    own wildcard); DNAT to a specific one (kube-proxy's choice), which serves its family only."""
    ip = ipaddress.ip_address(bind_address)
    if ip.is_unspecified:
        return RuleContext(None, physdev, node_ips, family)
    if ip.is_loopback:
        raise SettingsError(
            f"--bind-address {bind_address}: portals cannot reach a loopback listener from "
            "other machines; bind a node address or 0.0.0.0 (or use --no-portals)"
        )
    if ip.version != family:
        raise SettingsError(
            f"--bind-address {bind_address}: IPv{family} portals cannot DNAT to an "
            f"IPv{ip.version} address; bind an IPv{family} address, 0.0.0.0 or ::"
        )
    return RuleContext(str(ip), physdev, node_ips, family)


def compute_rules(
    portals: Mapping[ServicePortName, Portal],
    *,
    bind_address: str = "0.0.0.0",
    nodeport_addresses: Sequence[str] = (),
    physdev: bool = True,
    node_ips: tuple[str, ...] = (),
    family: Family = 4,
) -> Ruleset:
    """The complete desired state for `portals`; pure, for tests and the full sync alike."""
    ctx = rule_context(bind_address, physdev, node_ips, family)
    rendered = (portal_rules(name, portals[name], ctx) for name in sorted(portals))
    return Ruleset(assemble(rendered, family), ruleset_jumps(nodeport_addresses, family))


def diff_chains(
    current: Mapping[str, Sequence[str]], desired: Mapping[str, Sequence[str]]
) -> tuple[TableUpdate, list[str]]:
    """(the update converging `current` to `desired`, uproxy chains that should not exist)."""
    replace: dict[str, list[str]] = {}
    delete: dict[str, list[str]] = {}
    append: dict[str, list[str]] = {}
    for chain, want in desired.items():
        have = current.get(chain)
        if have is None or (chain in ORDERED_CHAINS and list(have) != list(want)):
            replace[chain] = list(want)
            continue
        missing = Counter(want) - Counter(have)
        extra = Counter(have) - Counter(want)
        if not missing and not extra:
            continue
        if extra.total() > max(64, len(want) // 2):
            replace[chain] = list(want)  # rewriting is cheaper than thousands of searches
            continue
        delete[chain] = list(extra.elements())
        append[chain] = []
        for spec in want:  # in desired order, each missing copy once
            if missing[spec] > 0:
                missing[spec] -= 1
                append[chain].append(spec)
    stale = [chain for chain in current if chain not in desired]
    return TableUpdate(replace=replace, delete=delete, append=append), stale


Change = tuple[tuple[RuleKey, ...], tuple[RuleKey, ...]]  # one portal's rules before, after


def incremental_updates(changes: Iterable[Change]) -> dict[str, TableUpdate]:
    """Per-table updates for the changed portals only (an added portal had no rules before, a
    removed one has none after)."""
    delete: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    append: dict[str, dict[str, list[str]]] = defaultdict(lambda: defaultdict(list))
    for before, after in changes:
        if before == after:
            continue
        gone, added = set(before) - set(after), set(after) - set(before)
        for table, chain, spec in before:
            if (table, chain, spec) in gone:
                delete[table][chain].append(spec)
        for table, chain, spec in after:
            if (table, chain, spec) in added:
                append[table][chain].append(spec)
    return {
        table: TableUpdate(delete=dict(delete[table]), append=dict(append[table]))
        for table in TABLES
        if delete[table] or append[table]
    }


def udp_destinations(
    portals: Mapping[ServicePortName, Portal], family: Family = 4
) -> dict[UdpFlowMatch, int]:
    """Every UDP virtual destination (address or NodePort) of `family` -> the proxy port it leads
    to (a NodePort's match has no address: the family's own flusher applies it)."""
    out: dict[UdpFlowMatch, int] = {}
    for portal in portals.values():
        svc = portal.service
        if svc.protocol != Protocol.UDP:
            continue
        for ip in of_family(svc.cluster_ips, family):
            out[UdpFlowMatch.destination(ip, svc.port)] = portal.proxy_port
        for ip in of_family((*svc.load_balancer_ips, *svc.external_ips), family):
            out[UdpFlowMatch.destination(ip, svc.port)] = portal.external_port
        if svc.node_port:
            out[UdpFlowMatch.destination(None, svc.node_port)] = portal.external_port
    return out


def tcp_destinations(
    portals: Mapping[ServicePortName, Portal], family: Family = 4
) -> list[UdpFlowMatch]:
    """The un-NATed TCP entries to every TCP ClusterIP and LoadBalancer IP: nothing but a portal
    answers those. NodePorts and externalIPs are real addresses, whose direct connections are
    not the portals' to judge."""
    out: list[UdpFlowMatch] = []
    for portal in portals.values():
        svc = portal.service
        if svc.protocol == Protocol.TCP:
            ips = of_family((*svc.cluster_ips, *svc.load_balancer_ips), family)
            out += [UdpFlowMatch.tcp_without_nat(ip, svc.port) for ip in ips]
    return out


_DESTINATION = re.compile(r"(?:^| )-d (\S+)/(?:32|128) ")
_TCP_PORTAL = re.compile(
    r"-p tcp .*--dport (\d+) -j (?:REDIRECT --to-ports (\d+)|DNAT --to-destination \S+:(\d+))$"
)


def tcp_redirects(chains: Mapping[str, Sequence[str]]) -> set[tuple[str | None, int, int]]:
    """(address, port, proxy port) of every TCP portal in uproxy's nat chains as the kernel has
    them; the address is None for a NodePort (it matches any local address)."""
    found: set[tuple[str | None, int, int]] = set()
    for specs in chains.values():
        for spec in specs:
            portal = _TCP_PORTAL.search(spec)
            if portal is None:
                continue
            destination = _DESTINATION.search(spec)
            to = portal.group(2) or portal.group(3)
            ip = destination.group(1) if destination else None
            found.add((ip, int(portal.group(1)), int(to)))
    return found


# -- the stateful part: converging the kernel ------------------------------------------------

PROBE = "UPROXY-PROBE"


def check_usable(netfilter: Netfilter) -> None:
    """KernelError unless `netfilter` can hold uproxy's chains in both tables (a kernel without
    IPv6 NAT refuses the ip6 nat table): created and removed in one commit, nothing left."""
    probe = TableUpdate(replace={PROBE: []}, delete_chains=[PROBE])
    netfilter.apply({table: probe for table in TABLES})


@dataclass
class _Stats:
    added: int = 0
    removed: int = 0
    notes: list[str] = field(default_factory=list)

    def count(self, update: TableUpdate) -> None:
        self.added += sum(len(v) for v in update.append.values())
        self.added += sum(len(v) for v in update.replace.values())
        self.removed += sum(len(v) for v in update.delete.values())


class NetfilterPortals:
    """The `Portals` protocol on iptables. One sync at a time; kernel work runs in a thread."""

    def __init__(
        self,
        netfilter: Netfilter,
        *,
        bind_address: str = "0.0.0.0",
        nodeport_addresses: Sequence[str] = (),
        resync_period: float = 30.0,
        conntrack: UdpFlowCleaner,
        physdev: bool,
        other_backends: Sequence[Netfilter],
        clock: Callable[[], float] = time.monotonic,
        node_ips: tuple[str, ...] = (),
    ) -> None:
        self._nf = netfilter
        self._family = netfilter.family
        self._ctx = rule_context(bind_address, physdev, node_ips, self._family)
        self._jumps = ruleset_jumps(nodeport_addresses, self._family)
        self._resync_period = resync_period
        self._conntrack = conntrack
        self._others = other_backends
        self._clock = clock
        self._lock = asyncio.Lock()
        # Each portal with its rules, as last rendered. While `_trusted`, that is also exactly
        # what the kernel holds; a failed write or a restart clears it until a full sync has read
        # the kernel back.
        self._rendered: dict[ServicePortName, tuple[Portal, tuple[RuleKey, ...]]] = {}
        self._trusted = False
        self._last_full = float("-inf")
        # Each UDP portal's virtual destinations -> the proxy port they lead to; None when a
        # previous run's flows may still point at its dead proxy ports.
        self._udp: dict[ServicePortName, dict[UdpFlowMatch, int]] | None = None
        # (address or None for a NodePort, port, proxy port) of a previous run's TCP portals,
        # read before flush_at_start empties its chains: their conntrack entries go at the
        # first sync.
        self._dead_tcp: set[tuple[str | None, int, int]] = set()
        self._others_cleaned = False

    @property
    def backend(self) -> BackendName:
        return self._nf.backend

    @property
    def family(self) -> Family:
        return self._family

    async def sync(
        self, portals: Mapping[ServicePortName, Portal], changed: Changed = None
    ) -> None:
        async with self._lock:
            started = self._clock()
            trusted, self._trusted = self._trusted, False  # until this sync has succeeded
            changes = (
                self._render(portals) if changed is None else self._render_some(portals, changed)
            )
            due = started - self._last_full >= 0.9 * self._resync_period
            if not trusted or due:
                stats = await self._full(trusted)
                self._last_full = started
                mode = "full"
            else:
                try:
                    stats = await self._incremental(changes)
                    mode = "incremental"
                except KernelError as exc:
                    # Someone changed uproxy's chains behind its back: read them and converge.
                    log.warning(
                        "portals_incremental_failed",
                        family=self._family,
                        error=str(exc),
                        action="full sync",
                    )
                    stats = await self._full(trusted=False)
                    self._last_full = started
                    mode = "full"
            self._trusted = True
            await self._flush_udp(portals, changed)
            wrote = stats.added or stats.removed
            (log.info if wrote else log.debug)(
                "portals_synced",
                mode=mode,
                backend=self._nf.backend,
                family=self._family,
                portals=len(portals),
                rules_added=stats.added,
                rules_removed=stats.removed,
                duration_ms=round((self._clock() - started) * 1000, 2),
            )

    async def flush_at_start(self) -> None:
        """Empty uproxy's chains (`uproxy run` starts clean: old proxy ports are dead) and remove
        whatever an earlier run left in the other iptables backend."""
        async with self._lock:
            self._forget()
            await in_thread(self._flush_blocking)

    async def cleanup(self) -> None:
        async with self._lock:
            self._forget()
            await in_thread(self._nf.delete_everything)
            log.info("portals_cleaned", backend=self._nf.backend, family=self._family)

    # -- internals -------------------------------------------------------------------------

    def _forget(self) -> None:
        self._trusted = False
        self._udp = None
        self._last_full = float("-inf")

    def _render(self, portals: Mapping[ServicePortName, Portal]) -> list[Change]:
        """Render the portals that changed since the last sync; their (before, after) rules.

        Two dict operations per unchanged portal: with 10,000 portals, hashing the names is
        what a sync costs in Python, so nothing here looks a name up twice.
        """
        old = self._rendered
        new: dict[ServicePortName, tuple[Portal, tuple[RuleKey, ...]]] = {}
        changes: list[Change] = []
        hits = 0
        for name, portal in portals.items():
            cached = old.get(name)
            if cached is not None:
                hits += 1
            if cached is None or (cached[0] is not portal and cached[0] != portal):
                rules = portal_rules(name, portal, self._ctx)
                changes.append((cached[1] if cached is not None else (), rules))
                cached = (portal, rules)
            new[name] = cached
        if hits < len(old):  # some portal is gone
            changes += [(rules, ()) for name, (_, rules) in old.items() if name not in new]
        self._rendered = new
        return changes

    def _render_some(
        self, portals: Mapping[ServicePortName, Portal], names: Iterable[ServicePortName]
    ) -> list[Change]:
        """`_render` for only `names`, the portals that can have changed: the rest stand."""
        rendered = self._rendered
        changes: list[Change] = []
        for name in names:
            portal = portals.get(name)
            cached = rendered.get(name)
            if portal is None:
                if cached is not None:
                    changes.append((cached[1], ()))
                    del rendered[name]
            elif cached is None or cached[0] != portal:
                rules = portal_rules(name, portal, self._ctx)
                changes.append((cached[1] if cached is not None else (), rules))
                rendered[name] = (portal, rules)
        return changes

    async def _incremental(self, changes: Iterable[Change]) -> _Stats:
        updates = incremental_updates(changes)
        stats = _Stats()
        if updates:
            await in_thread(self._nf.apply, updates)
            for update in updates.values():
                stats.count(update)
        return stats

    async def _full(self, trusted: bool) -> _Stats:
        desired = assemble((rules for _, rules in self._rendered.values()), self._family)
        stats = await in_thread(self._converge, desired)
        if trusted and (stats.added or stats.removed or stats.notes):
            log.warning(
                "portals_drift_repaired",
                backend=self._nf.backend,
                family=self._family,
                rules_added=stats.added,
                rules_removed=stats.removed,
                other=stats.notes,
            )
        return stats

    def _converge(self, desired: DesiredChains) -> _Stats:
        """Read each table back and make uproxy's part of it exactly `desired`. Blocks."""
        stats = _Stats()
        states = {table: self._nf.read(table) for table in TABLES}
        updates: dict[str, TableUpdate] = {}
        stale: dict[str, TableUpdate] = {}
        for table, state in states.items():
            update, stale_chains = diff_chains(state.chains, desired[table])
            if update:
                updates[table] = update
                stats.count(update)
            if stale_chains:
                stale[table] = TableUpdate(delete_chains=stale_chains)
        if updates:
            self._nf.apply(updates)  # first: the jumps need their chains
        for table, state in states.items():
            self._nf.ensure_jumps(table, self._jumps[table])
            if sorted(state.jumps) != sorted((j.chain, j.spec) for j in self._jumps[table]):
                stats.notes.append(f"{table} jumps")
        if stale:  # last: nothing of ours jumps there any more
            try:
                self._nf.apply(stale)
                stats.notes.append("stale chains")
            except KernelError as exc:  # a foreign rule still jumps there: leave it
                log.warning("stale_chains_kept", error=str(exc))
        if not self._others_cleaned:
            self._clean_others()
        return stats

    def _flush_blocking(self) -> None:
        updates = {}
        for table in TABLES:
            chains = self._nf.read(table).chains
            if table == NAT:
                self._dead_tcp = tcp_redirects(chains)
            if chains:
                updates[table] = TableUpdate(replace={chain: [] for chain in chains})
        self._nf.apply(updates)
        self._clean_others()

    def _clean_others(self) -> None:
        """A previous run on the other backend would still steer traffic to dead ports."""
        for other in self._others:
            try:
                other.delete_everything()
            except KernelError as exc:
                log.warning("other_backend_cleanup_failed", backend=other.backend, error=str(exc))
        self._others_cleaned = True

    async def _flush_udp(self, portals: Mapping[ServicePortName, Portal], changed: Changed) -> None:
        """Delete UDP flows whose portal appeared, vanished or now leads to another port: they
        keep the NAT decision of their first datagram for as long as the client keeps talking."""
        known = self._udp
        if known is None or changed is None:
            family = self._family
            fresh = {name: udp_destinations({name: p}, family) for name, p in portals.items()}
            fresh = {name: dests for name, dests in fresh.items() if dests}
            if known is None:  # a previous run's flows point at its dead proxy ports
                stale = [m for dests in fresh.values() for m in dests]
            else:
                stale = _moved(_flat(known), _flat(fresh))
            self._udp = fresh
        else:
            stale = []
            for name in changed:
                before = known.pop(name, {})
                portal = portals.get(name)
                after = udp_destinations({name: portal}, self._family) if portal is not None else {}
                if after:
                    known[name] = after
                stale += _moved(before, after)
        if known is None:  # TCP connections made before these portals were in had no NAT
            stale += tcp_destinations(portals, self._family)
            # ...and those a previous run steered to its proxy ports are refused there.
            live = {
                port
                for p in portals.values()
                if p.service.protocol == Protocol.TCP
                for port in (p.proxy_port, p.external_port)
            }
            stale += [
                UdpFlowMatch.tcp_redirected(ip, port, dead)
                for ip, port, dead in sorted(self._dead_tcp, key=str)
                if dead not in live
            ]
            self._dead_tcp = set()
        if stale:
            unique = set(stale)
            await self._conntrack(sorted(unique, key=lambda m: (m.ip or "", m.port, m.tcp)))


def _flat(
    per_portal: Mapping[ServicePortName, Mapping[UdpFlowMatch, int]],
) -> dict[UdpFlowMatch, int]:
    return {m: port for dests in per_portal.values() for m, port in dests.items()}


def _moved(
    before: Mapping[UdpFlowMatch, int], after: Mapping[UdpFlowMatch, int]
) -> list[UdpFlowMatch]:
    return [m for m in before.keys() | after.keys() if before.get(m) != after.get(m)]
