"""One view per service port from N workers' views: what /status and /metrics show.

The main process's own view is authoritative for what a port is (service, proxy port, known
endpoints, those in use); the workers' views say what happened on it. Counters of a worker that
died are carried over, so a restart never makes a counter go backwards.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, MutableMapping, Sequence

from uproxy.dataplane.stats import PortStats, sum_stats
from uproxy.model import Endpoint, ServicePortName
from uproxy.proxier.base import PortView

# PortStats fields that only ever grow; `active` is a gauge and dies with its worker.
CUMULATIVE = tuple(f.name for f in dataclasses.fields(PortStats) if f.name != "active")


def carry(carried: MutableMapping[ServicePortName, PortStats], views: Sequence[PortView]) -> None:
    """Keep the cumulative counters of a worker that is gone."""
    for view in views:
        kept = carried.setdefault(view.service.name, PortStats())
        for name in CUMULATIVE:
            setattr(kept, name, getattr(kept, name) + getattr(view.stats, name))


def aggregate(
    local: Sequence[PortView],
    workers: Sequence[Sequence[PortView]],
    carried: Mapping[ServicePortName, PortStats],
) -> list[PortView]:
    by_name: dict[ServicePortName, list[PortView]] = {}
    for views in workers:
        for view in views:
            by_name.setdefault(view.service.name, []).append(view)
    result = []
    for own in local:
        name = own.service.name
        seen = by_name.get(name, [])
        stats = [v.stats for v in seen]
        if name in carried:
            stats.append(carried[name])
        per_endpoint: dict[Endpoint, int] = {}
        for view in seen:
            for endpoint, count in view.per_endpoint.items():
                per_endpoint[endpoint] = per_endpoint.get(endpoint, 0) + count
        result.append(
            dataclasses.replace(
                own,
                per_endpoint=per_endpoint,
                connections=sum(v.connections for v in seen),
                affinity_entries=sum(v.affinity_entries for v in seen),
                stats=sum_stats(stats),
                ejected=frozenset().union(*(v.ejected for v in seen)),
                ejections=sum(v.ejections for v in seen),
            )
        )
    return result
