"""Change tracking: sources report objects, the tracker collapses them into one pending change.

Repeated changes to one object collapse into one; a change that ends where it started is dropped,
so a relist or an unchanged file never causes a sync. `snapshot()` hands the runner a complete,
consistent ProxyState and clears what was pending.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from uproxy.endpoints import endpoints_for_port
from uproxy.model import (
    Endpoint,
    EndpointSlice,
    ObjectKey,
    ProxyState,
    ServicePort,
    ServicePortName,
)

_ABSENT: tuple[ServicePort, ...] | None = None


@dataclass(frozen=True, slots=True)
class Snapshot:
    state: ProxyState
    # The services whose ports or endpoints changed since the previous snapshot.
    changed: frozenset[ObjectKey]
    # Their service ports, as they were and as they are: what a sync has to look at.
    changed_ports: frozenset[ServicePortName]
    # When the oldest change in this snapshot arrived (monotonic), for programming latency.
    oldest_change: float | None


class ChangeTracker:
    """Implements the sources' ConfigHandler; owned by the app, read by the sync."""

    def __init__(
        self,
        sources: Iterable[str],
        on_change: Callable[[], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._unsynced = set(sources)
        self._on_change = on_change
        self._clock = clock
        self._services: dict[ObjectKey, tuple[ServicePort, ...]] = {}
        self._slices: dict[ObjectKey, EndpointSlice] = {}
        self._slices_by_service: dict[ObjectKey, set[ObjectKey]] = {}
        # service -> its ports as of the last snapshot, for services changed since then.
        self._pending_services: dict[ObjectKey, tuple[ServicePort, ...] | None] = {}
        self._dirty_endpoints: set[ObjectKey] = set()
        self._endpoints: dict[ObjectKey, dict[ServicePortName, tuple[Endpoint, ...]]] = {}
        self._oldest_change: float | None = None
        # Every service port and its endpoints, kept flat as changes come in.
        self._flat_services: dict[ServicePortName, ServicePort] = {}
        self._flat_endpoints: dict[ServicePortName, tuple[Endpoint, ...]] = {}

    # --- ConfigHandler -------------------------------------------------------------------------

    def service_updated(self, key: ObjectKey, ports: tuple[ServicePort, ...]) -> None:
        self._set_service(key, ports)

    def service_deleted(self, key: ObjectKey) -> None:
        self._set_service(key, _ABSENT)

    def slice_updated(self, endpoint_slice: EndpointSlice) -> None:
        key = endpoint_slice.key
        previous = self._slices.get(key)
        if previous == endpoint_slice:
            return
        if previous is not None and previous.service != endpoint_slice.service:
            self._unindex_slice(previous)
        self._slices[key] = endpoint_slice
        self._slices_by_service.setdefault(endpoint_slice.service, set()).add(key)
        self._mark_endpoints(endpoint_slice.service)
        if previous is not None:
            self._mark_endpoints(previous.service)

    def slice_deleted(self, key: ObjectKey) -> None:
        previous = self._slices.pop(key, None)
        if previous is None:
            return
        self._unindex_slice(previous)
        self._mark_endpoints(previous.service)

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
        return bool(self._pending_services or self._dirty_endpoints)

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
        for service in changed:
            changed_ports.update(p.name for p in self._services.get(service, ()))
        oldest = self._oldest_change
        self._pending_services.clear()
        self._dirty_endpoints.clear()
        self._oldest_change = None
        # Copies, so the snapshot never changes under a sync: C-speed, where rebuilding from
        # the per-service maps was the bulk of a one-change sync's Python time.
        return Snapshot(
            state=ProxyState(
                services=dict(self._flat_services), endpoints=dict(self._flat_endpoints)
            ),
            changed=frozenset(changed),
            changed_ports=frozenset(changed_ports),
            oldest_change=oldest,
        )

    # --- internals -----------------------------------------------------------------------------

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

    def _mark_endpoints(self, service: ObjectKey) -> None:
        self._dirty_endpoints.add(service)
        self._note_change()

    def _note_change(self) -> None:
        if self._oldest_change is None:
            self._oldest_change = self._clock()
        self._on_change()

    def _unindex_slice(self, endpoint_slice: EndpointSlice) -> None:
        keys = self._slices_by_service.get(endpoint_slice.service)
        if keys is not None:
            keys.discard(endpoint_slice.key)
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
        slices = [self._slices[k] for k in self._slices_by_service.get(service, ())]
        ports = self._services.get(service, ())
        fresh = {port.name: endpoints_for_port(slices, port.name, port.protocol) for port in ports}
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
