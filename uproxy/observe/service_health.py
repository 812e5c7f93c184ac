"""kube-proxy's service health check server (pkg/proxy/healthcheck/service_health.go).

For every Service with a `healthCheckNodePort` (type LoadBalancer, externalTrafficPolicy Local)
an HTTP server on that port answers, for any path and method, 200 while this node has a ready
endpoint of the service and the proxy itself is healthy, 503 otherwise, with kube-proxy's JSON
body and headers. Cloud load balancers probe it and stop sending to nodes that would drop the
traffic. It is the same in every proxy mode: the App feeds it after each successful sync.

A port that cannot be had (another process holds it) is logged once and tried again at each
later sync; it never stops the proxy.
"""

from __future__ import annotations

import errno
import ipaddress
import json
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Protocol

import structlog

from uproxy.model import ObjectKey, ProxyState
from uproxy.observe.http import ConnectionCap, HttpServer, Response, Route, bound_socket

log = structlog.get_logger(__name__)

# Go listens on "0.0.0.0" as on every address of both families; "::" without V6ONLY does that.
ALL_ADDRESSES = "::"


class HealthCheckListener(Protocol):
    async def close(self) -> None: ...


class HealthCheckListeners(Protocol):
    """Opens the listener of one health check on one address; OSError when it cannot."""

    async def open(self, host: str, port: int, answer: Route) -> HealthCheckListener: ...


class SocketListeners:
    """The real listeners: a small HTTP server per address and port, answering every path and
    method (as kube-proxy's handler does), all under one connection cap."""

    def __init__(self, cap: ConnectionCap) -> None:
        self._cap = cap

    async def open(self, host: str, port: int, answer: Route) -> HealthCheckListener:
        try:
            sock = bound_socket(host, port, dual_stack=host == ALL_ADDRESSES)
        except OSError as exc:
            if host != ALL_ADDRESSES or exc.errno != errno.EAFNOSUPPORT:
                raise
            sock = bound_socket("0.0.0.0", port)  # a node without IPv6
        server = HttpServer(f"health-check:{port}", {}, self._cap, fallback=answer, any_method=True)
        await server.serve(sock)
        return server


def health_check_ports(state: ProxyState) -> dict[ObjectKey, int]:
    """Each service's healthCheckNodePort (kube-proxy's ServicePortMap.HealthCheckNodePorts)."""
    ports: dict[ObjectKey, int] = {}
    for name, service in state.services.items():
        if service.health_check_node_port:
            ports[name.service] = service.health_check_node_port
    return ports


def local_ready_endpoints(
    state: ProxyState, node_name: str, services: Collection[ObjectKey]
) -> dict[ObjectKey, int]:
    """Per service, its ready endpoints on this node, counted by distinct IP across all its ports
    (kube-proxy's EndpointsMap.LocalReadyEndpoints: 10.0.0.1:80 and 10.0.0.1:443 are one).
    Terminating endpoints do not count, even while they serve: the check should fail so that
    the load balancer moves away from a node whose endpoints are all going. Only `services`
    are counted (those with a health check), so a sync costs nothing for the others."""
    ips: dict[ObjectKey, set[str]] = {}
    if not node_name or not services:
        return {}
    for name, endpoints in state.endpoints.items():
        if name.service not in services:
            continue
        for endpoint in endpoints:
            if endpoint.ready and endpoint.node_name == node_name:
                ips.setdefault(name.service, set()).add(endpoint.ip)
    return {key: len(found) for key, found in ips.items()}


def health_check_addresses(cidrs: Sequence[str], node_ips: Iterable[str]) -> list[str]:
    """Where the health checks listen: everywhere, or, with --nodeport-addresses, on this node's
    addresses inside those CIDRs (kube-proxy's NodePortAddresses.GetNodeIPs)."""
    if not cidrs:
        return [ALL_ADDRESSES]
    networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
    out: list[str] = []
    for text in node_ips:
        ip = ipaddress.ip_address(text)
        if any(ip in net for net in networks) and str(ip) not in out:
            out.append(str(ip))
    return out


def answer_body(key: ObjectKey, local_endpoints: int, proxy_healthy: bool) -> bytes:
    """kube-proxy's body, byte for byte (its dedented template: tabs, no final newline)."""
    return (
        "{\n"
        '\t"service": {\n'
        f'\t\t"namespace": {json.dumps(key.namespace)},\n'
        f'\t\t"name": {json.dumps(key.name)}\n'
        "\t},\n"
        f'\t"localEndpoints": {local_endpoints},\n'
        f'\t"serviceProxyHealthy": {"true" if proxy_healthy else "false"}\n'
        "}"
    ).encode()


@dataclass
class _Instance:
    port: int
    listeners: list[HealthCheckListener] = field(default_factory=list)
    local_endpoints: int = 0


class ServiceHealthServer:
    """Opens and closes the health checks as services come and go, and answers them."""

    def __init__(
        self,
        listeners: HealthCheckListeners,
        addresses: Sequence[str],
        proxy_healthy: Callable[[], bool],
    ) -> None:
        self._listeners = listeners
        self._addresses = list(addresses)
        self._proxy_healthy = proxy_healthy
        self._instances: dict[ObjectKey, _Instance] = {}
        # Ports that could not be opened, with the error last logged for them.
        self._failing: dict[ObjectKey, tuple[int, str]] = {}

    @property
    def serving(self) -> dict[ObjectKey, int]:
        """The services whose health check is open, and its port."""
        return {key: inst.port for key, inst in self._instances.items()}

    async def sync(self, ports: Mapping[ObjectKey, int], local: Mapping[ObjectKey, int]) -> None:
        """Open what is new (kube-proxy's SyncServices), close what went or moved, then set
        every open check's local endpoint count (SyncEndpoints)."""
        for key, instance in list(self._instances.items()):
            if ports.get(key) != instance.port:
                del self._instances[key]
                await _close_all(instance.listeners)
                log.info("service_health_check_closed", service=str(key), port=instance.port)
        for key in [k for k, (port, _) in self._failing.items() if ports.get(k) != port]:
            del self._failing[key]
        for key, port in sorted(ports.items()):
            if key not in self._instances:
                await self._open(key, port)
        for key, instance in self._instances.items():
            instance.local_endpoints = local.get(key, 0)

    async def _open(self, key: ObjectKey, port: int) -> None:
        instance = _Instance(port)
        try:
            for host in self._addresses:
                instance.listeners.append(await self._listeners.open(host, port, self._route(key)))
        except OSError as exc:
            # Close what did open, so that the next sync starts clean (and frees the port).
            await _close_all(instance.listeners)
            error = exc.strerror or str(exc)
            if self._failing.get(key) != (port, error):
                log.warning(
                    "service_health_check_failed",
                    service=str(key),
                    port=port,
                    error=error,
                    action="retried at every sync",
                )
            self._failing[key] = (port, error)
            return
        self._failing.pop(key, None)
        self._instances[key] = instance
        log.info(
            "service_health_check_listening", service=str(key), port=port, addresses=self._addresses
        )

    def _route(self, key: ObjectKey) -> Route:
        async def answer() -> Response:
            return self.answer(key)

        return answer

    def answer(self, key: ObjectKey) -> Response:
        instance = self._instances.get(key)
        count = instance.local_endpoints if instance is not None else 0
        healthy = self._proxy_healthy()
        status = HTTPStatus.OK if count and healthy else HTTPStatus.SERVICE_UNAVAILABLE
        headers = (
            ("X-Content-Type-Options", "nosniff"),
            ("X-Load-Balancing-Endpoint-Weight", str(count)),
        )
        return Response(status, answer_body(key, count, healthy), "application/json", headers)

    async def close(self) -> None:
        instances, self._instances = self._instances, {}
        for instance in instances.values():
            await _close_all(instance.listeners)


async def _close_all(listeners: Iterable[HealthCheckListener]) -> None:
    for listener in listeners:
        await listener.close()
