"""IPVS mode end to end, against a real IP Virtual Server, inside the test VM (tests/vm/run.py).

The VM's root network namespace is the node: `uproxy run --mode ipvs` runs there, and so does
the foreign virtual server that must survive everything. Backends and an outside client live in
namespaces, each wired to the node by its own veth and routed through it (as a routed CNI does):

    client 10.20.0.2 --- 10.20.0.1  node  10.11.N.1 --- 10.11.N.2 backend bN   (N = 1, 2, 3)

--nodeport-addresses 10.20.0.0/24, so NodePorts answer on 10.20.0.1 only. The client routes
the service CIDR 10.96.0.0/16 and the externalIP range 10.30.0.0/24 to the node.

Each backend runs socat: TCP :8080 answers "bN <peer address>" and then echoes, UDP :5353
answers "bN <peer address>" to every datagram; the peer address shows who masqueraded what.

One uproxy process serves the whole module (Python under TCG is ~20x slower, so every start
costs tens of seconds); tests change its manifests and wait for the kernel to follow. They run
in file order, each leaving the manifests as it found them.
"""

from __future__ import annotations

import contextlib
import ctypes
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
WEB6_VIP, WEB6_BACKEND = "fd00:96::10", "fd00:11:1::2"  # kernel state only: no IPv6 routes here
FOREIGN_VIP = "10.99.0.1"
WEB_NODEPORT, DNS_NODEPORT = 30080, 30053
GRACE = 30.0
BACKENDS = {"b1": "10.11.1.2", "b2": "10.11.2.2", "b3": "10.11.3.2"}
NODE_SIDE = {"b1": "10.11.1.1", "b2": "10.11.2.1", "b3": "10.11.3.1"}
NODE_IPS = {CLIENT_GW, *NODE_SIDE.values()}
UPROXY_ADDRESSES = {WEB_VIP, DNS_VIP, STICKY_VIP, DRAIN_VIP, EXTERNAL_IP, WEB6_VIP}
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


def open_socket(ns: Namespace | None, kind: int) -> socket.socket:
    """A socket in namespace `ns` (None: the node's). A thread enters the namespace just to
    create it (setns affects only the calling thread); the socket stays in that namespace."""
    if ns is None:
        return socket.socket(socket.AF_INET, kind)
    made: list[socket.socket | BaseException] = []

    def create() -> None:
        try:
            fd = os.open(f"/run/netns/{ns.name}", os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            finally:
                os.close(fd)
            made.append(socket.socket(socket.AF_INET, kind))
        except BaseException as exc:
            made.append(exc)

    thread = threading.Thread(target=create)
    thread.start()
    thread.join()
    result = made[0]
    if isinstance(result, BaseException):
        raise result
    return result


def hello(ns: Namespace | None, ip: str, port: int, timeout: float = 10.0) -> tuple[str, str]:
    """Connect over TCP, return (backend name, the address the backend saw) and close."""
    with open_socket(ns, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect((ip, port))
        name, peer = read_line(sock).split()
        return name, peer


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
    with open_socket(ns, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.connect((ip, port))  # a reply from any other address would not be delivered
        sock.send(b"ping\n")
        name, peer = sock.recv(200).decode().split()
        return name, peer


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
    return [
        m.service(
            "web6",
            [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}],
            cluster_ip=WEB6_VIP,
            ipFamilies=["IPv6"],
        ),
        m.endpoint_slice(
            "web6",
            [{"name": "http", "port": 8080, "protocol": "TCP"}],
            [WEB6_BACKEND],
            address_type="IPv6",
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


def wire(net: Network, name: str, node_ip: str, ns_ip: str) -> Namespace:
    """A namespace routed through the node by one veth pair."""
    ns = net.namespace(name)
    node_dev = f"v{name}"
    run("ip", "link", "add", node_dev, "type", "veth", "peer", "name", "eth0", "netns", ns.name)
    run("ip", "addr", "add", f"{node_ip}/24", "dev", node_dev)
    run("ip", "link", "set", node_dev, "up")
    ns.run("ip", "addr", "add", f"{ns_ip}/24", "dev", "eth0")
    ns.run("ip", "link", "set", "eth0", "up")
    ns.route("default", via=node_ip)
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
            "10.20.0.0/24",
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
    with network() as net:
        client = wire(net, "client", CLIENT_GW, CLIENT_IP)
        client.route("10.96.0.0/16", via=CLIENT_GW)
        client.route("10.30.0.0/24", via=CLIENT_GW)
        backends = {}
        for name, ip in BACKENDS.items():
            ns = backends[name] = wire(net, name, NODE_SIDE[name], ip)
            # $SOCAT_PEERADDR: who the backend thinks it talks to (masqueraded or not).
            ns.start(
                "socat",
                "TCP-LISTEN:8080,fork,reuseaddr",
                f"SYSTEM:echo {name} $SOCAT_PEERADDR; exec cat",
            )
            ns.start("socat", "UDP-RECVFROM:5353,fork", f"SYSTEM:echo {name} $SOCAT_PEERADDR")
        # Someone else's virtual server on this node: uproxy must never touch it.
        run("ipvsadm", "-A", "-t", f"{FOREIGN_VIP}:80", "-s", "wlc")
        run("ipvsadm", "-a", "-t", f"{FOREIGN_VIP}:80", "-r", f"{BACKENDS['b3']}:8080", "-m")
        # Short IPVS FIN timeouts, so a closed connection leaves the table within seconds.
        run("ipvsadm", "--set", "900", "2", "60")
        world = World(net, client, backends, config)
        world.default()
        for name, ip in BACKENDS.items():  # the backends answer before anything is measured
            wait_for(f"{name} listening", lambda ns=backends[name], ip=ip: _answers(ns, ip))
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
        return bool(hello(ns, ip, 8080, timeout=2))
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
    expected = {
        ("TCP", WEB_VIP, 80): ("rr", None, both),
        ("TCP", EXTERNAL_IP, 80): ("rr", None, both),
        ("TCP", CLIENT_GW, WEB_NODEPORT): ("rr", None, both),
        ("UDP", DNS_VIP, 53): ("rr", None, {(BACKENDS[b], 5353) for b in ("b1", "b2")}),
        ("UDP", CLIENT_GW, DNS_NODEPORT): ("rr", None, {(BACKENDS[b], 5353) for b in ("b1", "b2")}),
        ("TCP", STICKY_VIP, 80): ("rr", 60, {(ip, 8080) for ip in BACKENDS.values()}),
        ("TCP", DRAIN_VIP, 80): ("rr", None, both),
        ("TCP", f"[{WEB6_VIP}]", 80): ("rr", None, {(f"[{WEB6_BACKEND}]", 8080)}),
    }
    ours = {key: s for key, s in table.items() if key[1] != FOREIGN_VIP}
    assert set(ours) == set(expected), run("ipvsadm", "-Ln")
    for key, (sched, persistent, dests) in expected.items():
        service = ours[key]
        assert (service.scheduler, service.persistent) == (sched, persistent), key
        assert set(service.dests) == dests, key
        assert {d[:2] for d in service.dests.values()} == {rr}, key
    # NodePorts only on the --nodeport-addresses CIDR.
    assert not any(port == WEB_NODEPORT and ip != CLIENT_GW for _, ip, port in table)
    assert table[("TCP", FOREIGN_VIP, 80)].scheduler == "wlc"
    assert dummy_addresses() == UPROXY_ADDRESSES
    for key, value in (
        ("net/ipv4/vs/conntrack", "1"),
        ("net/ipv4/vs/expire_nodest_conn", "1"),
        ("net/ipv4/vs/expire_quiescent_template", "1"),
        ("net/ipv4/ip_forward", "1"),
    ):
        assert Path("/proc/sys", key).read_text().strip() == value, key
    nat = run("iptables-nft-save", "-t", "nat")
    assert "-A POSTROUTING" in nat and "-j UPROXY-IPVS-POSTROUTING" in nat
    print(run("ipvsadm", "-Ln"))


def _complete(table: dict[tuple[str, str, int], IpvsService]) -> Any:
    return table if len([k for k in table if k[1] != FOREIGN_VIP]) == 8 else None


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
        lambda: not any(k[0] == "UDP" for k in ipvsadm()),
    )
    wait_for("its address gone", lambda: DNS_VIP not in dummy_addresses())
    world.default()
    wait_for("DNS back", lambda: _complete(ipvsadm()))


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
    assert not Path("/run/uproxy/ipvs-virtual-servers").exists()
