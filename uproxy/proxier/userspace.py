"""The userspace proxier: one listener per service port, portals steering virtual IPs to them.

A sync touches only what changed: a service port keeps its listener (and so its proxy port and
its connections) across every change except a change of protocol or of address families;
endpoint changes only reach its balancer. A removed port stops accepting while its established
connections finish.

IP families, as kube-proxy's per-family proxiers: a wildcard bind address serves both (IPv4
listeners on 0.0.0.0, IPv6 ones on ::), a specific one its own family. A service port gets one
listener per served family it has virtual addresses in, all on one proxy port (so one portal
serves every family), each balancing over its own family's endpoints only. A service port with
no virtual address in a served family gets one listener on the bind address that balances over
all its endpoints: reached on its proxy port directly (a sidecar), it bridges families.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol as TypingProtocol

import structlog

from uproxy.addresses import of_family
from uproxy.balancer import LoadBalancer
from uproxy.dataplane.sockopt import ipv6_available
from uproxy.dataplane.stats import PortStats, sum_stats
from uproxy.dataplane.tcp import TcpListener, open_tcp_socket
from uproxy.dataplane.tcp_options import TcpOptions
from uproxy.dataplane.udp import UdpListener, open_udp_socket
from uproxy.endpoints import categorize_endpoints, external_endpoints_differ
from uproxy.errors import UproxyError
from uproxy.kernel.netfilter import Family
from uproxy.model import Endpoint, Protocol, ProxyState, ServicePort, ServicePortName
from uproxy.proxier.base import Changed, PortView
from uproxy.proxier.portals import Portal, Portals

log = structlog.get_logger(__name__)


class Listener(TypingProtocol):
    """What the proxier needs of a listener: TcpListener, UdpListener, or (with --workers) the
    main process's stand-in that only holds the sockets its workers accept on."""

    @property
    def port(self) -> int: ...
    @property
    def balancer(self) -> LoadBalancer: ...
    @property
    def stats(self) -> PortStats: ...
    @property
    def per_endpoint(self) -> dict[Endpoint, int]: ...
    @property
    def connections(self) -> int: ...
    def stop_accepting(self) -> None: ...
    async def wait_idle(self) -> None: ...
    def abort_all(self) -> None: ...


# (service, proxy port to try, "cluster" or "external", its balancer) -> a listener, or OSError.
ListenerFactory = Callable[[ServicePort, int, str, LoadBalancer], Listener]


class ListenerStartError(UproxyError):
    """Some service ports could not get a listener this sync; the others are in force."""


def served_families(bind_address: str) -> tuple[Family, ...]:
    """The families listeners serve: both for a wildcard bind address, else its own."""
    ip = ipaddress.ip_address(bind_address)
    if ip.is_unspecified:
        return (4, 6)
    return (6,) if ip.version == 6 else (4,)


def family_address(bind_address: str, family: Family) -> str:
    """Where `family`'s listeners bind: that family's wildcard, or the specific address."""
    if ipaddress.ip_address(bind_address).is_unspecified:
        return "::" if family == 6 else "0.0.0.0"
    return bind_address


def _family(ip: str) -> Family:
    return 6 if ":" in ip else 4


_SOCKET_FAMILY = {4: socket.AF_INET, 6: socket.AF_INET6}
KERNEL_PORT_TRIES = 8  # kernel-chosen ports: one free in every family is found in a few tries

Listeners = dict[Family, Listener]  # one per family, all on one port


@dataclass(slots=True)
class _ServicePortState:
    service: ServicePort
    cluster: Listeners
    # Second listeners for external traffic when externalTrafficPolicy is Local.
    external_by_family: Listeners = dataclasses.field(default_factory=dict)
    endpoints: tuple[Endpoint, ...] = ()  # every known endpoint, usable or not
    # False: no virtual address of a served family; the one listener takes every endpoint.
    own_family: bool = True

    @property
    def families(self) -> tuple[Family, ...]:
        return tuple(self.cluster)

    @property
    def listener(self) -> Listener:
        return next(iter(self.cluster.values()))

    @property
    def external(self) -> Listener | None:
        return next(iter(self.external_by_family.values()), None)

    @property
    def listeners(self) -> tuple[Listener, ...]:
        return (*self.cluster.values(), *self.external_by_family.values())

    def portal(self) -> Portal:
        external = None if self.external is None else self.external.port
        return Portal(self.service, self.listener.port, external)


def _needs_external_listener(service: ServicePort) -> bool:
    # A listener balances over one endpoint set; external traffic gets its own listener when
    # its set differs from the ClusterIP traffic's.
    return external_endpoints_differ(service)


class PortAllocator:
    """Hands out proxy ports from --proxy-port-range; None lets the kernel choose."""

    def __init__(self, port_range: tuple[int, int] | None) -> None:
        self._range = port_range
        self._used: set[int] = set()

    def candidates(self) -> list[int]:
        if self._range is None:
            return [0] * KERNEL_PORT_TRIES
        low, high = self._range
        free = [p for p in range(low, high + 1) if p not in self._used]
        random.shuffle(free)
        return free

    def claim(self, port: int) -> None:
        if self._range is not None:
            self._used.add(port)

    def release(self, port: int) -> None:
        self._used.discard(port)


def listen_on(
    sock: socket.socket,
    service: ServicePort,
    balancer: LoadBalancer,
    loop: asyncio.AbstractEventLoop,
    *,
    tcp_options: TcpOptions,
    udp_timeout: float,
    udp_max_sessions: int,
) -> Listener:
    """The listener of one service port on a bound socket (this process's or a handed one)."""
    if service.protocol is Protocol.TCP:
        return TcpListener(service.name, sock, balancer, loop, tcp_options)
    return UdpListener(
        service.name, sock, balancer, loop, timeout=udp_timeout, max_sessions=udp_max_sessions
    )


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
        listener_factory: ListenerFactory | None = None,
        tcp_options: TcpOptions | None = None,
    ) -> None:
        self._tcp_options = tcp_options or TcpOptions()
        self._bind_address = bind_address
        own: Family = 6 if ipaddress.ip_address(bind_address).version == 6 else 4
        # A listener factory binds the bind address itself: its family only.
        self._families = served_families(bind_address) if listener_factory is None else (own,)
        if 6 in self._families and len(self._families) > 1 and not ipv6_available():
            log.warning("ipv6_unavailable", family=6, action="IPv4 listeners only")
            self._families = (4,)
        self._own_family: Family = own if own in self._families else self._families[0]
        self._ports = PortAllocator(port_range)
        self._node_name = node_name
        self._udp_timeout = udp_timeout
        self._udp_max_sessions = udp_max_sessions
        self._portals = portals
        self._balancer_factory = balancer_factory
        self._listener_factory = listener_factory
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
            families, own_family = self._families_of(service)
            if current is not None and current.service.protocol != service.protocol:
                self._retire(name, "protocol changed")
                current = None
            if current is not None and current.families != families:
                self._retire(name, "address families changed")
                current = None
            try:
                if current is None:
                    listeners = self._start(service, families)
                    current = self._active[name] = _ServicePortState(service, listeners)
                current.service = service
                current.own_family = own_family
                self._converge_external(current)
            except OSError as exc:
                log.error("listener_failed", service=str(name), error=str(exc))
                failed.append(f"{name}: {exc}")
                if current is None:
                    continue
            self._update_endpoints(current, state.endpoints.get(name, ()), state.node_zone)
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
            stats=listeners[0].stats
            if len(listeners) == 1
            else sum_stats(lst.stats for lst in listeners),
            ejected=frozenset().union(*(lst.balancer.ejected for lst in listeners)),
            ejections=sum(lst.balancer.ejections for lst in listeners),
        )

    # --- internals -----------------------------------------------------------------------------

    def _families_of(self, service: ServicePort) -> tuple[tuple[Family, ...], bool]:
        """(the families `service` gets listeners of, whether each takes only its own family's
        endpoints)."""
        addresses = (*service.cluster_ips, *service.external_ips, *service.load_balancer_ips)
        families = tuple(f for f in self._families if of_family(addresses, f))
        return (families, True) if families else ((self._own_family,), False)

    def _start(
        self, service: ServicePort, families: tuple[Family, ...], traffic: str = "cluster"
    ) -> Listeners:
        """One listener per family, all on one port."""
        loop = asyncio.get_running_loop()
        last_error: OSError | None = None
        for port in self._ports.candidates():
            try:
                if self._listener_factory is None:
                    listeners = self._open(service, port, families, loop)
                else:
                    balancer = self._balancer_factory()
                    factory = self._listener_factory
                    listeners = {families[0]: factory(service, port, traffic, balancer)}
            except OSError as exc:
                last_error = exc
                continue
            for family, listener in listeners.items():
                self._ports.claim(listener.port)
                log.info(
                    "listener_started" if traffic == "cluster" else "external_listener_started",
                    service=str(service.name),
                    protocol=service.protocol.value,
                    family=family,
                    address=family_address(self._bind_address, family),
                    port=listener.port,
                )
            return listeners
        raise last_error or OSError("no free port in --proxy-port-range")

    def _open(
        self,
        service: ServicePort,
        port: int,
        families: tuple[Family, ...],
        loop: asyncio.AbstractEventLoop,
    ) -> Listeners:
        """Bind every family's socket on one port (the first family's, when the kernel chooses
        it) before any becomes a listener: a port taken in one family is tried no further."""
        opener = open_tcp_socket if service.protocol is Protocol.TCP else open_udp_socket
        socks: dict[Family, socket.socket] = {}
        try:
            for family in families:
                address = family_address(self._bind_address, family)
                socks[family] = opener(address, port, _SOCKET_FAMILY[family])
                port = socks[family].getsockname()[1]
        except OSError:
            for sock in socks.values():
                sock.close()
            raise
        return {
            family: listen_on(
                sock,
                service,
                self._balancer_factory(),
                loop,
                tcp_options=self._tcp_options,
                udp_timeout=self._udp_timeout,
                udp_max_sessions=self._udp_max_sessions,
            )
            for family, sock in socks.items()
        }

    def _converge_external(self, state: _ServicePortState) -> None:
        if _needs_external_listener(state.service):
            if not state.external_by_family:
                state.external_by_family = self._start(state.service, state.families, "external")
        elif state.external_by_family:
            for listener in state.external_by_family.values():
                self._stop(state.service.name, listener, "external traffic policy changed")
            state.external_by_family = {}

    def _update_endpoints(
        self, state: _ServicePortState, endpoints: tuple[Endpoint, ...], node_zone: str
    ) -> None:
        state.endpoints = endpoints
        service = state.service
        for family, listener in state.cluster.items():
            # Each family's listener dials its own family's endpoints (one slice per family).
            mine = (
                tuple(e for e in endpoints if _family(e.ip) == family)
                if state.own_family
                else endpoints
            )
            chosen = categorize_endpoints(mine, service, self._node_name, node_zone)
            self._balance(service, listener, chosen.internal, "cluster", family)
            external = state.external_by_family.get(family)
            if external is not None:
                self._balance(service, external, chosen.external, "external", family)

    def _balance(
        self,
        service: ServicePort,
        listener: Listener,
        usable: tuple[Endpoint, ...],
        traffic: str,
        family: Family,
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
                family=family,
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
