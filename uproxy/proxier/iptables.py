"""iptables mode: netfilter's NAT rules pick the endpoint; no packet passes through Python.

The rules (see `iptables_rules`) are rendered per service port from the model, and the kernel is
converged to them through the injected `Netfilter` backend (legacy or nft), like kube-proxy:

* A partial sync (the kernel is trusted, the full sync is not due) re-renders only the service
  ports that changed and writes only their difference: their own SVC/SVL/EXT/SEP chains are
  rewritten, chains of removed ports deleted, their dispatch rules in the shared chains added and
  deleted one by one. Unchanged ports cost a dictionary lookup.
* A full sync (the first, every --sync-period, after any failed write) reads uproxy's chains back
  from the kernel and converges them to the complete desired state: stale chains of a killed run
  or of another uproxy mode (userspace portals, IPVS masquerading) are removed, rules deleted by
  hand restored, and the jumps from the built-in chains made exact. Rules that are not uproxy's
  are never touched. The first one also removes what uproxy left in the other iptables backend
  and what the IPVS mode left outside netfilter (injected cleaners).

One proxier serves one IP family (its backend's and its context's: iptables or ip6tables), as
kube-proxy's: it takes only the service ports with a ClusterIP of its family, and of those only
that family's addresses and endpoints; `families.PerFamily` puts two side by side.

UDP has no connection to end, so a client that keeps sending keeps its conntrack entry and with
it the NAT decision of its first datagram. After each successful write the entries that would go
to the old place are deleted (kube-proxy's pkg/proxy/conntrack): those whose reply source is an
endpoint that was removed, and those to the virtual addresses of a UDP port that just got its
first endpoint (or lost an address), whose datagrams were rejected or not NATed at all.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field

import structlog

from uproxy.addresses import of_family
from uproxy.dataplane.stats import PortStats
from uproxy.endpoints import EndpointSelection
from uproxy.errors import KernelError
from uproxy.kernel.conntrack import UdpFlowCleaner, UdpFlowMatch
from uproxy.kernel.netfilter import Family, Netfilter, TableUpdate
from uproxy.model import Endpoint, ProxyState, ServicePort, ServicePortName
from uproxy.proxier.base import Changed, PortView, SyncCounters
from uproxy.proxier.iptables_diff import Change, converge_table, partial_updates, rules_written
from uproxy.proxier.iptables_rules import (
    TABLES,
    PortRules,
    RuleContext,
    assemble,
    family_endpoints,
    jumps,
    render_port,
    select,
    serves,
    tails,
)
from uproxy.proxier.udp_flows import stale_udp_flows
from uproxy.threads import in_thread

log = structlog.get_logger(__name__)

Cleaner = Callable[[], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class _Port:
    """One service port as last rendered."""

    service: ServicePort
    endpoints: tuple[Endpoint, ...]
    selection: EndpointSelection
    rules: PortRules
    node_zone: str  # topology hints are judged against it


@dataclass
class _Written:
    rules: int = 0
    repaired: list[str] = field(default_factory=list)


class IptablesProxier:
    """The `Proxier` protocol on iptables NAT rules. One sync at a time; kernel work in a thread."""

    def __init__(
        self,
        netfilter: Netfilter,
        *,
        context: RuleContext,
        conntrack: UdpFlowCleaner,
        resync_period: float = 30.0,
        other_backends: Sequence[Netfilter] = (),
        leftovers: Sequence[Cleaner] = (),
        cleanup_on_exit: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if netfilter.family != context.family:
            raise ValueError(
                f"an IPv{context.family} rule context on an IPv{netfilter.family} backend"
            )
        self._nf = netfilter
        self._ctx = context
        self._family = context.family
        self._tails = tails(context)
        self._jumps = jumps()
        self._conntrack = conntrack
        self._resync_period = resync_period
        self._others = other_backends
        self._leftovers = leftovers
        self._cleanup_on_exit = cleanup_on_exit
        self._clock = clock
        self._lock = asyncio.Lock()
        # While `_trusted`, the kernel holds exactly what `_ports` renders; a failed write clears
        # it until a full sync has read the kernel back.
        self._ports: dict[ServicePortName, _Port] = {}
        self._trusted = False
        self._last_full = float("-inf")
        self._first = True  # nothing known of what a previous run left (conntrack included)
        self._flows: set[UdpFlowMatch] = set()  # to delete once the rules are in force
        self._unseen: set[ServicePortName] = set()  # views to refresh once the rules are in force
        self._views: dict[ServicePortName, PortView] = {}
        self._counters = SyncCounters()
        self._closed = False

    @property
    def backend(self) -> str:
        return self._nf.backend

    @property
    def family(self) -> Family:
        return self._family

    # -- Proxier -----------------------------------------------------------------------------

    async def sync(self, state: ProxyState, changed: Changed = None) -> None:
        async with self._lock:
            started = self._clock()
            due = started - self._last_full >= 0.9 * self._resync_period
            trusted, self._trusted = self._trusted, False  # until this sync has succeeded
            if not trusted or due:
                changed = None  # a full sync converges to everything, so look at everything
            changes = self._render(state, changed)
            self._unseen.update(name for name, _ in changes)
            kind = "full"
            if trusted and not due:
                try:
                    written = await self._partial([c for _, c in changes])
                    kind = "partial"
                except KernelError as exc:
                    # Someone changed uproxy's chains behind its back: read them and converge.
                    log.warning(
                        "iptables_partial_sync_failed",
                        family=self._family,
                        error=str(exc),
                        action="full sync",
                    )
                    self._counters.partial_failures += 1
            if kind == "full":
                written = await self._full(trusted)
                self._last_full = started
            self._trusted = True
            self._count(kind, written.rules)
            await self._cleanup_leftovers()
            await self._flush_flows()
            unseen, self._unseen = self._unseen, set()
            for name in unseen:
                self._update_view(name)
            (log.info if written.rules or written.repaired else log.debug)(
                "iptables_synced",
                kind=kind,
                backend=self._nf.backend,
                family=self._family,
                service_ports=len(self._ports),
                changed_ports=len(changes),
                rules_written=written.rules,
                repaired=written.repaired,
                duration_ms=round((self._clock() - started) * 1000, 2),
            )

    async def shutdown(self, grace: float) -> None:
        """The kernel keeps forwarding without uproxy, so nothing waits; with --cleanup-on-exit
        every chain of uproxy's goes."""
        del grace
        if self._closed:
            return
        self._closed = True
        if self._cleanup_on_exit:
            async with self._lock:
                self._trusted = False
                await in_thread(self._nf.delete_everything)
            log.info("iptables_cleaned", backend=self._nf.backend, family=self._family)

    def view(self) -> list[PortView]:
        return list(self._views.values())

    def sync_counters(self) -> SyncCounters:
        return self._counters

    # -- rendering ---------------------------------------------------------------------------

    def _render(self, state: ProxyState, changed: Changed) -> list[tuple[ServicePortName, Change]]:
        """Render the service ports that differ from the last sync; their names and rules before
        and after. `changed` narrows the look to those ports; None compares every one (cheap:
        an identity test per unchanged port, since unchanged ports keep their objects)."""
        names: Iterable[ServicePortName]
        if changed is None:
            names = [*state.services, *(n for n in self._ports if n not in state.services)]
        else:
            names = changed
        out: list[tuple[ServicePortName, Change]] = []
        first = self._first
        for name in names:
            old = self._ports.get(name)
            svc = state.services.get(name)
            if svc is not None and not serves(svc, self._family):
                svc = None  # the other family's proxier takes it
            if svc is None:
                if old is not None:
                    del self._ports[name]
                    out.append((name, Change(old.rules, None)))
                    self._flows |= stale_udp_flows(old, None)
                continue
            endpoints = tuple(state.endpoints.get(name, ()))
            if (
                old is not None
                and (old.service is svc or old.service == svc)
                and (old.endpoints is endpoints or old.endpoints == endpoints)
                and old.node_zone == state.node_zone
            ):
                continue
            chosen = select(endpoints, svc, self._ctx.node_name, state.node_zone, self._family)
            new = _Port(
                svc, endpoints, chosen, render_port(svc, chosen, self._ctx), state.node_zone
            )
            self._ports[name] = new
            out.append((name, Change(old.rules if old is not None else None, new.rules)))
            # A previous run's flows may point anywhere: treat every port as new.
            self._flows |= stale_udp_flows(None if first else old, new)
        self._first = False
        return out

    def _update_view(self, name: ServicePortName) -> None:
        port = self._ports.get(name)
        if port is None:
            self._views.pop(name, None)
            return
        self._views[name] = PortView(
            service=port.service,
            proxy_port=0,  # no proxy port: the kernel forwards the service port itself
            endpoints=family_endpoints(port.endpoints, self._family),
            in_use=frozenset(port.selection.reachable),
            per_endpoint={},
            connections=0,
            affinity_entries=0,
            stats=PortStats(),
        )

    def _count(self, kind: str, rules: int) -> None:
        if kind == "full":
            self._counters.full_syncs += 1
        else:
            self._counters.partial_syncs += 1
        self._counters.rules_written += rules

    # -- converging the kernel ---------------------------------------------------------------

    async def _partial(self, changes: Sequence[Change]) -> _Written:
        updates = partial_updates(changes, self._tails)
        if updates:
            await in_thread(self._nf.apply, updates)
        return _Written(sum(rules_written(u) for u in updates.values()))

    async def _full(self, trusted: bool) -> _Written:
        desired = assemble((self._ports[name].rules for name in sorted(self._ports)), self._ctx)
        written = await in_thread(self._converge, desired)
        if trusted and written.repaired:
            log.warning(
                "iptables_drift_repaired",
                backend=self._nf.backend,
                family=self._family,
                rules_written=written.rules,
                repaired=written.repaired,
            )
        return written

    def _converge(self, desired: dict[str, dict[str, list[str]]]) -> _Written:
        """Read each table back and make uproxy's part of it exactly `desired`. Blocks."""
        written = _Written()
        states = {table: self._nf.read(table) for table in TABLES}
        updates: dict[str, TableUpdate] = {}
        stale: dict[str, TableUpdate] = {}
        for table, state in states.items():
            update, stale_chains = converge_table(table, state.chains, desired[table], self._tails)
            if update:
                updates[table] = update
                written.rules += rules_written(update)
                written.repaired.append(f"{table} rules")
            if stale_chains:
                stale[table] = TableUpdate(delete_chains=stale_chains)
        if updates:
            self._nf.apply(updates)  # first: the jumps need their chains
        for table, state in states.items():
            self._nf.ensure_jumps(table, self._jumps[table])
            wanted = sorted((j.chain, j.spec) for j in self._jumps[table])
            if sorted(state.jumps) != wanted:
                written.repaired.append(f"{table} jumps")
        if stale:  # last: nothing of ours jumps there any more
            try:
                self._nf.apply(stale)
                written.repaired.append("stale chains")
            except KernelError as exc:  # a foreign rule still jumps there: leave it
                log.warning(
                    "stale_chains_kept",
                    backend=self._nf.backend,
                    family=self._family,
                    error=str(exc),
                )
        return written

    async def _cleanup_leftovers(self) -> None:
        """Once: what uproxy left in the other iptables backend and outside netfilter (IPVS)."""
        others, self._others = self._others, ()
        for other in others:
            try:
                await in_thread(other.delete_everything)
            except KernelError as exc:
                log.warning(
                    "other_backend_cleanup_failed",
                    backend=other.backend,
                    family=other.family,
                    error=str(exc),
                )
        leftovers, self._leftovers = self._leftovers, ()
        for cleaner in leftovers:
            try:
                await cleaner()
            except KernelError as exc:
                log.warning("leftover_cleanup_failed", error=str(exc))

    async def _flush_flows(self) -> None:
        # A dual-stack port's matches name both families' addresses; this family's conntrack
        # table holds only its own (None: a NodePort on any address).
        flows = {m for m in self._flows if m.ip is None or of_family([m.ip], self._family)}
        self._flows = set()
        if flows:
            await self._conntrack(sorted(flows, key=lambda m: (m.reply, m.ip or "", m.port)))
