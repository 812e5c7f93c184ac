"""The workers' own metrics: how many run and how often each was restarted."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from uproxy.workers.supervisor import Supervisor


class WorkerCollector(Collector):
    def __init__(self, supervisor: Supervisor) -> None:
        self._supervisor = supervisor

    def collect(self) -> Iterator[Metric]:
        slots = self._supervisor.slots
        yield GaugeMetricFamily(
            "uproxy_workers_running",
            "Forwarding worker processes running.",
            value=sum(1 for slot in slots if slot.live),
        )
        restarts = CounterMetricFamily(
            "uproxy_worker_restarts", "Worker processes restarted after dying.", labels=["worker"]
        )
        accepted = CounterMetricFamily(
            "uproxy_worker_connections",
            "TCP connections accepted or UDP sessions created, by worker (all service ports).",
            labels=["worker"],
        )
        active = GaugeMetricFamily(
            "uproxy_worker_connections_active",
            "Open TCP connections or live UDP sessions, by worker (all service ports).",
            labels=["worker"],
        )
        for slot in slots:
            worker = [str(slot.index)]
            restarts.add_metric(worker, slot.restarts)
            accepted.add_metric(worker, sum(view.stats.total for view in slot.views))
            active.add_metric(worker, sum(view.stats.active for view in slot.views))
        yield from (restarts, accepted, active)
