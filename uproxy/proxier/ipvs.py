"""IPVS mode: the service model handed to the kernel's IP Virtual Server; no bytes pass through
Python.

What a sync makes the kernel hold (kube-proxy's IPVS mode where that mode is right):

* A dummy interface `uproxy-ipvs0` with every ClusterIP, externalIP and LoadBalancer IP as /32
  (/128, without duplicate address detection), so the kernel takes packets to them as local and
  IPVS (hooked at LOCAL_IN/LOCAL_OUT) sees them.
* One virtual server per (address, port, protocol), and for a NodePort one per node address
  (the node's unicast addresses, minus loopback, link-local and uproxy-ipvs0's own, narrowed by
  --nodeport-addresses). Scheduler from --ipvs-scheduler; ClientIP affinity is persistence with
  the service's timeout. Real servers have weight 1 and are masqueraded (IPVS NAT).
* IPv6 the same way: IPVS itself is family-agnostic, but masquerading cannot cross families, so
  a virtual server gets only its own family's real servers (a dual-stack service has one virtual
  server per ClusterIP, each with its family's EndpointSlice), and a NodePort sits on the node
  addresses of the families the service has ClusterIPs of.
* nat chain UPROXY-IPVS-POSTROUTING (jumped to from POSTROUTING), in iptables for IPv4 virtual
  servers and in ip6tables for IPv6 ones, with MASQUERADE for what IPVS
  NAT alone gets wrong: node-local clients (their source is the virtual address itself, which
  a backend elsewhere would answer to its own node), hairpin connections (a backend scheduled to
  itself would answer itself directly) and traffic to NodePorts, externalIPs and LoadBalancer IPs
  (whose replies must come back through this node), except external traffic to services with
  externalTrafficPolicy Local, which keeps the client's address.
* The sysctls IPVS forwarding needs: net.ipv4.vs.conntrack=1 (netfilter NAT, the MASQUERADE
  rules, must see IPVS connections), expire_nodest_conn=1 and expire_quiescent_template=1 (a
  deleted or weight-0 real server gets no more packets or persistent clients), ip_forward=1;
  with --ipvs-strict-arp also arp_ignore=1/arp_announce=2, so the node does not answer ARP for
  the addresses on uproxy-ipvs0 (IPv6 needs nothing alike: the node answers neighbour
  solicitations only for the addresses of the interface they arrive on). IPv6 forwarding
  (net.ipv6.conf.all.forwarding) is checked, not set: turning it on makes the node ignore router
  advertisements; `ipv6_forwarding_off` says when it is off.
* A family whose ip6tables/iptables is unavailable is left out (no virtual servers of it), as
  `build_ipvs_proxier` decides at start.

Ownership, which survives a restart: a virtual server is uproxy's when its address is on
uproxy-ipvs0, or when it is listed in the state file /run/uproxy/ipvs-virtual-servers, which
records every virtual server uproxy creates before it creates it (NodePort virtual servers sit on
node addresses, so the interface alone cannot tell). /run is a tmpfs, so the record lives exactly
as long as the kernel's IPVS table, which a reboot empties too. Everything else in IPVS is never
read twice or touched; kube-proxy's cleanup flushing all of IPVS is a known complaint. A virtual
server uproxy wants that already exists without being on record is someone else's: uproxy leaves
it exactly as it is (scheduler, real servers, all), logs `ipvs_foreign_virtual_server` once and
counts it (`foreign_clashes`), and takes it over only once its owner has deleted it.

Syncs are level-triggered: each reads the kernel's virtual servers and uproxy-ipvs0's addresses,
and the real servers of every virtual server whose desired state changed since the last sync
(of all of them on a full sync: the first, after a failure, and every --sync-period), diffs
against the desired state and changes only the difference.

Graceful termination (removed TCP real servers at weight 0 until drained) is in
`ipvs_termination.py`; the desired state is computed in `ipvs_desired.py`, ownership recorded in
`ipvs_owned.py`, and `ipvs_cleanup.py` removes it all.

Every netlink call runs on one dedicated worker thread (`Worker`); the event loop only computes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Protocol as TypingProtocol

import structlog

from uproxy.dataplane.stats import PortStats
from uproxy.errors import KernelError
from uproxy.kernel.conntrack import UdpFlowCleaner, UdpFlowMatch
from uproxy.kernel.ipvs import (
    DUMMY_INTERFACE,
    PROC_IPVS,
    SCHEDULERS,
    DestInfo,
    Ipvs,
    IpvsError,
    IpvsHost,
    RealServer,
    ServiceInfo,
    VirtualServer,
    Worker,
    ip_family,
)
from uproxy.kernel.netfilter import Family, Netfilter, TableUpdate
from uproxy.model import Protocol, ProxyState, ServicePortName
from uproxy.proxier.base import Changed, PortView
from uproxy.proxier.ipvs_cleanup import cleanup_blocking
from uproxy.proxier.ipvs_desired import (
    FAMILIES,
    FILTER,
    FIREWALL_CHAIN,
    FIREWALL_JUMP,
    IPV6_FORWARDING,
    NAT,
    POSTROUTING_CHAIN,
    POSTROUTING_JUMP,
    REQUIRED_SYSCTLS,
    STATE_FILE,
    STRICT_ARP_SYSCTLS,
    WEIGHT,
    Desired,
    DesiredServer,
    compute_desired,
    ip_sort_key,
    masquerade_rules,
    nodeport_ips,
)
from uproxy.proxier.ipvs_owned import OwnedServers
from uproxy.proxier.ipvs_termination import IpvsChanges, Observed, Terminations

log = structlog.get_logger(__name__)

# -- the stateful part: converging the kernel -------------------------------------------------


class Capabilities(TypingProtocol):
    def available(self) -> str | None:
        """None when the kernel has IPVS, else why not."""

    def scheduler_available(self, scheduler: str) -> bool:
        """Whether the kernel has (or loads on demand) this IPVS scheduler."""


class IpvsProxier:
    """The `Proxier` protocol on IPVS. One sync (or reap) at a time; kernel work on `worker`.

    One proxier serves both families (IPVS, uproxy-ipvs0 and the ownership record are shared):
    `netfilter` is IPv4's iptables, `netfilter6` IPv6's ip6tables (None: no rules in it),
    `conntrack` flushes IPv4's UDP flows and `conntrack6` IPv6's (None: `conntrack` does),
    `families` the ones served."""

    def __init__(
        self,
        *,
        ipvs: Ipvs,
        host: IpvsHost,
        netfilter: Netfilter | None,
        netfilter6: Netfilter | None = None,
        families: Sequence[Family] = FAMILIES,
        worker: Worker | None = None,
        scheduler: str = "rr",
        graceful_period: float = 15.0,
        node_name: str = "",
        nodeport_addresses: Sequence[str] = (),
        strict_arp: bool = False,
        resync_period: float = 30.0,
        state_file: Path | None = STATE_FILE,
        conntrack: UdpFlowCleaner,
        conntrack6: UdpFlowCleaner | None = None,
        clock: Callable[[], float] = time.monotonic,
        housekeeping_interval: float | None = 1.0,
        stats_period: float = 10.0,
        cleanup_on_exit: bool = False,
    ) -> None:
        self._ipvs = ipvs
        self._host = host
        self._netfilters = {nf.family: nf for nf in (netfilter, netfilter6) if nf is not None}
        self._families = tuple(families)
        self._own_worker = worker is None
        self._worker = worker or Worker()
        self._scheduler = scheduler
        self._node_name = node_name
        self._cidrs = tuple(nodeport_addresses)
        self._strict_arp = strict_arp
        self._resync_period = resync_period
        self._journal = OwnedServers(state_file)
        self._conntrack: dict[Family, UdpFlowCleaner] = {4: conntrack, 6: conntrack6 or conntrack}
        self._clock = clock
        self._interval = housekeeping_interval
        self._stats_period = stats_period
        self._cleanup_on_exit = cleanup_on_exit
        self._lock = asyncio.Lock()
        self._housekeeper: asyncio.Task[None] | None = None
        self._closed = False
        # Kernel-side bookkeeping; only the worker thread touches it, one job at a time.
        self._observed: Observed = {}
        self._terminations = Terminations(
            ipvs, graceful_period, self._observed, self._delete_service, self._forget
        )
        self._service_info: dict[VirtualServer, ServiceInfo] = {}
        self._applied: dict[VirtualServer, DesiredServer] = {}
        self._rules: dict[Family, tuple[list[str], list[str]]] = {}  # as last written
        self._warned_forwarding = False
        self._trusted = False
        self._last_full = float("-inf")
        self._next_stats = float("-inf")
        # What the loop thread reads.
        self._state = ProxyState()
        self._desired = Desired({}, frozenset())  # of the last successful sync
        self._target = self._desired  # of the latest sync, successful or not
        self._views: list[PortView] = []
        # Virtual servers uproxy wants but someone else made: never touched (worker thread).
        self._foreign: set[VirtualServer] = set()
        self.foreign_clashes = 0  # clashes found since start, each counted once

    # --- Proxier -------------------------------------------------------------------------------

    async def sync(self, state: ProxyState, changed: Changed = None) -> None:
        async with self._lock:
            started = self._clock()
            node_ips: list[str] = []
            found: list[str] = []
            if any(s.node_port or s.load_balancer_source_ranges for s in state.services.values()):
                found = await self._worker.run(self._host.node_addresses, DUMMY_INTERFACE)
                node_ips = nodeport_ips(found, self._cidrs)
            desired = compute_desired(
                state,
                scheduler=self._scheduler,
                node_name=self._node_name,
                node_ips=node_ips,
                node_addresses=found,
                families=self._families,
            )
            for conflict in desired.conflicts:
                log.warning("ipvs_conflict", detail=conflict)
            full = not self._trusted or started - self._last_full >= 0.9 * self._resync_period
            self._trusted = False  # until this sync has succeeded
            self._target = desired
            result = await self._worker.run(self._converge, desired, full)
            self._trusted = True
            if full:
                self._last_full = started
            self._state, self._desired = state, desired
            await self._flush(result.flush)
            self._rebuild_views()
            (log.info if result.changed else log.debug)(
                "ipvs_synced",
                mode="full" if full else "changes",
                virtual_servers=len(desired.servers),
                addresses=len(desired.addresses),
                services_added=result.services_added,
                services_changed=result.services_changed,
                services_removed=result.services_removed,
                dests_added=result.dests_added,
                dests_quiesced=result.dests_quiesced,
                dests_removed=result.dests_removed,
                terminating=len(self._terminations.terminating),
                rules_rewritten=result.rules,
                duration_ms=round((self._clock() - started) * 1000, 2),
            )
        self._start_housekeeper()

    async def shutdown(self, grace: float) -> None:
        """Stop uproxy's own work. The kernel keeps forwarding (and draining) without uproxy, so
        nothing waits for connections; with --cleanup-on-exit everything uproxy made goes."""
        if self._housekeeper is not None:
            self._housekeeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._housekeeper
            self._housekeeper = None
        if self._cleanup_on_exit and not self._closed:
            async with self._lock:
                await self._worker.run(self._cleanup_blocking)
            log.info("ipvs_cleaned")
        if not self._closed:
            self._closed = True
            await asyncio.to_thread(self._worker.close)

    def view(self) -> list[PortView]:
        return list(self._views)

    # --- graceful termination and statistics, between syncs -----------------------------------

    async def housekeep(self) -> None:
        """Delete terminating real servers that drained or ran out of time, and refresh the
        connection counts when due. The housekeeping task calls this every interval."""
        async with self._lock:
            if self._closed:
                return
            now = self._clock()
            stats = now >= self._next_stats
            if not (self._terminations or stats):
                return
            result = await self._worker.run(self._housekeep_blocking, stats)
            await self._flush(result.flush)
            self._rebuild_views()
            if result.changed:
                log.info(
                    "ipvs_reaped",
                    dests_removed=result.dests_removed,
                    services_removed=result.services_removed,
                    connections_cut=result.cut_short,
                    terminating=len(self._terminations.terminating),
                )

    @property
    def terminating(self) -> dict[tuple[VirtualServer, RealServer], float]:
        """Real servers at weight 0 waiting to be deleted, with their deadlines."""
        return dict(self._terminations.terminating)

    def _start_housekeeper(self) -> None:
        if self._interval is None or self._housekeeper is not None or self._closed:
            return
        self._housekeeper = asyncio.get_running_loop().create_task(
            self._housekeep_forever(self._interval), name="ipvs-housekeeping"
        )

    async def _housekeep_forever(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.housekeep()
            except KernelError as exc:
                log.warning("ipvs_housekeeping_failed", error=str(exc))
            except Exception:
                # A bug must not stop graceful termination for good; the next round retries.
                log.exception("ipvs_housekeeping_crashed")

    # --- internals on the worker thread -----------------------------------------------------

    def _converge(self, desired: Desired, full: bool) -> IpvsChanges:
        ipvs, host = self._ipvs, self._host
        now = self._clock()
        result = IpvsChanges()
        if full:
            self._ensure_sysctls(desired)
        host.ensure_dummy(DUMMY_INTERFACE)
        bound = host.dummy_addresses(DUMMY_INTERFACE)
        actual = ipvs.services()
        recorded = self._journal.load()
        # Everything uproxy creates is recorded first, so a desired virtual server in the kernel
        # but not on record was made by someone else, whatever address it sits on.
        clashes = (desired.servers.keys() & actual.keys()) - recorded
        for vs in sorted(clashes - self._foreign):
            self.foreign_clashes += 1
            log.warning(
                "ipvs_foreign_virtual_server",
                virtual_server=str(vs),
                action="left untouched; this service port is not served by uproxy",
                hint="delete it (ipvsadm -D) and uproxy takes the address over at its next sync",
            )
        self._foreign = (self._foreign & actual.keys()) | clashes
        owned = {vs for vs in actual if vs.ip in bound or vs in recorded} - self._foreign
        # Written ahead: whatever exists after a crash in the middle is on record. Entries the
        # kernel no longer has go (nothing else writes IPVS from uproxy: one worker thread).
        self._journal.discard(recorded - actual.keys())
        self._journal.add((desired.servers.keys() | owned) - self._foreign)
        for ip in sorted(desired.addresses - bound, key=ip_sort_key):
            host.add_address(DUMMY_INTERFACE, ip)
            result.addresses_added += 1
        fresh: set[VirtualServer] = set()
        for vs, want in desired.servers.items():
            if vs in self._foreign:
                continue
            self._terminations.draining.discard(vs)
            info = actual.get(vs)
            if info is None:
                ipvs.add_service(vs, want.config)
                result.services_added += 1
                have: dict[RealServer, DestInfo] = {}
            else:
                if info.config != want.config:
                    ipvs.set_service(vs, want.config)
                    result.services_changed += 1
                if full or self._applied.get(vs) != want or self._terminations.has_terminating(vs):
                    have = ipvs.dests(vs)
                    fresh.add(vs)
                else:
                    have = self._observed.get(vs, {})
            self._converge_dests(vs, want, have, now, result)
            self._applied[vs] = want
        for vs in list(self._applied):
            if vs not in desired.servers or vs in self._foreign:
                del self._applied[vs]
        for vs in sorted(owned - desired.servers.keys()):
            self._terminations.drain_service(vs, now, result)
            fresh.add(vs)
        self._terminations.reap(now, result, fresh)
        keep = desired.addresses | {vs.ip for vs in self._terminations.draining}
        self._remove_addresses((bound | desired.addresses) - keep, result)
        self._service_info = {vs: i for vs, i in actual.items() if vs in self._observed}
        for family, nf in self._netfilters.items():
            rules = (masquerade_rules(desired, family), list(desired.firewall_of(family)))
            if full or rules != self._rules.get(family):
                self._rules.pop(family, None)
                result.rules = self._converge_netfilter(nf, *rules) or result.rules
                self._rules[family] = rules
        return result

    def _converge_dests(
        self,
        vs: VirtualServer,
        want: DesiredServer,
        have: Mapping[RealServer, DestInfo],
        now: float,
        result: IpvsChanges,
    ) -> None:
        observed = dict(have)
        had_usable = any(d.weight > 0 for d in have.values())
        for rs in sorted(want.dests):
            current = have.get(rs)
            if current is None:
                self._ipvs.add_dest(vs, rs, WEIGHT)
                observed[rs] = DestInfo(WEIGHT)
                result.dests_added += 1
            elif current.weight != WEIGHT or not current.masquerade:
                # Back from termination, or changed behind uproxy's back.
                self._ipvs.set_dest(vs, rs, WEIGHT)
                observed[rs] = replace(current, weight=WEIGHT, masquerade=True)
                result.dests_added += 1
            self._terminations.cancel(vs, rs)
        for rs in sorted(have.keys() - want.dests):
            self._terminations.retire_dest(vs, rs, have[rs], now, result, observed)
        self._observed[vs] = observed
        if vs.protocol is Protocol.UDP and want.dests and not had_usable:
            # Datagrams sent while there was no real server left conntrack entries that keep
            # the client's flow away from IPVS; the next datagram must be scheduled.
            result.flush.append(UdpFlowMatch.destination(vs.ip, vs.port))

    def _delete_service(self, vs: VirtualServer, result: IpvsChanges) -> None:
        self._ipvs.delete_service(vs)
        self._journal.discard([vs])
        self._forget(vs)
        result.services_removed += 1
        result.deleted.append(vs)

    def _forget(self, vs: VirtualServer) -> None:
        self._observed.pop(vs, None)
        self._service_info.pop(vs, None)
        self._terminations.forget(vs)

    def _remove_addresses(self, addresses: Iterable[str], result: IpvsChanges) -> None:
        for ip in sorted(addresses, key=ip_sort_key):
            self._host.delete_address(DUMMY_INTERFACE, ip)
            result.addresses_removed += 1

    def _housekeep_blocking(self, stats: bool) -> IpvsChanges:
        now = self._clock()
        result = IpvsChanges()
        fresh: set[VirtualServer] = set()
        if stats:
            started = time.monotonic()
            self._service_info = {
                vs: info for vs, info in self._ipvs.services().items() if vs in self._observed
            }
            for vs in list(self._observed):
                with contextlib.suppress(IpvsError):
                    self._observed[vs] = self._ipvs.dests(vs)
                    fresh.add(vs)
            # Never spend more than ~5% of the time on statistics, however many services.
            self._next_stats = now + max(self._stats_period, 20 * (time.monotonic() - started))
        if self._terminations:
            self._terminations.reap(now, result, fresh)
            # Only the addresses of the services this round deleted: anything else is the next
            # sync's to judge, with the kernel's whole state in hand.
            keep = self._target.addresses | {vs.ip for vs in self._terminations.draining}
            self._remove_addresses({vs.ip for vs in result.deleted} - keep, result)
        return result

    def _ensure_sysctls(self, desired: Desired) -> None:
        wanted = REQUIRED_SYSCTLS + (STRICT_ARP_SYSCTLS if self._strict_arp else ())
        for key, value in wanted:
            current = self._host.read_sysctl(key)
            if current is None:
                raise KernelError(f"sysctl {key} does not exist (is the ip_vs module loaded?)")
            if current != value:
                self._host.write_sysctl(key, value)
                log.info("sysctl_set", key=key, value=value, was=current)
        if (
            desired.has_family(6)
            and not self._warned_forwarding
            and self._host.read_sysctl(IPV6_FORWARDING) == "0"
        ):
            self._warned_forwarding = True
            log.warning(
                "ipv6_forwarding_off",
                sysctl=IPV6_FORWARDING,
                impact="IPv6 virtual servers answer only clients on this node and masqueraded "
                "traffic (NodePorts, external IPs); replies to other clients are not forwarded",
                hint=f"set {IPV6_FORWARDING}=1 (with accept_ra=2 where the node takes its "
                "IPv6 route from router advertisements)",
            )

    def _converge_netfilter(self, nf: Netfilter, rules: list[str], firewall: list[str]) -> bool:
        """Make UPROXY-IPVS-POSTROUTING exactly `rules` and UPROXY-IPVS-FIREWALL `firewall`
        (no chain when empty) with their jumps, and remove what another uproxy mode left in nat
        and filter (its portals would steal the virtual addresses' traffic before IPVS sees
        it). True when something was rewritten."""
        nat, filter_ = nf.read(NAT), nf.read(FILTER)
        rewritten = nat.chains.get(POSTROUTING_CHAIN) != rules
        if rewritten:
            nf.apply({NAT: TableUpdate(replace={POSTROUTING_CHAIN: rules})})
        nf.ensure_jumps(NAT, (POSTROUTING_JUMP,))
        keep = {NAT: {POSTROUTING_CHAIN}, FILTER: {FIREWALL_CHAIN} if firewall else set()}
        if firewall and filter_.chains.get(FIREWALL_CHAIN) != firewall:
            nf.apply({FILTER: TableUpdate(replace={FIREWALL_CHAIN: firewall})})
            rewritten = True
        if filter_.jumps or firewall:
            nf.ensure_jumps(FILTER, (FIREWALL_JUMP,) if firewall else ())
        stale = {
            table: TableUpdate(delete_chains=[c for c in state.chains if c not in keep[table]])
            for table, state in ((NAT, nat), (FILTER, filter_))
            if any(c not in keep[table] for c in state.chains)
        }
        if stale:
            try:
                nf.apply(stale)
            except KernelError as exc:  # a foreign rule still jumps there: leave it
                log.warning("stale_chains_kept", error=str(exc))
            rewritten = True
        return rewritten

    def _cleanup_blocking(self) -> None:
        cleanup_blocking(
            self._ipvs, self._host, self._journal, self._netfilters.values(), self._foreign
        )
        self._terminations.clear()
        self._observed.clear()
        self._applied.clear()
        self._trusted = False
        self._rules.clear()

    # --- internals on the loop thread ---------------------------------------------------------

    async def _flush(self, matches: Sequence[UdpFlowMatch]) -> None:
        # Each family's conntrack table is flushed on its own (conntrack -f ipv4/ipv6).
        by_family: dict[Family, set[UdpFlowMatch]] = {}
        for match in matches:
            families = FAMILIES if match.ip is None else (ip_family(match.ip),)
            for family in families:
                by_family.setdefault(family, set()).add(match)
        for family in sorted(by_family):
            ordered = sorted(by_family[family], key=lambda m: (m.ip or "", m.port))
            await self._conntrack[family](ordered)

    def _rebuild_views(self) -> None:
        by_owner: dict[ServicePortName, list[DesiredServer]] = {}
        for server in self._desired.servers.values():
            by_owner.setdefault(server.owner, []).append(server)
        views = []
        for name, svc in self._state.services.items():
            endpoints = self._state.endpoints.get(name, ())
            per_rs: dict[RealServer, int] = {}
            persistent = total = bytes_in = bytes_out = 0
            in_use: set[RealServer] = set()
            for server in by_owner.get(name, ()):
                in_use |= server.dests
                for rs, dest in self._observed.get(server.vs, {}).items():
                    # TCP: established connections; UDP: the kernel's UDP entries (sessions).
                    count = dest.active if svc.protocol is Protocol.TCP else dest.inactive
                    per_rs[rs] = per_rs.get(rs, 0) + count
                    persistent += dest.persistent
                info = self._service_info.get(server.vs)
                if info is not None:
                    total += info.connections
                    bytes_in += info.bytes_in
                    bytes_out += info.bytes_out
            per_endpoint = {
                e: per_rs.get(RealServer(e.ip, e.port), 0)
                for e in endpoints
                if RealServer(e.ip, e.port) in per_rs
            }
            connections = sum(per_rs.values())
            views.append(
                PortView(
                    service=svc,
                    proxy_port=svc.port,  # no proxy port: IPVS forwards the service port itself
                    endpoints=endpoints,
                    in_use=frozenset(e for e in endpoints if RealServer(e.ip, e.port) in in_use),
                    per_endpoint=per_endpoint,
                    connections=connections,
                    affinity_entries=persistent,
                    stats=PortStats(
                        active=connections, total=total, bytes_in=bytes_in, bytes_out=bytes_out
                    ),
                )
            )
        self._views = views


# -- building it -------------------------------------------------------------------------------


def ipvs_available(proc: Path = PROC_IPVS) -> bool:
    return proc.exists()


def check_capabilities(kernel: Capabilities, scheduler: str) -> None:
    """Refuse to start, with a message saying what to do, when IPVS mode cannot work."""
    why = kernel.available()
    if why is not None:
        raise KernelError(
            "IPVS mode needs the kernel's IP_VS support, which this kernel does not have "
            f"({why}; where the module exists, 'modprobe ip_vs' loads it); "
            "run with --mode userspace instead"
        )
    if scheduler not in SCHEDULERS:
        raise KernelError(
            f"unknown IPVS scheduler {scheduler!r} (choose one of {', '.join(SCHEDULERS)})"
        )
    if not kernel.scheduler_available(scheduler):
        raise KernelError(
            f"this kernel has no IPVS scheduler {scheduler!r} (module ip_vs_{scheduler}); "
            f"load it with 'modprobe ip_vs_{scheduler}' or choose another --ipvs-scheduler "
            "(rr is the default)"
        )
