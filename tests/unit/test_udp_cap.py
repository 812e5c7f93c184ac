"""The UDP listener at its session cap and under bursts, on loopback sockets (issue 18, item 5)."""

from __future__ import annotations

import asyncio
import socket

import structlog

from uproxy.balancer import LoadBalancer
from uproxy.dataplane.sockopt import raise_receive_buffer
from uproxy.dataplane.udp import READ_BATCH, RECEIVE_BUFFER, UdpListener, open_udp_socket
from uproxy.model import Endpoint, ServicePortName

DNS = ServicePortName("default", "dns", "dns")


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


def _listener(
    backend: socket.socket, clock: FakeClock, *, timeout: float, max_sessions: int
) -> UdpListener:
    """A loopback UDP listener whose one endpoint is `backend`; call it inside the loop."""
    balancer = LoadBalancer()
    balancer.update([Endpoint("127.0.0.1", backend.getsockname()[1])], None)
    return UdpListener(
        DNS,
        open_udp_socket("127.0.0.1", 0, socket.AF_INET),
        balancer,
        asyncio.get_running_loop(),
        timeout=timeout,
        max_sessions=max_sessions,
        clock=clock,
    )


async def _answer(backend: socket.socket, n: int) -> None:
    """The backend echoes `n` datagrams."""
    loop = asyncio.get_running_loop()
    for _ in range(n):
        data, peer = await loop.sock_recvfrom(backend, 2048)
        backend.sendto(data, peer)


async def _exchange(client: socket.socket, listener: UdpListener, payload: bytes) -> bytes | None:
    client.sendto(payload, ("127.0.0.1", listener.port))
    try:
        return await asyncio.wait_for(asyncio.get_running_loop().sock_recv(client, 2048), 0.5)
    except TimeoutError:
        return None


def test_the_listener_asks_for_a_large_receive_buffer() -> None:
    sock = open_udp_socket("127.0.0.1", 0, socket.AF_INET)
    try:
        granted = raise_receive_buffer(sock, RECEIVE_BUFFER)
        # Linux reports twice what was set; as root SO_RCVBUFFORCE passes rmem_max.
        assert granted >= RECEIVE_BUFFER
        # Never lowered.
        assert raise_receive_buffer(sock, 4096) == granted
    finally:
        sock.close()


def test_at_the_cap_established_sessions_are_served_and_new_ones_refused_counted_logged() -> None:
    async def run() -> None:
        clock = FakeClock()
        backend = _socket()
        listener = _listener(backend, clock, timeout=60, max_sessions=2)
        clients = [_socket() for _ in range(4)]
        echo = asyncio.create_task(_answer(backend, 5))
        try:
            with structlog.testing.capture_logs() as logs:
                assert await _exchange(clients[0], listener, b"a") == b"a"
                assert await _exchange(clients[1], listener, b"b") == b"b"
                # Beyond the cap: refused, twice within the same second, once a second later.
                assert await _exchange(clients[2], listener, b"c") is None
                assert await _exchange(clients[3], listener, b"d") is None
                clock.now += 1.0
                assert await _exchange(clients[2], listener, b"e") is None
                # The established sessions are still served.
                assert await _exchange(clients[0], listener, b"f") == b"f"
                assert await _exchange(clients[1], listener, b"g") == b"g"
                assert await _exchange(clients[1], listener, b"h") == b"h"
            stats = listener.stats
            assert (stats.active, stats.total, stats.udp_refused, stats.dropped) == (2, 2, 3, 3)
            capped = [e for e in logs if e["event"] == "udp_session_cap_reached"]
            assert [(e["refused"], e["refused_total"], e["limit"]) for e in capped] == [
                (1, 1, 2),
                (2, 3, 2),
            ]
        finally:
            echo.cancel()
            await asyncio.gather(echo, return_exceptions=True)
            listener.stop_accepting()
            for sock in [backend, *clients]:
                sock.close()

    asyncio.run(run())


def test_a_session_whose_datagram_waits_in_a_backlog_is_not_expired() -> None:
    async def run() -> None:
        clock = FakeClock()
        backend = _socket()
        listener = _listener(backend, clock, timeout=1, max_sessions=10)
        steady, noisy = _socket(), _socket()
        echo = asyncio.create_task(_answer(backend, 1))
        try:
            assert await _exchange(steady, listener, b"a") == b"a"
            (session,) = listener._sessions.values()
            # A queue longer than one read batch, the steady client's next datagram at its end,
            # and the clock past the timeout by the time the first batch is read.
            for _ in range(3 * READ_BATCH):
                noisy.sendto(b"n", ("127.0.0.1", listener.port))
            steady.sendto(b"b", ("127.0.0.1", listener.port))
            clock.now += 5
            listener._datagrams_ready()  # one batch: the backlog remains
            listener._expire(session)
            assert listener.connections == 2  # the steady session is still there
            while listener.stats.bytes_in < 2 + 3 * READ_BATCH:
                listener._datagrams_ready()
            listener._datagrams_ready()  # the queue is seen empty: idleness counts again
            clock.now += 5
            listener._expire(session)
            assert listener.connections == 1
        finally:
            echo.cancel()
            await asyncio.gather(echo, return_exceptions=True)
            listener.stop_accepting()
            for sock in [backend, steady, noisy]:
                sock.close()

    asyncio.run(run())
