"""Per-service-port views summed over workers, and the main process's socket groups."""

from __future__ import annotations

import socket

import pytest

from uproxy.balancer import LoadBalancer
from uproxy.dataplane.stats import PortStats
from uproxy.errors import SettingsError
from uproxy.model import Endpoint, Protocol, ProxyState, ServicePort, ServicePortName
from uproxy.proxier.base import PortView
from uproxy.settings import Settings, parse_workers
from uproxy.workers.aggregate import aggregate, carry
from uproxy.workers.held import HeldSockets

WEB = ServicePortName("default", "web", "http")
DNS = ServicePortName("default", "dns", "dns")
A, B = Endpoint("10.1.0.1", 8080), Endpoint("10.1.0.2", 8080)
WEB_PORT = ServicePort(WEB, Protocol.TCP, 80)
DNS_PORT = ServicePort(DNS, Protocol.UDP, 53)


def view(service: ServicePort, **fields: object) -> PortView:
    base: dict[str, object] = {
        "service": service,
        "proxy_port": 0,
        "endpoints": (),
        "in_use": frozenset(),
        "per_endpoint": {},
        "connections": 0,
        "affinity_entries": 0,
        "stats": PortStats(),
    }
    return PortView(**{**base, **fields})  # type: ignore[arg-type]


def test_worker_figures_add_up_per_service_port_and_the_main_view_says_what_it_is() -> None:
    local = [
        view(WEB_PORT, proxy_port=4000, endpoints=(A, B), in_use=frozenset({A, B})),
        view(DNS_PORT, proxy_port=4001),
    ]
    w0 = [
        view(WEB_PORT, per_endpoint={A: 2}, connections=2, affinity_entries=1,
             stats=PortStats(active=2, total=10, bytes_in=100), ejections=1),
    ]  # fmt: skip
    w1 = [
        view(WEB_PORT, per_endpoint={A: 1, B: 3}, connections=4, affinity_entries=2,
             stats=PortStats(active=4, total=5, bytes_in=50), ejected=frozenset({B})),
        view(DNS_PORT, connections=1, stats=PortStats(active=1, total=7)),
    ]  # fmt: skip
    web, dns = aggregate(local, [w0, w1], {})
    assert web.proxy_port == 4000 and web.in_use == {A, B} and web.endpoints == (A, B)
    assert web.per_endpoint == {A: 3, B: 3}
    assert (web.connections, web.affinity_entries, web.ejections) == (6, 3, 1)
    assert web.ejected == {B}
    assert web.stats == PortStats(active=6, total=15, bytes_in=150)
    assert dns.stats == PortStats(active=1, total=7) and dns.proxy_port == 4001


def test_a_dead_workers_counters_are_carried_but_not_its_open_connections() -> None:
    carried: dict[ServicePortName, PortStats] = {}
    carry(carried, [view(WEB_PORT, stats=PortStats(active=3, total=10, dial_failures=2))])
    local = [view(WEB_PORT)]
    (web,) = aggregate(local, [[view(WEB_PORT, stats=PortStats(active=1, total=1))], []], carried)
    assert web.stats == PortStats(active=1, total=11, dial_failures=2)


def test_a_port_no_worker_reported_yet_shows_zeros() -> None:
    (web,) = aggregate([view(WEB_PORT, proxy_port=4000)], [[], []], {})
    assert web.stats == PortStats() and web.proxy_port == 4000


def test_held_groups_share_one_port_and_a_closed_port_waits_for_the_workers() -> None:
    held = HeldSockets(3, "127.0.0.1")
    web = held(WEB_PORT, 0, "cluster", LoadBalancer())
    try:
        ports = {sock.getsockname()[1] for sock in web.sockets}
        assert len(web.sockets) == 3 and ports == {web.port}
        assert all(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) for s in web.sockets)
        assert list(held.take_new()) == [(WEB, "cluster")]
        assert held.take_new() == {}
        assert list(held.all()) == [(WEB, "cluster")]
        held.steer(
            ProxyState(services={WEB: ServicePort(WEB, Protocol.TCP, 80, affinity_timeout=10)})
        )
        assert web.steered
        held.steer(ProxyState(services={WEB: WEB_PORT}))
        assert not web.steered
        port = web.port
        web.stop_accepting()
        assert held.all() == {}
        with pytest.raises(OSError):
            held(WEB_PORT, port, "cluster", LoadBalancer())
        held.synced()
        again = held(WEB_PORT, port, "cluster", LoadBalancer())
        assert again.port == port
        again.stop_accepting()
    finally:
        web.stop_accepting()


def test_workers_flag() -> None:
    assert parse_workers("auto", 6) == 6
    assert parse_workers("3", 6) == 3
    with pytest.raises(SettingsError, match="--workers"):
        parse_workers("many", 6)
    with pytest.raises(SettingsError, match="at least 1"):
        parse_workers("0", 6)
    assert Settings(workers=4).workers == 4
    with pytest.raises(SettingsError, match="only the userspace mode"):
        Settings(mode="iptables", workers=2)
    assert Settings(mode="iptables", workers=1).workers == 1


def test_the_cli_rejects_workers_in_a_kernel_mode() -> None:
    from click.testing import CliRunner

    from uproxy.cli import cli

    bad = CliRunner().invoke(cli, ["run", "--mode", "nftables", "--workers", "2"])
    assert bad.exit_code == 2
    assert "only the userspace mode" in bad.output
