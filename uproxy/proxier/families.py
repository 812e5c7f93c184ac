"""One proxier per IP family behind the one Proxier interface, as kube-proxy's metaproxier:
each family's proxier takes only its family's addresses and endpoints."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

from uproxy.dataplane.stats import sum_stats
from uproxy.model import Endpoint, ProxyState, ServicePortName
from uproxy.proxier.base import (
    Changed,
    CountsSyncs,
    PortView,
    Proxier,
    SyncCounters,
    each_then_first_failure,
)


def merge_views(views: Sequence[PortView]) -> PortView:
    """One service port's views from several proxiers (one per family) as one."""
    first = views[0]
    if len(views) == 1:
        return first
    per_endpoint: dict[Endpoint, int] = {}
    for view in views:
        for endpoint, count in view.per_endpoint.items():
            per_endpoint[endpoint] = per_endpoint.get(endpoint, 0) + count
    return dataclasses.replace(
        first,
        endpoints=tuple(dict.fromkeys(e for view in views for e in view.endpoints)),
        in_use=frozenset().union(*(view.in_use for view in views)),
        per_endpoint=per_endpoint,
        connections=sum(view.connections for view in views),
        affinity_entries=sum(view.affinity_entries for view in views),
        stats=sum_stats(view.stats for view in views),
        ejected=frozenset().union(*(view.ejected for view in views)),
        ejections=sum(view.ejections for view in views),
    )


class PerFamily:
    def __init__(self, proxiers: Sequence[Proxier]) -> None:
        self._proxiers = tuple(proxiers)

    async def sync(self, state: ProxyState, changed: Changed = None) -> None:
        await each_then_first_failure(
            [functools.partial(proxier.sync, state, changed) for proxier in self._proxiers]
        )

    async def shutdown(self, grace: float) -> None:
        for proxier in self._proxiers:
            await proxier.shutdown(grace)

    def view(self) -> list[PortView]:
        """One row per service port, its families' views merged: a dual-stack port shows the
        endpoints and counters of both."""
        by_name: dict[ServicePortName, list[PortView]] = {}
        for proxier in self._proxiers:
            for view in proxier.view():
                by_name.setdefault(view.service.name, []).append(view)
        return [merge_views(views) for views in by_name.values()]

    def sync_counters(self) -> SyncCounters:
        total = SyncCounters()
        for proxier in self._proxiers:
            if isinstance(proxier, CountsSyncs):
                counts = proxier.sync_counters()
                total.full_syncs += counts.full_syncs
                total.partial_syncs += counts.partial_syncs
                total.partial_failures += counts.partial_failures
                total.rules_written += counts.rules_written
        return total
