"""Change tracking: sources report objects, the tracker collapses them into one pending change.

Repeated changes to one object collapse into one; a change that ends where it started is dropped,
so a relist or an unchanged file never causes a sync. `snapshot()` hands the runner a complete,
consistent ProxyState and clears what was pending.

Each source owns its own objects: a source deleting `default/web` removes only its own copy, and
a Service takes its endpoints from the EndpointSlices of the source its copy came from. When two
sources define the same Service, the source listed first wins (the app lists the Kubernetes API
before manifest files), the clash is logged once as `source_conflict` naming both, and deleting
the winner's copy falls back to the other source's Service and slices.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import structlog

from uproxy.endpoints import endpoints_for_port
from uproxy.model import (
    Endpoint,
    EndpointSlice,
    NodeInfo,
    ObjectKey,
    ProxyState,
    ServicePort,
    ServicePortName,
)

_ABSENT: tuple[ServicePort, ...] | None = None

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Snapshot:
    state: ProxyState
    # The services whose ports or endpoints changed since the previous snapshot.
    changed: frozenset[ObjectKey]
    # Their service ports, as they were and as they are: what a sync has to look at.
    changed_ports: frozenset[ServicePortName]
    # When the oldest change in this snapshot arrived (monotonic), for programming latency.
    oldest_change: float | None


class SourceHandler:
    """The ConfigHandler one source writes through: its objects stay its own."""

    def __init__(self, tracker: ChangeTracker, source: str) -> None:
        self._tracker = tracker
        self.source = source

    def service_updated(self, key: ObjectKey, ports: tuple[ServicePort, ...]) -> None:
        self._tracker.service_updated(key, ports, source=self.source)

    def service_deleted(self, key: ObjectKey) -> None:
        self._tracker.service_deleted(key, source=self.source)

    def slice_updated(self, endpoint_slice: EndpointSlice) -> None:
        self._tracker.slice_updated(endpoint_slice, source=self.source)

    def slice_deleted(self, key: ObjectKey) -> None:
        self._tracker.slice_deleted(key, source=self.source)

    def node_updated(self, node: NodeInfo) -> None:
        self._tracker.node_updated(node)

    def node_deleted(self, name: str) -> None:
        self._tracker.node_deleted(name)

    def source_synced(self, source: str) -> None:
        self._tracker.source_synced(source)


class ChangeTracker:
    """Collects every source's objects; owned by the app, read by the sync. Sources write through
    `handler(name)`; the tracker's own ConfigHandler methods serve a tracker of one source."""

    def __init__(
        self,
        sources: Iterable[str],
        on_change: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
        *,
        node_name: str = "",
        node_zone: str | None = None,
    ) -> None:
        self._sources = list(sources)  # in priority order: the first one wins a conflict
        self._unsynced = set(self._sources)
        # What each source says, per object; the effective copy is the first source's.
        self._service_copies: dict[ObjectKey, dict[str, tuple[ServicePort, ...]]] = {}
        self._node_name = node_name
        # A zone given by flag is fixed; otherwise this node's Node object supplies it.
        self._pinned_zone = node_zone is not None
        self._node_zone = node_zone or ""
        self._zone_changed = False
        # This node's eligibility for load-balancer traffic (/healthz nodeEligible).
        self.node_eligible = True
        self._on_change = on_change
        self._clock = clock
        self._services: dict[ObjectKey, tuple[ServicePort, ...]] = {}
        # Slices per (source, key): two sources' slices of one name are two different slices.
        self._slices: dict[tuple[str, ObjectKey], EndpointSlice] = {}
        self._slices_by_service: dict[ObjectKey, set[tuple[str, ObjectKey]]] = {}
        # service -> its ports as of the last snapshot, for services changed since then.
        self._pending_services: dict[ObjectKey, tuple[ServicePort, ...] | None] = {}
        self._dirty_endpoints: set[ObjectKey] = set()
        self._endpoints: dict[ObjectKey, dict[ServicePortName, tuple[Endpoint, ...]]] = {}
        self._oldest_change: float | None = None
        # Every service port and its endpoints, kept flat as changes come in.
        self._flat_services: dict[ServicePortName, ServicePort] = {}
        self._flat_endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}

    # --- ConfigHandler -------------------------------------------------------------------------

    def handler(self, source: str) -> SourceHandler:
        """The handler `source` writes through."""
        if source not in self._sources:
            raise ValueError(f"unknown source {source!r} (known: {', '.join(self._sources)})")
        return SourceHandler(self, source)

    def service_updated(
        self, key: ObjectKey, ports: tuple[ServicePort, ...], *, source: str | None = None
    ) -> None:
        name = self._source(source)
        copies = self._service_copies.setdefault(key, {})
        self._note_conflict(key, copies, name)
        owner = self._owner(key)
        copies[name] = ports
        self._set_service(key, copies[self._owner(key) or name])
        if self._owner(key) != owner:
            self._mark_endpoints(key)

    def service_deleted(self, key: ObjectKey, *, source: str | None = None) -> None:
        copies = self._service_copies.get(key)
        owner = self._owner(key)
        if copies is None or copies.pop(self._source(source), None) is None:
            return
        if not copies:
            del self._service_copies[key]
        new_owner = self._owner(key)
        self._set_service(key, None if new_owner is None else self._service_copies[key][new_owner])
        if new_owner != owner:
            self._mark_endpoints(key)

    def slice_updated(self, endpoint_slice: EndpointSlice, *, source: str | None = None) -> None:
        key = (self._source(source), endpoint_slice.key)
        previous = self._slices.get(key)
        if previous == endpoint_slice:
            return
        if previous is not None and previous.service != endpoint_slice.service:
            self._unindex_slice(key, previous)
        self._slices[key] = endpoint_slice
        self._slices_by_service.setdefault(endpoint_slice.service, set()).add(key)
        self._mark_slice_of(key[0], endpoint_slice.service)
        if previous is not None:
            self._mark_slice_of(key[0], previous.service)

    def slice_deleted(self, key: ObjectKey, *, source: str | None = None) -> None:
        owned = (self._source(source), key)
        previous = self._slices.pop(owned, None)
        if previous is None:
            return
        self._unindex_slice(owned, previous)
        self._mark_slice_of(owned[0], previous.service)

    def node_updated(self, node: NodeInfo) -> None:
        if node.name != self._node_name:
            return
        if node.eligible != self.node_eligible:
            self.node_eligible = node.eligible
            self._on_change()  # nothing to resync; the app reads it after the next sync
        if self._pinned_zone or node.zone == self._node_zone:
            return
        self._node_zone = node.zone
        # Topology hints are judged against the zone, so every service port may change.
        self._zone_changed = True
        self._note_change()

    def node_deleted(self, name: str) -> None:
        self.node_updated(NodeInfo(name))

    def source_synced(self, source: str) -> None:
        if source in self._unsynced:
            self._unsynced.discard(source)
            self._on_change()

    # --- read side -----------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        """True once every source has delivered its initial state."""
        return not self._unsynced

    @property
    def pending(self) -> bool:
        return bool(self._pending_services or self._dirty_endpoints or self._zone_changed)

    @property
    def oldest_change(self) -> float | None:
        return self._oldest_change

    def snapshot(self) -> Snapshot:
        changed = {key for key, old in self._pending_services.items() if old != self._ports(key)}
        changed_ports: set[ServicePortName] = set()
        for key in changed:
            changed_ports.update(p.name for p in self._pending_services[key] or ())
            self._flatten_service(key)
        for service in self._dirty_endpoints | changed:
            names = self._refresh_endpoints(service)
            if names:
                changed.add(service)
                changed_ports |= names
        if self._zone_changed:
            changed.update(self._services)
        for service in changed:
            changed_ports.update(p.name for p in self._services.get(service, ()))
        oldest = self._oldest_change
        self._zone_changed = False
        self._pending_services.clear()
        self._dirty_endpoints.clear()
        self._oldest_change = None
        # Copies, so the snapshot never changes under a sync: C-speed, where rebuilding from
        # the per-service maps was the bulk of a one-change sync's Python time.
        return Snapshot(
            state=ProxyState(
                services=dict(self._flat_services),
                endpoints=dict(self._flat_endpoints),
                node_zone=self._node_zone,
            ),
            changed=frozenset(changed),
            changed_ports=frozenset(changed_ports),
            oldest_change=oldest,
        )

    # --- internals -----------------------------------------------------------------------------

    def _source(self, source: str | None) -> str:
        if source is None:
            if len(self._sources) != 1:
                raise ValueError("a tracker of several sources takes updates through handler()")
            return self._sources[0]
        return source

    def _owner(self, key: ObjectKey) -> str | None:
        """The source whose copy of Service `key` is in force."""
        copies = self._service_copies.get(key, {})
        return next((source for source in self._sources if source in copies), None)

    def _note_conflict(self, key: ObjectKey, copies: Mapping[str, object], new: str) -> None:
        """Log once when a second source starts defining a Service another one defines."""
        if not copies or new in copies:
            return
        sources = [s for s in self._sources if s in copies or s == new]
        log.warning(
            "source_conflict",
            kind="Service",
            object=f"{key.namespace}/{key.name}",
            sources=sources,
            winner=sources[0],
            hint="the first source wins; deleting its copy falls back to the other's",
        )

    def _ports(self, key: ObjectKey) -> tuple[ServicePort, ...] | None:
        return self._services.get(key)

    def _set_service(self, key: ObjectKey, ports: tuple[ServicePort, ...] | None) -> None:
        current = self._services.get(key)
        if current == ports:
            return
        if key not in self._pending_services:
            self._pending_services[key] = current
        if ports is None:
            del self._services[key]
        else:
            self._services[key] = ports
        if self._pending_services[key] == ports:
            # Back where it started: nothing to do for this service after all.
            del self._pending_services[key]
            return
        self._note_change()

    def _mark_slice_of(self, source: str, service: ObjectKey) -> None:
        """A slice of `source` changed: it matters only if `service` is `source`'s (or no one's
        yet: a slice may arrive before its Service)."""
        if self._owner(service) in (source, None):
            self._mark_endpoints(service)

    def _mark_endpoints(self, service: ObjectKey) -> None:
        self._dirty_endpoints.add(service)
        self._note_change()

    def _note_change(self) -> None:
        if self._oldest_change is None:
            self._oldest_change = self._clock()
        self._on_change()

    def _unindex_slice(self, key: tuple[str, ObjectKey], endpoint_slice: EndpointSlice) -> None:
        keys = self._slices_by_service.get(endpoint_slice.service)
        if keys is not None:
            keys.discard(key)
            if not keys:
                del self._slices_by_service[endpoint_slice.service]

    def _flatten_service(self, key: ObjectKey) -> None:
        """Bring the flat service-port map in line with `key`'s ports."""
        for port in self._pending_services[key] or ():
            self._flat_services.pop(port.name, None)
        for port in self._services.get(key, ()):
            self._flat_services[port.name] = port

    def _refresh_endpoints(self, service: ObjectKey) -> set[ServicePortName]:
        """Recompute the endpoints of every port of `service`; the ports whose endpoints changed."""
        owner = self._owner(service)
        slices = [
            self._slices[k] for k in self._slices_by_service.get(service, ()) if k[0] == owner
        ]
        ports = self._services.get(service, ())
        fresh = {
            port.name: endpoints_for_port(
                slices, port.name, port.protocol, node_name=self._node_name
            )
            for port in ports
        }
        current = self._endpoints.get(service, {})
        if current == fresh:
            return set()
        names = {n for n in current.keys() | fresh.keys() if current.get(n) != fresh.get(n)}
        for name in current:
            self._flat_endpoints.pop(name, None)
        self._flat_endpoints.update(fresh)
        if fresh:
            self._endpoints[service] = fresh
        else:
            self._endpoints.pop(service, None)
        return names
