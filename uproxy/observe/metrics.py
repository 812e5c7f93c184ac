"""Prometheus metrics, with kube-proxy's names where the meaning is the same.

Per-service-port figures are read from the data plane's plain counters at scrape time, so the
per-connection path never touches a metrics library. Labels are bounded: service port name and
protocol, never client addresses.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

from prometheus_client import CollectorRegistry, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from uproxy.proxier.base import PortView, SyncCounters

# kube-proxy's buckets for rule syncs and network programming.
_SYNC_BUCKETS = (0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064, 0.128, 0.256, 0.512, 1.024, 2.048)
_PROGRAMMING_BUCKETS = (
    *(0.25 * i for i in range(1, 4)),
    *(1.0 * i for i in range(1, 6)),
    *(5.0 * i for i in range(2, 13)),
    120.0,
    180.0,
    300.0,
)


class _PortCollector(Collector):
    def __init__(self, views: Callable[[], Sequence[PortView]]) -> None:
        self._views = views

    def collect(self) -> Iterator[Metric]:
        labels = ["service_port", "protocol"]

        def gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, doc, labels=labels)

        def counter(name: str, doc: str, extra: Sequence[str] = ()) -> CounterMetricFamily:
            return CounterMetricFamily(name, doc, labels=[*labels, *extra])

        active = gauge("uproxy_connections_active", "Open TCP connections or live UDP sessions.")
        total = counter("uproxy_connections", "TCP connections accepted or UDP sessions created.")
        bytes_ = counter("uproxy_bytes", "Bytes spliced.", extra=["direction"])
        failures = counter("uproxy_dial_failures", "Failed attempts to reach an endpoint.")
        retries = counter("uproxy_dial_retries", "Connections that needed more than one dial.")
        no_endpoint = counter("uproxy_no_endpoint", "Connections or flows refused: no endpoint.")
        dropped = counter("uproxy_udp_dropped", "UDP datagrams dropped.")
        sessions = gauge("uproxy_udp_sessions", "Live UDP sessions.")
        affinity = gauge("uproxy_affinity_entries", "ClientIP affinity entries.")
        endpoints = gauge("uproxy_endpoints_in_use", "Endpoints new connections go to.")
        for view in self._views():
            key = [str(view.service.name), view.service.protocol.value]
            stats = view.stats
            active.add_metric(key, stats.active)
            total.add_metric(key, stats.total)
            bytes_.add_metric([*key, "in"], stats.bytes_in)
            bytes_.add_metric([*key, "out"], stats.bytes_out)
            failures.add_metric(key, stats.dial_failures)
            retries.add_metric(key, stats.dial_retries)
            no_endpoint.add_metric(key, stats.no_endpoint)
            if view.service.protocol.value == "UDP":
                dropped.add_metric(key, stats.dropped)
                sessions.add_metric(key, stats.active)
            affinity.add_metric(key, view.affinity_entries)
            endpoints.add_metric(key, len(view.in_use))
        yield from (
            active, total, bytes_, failures, retries, no_endpoint, dropped, sessions, affinity,
            endpoints,
        )  # fmt: skip


class _SyncCollector(Collector):
    """A kernel mode's rule-sync totals, read at scrape time."""

    def __init__(self, counters: Callable[[], SyncCounters]) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        counters = self._counters()
        syncs = CounterMetricFamily(
            "uproxy_rule_syncs", "Rule syncs by kind: full (read back) or partial.", labels=["kind"]
        )
        syncs.add_metric(["full"], counters.full_syncs)
        syncs.add_metric(["partial"], counters.partial_syncs)
        yield syncs
        yield CounterMetricFamily(
            "uproxy_rules_written", "Rules written to the kernel.", value=counters.rules_written
        )
        yield CounterMetricFamily(
            "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures",
            "Partial syncs the kernel refused (a full sync followed).",
            value=counters.partial_failures,
        )


class Metrics:
    """One registry per app (no global state), so tests can run several side by side."""

    def __init__(
        self,
        views: Callable[[], Sequence[PortView]],
        sync_counters: Callable[[], SyncCounters] | None = None,
    ) -> None:
        self.registry = CollectorRegistry()
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "How long one sync of the proxy rules and listeners took.",
            buckets=_SYNC_BUCKETS,
            registry=self.registry,
        )
        self.programming_latency = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "From a change arriving from a source to it being in force.",
            buckets=_PROGRAMMING_BUCKETS,
            registry=self.registry,
        )
        self.last_sync = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "When the last successful sync finished (Unix time).",
            registry=self.registry,
        )
        self.sync_failures = Gauge(
            "uproxy_sync_failures_consecutive",
            "Syncs that failed in a row (0 after a success).",
            registry=self.registry,
        )
        self.service_ports = Gauge(
            "uproxy_service_ports", "Service ports in force.", registry=self.registry
        )
        self.endpoints = Gauge(
            "uproxy_endpoints", "Endpoints known across all service ports.", registry=self.registry
        )
        self.registry.register(_PortCollector(views))
        if sync_counters is not None:
            self.registry.register(_SyncCollector(sync_counters))
