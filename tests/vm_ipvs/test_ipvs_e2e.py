"""IPVS mode end to end, against a real IP Virtual Server, inside the test VM (tests/vm/run.py).

The VM's root network namespace is the node: `uproxy run --mode ipvs` runs there, and so does
the foreign virtual server that must survive everything. Backends and an outside client live in
namespaces, each wired to the node by its own veth and routed through it (as a routed CNI does):

    client 10.20.0.2 --- 10.20.0.1  node  10.11.N.1 --- 10.11.N.2 backend bN   (N = 1, 2, 3)
      fd00:20::2     fd00:20::1       fd00:11:N::1  fd00:11:N::2

--nodeport-addresses 10.20.0.0/24,fd00:20::/64, so NodePorts answer on 10.20.0.1 and
fd00:20::1 only. The client routes the service CIDR 10.96.0.0/16 and the externalIP range
10.30.0.0/24 to the node, and all of IPv6 (fd00:96::/64, the IPv6 ClusterIPs, included).

Each backend, over IPv4 and IPv6: TCP :8080 (socat) answers "bN <peer address>" and then
echoes, UDP :5353 (one socket, `Namespace.start_udp_answerer`) answers "bN <peer address>" to
every datagram; the peer address shows who masqueraded what.

One uproxy process serves the whole module (Python under TCG is ~20x slower, so every start
costs tens of seconds); tests change its manifests and wait for the kernel to follow. They run
in file order, each leaving the manifests as it found them.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import ipaddress
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests import manifests as m
from tests.integration.netns import Namespace, Network, network
from tests.uproxy_process import REPO, UproxyProcess

T = TypeVar("T")

CLIENT_IP, CLIENT_GW = "10.20.0.2", "10.20.0.1"
WEB_VIP, DNS_VIP, STICKY_VIP, EXTERNAL_IP = "10.96.0.10", "10.96.0.53", "10.96.0.20", "10.30.0.5"
DRAIN_VIP = "10.96.0.30"
CLIENT6, CLIENT6_GW = "fd00:20::2", "fd00:20::1"
WEB6_VIP = "fd00:96::10"  # IPv6 only: TCP :80 and UDP :53
DUAL_VIP, DUAL6_VIP = "10.96.0.60", "fd00:96::60"  # dual stack, with ClientIP affinity
DUAL_NODEPORT = 30090
FOREIGN_VIP = "10.99.0.1"
WEB_NODEPORT, DNS_NODEPORT = 30080, 30053
GRACE = 30.0
BACKENDS = {"b1": "10.11.1.2", "b2": "10.11.2.2", "b3": "10.11.3.2"}
NODE_SIDE = {"b1": "10.11.1.1", "b2": "10.11.2.1", "b3": "10.11.3.1"}
NODE_IPS = {CLIENT_GW, *NODE_SIDE.values()}
BACKENDS6 = {"b1": "fd00:11:1::2", "b2": "fd00:11:2::2", "b3": "fd00:11:3::2"}
NODE_SIDE6 = {"b1": "fd00:11:1::1", "b2": "fd00:11:2::1", "b3": "fd00:11:3::1"}
UPROXY_ADDRESSES = {
    WEB_VIP,
    DNS_VIP,
    STICKY_VIP,
    DRAIN_VIP,
    EXTERNAL_IP,
    WEB6_VIP,
    DUAL_VIP,
    DUAL6_VIP,
}
CLONE_NEWNET = 0x40000000


# -- the node's tools ------------------------------------------------------------------------


def run(*argv: str, check: bool = True) -> str:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {proc.stdout}{proc.stderr}")
    return proc.stdout


@dataclass(frozen=True)
class IpvsService:
    scheduler: str
    persistent: int | None
    dests: dict[tuple[str, int], tuple[str, int, int, int]]  # -> (forward, weight, act, inact)


_SERVICE_LINE = re.compile(r"^(TCP|UDP)\s+(\S+):(\d+)\s+(\S+)(?:\s+persistent (\d+))?")
_DEST_LINE = re.compile(r"^\s+->\s+(\S+):(\d+)\s+(\S+)\s+(\d+)\s+(\d+)\s+(\d+)")


def ipvsadm() -> dict[tuple[str, str, int], IpvsService]:
    """`ipvsadm -Ln`, parsed: (protocol, address, port) -> scheduler, persistence, real servers."""
    table: dict[tuple[str, str, int], IpvsService] = {}
    current: dict[tuple[str, int], tuple[str, int, int, int]] | None = None
    for line in run("ipvsadm", "-Ln").splitlines():
        service = _SERVICE_LINE.match(line)
        if service:
            proto, ip, port, sched, persistent = service.groups()
            current = {}
            table[(proto, ip, int(port))] = IpvsService(
                sched, int(persistent) if persistent else None, current
            )
            continue
        dest = _DEST_LINE.match(line)
        if dest and current is not None:
            ip, port, forward, weight, active, inactive = dest.groups()
            current[(ip, int(port))] = (forward, int(weight), int(active), int(inactive))
    return table


def dummy_addresses() -> set[str]:
    out = run("ip", "-o", "addr", "show", "dev", "uproxy-ipvs0", check=False)
    return {a for a in re.findall(r"inet6? ([0-9a-f.:]+)/", out) if not a.startswith("fe80:")}


def wait_for(what: str, check: Callable[[], T | None], timeout: float = 60.0) -> T:
    """Poll `check` until it returns something truthy; its last value in the failure message."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout}s\n{run('ipvsadm', '-Ln')}")
        time.sleep(0.25)


# -- clients -------------------------------------------------------------------------------

_libc = ctypes.CDLL(None, use_errno=True)


def open_socket(ns: Namespace | None, kind: int, family: int = socket.AF_INET) -> socket.socket:
    """A socket in namespace `ns` (None: the node's). A thread enters the namespace just to
    create it (setns affects only the calling thread); the socket stays in that namespace."""
    if ns is None:
        return socket.socket(family, kind)
    made: list[socket.socket | BaseException] = []

    def create() -> None:
        try:
            fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            made.append(socket.socket(family, kind))
        except BaseException as exc:
            made.append(exc)

    thread = threading.Thread(target=create)
    thread.start()
    thread.join()
    result = made[0]
    if isinstance(result, BaseException):
        raise result
    return result


def family_of(ip: str) -> int:
    return socket.AF_INET6 if ":" in ip else socket.AF_INET


def peer_address(text: str) -> str:
    """socat's $SOCAT_PEERADDR, compressed: it spells IPv6 in full, in brackets."""
    return str(ipaddress.ip_address(text.strip("[]")))


def hello(ns: Namespace | None, ip: str, port: int, timeout: float = 10.0) -> tuple[str, str]:
    """Connect over TCP, return (backend name, the address the backend saw) and close."""
    with open_socket(ns, socket.SOCK_STREAM, family_of(ip)) as sock:
        sock.settimeout(timeout)
        sock.connect((ip, port))
        name, peer = read_line(sock).split()
        return name, peer_address(peer)


def read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(200)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def datagram(ns: Namespace | None, ip: str, port: int, timeout: float = 5.0) -> tuple[str, str]:
    """One UDP request from a fresh source port; (backend name, the address it saw)."""
    with open_socket(ns, socket.SOCK_DGRAM, family_of(ip)) as sock:
        sock.settimeout(timeout)
        sock.connect((ip, port))  # a reply from any other address would not be delivered
        sock.send(b"ping\n")
        name, peer = sock.recv(200).decode().split()
        return name, peer_address(peer)


# -- the world -------------------------------------------------------------------------------


def web_service(backends: list[str]) -> list[dict[str, Any]]:
    return [
        m.service(
            "web",
            [
                {
                    "name": "http",
                    "port": 80,
                    "targetPort": 8080,
                    "protocol": "TCP",
                    "nodePort": WEB_NODEPORT,
                }
            ],
            cluster_ip=WEB_VIP,
            type="NodePort",
            externalIPs=[EXTERNAL_IP],
        ),
        m.endpoint_slice(
            "web",
            [{"name": "http", "port": 8080, "protocol": "TCP"}],
            [BACKENDS[b] for b in backends],
        ),
    ]


def dns_service(backends: list[str]) -> list[dict[str, Any]]:
    port = {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"}
    return [
        m.service("dns", [{**port, "nodePort": DNS_NODEPORT}], cluster_ip=DNS_VIP, type="NodePort"),
        m.endpoint_slice(
            "dns",
            [{"name": "dns", "port": 5353, "protocol": "UDP"}],
            [BACKENDS[b] for b in backends],
        ),
    ]


def drain_service(backends: list[str]) -> list[dict[str, Any]]:
    """A plain ClusterIP service that only the graceful termination test connects to."""
    return [
        m.service(
            "drain",
            [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            cluster_ip=DRAIN_VIP,
        ),
        m.endpoint_slice(
            "drain",
            [{"name": "http", "port": 8080, "protocol": "TCP"}],
            [BACKENDS[b] for b in backends],
        ),
    ]


def web6_service() -> list[dict[str, Any]]:
    """IPv6 only, TCP and UDP."""
    return [
        m.service(
            "web6",
            [
                {"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 53, "targetPort": 5353, "protocol": "UDP"},
            ],
            cluster_ip=WEB6_VIP,
            ipFamilies=["IPv6"],
        ),
        m.endpoint_slice(
            "web6",
            [
                {"name": "http", "port": 8080, "protocol": "TCP"},
                {"name": "dns", "port": 5353, "protocol": "UDP"},
            ],
            [BACKENDS6["b1"], BACKENDS6["b2"]],
            address_type="IPv6",
        ),
    ]


def dual_service() -> list[dict[str, Any]]:
    """Dual stack, a NodePort, ClientIP affinity; one EndpointSlice per family."""
    http = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    return [
        m.service(
            "dual",
            [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": DUAL_NODEPORT}],
            cluster_ip=DUAL_VIP,
            clusterIPs=[DUAL_VIP, DUAL6_VIP],
            ipFamilies=["IPv4", "IPv6"],
            type="NodePort",
            affinity_timeout=60,
        ),
        m.endpoint_slice("dual", http, list(BACKENDS.values()), name="dual-v4"),
        m.endpoint_slice(
            "dual", http, list(BACKENDS6.values()), name="dual-v6", address_type="IPv6"
        ),
    ]


def sticky_service() -> list[dict[str, Any]]:
    return [
        m.service(
            "sticky",
            [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            cluster_ip=STICKY_VIP,
            affinity_timeout=60,
        ),
        m.endpoint_slice(
            "sticky",
            [{"name": "http", "port": 8080, "protocol": "TCP"}],
            list(BACKENDS.values()),
        ),
    ]


@dataclass
class World:
    net: Network
    client: Namespace
    backends: dict[str, Namespace]
    config: Path
    uproxy: UproxyProcess | None = None

    def write(
        self,
        web: list[str] | None = None,
        dns: list[str] | None = None,
        sticky: bool = True,
        drain: list[str] | None = None,
    ) -> None:
        """Rewrite the manifests: the services given (with those backends) exist."""
        m.write(self.config / "web.yaml", *web_service(web if web is not None else ["b1", "b2"]))
        m.write(self.config / "drain.yaml", *drain_service(drain or ["b1", "b2"]))
        m.write(self.config / "web6.yaml", *web6_service())
        m.write(self.config / "dual.yaml", *dual_service())
        if dns is None:
            (self.config / "dns.yaml").unlink(missing_ok=True)
        else:
            m.write(self.config / "dns.yaml", *dns_service(dns))
        if sticky:
            m.write(self.config / "sticky.yaml", *sticky_service())
        else:
            (self.config / "sticky.yaml").unlink(missing_ok=True)

    def default(self) -> None:
        self.write(web=["b1", "b2"], dns=["b1", "b2"], sticky=True)


def wire(net: Network, name: str, node_ip: str, ns_ip: str, node6: str, ns6: str) -> Namespace:
    """A namespace routed through the node by one veth pair, over IPv4 and IPv6 (without
    duplicate address detection's delay)."""
    ns = net.namespace(name)
    node_dev = f"v{name}"
    run("ip", "link", "add", node_dev, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
    run("ip", "addr", "add", f"{node_ip}/24", "dev", node_dev)
    run("ip", "-6", "addr", "add", f"{node6}/64", "dev", node_dev, "nodad")
    run("ip", "link", "set", node_dev, "up")
    ns.run("ip", "addr", "add", f"{ns_ip}/24", "dev", "eth0")
    ns.run("ip", "-6", "addr", "add", f"{ns6}/64", "dev", "eth0", "nodad")
    ns.run("ip", "link", "set", "eth0", "up")
    ns.route("default", via=node_ip)
    ns.run("ip", "-6", "route", "add", "default", "via", node6)
    return ns


def start_uproxy(config: Path) -> UproxyProcess:
    proc = UproxyProcess(
        [
            "run",
            "--mode",
            "ipvs",
            "--config",
            str(config),
            "--log-format",
            "json",
            "--hostname-override",
            "node-a",
            "--nodeport-addresses",
            "10.20.0.0/24,fd00:20::/64",
            "--ipvs-graceful-period",
            f"{GRACE:.0f}s",
            "--min-sync-period",
            "100ms",
            "--healthz-bind-address",
            "",
            "--metrics-bind-address",
            "127.0.0.1:10249",
        ]
    )
    proc.wait_event("ipvs_synced", timeout=240)
    return proc


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    config = tmp_path_factory.mktemp("manifests")
    # The VM is the node: IPv6 forwarding is the node's to turn on (uproxy only checks it).
    Path("/proc/sys/net/ipv6/conf/all/forwarding").write_text("1\n")
    with network() as net:
        client = wire(net, "client", CLIENT_GW, CLIENT_IP, CLIENT6_GW, CLIENT6)
        client.route("10.96.0.0/16", via=CLIENT_GW)
        client.route("10.30.0.0/24", via=CLIENT_GW)
        backends = {}
        for name, ip in BACKENDS.items():
            ns = backends[name] = wire(
                net, name, NODE_SIDE[name], ip, NODE_SIDE6[name], BACKENDS6[name]
            )
            # $SOCAT_PEERADDR: who the backend thinks it talks to (masqueraded or not).
            for tcp in ("TCP-LISTEN", "TCP6-LISTEN"):
                v6 = ",ipv6only=1" if tcp.startswith("TCP6") else ""
                ns.start(
                    "socat",
                    f"{tcp}:8080,fork,reuseaddr{v6}",
                    f"SYSTEM:echo {name} $SOCAT_PEERADDR; exec cat",
                )
            for address in (ip, BACKENDS6[name]):
                ns.start_udp_answerer(address, 5353, f"{name} {{peer}}")
        # Someone else's virtual server on this node: uproxy must never touch it.
        run("ipvsadm", "-A", "-t", f"{FOREIGN_VIP}:80", "-s", "wlc")
        run("ipvsadm", "-a", "-t", f"{FOREIGN_VIP}:80", "-r", f"{BACKENDS['b3']}:8080", "-m")
        # Short IPVS FIN timeouts, so a closed connection leaves the table within seconds.
        run("ipvsadm", "--set", "900", "2", "60")
        world = World(net, client, backends, config)
        world.default()
        for name in BACKENDS:  # the backends answer before anything is measured
            for ip in (BACKENDS[name], BACKENDS6[name]):
                wait_for(
                    f"{name} listening on {ip}", functools.partial(_answers, backends[name], ip)
                )
        world.uproxy = start_uproxy(config)
        try:
            yield world
        finally:
            if world.uproxy is not None:
                world.uproxy.stop(timeout=30)
            with contextlib.suppress(Exception):
                uproxy_cleanup()
            run("ipvsadm", "-D", "-t", f"{FOREIGN_VIP}:80", check=False)


def _answers(ns: Namespace, ip: str) -> bool:
    with contextlib.suppress(OSError, ValueError):
        return bool(hello(ns, ip, 8080, timeout=2)) and bool(datagram(ns, ip, 5353, timeout=2))
    return False


def uproxy_cleanup() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "uproxy", "cleanup"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=REPO,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def dests_of(vip: str, table: dict[tuple[str, str, int], IpvsService]) -> dict[str, int]:
    """Backend name -> weight for the TCP service on `vip`:80."""
    service = table.get(("TCP", vip, 80))
    if service is None:
        return {}
    names = {ip: name for name, ip in BACKENDS.items()}
    return {names[ip]: d[1] for (ip, _), d in service.dests.items()}


def web_connections() -> int:
    with urllib.request.urlopen("http://127.0.0.1:10249/status", timeout=5) as response:
        document = json.load(response)
    [web] = [p for p in document["servicePorts"] if p["name"] == "default/web:http"]
    assert document["mode"] == "ipvs"
    return int(web["connections"])


def connect(ns: Namespace, vip: str) -> tuple[socket.socket, str]:
    """A connection held open; (socket, the backend it reached)."""
    sock = open_socket(ns, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect((vip, 80))
    return sock, read_line(sock).split()[0]


# -- the tests, in order -----------------------------------------------------------------------


def test_kernel_state_matches_the_services(world: World) -> None:
    table = wait_for("every virtual server", lambda: _complete(ipvsadm()))
    rr = ("Masq", 1)
    both = {(BACKENDS["b1"], 8080), (BACKENDS["b2"], 8080)}
    both6 = ("b1", "b2")
    all4 = {(ip, 8080) for ip in BACKENDS.values()}
    all6 = {(f"[{ip}]", 8080) for ip in BACKENDS6.values()}
    expected = {
        ("TCP", WEB_VIP, 80): ("rr", None, both),
        ("TCP", EXTERNAL_IP, 80): ("rr", None, both),
        ("TCP", CLIENT_GW, WEB_NODEPORT): ("rr", None, both),
        ("UDP", DNS_VIP, 53): ("rr", None, {(BACKENDS[b], 5353) for b in ("b1", "b2")}),
        ("UDP", CLIENT_GW, DNS_NODEPORT): ("rr", None, {(BACKENDS[b], 5353) for b in ("b1", "b2")}),
        ("TCP", STICKY_VIP, 80): ("rr", 60, {(ip, 8080) for ip in BACKENDS.values()}),
        ("TCP", DRAIN_VIP, 80): ("rr", None, both),
        ("TCP", f"[{WEB6_VIP}]", 80): ("rr", None, {(f"[{BACKENDS6[b]}]", 8080) for b in both6}),
        ("UDP", f"[{WEB6_VIP}]", 53): ("rr", None, {(f"[{BACKENDS6[b]}]", 5353) for b in both6}),
        # Dual stack: each ClusterIP, and the NodePort on each family's node address, gets its
        # own family's real servers.
        ("TCP", DUAL_VIP, 80): ("rr", 60, all4),
        ("TCP", CLIENT_GW, DUAL_NODEPORT): ("rr", 60, all4),
        ("TCP", f"[{DUAL6_VIP}]", 80): ("rr", 60, all6),
        ("TCP", f"[{CLIENT6_GW}]", DUAL_NODEPORT): ("rr", 60, all6),
    }
    ours = {key: s for key, s in table.items() if key[1] != FOREIGN_VIP}
    assert set(ours) == set(expected), run("ipvsadm", "-Ln")
    for key, (sched, persistent, dests) in expected.items():
        service = ours[key]
        assert (service.scheduler, service.persistent) == (sched, persistent), key
        assert set(service.dests) == dests, key
        assert {d[:2] for d in service.dests.values()} == {rr}, key
    # NodePorts only on the --nodeport-addresses CIDRs, and an IPv4-only service's on IPv4 only.
    assert not any(port == WEB_NODEPORT and ip != CLIENT_GW for _, ip, port in table)
    assert table[("TCP", FOREIGN_VIP, 80)].scheduler == "wlc"
    assert dummy_addresses() == UPROXY_ADDRESSES
    dummy6 = run("ip", "-o", "-6", "addr", "show", "dev", "uproxy-ipvs0", "scope", "global")
    assert dummy6.count("nodad") == 2, dummy6  # no duplicate address detection: usable at once
    for sysctl, value in (
        ("net/ipv4/vs/conntrack", "1"),
        ("net/ipv4/vs/expire_nodest_conn", "1"),
        ("net/ipv4/vs/expire_quiescent_template", "1"),
        ("net/ipv4/ip_forward", "1"),
    ):
        assert Path("/proc/sys", sysctl).read_text().strip() == value, sysctl
    nat = run("iptables-nft-save", "-t", "nat")
    assert "-A POSTROUTING" in nat and "-j UPROXY-IPVS-POSTROUTING" in nat
    nat6 = run("ip6tables-nft-save", "-t", "nat")
    print(nat6)
    assert "-A POSTROUTING" in nat6 and "-j UPROXY-IPVS-POSTROUTING" in nat6
    # uproxy compares its rules with ip6tables-save's text: they must read back exactly as made.
    masq = "--vdir ORIGINAL --vmethod MASQ"
    for rule in (
        f"-s {BACKENDS6['b1']}/128 -d {BACKENDS6['b1']}/128 -m ipvs {masq} "
        '-m comment --comment "uproxy IPVS: hairpin" -j MASQUERADE',
        f"-m ipvs --vaddr {CLIENT6_GW} {masq} "
        '-m comment --comment "uproxy IPVS: external traffic" -j MASQUERADE',
    ):
        assert f"-A UPROXY-IPVS-POSTROUTING {rule}\n" in nat6, rule
    assert "fd00" not in nat and "10." not in nat6.replace("-A ", "")
    print(run("ipvsadm", "-Ln"))


def _complete(table: dict[tuple[str, str, int], IpvsService]) -> Any:
    return table if len([k for k in table if k[1] != FOREIGN_VIP]) == 13 else None


def test_tcp_cluster_ip_from_outside_and_from_the_node(world: World) -> None:
    name, peer = hello(world.client, WEB_VIP, 80)
    assert name in ("b1", "b2")
    assert peer == CLIENT_IP  # a ClusterIP keeps the client's address
    name, peer = hello(None, WEB_VIP, 80)  # node-local: masqueraded to the node's address
    assert name in ("b1", "b2")
    assert peer in NODE_SIDE.values(), peer


def test_round_robin_spreads_evenly(world: World) -> None:
    counts = Counter(hello(world.client, WEB_VIP, 80)[0] for _ in range(20))
    print("spread over 20 connections:", dict(counts))
    assert set(counts) == {"b1", "b2"}
    assert abs(counts["b1"] - counts["b2"]) <= 2


def test_nodeport_and_external_ip(world: World) -> None:
    name, peer = hello(world.client, CLIENT_GW, WEB_NODEPORT)
    assert name in ("b1", "b2")
    # External traffic is masqueraded, so replies come back through this node.
    assert peer in NODE_SIDE.values(), peer
    name, peer = hello(world.client, EXTERNAL_IP, 80)
    assert name in ("b1", "b2") and peer in NODE_SIDE.values(), peer
    name, peer = hello(None, CLIENT_GW, WEB_NODEPORT)  # from the node itself
    assert name in ("b1", "b2") and peer in NODE_SIDE.values(), peer
    # 10.11.1.1 is a node address outside --nodeport-addresses: no NodePort there.
    with pytest.raises(OSError):
        hello(world.client, NODE_SIDE["b1"], WEB_NODEPORT, timeout=3)


def test_hairpin(world: World) -> None:
    """A backend reaching its own service, scheduled to itself, would answer itself directly
    (and drop its own packets as martians) without the hairpin masquerade."""
    answers = [hello(world.backends["b1"], WEB_VIP, 80) for _ in range(4)]
    assert {name for name, _ in answers} == {"b1", "b2"}, answers
    assert {peer for name, peer in answers if name == "b1"} == {NODE_SIDE["b1"]}, answers


def test_udp_cluster_ip_and_nodeport(world: World) -> None:
    answers = Counter(datagram(world.client, DNS_VIP, 53)[0] for _ in range(10))
    print("UDP spread over 10 datagrams:", dict(answers))
    assert set(answers) == {"b1", "b2"}
    name, peer = datagram(world.client, CLIENT_GW, DNS_NODEPORT)
    assert name in ("b1", "b2") and peer in NODE_SIDE.values(), peer
    assert datagram(None, DNS_VIP, 53)[0] in ("b1", "b2")


def test_client_ip_affinity_is_persistence(world: World) -> None:
    names = Counter(hello(world.client, STICKY_VIP, 80)[0] for _ in range(10))
    assert len(names) == 1, names
    assert ipvsadm()[("TCP", STICKY_VIP, 80)].persistent == 60


def test_graceful_termination_of_removed_backends(world: World) -> None:
    """Two services each lose the backend a live connection is on. On `drain` the client then
    resets its connection: IPVS keeps the entry in CLOSE state for 10 s, after which the real
    server is deleted, well inside the graceful period. On `web` the connection stays open and
    keeps working at weight 0 until the graceful period ends, and not a moment longer."""
    held, held_on = connect(world.client, WEB_VIP)
    reset, reset_on = connect(world.client, DRAIN_VIP)
    try:
        web_other = "b2" if held_on == "b1" else "b1"
        drain_other = "b2" if reset_on == "b1" else "b1"
        world.write(web=[web_other], dns=["b1", "b2"], drain=[drain_other])
        wait_for(
            "both at weight 0",
            lambda: (
                dests_of(WEB_VIP, t := ipvsadm()).get(held_on) == 0
                and dests_of(DRAIN_VIP, t).get(reset_on) == 0
            ),
        )
        quiesced = time.monotonic()
        # The open connections go on; new ones go elsewhere.
        held.sendall(b"still there\n")
        assert read_line(held) == "still there"
        assert {hello(world.client, WEB_VIP, 80)[0] for _ in range(4)} == {web_other}
        reset.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        reset.close()  # RST
        wait_for(
            f"{reset_on} deleted from drain once its connection is gone",
            lambda: reset_on not in dests_of(DRAIN_VIP, ipvsadm()),
            timeout=GRACE,
        )
        drained = time.monotonic() - quiesced
        assert ipvsadm()[("TCP", WEB_VIP, 80)].dests[(BACKENDS[held_on], 8080)][1:3] == (0, 1)
        # /status counts the connection from the kernel's statistics (refreshed every 10 s).
        wait_for("the held connection in /status", lambda: web_connections() >= 1, timeout=15)
        wait_for(
            f"{held_on} deleted from web when the graceful period ends",
            lambda: held_on not in dests_of(WEB_VIP, ipvsadm()),
            timeout=GRACE + 10,
        )
        bounded = time.monotonic() - quiesced
        print(
            f"graceful period {GRACE:.0f}s: drained real server deleted after {drained:.1f}s, "
            f"busy one after {bounded:.1f}s"
        )
        assert drained < GRACE - 5
        assert GRACE - 3 <= bounded <= GRACE + 5
    finally:
        held.close()
        reset.close()
        world.default()
    wait_for(
        "the backends back",
        lambda: (
            dests_of(WEB_VIP, t := ipvsadm()) == {"b1": 1, "b2": 1}
            and dests_of(DRAIN_VIP, t) == {"b1": 1, "b2": 1}
        ),
    )


def test_udp_backend_removed_at_once(world: World) -> None:
    world.write(web=["b1", "b2"], dns=["b2"])

    def only_b2() -> bool:
        service = ipvsadm().get(("UDP", DNS_VIP, 53))
        return service is not None and set(service.dests) == {(BACKENDS["b2"], 5353)}

    wait_for("b1 gone from the UDP service", only_b2)
    assert {datagram(world.client, DNS_VIP, 53)[0] for _ in range(4)} == {"b2"}
    world.default()
    wait_for("b1 back", lambda: len(ipvsadm()[("UDP", DNS_VIP, 53)].dests) == 2)


def test_removed_service_takes_its_address_along(world: World) -> None:
    world.write(web=["b1", "b2"], dns=None)
    wait_for(
        "the DNS virtual servers gone",
        lambda: not any(k[0] == "UDP" and ":" not in k[1] for k in ipvsadm()),
    )
    wait_for("its address gone", lambda: DNS_VIP not in dummy_addresses())
    world.default()
    wait_for("DNS back", lambda: _complete(ipvsadm()))


def test_load_balancer_source_ranges_admit_only_their_sources(world: World) -> None:
    # The client (10.20.0.2) is inside the only range; backend b3 (10.11.3.2) calls from outside.
    lb_vip, lb_cluster_ip = "10.30.0.8", "10.96.0.40"
    service = m.service(
        "ranged",
        [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
        cluster_ip=lb_cluster_ip,
        type="LoadBalancer",
        loadBalancerSourceRanges=["10.20.0.0/24"],
    )
    service["status"] = {"loadBalancer": {"ingress": [{"ip": lb_vip}]}}
    ports = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    slice_ = m.endpoint_slice("ranged", ports, [BACKENDS["b1"], BACKENDS["b2"]])
    path = world.config / "ranged.yaml"
    m.write(path, service, slice_)
    try:
        wait_for("the LB virtual server", lambda: dests_of(lb_vip, ipvsadm()))
        # The chain and the jump into it are two writes: wait for the second.
        hooked = "-A INPUT -m conntrack --ctstate NEW"
        wait_for("the firewall", lambda: hooked in run("iptables-nft-save", "-t", "filter"))
        assert hello(world.client, lb_vip, 80)[0] in ("b1", "b2")
        with pytest.raises(OSError):  # dropped in filter INPUT before IPVS: no answer at all
            answer = hello(world.backends["b3"], lb_vip, 80, timeout=3)
            print(answer, run("iptables-nft-save", "-t", "filter"))
        # Only the LoadBalancer IP is firewalled: the ClusterIP serves b3.
        assert hello(world.backends["b3"], lb_cluster_ip, 80)[0] in ("b1", "b2")
    finally:
        path.unlink()
    wait_for("the LB virtual server gone", lambda: not dests_of(lb_vip, ipvsadm()))
    wait_for("the firewall gone", lambda: "UPROXY-IPVS-FIREWALL" not in run("iptables-nft-save"))


def test_ipv6_cluster_ip_tcp_and_udp(world: World) -> None:
    names: Counter[str] = Counter()
    for _ in range(4):
        name, peer = hello(world.client, WEB6_VIP, 80)
        names[name] += 1
        assert peer == CLIENT6  # a ClusterIP keeps the client's address, over IPv6 too
    assert set(names) == {"b1", "b2"}, names
    # Node-local: masqueraded (ip6tables) to the node's address on the backend's link.
    name, peer = hello(None, WEB6_VIP, 80)
    assert name in ("b1", "b2") and peer == NODE_SIDE6[name], peer
    answers = [datagram(world.client, WEB6_VIP, 53) for _ in range(4)]
    assert {name for name, _ in answers} == {"b1", "b2"}, answers
    assert {peer for _, peer in answers} == {CLIENT6}, answers
    name, peer = datagram(None, WEB6_VIP, 53)
    assert name in ("b1", "b2") and peer == NODE_SIDE6[name], peer


def test_dual_stack_service_on_both_cluster_ips_with_affinity(world: World) -> None:
    """Each ClusterIP reaches its own family's backends, and ClientIP affinity (IPVS
    persistence) holds per family: one backend for every connection."""
    for vip, client in ((DUAL_VIP, CLIENT_IP), (DUAL6_VIP, CLIENT6)):
        answers = [hello(world.client, vip, 80) for _ in range(5)]
        assert len({name for name, _ in answers}) == 1, (vip, answers)
        assert {peer for _, peer in answers} == {client}, (vip, answers)
    table = ipvsadm()
    assert table[("TCP", DUAL_VIP, 80)].persistent == 60
    assert table[("TCP", f"[{DUAL6_VIP}]", 80)].persistent == 60


def test_ipv6_nodeport(world: World) -> None:
    name, peer = hello(world.client, CLIENT6_GW, DUAL_NODEPORT)
    # External traffic is masqueraded (ip6tables), so replies come back through this node.
    assert name in BACKENDS and peer == NODE_SIDE6[name], peer
    # fd00:11:1::1 is a node address outside --nodeport-addresses: no NodePort there.
    with pytest.raises(OSError):
        hello(world.client, NODE_SIDE6["b1"], DUAL_NODEPORT, timeout=3)


def test_kernel_forwards_without_uproxy_and_cleanup_leaves_only_foreign_state(
    world: World,
) -> None:
    assert world.uproxy is not None
    assert world.uproxy.stop(signal.SIGTERM, timeout=60) == 0
    events = world.uproxy.events
    world.uproxy = None
    syncs = [e for e in events if e.get("event") == "ipvs_synced"]
    print(f"{len(syncs)} syncs; the changes took (ms):", [e["duration_ms"] for e in syncs])
    problems = [e for e in events if e.get("level") in ("warning", "error")]
    assert not problems, problems
    # uproxy is gone; the kernel still forwards (no byte ever went through Python).
    assert hello(world.client, WEB_VIP, 80)[0] in ("b1", "b2")
    uproxy_cleanup()
    table = ipvsadm()
    assert set(table) == {("TCP", FOREIGN_VIP, 80)}, run("ipvsadm", "-Ln")
    assert table[("TCP", FOREIGN_VIP, 80)].dests == {(BACKENDS["b3"], 8080): ("Masq", 1, 0, 0)}
    assert "uproxy-ipvs0" not in run("ip", "-o", "link", "show")
    assert "UPROXY-IPVS" not in run("iptables-nft-save")
    assert "UPROXY" not in run("ip6tables-nft-save")
    assert not Path("/run/uproxy/ipvs-virtual-servers").exists()
