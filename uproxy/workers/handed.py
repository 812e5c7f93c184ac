"""The worker's side of the listeners: sockets the main process bound and handed over."""

from __future__ import annotations

import asyncio
import socket

import structlog

from uproxy.balancer import LoadBalancer
from uproxy.dataplane.tcp_options import TcpOptions
from uproxy.model import ServicePort
from uproxy.proxier.userspace import Listener, listen_on
from uproxy.workers.messages import SocketKey

log = structlog.get_logger(__name__)


class HandedSockets:
    """The worker proxier's listener factory: listens on the socket handed for that key."""

    def __init__(
        self, *, udp_timeout: float, udp_max_sessions: int, tcp_options: TcpOptions
    ) -> None:
        self._tcp_options = tcp_options
        self._udp_timeout = udp_timeout
        self._udp_max_sessions = udp_max_sessions
        self._pending: dict[SocketKey, socket.socket] = {}

    def hand(self, keys: tuple[SocketKey, ...], sockets: list[socket.socket]) -> None:
        for key, sock in zip(keys, sockets, strict=True):
            old = self._pending.pop(key, None)
            if old is not None:
                old.close()
            self._pending[key] = sock

    def __call__(
        self, service: ServicePort, port: int, traffic: str, balancer: LoadBalancer
    ) -> Listener:
        sock = self._pending.pop((service.name, traffic), None)
        if sock is None:
            raise OSError(f"the main process handed no socket for {service.name} ({traffic})")
        return listen_on(
            sock,
            service,
            balancer,
            asyncio.get_running_loop(),
            tcp_options=self._tcp_options,
            udp_timeout=self._udp_timeout,
            udp_max_sessions=self._udp_max_sessions,
        )

    def close_unused(self) -> None:
        """A socket no listener took would keep its port's group alive: close it."""
        for (name, traffic), sock in self._pending.items():
            log.warning("handed_socket_unused", service=str(name), traffic=traffic)
            sock.close()
        self._pending.clear()
