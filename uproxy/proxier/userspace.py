"""The userspace proxier: one listener per service port, portals steering virtual IPs to them.

A sync touches only what changed: a service port keeps its listener (and so its proxy port and
its connections) across every change except a change of protocol; endpoint changes only reach
its balancer. A removed port stops accepting while its established connections finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable
from dataclasses import dataclass, fields

import structlog

from uproxy.balancer import LoadBalancer
from uproxy.dataplane.sockopt import family_of
from uproxy.dataplane.stats import PortStats
from uproxy.dataplane.tcp import TcpListener, open_tcp_socket
from uproxy.dataplane.udp import UdpListener, open_udp_socket
from uproxy.endpoints import categorize_endpoints, external_endpoints_differ
from uproxy.errors import UproxyError
from uproxy.model import Endpoint, Protocol, ProxyState, ServicePort, ServicePortName
from uproxy.proxier.base import Changed, PortView
from uproxy.proxier.portals import Portal, Portals

log = structlog.get_logger(__name__)

Listener = TcpListener | UdpListener


class ListenerStartError(UproxyError):
    """Some service ports could not get a listener this sync; the others are in force."""


@dataclass(slots=True)
class _ServicePortState:
    service: ServicePort
    listener: Listener
    # A second listener for external traffic when externalTrafficPolicy is Local.
    external: Listener | None = None
    endpoints: tuple[Endpoint, ...] = ()  # every known endpoint, usable or not

    @property
    def listeners(self) -> tuple[Listener, ...]:
        return (self.listener,) if self.external is None else (self.listener, self.external)

    def portal(self) -> Portal:
        external = None if self.external is None else self.external.port
        return Portal(self.service, self.listener.port, external)


def _needs_external_listener(service: ServicePort) -> bool:
    # A listener balances over one endpoint set; external traffic gets its own listener when
    # its set differs from the ClusterIP traffic's.
    return external_endpoints_differ(service)


def _sum_stats(listeners: tuple[Listener, ...]) -> PortStats:
    if len(listeners) == 1:
        return listeners[0].stats
    total = PortStats()
    for field in fields(PortStats):
        setattr(total, field.name, sum(getattr(lst.stats, field.name) for lst in listeners))
    return total


class PortAllocator:
    """Hands out proxy ports from --proxy-port-range; None lets the kernel choose."""

    def __init__(self, port_range: tuple[int, int] | None) -> None:
        self._range = port_range
        self._used: set[int] = set()

    def candidates(self) -> list[int]:
        if self._range is None:
            return [0]
        low, high = self._range
        free = [p for p in range(low, high + 1) if p not in self._used]
        random.shuffle(free)
        return free

    def claim(self, port: int) -> None:
        if self._range is not None:
            self._used.add(port)

    def release(self, port: int) -> None:
        self._used.discard(port)


class UserspaceProxier:
    def __init__(
        self,
        *,
        bind_address: str,
        port_range: tuple[int, int] | None,
        node_name: str,
        udp_timeout: float,
        udp_max_sessions: int,
        portals: Portals,
        balancer_factory: Callable[[], LoadBalancer] = LoadBalancer,
    ) -> None:
        self._bind_address = bind_address
        self._family = family_of(bind_address)
        self._ports = PortAllocator(port_range)
        self._node_name = node_name
        self._udp_timeout = udp_timeout
        self._udp_max_sessions = udp_max_sessions
        self._portals = portals
        self._balancer_factory = balancer_factory
        self._active: dict[ServicePortName, _ServicePortState] = {}
        # The portal of every active service port, kept up to date as ports change.
        self._portals_wanted: dict[ServicePortName, Portal] = {}
        # Listeners of removed service ports whose connections are still finishing.
        self._retired: set[Listener] = set()
        self._reapers: set[asyncio.Task[None]] = set()

    # --- Proxier -------------------------------------------------------------------------------

    async def sync(self, state: ProxyState, changed: Changed = None) -> None:
        # Removed ports first: they free their proxy ports for new ones.
        if changed is None:
            names = [n for n in self._active if n not in state.services] + list(state.services)
        else:
            names = sorted(changed, key=lambda n: n in state.services)
        failed: list[str] = []
        for name in names:
            service = state.services.get(name)
            if service is None:
                if name in self._active:
                    self._retire(name, "service port removed")
                continue
            current = self._active.get(name)
            if current is not None and current.service.protocol != service.protocol:
                self._retire(name, "protocol changed")
                current = None
            try:
                if current is None:
                    current = self._active[name] = _ServicePortState(service, self._start(service))
                current.service = service
                self._converge_external(current)
            except OSError as exc:
                log.error("listener_failed", service=str(name), error=str(exc))
                failed.append(f"{name}: {exc}")
                if current is None:
                    continue
            self._update_endpoints(current, state.endpoints.get(name, ()))
            self._portals_wanted[name] = current.portal()
        for name in names:
            if name not in self._active:
                self._portals_wanted.pop(name, None)
        await self._portals.sync(self._portals_wanted, changed)
        if failed:
            raise ListenerStartError("no listener for " + "; ".join(failed))

    async def shutdown(self, grace: float) -> None:
        listeners = [lst for s in self._active.values() for lst in s.listeners]
        listeners += self._retired
        for listener in listeners:
            listener.stop_accepting()
        open_now = sum(listener.connections for listener in listeners)
        if open_now:
            log.info("draining", connections=open_now, grace=grace)
            waits = [listener.wait_idle() for listener in listeners]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*waits), timeout=grace)
        left = sum(listener.connections for listener in listeners)
        for listener in listeners:
            listener.abort_all()
        for task in list(self._reapers):
            task.cancel()
        if self._reapers:
            await asyncio.gather(*self._reapers, return_exceptions=True)
        self._active.clear()
        self._portals_wanted.clear()
        self._retired.clear()
        if left:
            log.warning("drain_incomplete", connections_reset=left)

    # --- views ---------------------------------------------------------------------------------

    def view(self) -> list[PortView]:
        return [self._view(s) for s in self._active.values()]

    def _view(self, state: _ServicePortState) -> PortView:
        listeners = state.listeners
        per_endpoint: dict[Endpoint, int] = {}
        for listener in listeners:
            for endpoint, count in listener.per_endpoint.items():
                per_endpoint[endpoint] = per_endpoint.get(endpoint, 0) + count
        return PortView(
            service=state.service,
            proxy_port=state.listener.port,
            endpoints=state.endpoints,
            in_use=frozenset(e for lst in listeners for e in lst.balancer.endpoints),
            per_endpoint=per_endpoint,
            connections=sum(lst.connections for lst in listeners),
            affinity_entries=sum(lst.balancer.affinity_entries for lst in listeners),
            stats=_sum_stats(listeners),
        )

    # --- internals -----------------------------------------------------------------------------

    def _start(self, service: ServicePort, traffic: str = "cluster") -> Listener:
        loop = asyncio.get_running_loop()
        last_error: OSError | None = None
        for port in self._ports.candidates():
            try:
                listener = self._open(service, port, loop)
            except OSError as exc:
                last_error = exc
                continue
            self._ports.claim(listener.port)
            log.info(
                "listener_started" if traffic == "cluster" else "external_listener_started",
                service=str(service.name),
                protocol=service.protocol.value,
                address=self._bind_address,
                port=listener.port,
            )
            return listener
        raise last_error or OSError("no free port in --proxy-port-range")

    def _open(self, service: ServicePort, port: int, loop: asyncio.AbstractEventLoop) -> Listener:
        balancer = self._balancer_factory()
        if service.protocol is Protocol.TCP:
            sock = open_tcp_socket(self._bind_address, port, self._family)
            return TcpListener(service.name, sock, balancer, loop)
        sock = open_udp_socket(self._bind_address, port, self._family)
        return UdpListener(
            service.name,
            sock,
            balancer,
            loop,
            timeout=self._udp_timeout,
            max_sessions=self._udp_max_sessions,
        )

    def _converge_external(self, state: _ServicePortState) -> None:
        if _needs_external_listener(state.service):
            if state.external is None:
                state.external = self._start(state.service, traffic="external")
        elif state.external is not None:
            self._stop(state.service.name, state.external, "external traffic policy changed")
            state.external = None

    def _update_endpoints(self, state: _ServicePortState, endpoints: tuple[Endpoint, ...]) -> None:
        state.endpoints = endpoints
        service = state.service
        chosen = categorize_endpoints(endpoints, service, self._node_name)
        self._balance(service, state.listener, chosen.internal, "cluster")
        if state.external is not None:
            self._balance(service, state.external, chosen.external, "external")

    def _balance(
        self, service: ServicePort, listener: Listener, usable: tuple[Endpoint, ...], traffic: str
    ) -> None:
        balancer = listener.balancer
        before = balancer.endpoints
        balancer.update(usable, service.affinity_timeout)
        balancer.sweep()
        if balancer.endpoints != before:
            if isinstance(listener, UdpListener):
                listener.endpoints_changed()
            log.info(
                "endpoints_updated",
                service=str(service.name),
                traffic=traffic,
                endpoints=[str(e) for e in sorted(usable)],
            )

    def _retire(self, name: ServicePortName, reason: str) -> None:
        state = self._active.pop(name)
        for listener in state.listeners:
            self._stop(name, listener, reason)

    def _stop(self, name: ServicePortName, listener: Listener, reason: str) -> None:
        listener.stop_accepting()
        self._ports.release(listener.port)
        log.info("listener_stopped", service=str(name), port=listener.port, reason=reason)
        if listener.connections:
            self._retired.add(listener)
            task = asyncio.get_running_loop().create_task(self._reap(listener))
            self._reapers.add(task)
            task.add_done_callback(self._reapers.discard)

    async def _reap(self, listener: Listener) -> None:
        try:
            await listener.wait_idle()
        finally:
            self._retired.discard(listener)
