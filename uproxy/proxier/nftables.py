"""The nftables mode: the service model as one nftables table of uproxy's own, `ip uproxy`.

No packet passes through Python: the kernel's NAT picks the endpoint (see `nftables_rules` for
the table's structure). Every change is one `nft -f -` transaction, atomic as the kernel makes
it. A sync told which service ports changed rewrites only their chains and map elements; a full
sync (the first, after a failure, and every --sync-period) rewrites the whole table from the
model in one transaction (flushing and refilling every chain and map, never the affinity sets,
which hold live client state) and deletes whatever else is in it: a killed run's leftovers, or
an admin's edits.

UDP has no connection to end, so conntrack would keep a client's flow on a removed endpoint, or
on the "no endpoint" verdict, for as long as the client keeps sending. Those flows are deleted:
flows answered by a removed endpoint, and flows to a UDP service port that just got its first
endpoint (kube-proxy's long-standing stale-UDP bug class).
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from uproxy.dataplane.stats import PortStats
from uproxy.endpoints import EndpointSelection, categorize_endpoints
from uproxy.errors import KernelError
from uproxy.kernel.conntrack import UdpFlowCleaner, UdpFlowMatch
from uproxy.kernel.nft import Chain, Element, Listing, Map, Nft, Rule, Set, Transaction
from uproxy.model import Endpoint, ProxyState, ServicePort, ServicePortName
from uproxy.proxier.base import Changed, PortView, SyncCounters
from uproxy.proxier.nftables_rules import (
    NatConfig,
    PortObjects,
    render_port,
    static_chains,
    static_maps,
)
from uproxy.proxier.udp_flows import stale_udp_flows
from uproxy.threads import in_thread

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class _Rendered:
    service: ServicePort
    endpoints: tuple[Endpoint, ...]
    selection: EndpointSelection
    objects: PortObjects
    node_zone: str  # topology hints are judged against it


@dataclass
class SyncCounts:
    """What the last sync wrote, for logs and metrics."""

    operations: int = 0
    rules: int = 0
    full: bool = False


class NftablesProxier:
    """The `Proxier` protocol on nftables. One sync at a time; `nft` runs in a worker thread."""

    def __init__(
        self,
        *,
        nft: Nft,
        node_name: str,
        config: NatConfig,
        conntrack: UdpFlowCleaner,
        resync_period: float = 30.0,
        cleanup_on_exit: bool = False,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._nft = nft
        self._node_name = node_name
        self._config = config
        self._conntrack = conntrack
        self._resync_period = resync_period
        self._cleanup_on_exit = cleanup_on_exit
        self._clock = clock
        self._lock = asyncio.Lock()
        self._rendered: dict[ServicePortName, _Rendered] = {}
        # While trusted, the kernel's table is exactly what `_rendered` says.
        self._trusted = False
        self._last_full = float("-inf")
        self.last = SyncCounts()
        self._counters = SyncCounters()

    # --- Proxier -------------------------------------------------------------------------------

    async def sync(self, state: ProxyState, changed: Changed = None) -> None:
        async with self._lock:
            started = self._clock()
            due = started - self._last_full >= 0.9 * self._resync_period
            full = changed is None or not self._trusted or due
            names: Iterable[ServicePortName] = (
                self._rendered.keys() | state.services.keys()
                if changed is None or full
                else changed
            )
            trusted, self._trusted = self._trusted, False  # until this sync has succeeded
            before = {n: self._rendered.get(n) for n in names}
            for name in before:
                self._render(name, state)
            if full:
                await self._full(trusted)
            else:
                try:
                    await self._partial(before)
                except KernelError as exc:
                    # Someone changed uproxy's table behind its back: rewrite all of it.
                    log.warning("nftables_partial_failed", error=str(exc), action="full sync")
                    self._counters.partial_failures += 1
                    await self._full(trusted=False)
                    full = True
            self._trusted = True
            if full:
                self._last_full = started
                self._counters.full_syncs += 1
            else:
                self._counters.partial_syncs += 1
            self._counters.rules_written += self.last.rules
            await self._flush_udp(before, first=not trusted)
            (log.info if self.last.operations else log.debug)(
                "nftables_synced",
                mode="full" if full else "partial",
                service_ports=len(self._rendered),
                operations=self.last.operations,
                rules_written=self.last.rules,
                duration_ms=round((self._clock() - started) * 1000, 2),
            )

    async def shutdown(self, grace: float) -> None:
        """The kernel keeps forwarding without uproxy; --cleanup-on-exit removes the table."""
        if self._cleanup_on_exit:
            async with self._lock:
                await in_thread(self._nft.delete_table)
                self._trusted = False
            log.info("nftables_cleaned")

    def sync_counters(self) -> SyncCounters:
        return self._counters

    def view(self) -> list[PortView]:
        return [
            PortView(
                service=r.service,
                proxy_port=r.service.port,  # no proxy port: the kernel forwards the port itself
                endpoints=r.endpoints,
                in_use=frozenset(r.selection.reachable),
                per_endpoint={},
                connections=0,
                affinity_entries=0,
                stats=PortStats(),
            )
            for r in self._rendered.values()
        ]

    # --- internals -----------------------------------------------------------------------------

    def _render(self, name: ServicePortName, state: ProxyState) -> None:
        service = state.services.get(name)
        if service is None:
            self._rendered.pop(name, None)
            return
        # Like kube-proxy's per-family proxiers, each table sees only its family's endpoints (a
        # DNAT to the other family's address would fail the whole transaction).
        family = self._config.family
        endpoints = tuple(e for e in state.endpoints.get(name, ()) if _family(e.ip) == family)
        old = self._rendered.get(name)
        zone = state.node_zone
        if (
            old is not None
            and old.service == service
            and old.endpoints == endpoints
            and old.node_zone == zone
        ):
            return
        selection = categorize_endpoints(endpoints, service, self._node_name, zone)
        objects = render_port(service, selection, self._config)
        self._rendered[name] = _Rendered(service, endpoints, selection, objects, zone)

    async def _full(self, trusted: bool) -> None:
        listing = await in_thread(self._nft.listing)
        tx, rules, stale = self._full_transaction(listing)
        await in_thread(self._nft.apply, tx)
        self.last = SyncCounts(len(tx), rules, full=True)
        if trusted and stale:
            log.warning("nftables_stale_chains_removed", chains=stale)

    def _full_transaction(self, listing: Listing | None) -> tuple[Transaction, int, int]:
        """The whole table in one transaction; with how many rules it writes, and how many
        chains of someone else's (a killed run, an admin) it deletes."""
        chains: dict[str, tuple[Chain, tuple[str, ...]]] = {
            chain.name: (chain, rules) for chain, rules in static_chains(self._config)
        }
        sets: dict[str, Set] = {}
        elements: list[Element] = []
        for r in self._rendered.values():
            for name, rules in r.objects.chains:
                chains[name] = (Chain(name), rules)
            sets.update((s.name, s) for s in r.objects.sets)
            elements += r.objects.elements
        maps = static_maps(self._config)
        existing = listing or Listing()
        tx = Transaction()
        for m in maps:
            tx.add(m)
            tx.flush(m)
        for name in sorted(existing.chains):  # nothing may point at a chain about to go
            tx.flush(Chain(name))
        for s in sets.values():
            tx.add(s)  # an existing set keeps its clients: affinity survives a full sync
        for chain, _ in chains.values():
            tx.add(chain)
        rule_count = 0
        for chain, specs in chains.values():
            for spec in specs:
                tx.add(Rule(chain.name, spec))
            rule_count += len(specs)
        for element in elements:
            tx.add(element)
        stale = sorted(existing.chains - chains.keys())
        for name in stale:
            tx.delete(Chain(name))
        wanted_containers = sets.keys() | {m.name for m in maps}
        for name in sorted((existing.sets | existing.maps) - wanted_containers):
            tx.delete(Set(name, "") if name in existing.sets else Map(name, ""))
        return tx, rule_count, len(stale)

    async def _partial(self, before: Mapping[ServicePortName, _Rendered | None]) -> None:
        tx = Transaction()
        old_chains: dict[str, tuple[str, ...]] = {}
        new_chains: dict[str, tuple[str, ...]] = {}
        old_sets: dict[str, Set] = {}
        new_sets: dict[str, Set] = {}
        old_elements: set[Element] = set()
        new_elements: set[Element] = set()
        for port_name, old in before.items():
            new = self._rendered.get(port_name)
            if old is new:
                continue
            for objects, chains, sets, elements in (
                (old, old_chains, old_sets, old_elements),
                (new, new_chains, new_sets, new_elements),
            ):
                if objects is not None:
                    chains.update(objects.objects.chains)
                    sets.update((s.name, s) for s in objects.objects.sets)
                    elements.update(objects.objects.elements)
        for element in sorted(old_elements - new_elements, key=_element_order):
            tx.delete(Element(element.container, element.key))
        for name in new_sets.keys() - old_sets.keys():
            tx.add(new_sets[name])
        for name in new_chains.keys() - old_chains.keys():
            tx.add(Chain(name))
        rewritten = [n for n in new_chains if n in old_chains and new_chains[n] != old_chains[n]]
        removed = [n for n in old_chains if n not in new_chains]
        for name in (*rewritten, *removed):
            tx.flush(Chain(name))
        rules = 0
        for name, specs in new_chains.items():
            if name not in old_chains or name in rewritten:
                for spec in specs:
                    tx.add(Rule(name, spec))
                rules += len(specs)
        for element in sorted(new_elements - old_elements, key=_element_order):
            tx.add(element)
        for name in removed:
            tx.delete(Chain(name))
        for name in old_sets.keys() - new_sets.keys():
            tx.delete(old_sets[name])
        if tx:
            await in_thread(self._nft.apply, tx)
        self.last = SyncCounts(len(tx), rules, full=False)

    async def _flush_udp(
        self, before: Mapping[ServicePortName, _Rendered | None], first: bool
    ) -> None:
        matches: set[UdpFlowMatch] = set()
        for port_name, old in before.items():
            new = self._rendered.get(port_name)
            matches |= stale_udp_flows(None if first else old, new)
        if matches:
            await self._conntrack(sorted(matches, key=lambda m: (m.ip or "", m.port, m.reply)))


def _family(ip: str) -> int:
    try:
        return ipaddress.ip_address(ip).version
    except ValueError:
        return 0


def _element_order(element: Element) -> tuple[str, str]:
    return (element.container, element.key)
