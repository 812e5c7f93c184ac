"""Prometheus metrics, with kube-proxy's names (and buckets) where the meaning is the same.

Per-service-port figures are read from the data plane's plain counters at scrape time, so the
per-connection path never touches a metrics library. Labels are bounded: service port name and
protocol, never client addresses.

A scrape is taken in two steps: `snapshot` copies what the proxier knows, on the event loop
(where it is never half-updated), and `render` turns it into text, which costs far more with
thousands of service ports and so runs in a worker thread, off the forwarding path.

As kube-proxy (Go) has none, no `*_created` series are exposed: they are filtered out here
rather than switched off in prometheus_client's process-wide settings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector
from prometheus_client import generate_latest as _generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from uproxy.endpoints import categorize_endpoints
from uproxy.model import ProxyState
from uproxy.proxier.base import PortView, SyncCounters

# kube-proxy's buckets: ExponentialBuckets(0.001, 2, 15) for rule syncs; for network
# programming 0.25 s, 0.5 s, 1..59 s, 60..115 s by 5 s, 2..5 min by 30 s.
_SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
_PROGRAMMING_BUCKETS = (
    0.25,
    0.5,
    *(float(i) for i in range(1, 60)),
    *(60.0 + 5 * i for i in range(12)),
    *(120.0 + 30 * i for i in range(7)),
)


@dataclass(frozen=True, slots=True)
class MetricsSnapshot:
    """What a scrape reports of the proxier, copied on the event loop."""

    views: tuple[PortView, ...]
    counters: SyncCounters | None


class _PortCollector(Collector):
    def __init__(self, views: Sequence[PortView]) -> None:
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
        refused = counter("uproxy_udp_refused", "UDP datagrams refused a session at the cap.")
        sessions = gauge("uproxy_udp_sessions", "Live UDP sessions.")
        affinity = gauge("uproxy_affinity_entries", "ClientIP affinity entries.")
        endpoints = gauge("uproxy_endpoints_in_use", "Endpoints new connections go to.")
        ejected = gauge("uproxy_endpoints_ejected", "Endpoints skipped after failed dials.")
        ejections = counter("uproxy_endpoint_ejections", "Endpoints ejected after failed dials.")
        for view in self._views:
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
                refused.add_metric(key, stats.udp_refused)
                sessions.add_metric(key, stats.active)
            affinity.add_metric(key, view.affinity_entries)
            endpoints.add_metric(key, len(view.in_use))
            if view.service.protocol.value == "TCP":
                ejected.add_metric(key, len(view.ejected))
                ejections.add_metric(key, view.ejections)
        yield from (
            active, total, bytes_, failures, retries, no_endpoint, dropped, sessions, affinity,
            endpoints, ejected, ejections, refused,
        )  # fmt: skip


class _SyncCollector(Collector):
    """A kernel mode's rule-sync totals, read at scrape time."""

    def __init__(self, counters: SyncCounters) -> None:
        self._counters = counters

    def collect(self) -> Iterator[Metric]:
        counters = self._counters
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


def no_local_endpoints(state: ProxyState, node_name: str) -> tuple[int, int]:
    """kube-proxy's sync_proxy_rules_no_local_endpoints_total: the service ports that have
    endpoints, but none on this node for traffic under a Local policy (internal, external)."""
    internal = external = 0
    for name, service in state.services.items():
        if not (service.internal_traffic_local or service.external_traffic_local):
            continue
        endpoints = state.endpoints.get(name, ())
        selection = categorize_endpoints(endpoints, service, node_name, state.node_zone)
        if not selection.reachable or selection.local:
            continue
        internal += selection.internal_local
        external += selection.external_local
    return internal, external


class _Scrape(Collector):
    """One scrape: the registry's own metrics and the snapshot's, without `*_created`."""

    def __init__(self, collectors: Iterable[Collector]) -> None:
        self._collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self._collectors:
            for metric in collector.collect():
                created = metric.name + "_created"
                metric.samples = [s for s in metric.samples if s.name != created]
                yield metric


class Metrics:
    """One registry per app (no global state), so tests can run several side by side."""

    def __init__(
        self,
        views: Callable[[], Sequence[PortView]],
        sync_counters: Callable[[], SyncCounters] | None = None,
    ) -> None:
        self._views = views
        self._sync_counters = sync_counters
        self.registry = CollectorRegistry()
        registry = self.registry
        self.sync_duration = Histogram(
            "kubeproxy_sync_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds: one sync of the proxy rules and listeners.",
            buckets=_SYNC_BUCKETS,
            registry=registry,
        )
        self.full_sync_duration = Histogram(
            "kubeproxy_sync_full_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for full resyncs.",
            buckets=_SYNC_BUCKETS,
            registry=registry,
        )
        self.partial_sync_duration = Histogram(
            "kubeproxy_sync_partial_proxy_rules_duration_seconds",
            "SyncProxyRules latency in seconds for partial resyncs.",
            buckets=_SYNC_BUCKETS,
            registry=registry,
        )
        self.programming_latency = Histogram(
            "kubeproxy_network_programming_duration_seconds",
            "In Cluster Network Programming Latency in seconds: from a change arriving from a "
            "source to it being in force.",
            buckets=_PROGRAMMING_BUCKETS,
            registry=registry,
        )
        self.last_sync = Gauge(
            "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
            "The last time proxy rules were successfully synced (Unix time).",
            registry=registry,
        )
        self.last_queued = Gauge(
            "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
            "The last time a sync of proxy rules was queued (Unix time).",
            registry=registry,
        )
        self.no_local_endpoints = Gauge(
            "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
            "Number of services with a Local traffic policy and no endpoints.",
            labelnames=["traffic_policy"],
            registry=registry,
        )
        for policy in ("internal", "external"):
            self.no_local_endpoints.labels(traffic_policy=policy).set(0)
        self.healthz_total = Counter(
            "kubeproxy_proxy_healthz",
            "Cumulative proxy healthz HTTP status.",
            labelnames=["code"],
            registry=registry,
        )
        self.livez_total = Counter(
            "kubeproxy_proxy_livez",
            "Cumulative proxy livez HTTP status.",
            labelnames=["code"],
            registry=registry,
        )
        self.sync_failures = Gauge(
            "uproxy_sync_failures_consecutive",
            "Syncs that failed in a row (0 after a success).",
            registry=registry,
        )
        self.service_ports = Gauge(
            "uproxy_service_ports", "Service ports in force.", registry=registry
        )
        self.endpoints = Gauge(
            "uproxy_endpoints", "Endpoints known across all service ports.", registry=registry
        )
        # process_cpu_seconds_total, process_resident_memory_bytes, process_open_fds, ... as
        # every Go component (kube-proxy included) exposes them.
        ProcessCollector(registry=registry)

    def snapshot(self) -> MetricsSnapshot:
        """On the event loop: copy what the proxier knows now."""
        counters = self._sync_counters() if self._sync_counters is not None else None
        return MetricsSnapshot(
            views=tuple(self._views()),
            counters=dataclasses.replace(counters) if counters is not None else None,
        )

    def render(self, snapshot: MetricsSnapshot) -> bytes:
        """Prometheus text for one scrape; safe in any thread (the registry's metrics lock)."""
        collectors: list[Collector] = [self.registry, _PortCollector(snapshot.views)]
        if snapshot.counters is not None:
            collectors.append(_SyncCollector(snapshot.counters))
        return _generate_latest(_Scrape(collectors))
