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
        for service in self._dirty_endpoints | changed:
            if self._refresh_endpoints(service):
                changed.add(service)
        services = {port.name: port for ports in self._services.values() for port in ports}
        endpoints = {name: eps for per in self._endpoints.values() for name, eps in per.items()}
        oldest = self._oldest_change
        self._pending_services.clear()
        self._dirty_endpoints.clear()
        self._oldest_change = None
        return Snapshot(
            state=ProxyState(services=services, endpoints=endpoints),
            changed=frozenset(changed),
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

    def _refresh_endpoints(self, service: ObjectKey) -> bool:
        """Recompute the endpoints of every port of `service`; True when any of them changed."""
        slices = [self._slices[k] for k in self._slices_by_service.get(service, ())]
        ports = self._services.get(service, ())
        fresh = {port.name: endpoints_for_port(slices, port.name, port.protocol) for port in ports}
        if self._endpoints.get(service, {}) == fresh:
            return False
        if fresh:
            self._endpoints[service] = fresh
        else:
            self._endpoints.pop(service, None)
        return True
