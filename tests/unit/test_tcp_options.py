"""Dead and idle peers in the TCP data plane: flags, socket options, idle timeout and linger.

Real sockets on 127.0.0.1 (no root needed); assertions are on the resulting state: the socket
options the kernel reports, and what a client sees of the connection.
"""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import AsyncIterator

import pytest
from click.testing import CliRunner

from uproxy.balancer import LoadBalancer
from uproxy.cli import cli
from uproxy.dataplane.sockopt import (
    TCP_USER_TIMEOUT,
    BorrowedSocket,
    eof_pending,
    send_last,
    shutdown_write,
)
from uproxy.dataplane.tcp import TcpListener, open_tcp_socket
from uproxy.dataplane.tcp_options import TcpOptions
from uproxy.errors import SettingsError
from uproxy.model import Endpoint, ServicePortName
from uproxy.settings import Settings


def test_settings_default_to_go_keepalive_and_no_idle_timeout() -> None:
    settings = Settings()
    assert settings.tcp_keepalive is True
    assert (settings.tcp_keepalive_idle, settings.tcp_keepalive_interval) == (15.0, 15.0)
    assert settings.tcp_keepalive_count == 9
    assert settings.tcp_idle_timeout is None
    assert settings.tcp_linger_timeout == 30.0


@pytest.mark.parametrize(
    ("field", "value", "flag"),
    [
        ("tcp_keepalive_idle", 0.0, "--tcp-keepalive-idle"),
        ("tcp_keepalive_interval", 40000.0, "--tcp-keepalive-interval"),
        ("tcp_keepalive_count", 0, "--tcp-keepalive-count"),
        ("tcp_idle_timeout", -1.0, "--tcp-idle-timeout"),
        ("tcp_linger_timeout", -1.0, "--tcp-linger-timeout"),
    ],
)
def test_bad_values_are_refused_naming_the_flag(field: str, value: float, flag: str) -> None:
    with pytest.raises(SettingsError, match=flag):
        Settings(**{field: value})  # type: ignore[arg-type]


def test_the_cli_offers_the_flags() -> None:
    help_text = CliRunner().invoke(cli, ["run", "--help"]).output
    for flag in ("--no-tcp-keepalive", "--tcp-keepalive-idle", "--tcp-idle-timeout"):
        assert flag in help_text
    bad = CliRunner().invoke(cli, ["run", "--tcp-keepalive-count", "0"])
    assert bad.exit_code == 2 and "--tcp-keepalive-count" in bad.output


def test_keepalive_options_land_on_the_socket() -> None:
    with socket.socket() as sock:
        TcpOptions(keepalive_idle=2.5, keepalive_interval=3, keepalive_count=4).apply_keepalive(
            sock
        )
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 3  # whole seconds
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 3
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4
        # Data in flight to a dead peer is given up when an idle one would be: 3 + 3 * 4 s.
        assert sock.getsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT) == 15_000
    with socket.socket() as sock:
        TcpOptions(keepalive=False).apply_keepalive(sock)
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 0


def test_end_of_stream_helpers_on_a_socket_pair() -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with a, b:
        a.setblocking(False)
        assert not eof_pending(a)  # nothing to read yet
        b.send(b"data")
        assert not eof_pending(a)  # data first
        assert a.recv(10) == b"data"
        assert send_last(b, b"last") == 4  # data, then the write side shut
        assert a.recv(10) == b"last"
        assert eof_pending(a)
        assert a.recv(10) == b""
        assert shutdown_write(a)
        assert b.recv(10) == b""
    # Once the owner has closed it, the helpers fail harmlessly.
    assert not eof_pending(a) and send_last(a, b"x") == 0 and not shutdown_write(a)


# -- a real listener on loopback --------------------------------------------------------------


@pytest.fixture
async def silent_backend() -> AsyncIterator[int]:
    """A backend that accepts and never sends anything."""
    accepted: list[asyncio.StreamWriter] = []
    server = await asyncio.start_server(lambda r, w: accepted.append(w), "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for writer in accepted:
            writer.close()
        await server.wait_closed()


def listener(backend_port: int, options: TcpOptions) -> TcpListener:
    balancer = LoadBalancer()
    balancer.update((Endpoint("127.0.0.1", backend_port),), None)
    sock = open_tcp_socket("127.0.0.1", 0, socket.AF_INET)
    name = ServicePortName("default", "t", "p")
    return TcpListener(name, sock, balancer, asyncio.get_running_loop(), options)


async def test_a_connection_silent_both_ways_is_closed(silent_backend: int) -> None:
    proxy = listener(silent_backend, TcpOptions(idle_timeout=0.3, linger_timeout=1.0))
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        assert await asyncio.wait_for(reader.read(), 10) == b""  # closed by the proxy
        writer.close()
        await writer.wait_closed()
        await asyncio.wait_for(proxy.wait_idle(), 10)
        assert proxy.connections == 0
    finally:
        proxy.stop_accepting()


async def test_the_listener_passes_keepalive_on_to_accepted_sockets(silent_backend: int) -> None:
    proxy = listener(silent_backend, TcpOptions(keepalive_idle=7))
    try:
        sock = proxy._sock  # the listening socket: accepted ones inherit its options
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 7
    finally:
        proxy.stop_accepting()


def test_a_borrowed_socket_never_closes_the_descriptor_it_borrowed() -> None:
    a, b = socket.socketpair()
    with a, b:
        borrowed = BorrowedSocket(a.family, socket.SOCK_STREAM, 0, a.fileno())
        del borrowed
        gc.collect()
        b.send(b"still open")
        assert a.recv(20) == b"still open"
