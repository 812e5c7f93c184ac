"""The main process's side of the listeners: it binds every proxy port, once per worker.

With --workers N the main process's proxier still decides which service port gets which proxy
port (so the portals never change), but its listeners only hold sockets: N per port, bound with
SO_REUSEPORT in worker order and handed to the workers, which accept on them. Holding them here
keeps each socket's place in its reuseport group while a worker restarts: connections queue in
the backlog of the dead worker's socket until its successor takes it over, and a client's
steering index still means the same worker.
"""

from __future__ import annotations

import errno
import socket
from collections.abc import Callable

import structlog

from uproxy.balancer import LoadBalancer
from uproxy.dataplane.sockopt import family_of
from uproxy.dataplane.stats import PortStats
from uproxy.model import Endpoint, Protocol, ProxyState, ServicePort
from uproxy.workers import reuseport_bpf
from uproxy.workers.messages import SocketKey

log = structlog.get_logger(__name__)


def bind_group(
    protocol: Protocol, host: str, port: int, count: int, family: socket.AddressFamily
) -> list[socket.socket]:
    """`count` SO_REUSEPORT sockets on one port, in index order (port 0: the kernel picks)."""
    kind = socket.SOCK_STREAM if protocol is Protocol.TCP else socket.SOCK_DGRAM
    group: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(family, kind)
            group.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((host, port))
            port = sock.getsockname()[1]
            if kind == socket.SOCK_STREAM:
                # A TCP socket joins its group when it listens, so listen in index order too.
                sock.listen(socket.SOMAXCONN)
    except BaseException:
        for sock in group:
            sock.close()
        raise
    return group


class HeldListener:
    """Stands in for a listener in the main process: holds the group, accepts nothing."""

    def __init__(
        self,
        key: SocketKey,
        sockets: list[socket.socket],
        balancer: LoadBalancer,
        on_close: Callable[[HeldListener], None],
    ) -> None:
        self.key = key
        self.sockets = sockets
        self.balancer = balancer
        self.stats = PortStats()
        self.per_endpoint: dict[Endpoint, int] = {}
        self.port: int = sockets[0].getsockname()[1]
        self.steered = False
        self._on_close = on_close

    @property
    def connections(self) -> int:
        return 0  # the workers' connections; the proxier need not wait for any here

    @property
    def open(self) -> bool:
        return self.sockets[0].fileno() >= 0

    def stop_accepting(self) -> None:
        if self.open:
            for sock in self.sockets:
                sock.close()
            self._on_close(self)

    async def wait_idle(self) -> None:
        return None

    def abort_all(self) -> None:
        self.stop_accepting()

    def steer(self, by_client: bool) -> None:
        if by_client and not self.steered:
            reuseport_bpf.attach(self.sockets[0], len(self.sockets))
        elif self.steered and not by_client:
            reuseport_bpf.detach(self.sockets[0])
        self.steered = by_client


class HeldSockets:
    """The main proxier's listener factory; remembers what its workers must be handed."""

    def __init__(self, workers: int, bind_address: str) -> None:
        self._workers = workers
        self._host = bind_address
        self._family = family_of(bind_address)
        self._held: dict[SocketKey, HeldListener] = {}
        self._new: list[SocketKey] = []
        # Ports closed here whose workers may still hold them: a new group bound to one of
        # them would join the old group, so they stay unused until every worker has synced.
        self._quarantine: set[int] = set()

    def __call__(
        self, service: ServicePort, port: int, traffic: str, balancer: LoadBalancer
    ) -> HeldListener:
        if port in self._quarantine:
            raise OSError(errno.EADDRINUSE, f"proxy port {port} is still being released")
        group = bind_group(service.protocol, self._host, port, self._workers, self._family)
        key = (service.name, traffic)
        held = HeldListener(key, group, balancer, self._closed)
        self._held[key] = held
        self._new.append(key)
        return held

    def _closed(self, held: HeldListener) -> None:
        self._quarantine.add(held.port)
        if self._held.get(held.key) is held:
            del self._held[held.key]

    def steer(self, state: ProxyState) -> None:
        """ClientIP affinity needs one client on one worker; without it the kernel's 4-tuple
        hash spreads connections, even those of a single client, over every worker."""
        for (name, _), held in self._held.items():
            service = state.services.get(name)
            if service is not None:
                held.steer(service.has_affinity)

    def take_new(self) -> dict[SocketKey, list[socket.socket]]:
        """The groups bound since the last call (each worker gets its own socket of each)."""
        new = {key: self._held[key].sockets for key in self._new if key in self._held}
        self._new.clear()
        return new

    def all(self) -> dict[SocketKey, list[socket.socket]]:
        """Every group in force, for a worker that starts over."""
        return {key: held.sockets for key, held in self._held.items()}

    def synced(self) -> None:
        """Every worker has applied a sync: the ports closed before it are free again."""
        self._quarantine.clear()
