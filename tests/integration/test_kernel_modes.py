"""The kernel NAT modes end to end: a real `uproxy run --mode M` in a node namespace, real
clients in a client namespace, real servers in backend namespaces. One behaviour, one test,
parametrised by mode; only `kernel_state` knows how each mode shows its rules.

    client 10.10.0.2 --veth-- 10.10.0.1 node 10.20.N.1 --veth-- 10.20.N.2 backend N

Backend N answers TCP :8080 with `beN` (or with the client address it sees) and resolves
*.svc.test to 10.0.0.N on UDP :53. The node forwards (a sysctl of its own namespace only).
"""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import require_tools
from tests.integration.netns import Namespace, Network, Process
from tests.integration.test_portals import (
    CLIENT_IP,
    NODE_IP,
    REMOTE_EIP,
    Topology,
    ask,
    build_topology,
    dig,
    iptables_save,
    start_backends,
)
from tests.manifests import endpoint_slice, service, write

pytestmark = pytest.mark.root

KERNEL_MODES = ["nftables"]
WEB_VIP, DNS_VIP, STICKY_VIP, EMPTY_VIP, LOCAL_VIP = (
    "10.96.0.10",
    "10.96.0.53",
    "10.96.0.20",
    "10.96.0.40",
    "10.96.0.30",
)
LB_IP = "10.96.5.5"
BACKEND_IPS = ["10.20.1.2", "10.20.2.2", "10.20.3.2"]
HTTP = [{"name": "http", "port": 8080, "protocol": "TCP"}]
DNS_PORT = [{"name": "dns", "port": 53, "protocol": "UDP"}]


def manifests(dns_backends: list[str] | None = None, *, with_sticky: bool = True) -> list[Any]:
    web = service(
        "web",
        [{"name": "http", "port": 80, "nodePort": 30080}],
        cluster_ip=WEB_VIP,
        type="LoadBalancer",
        externalIPs=[REMOTE_EIP],
    )
    web["status"] = {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    objects: list[Any] = [
        web,
        endpoint_slice("web", HTTP, BACKEND_IPS),
        service("dns", [{"name": "dns", "port": 53, "protocol": "UDP"}], cluster_ip=DNS_VIP),
        endpoint_slice("dns", DNS_PORT, BACKEND_IPS[:2] if dns_backends is None else dns_backends),
        service("empty", [{"name": "http", "port": 80}], cluster_ip=EMPTY_VIP),
    ]
    if with_sticky:
        objects += [
            service(
                "sticky", [{"name": "http", "port": 80}], cluster_ip=STICKY_VIP, affinity_timeout=2
            ),
            endpoint_slice("sticky", HTTP, BACKEND_IPS),
        ]
    return objects


def local_policy_manifests() -> list[Any]:
    local = service(
        "local",
        [{"name": "http", "port": 80, "nodePort": 30081}],
        cluster_ip=LOCAL_VIP,
        type="NodePort",
        externalTrafficPolicy="Local",
    )
    slice_ = endpoint_slice("local", HTTP, [])
    slice_["endpoints"] = [
        {"addresses": ["10.20.1.2"], "nodeName": "node-a"},
        {"addresses": ["10.20.2.2"], "nodeName": "node-b"},
    ]
    return [local, slice_]


def start_uproxy(node: Namespace, config: Path, mode: str, *extra: str) -> Process:
    process = node.start_python(
        "-m", "uproxy", "run", "--mode", mode, "--config", str(config),
        "--sync-period", "2s", "--min-sync-period", "0", "--log-format", "json",
        "--hostname-override", "node-a",
        "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0",
        *extra,
    )  # fmt: skip
    process.wait_event("sync_done", timeout=30)
    return process


def kernel_state(node: Namespace) -> str:
    """Everything of uproxy's the node's kernel holds, as an admin's tools show it."""
    parts = [
        line
        for backend in ("nft", "legacy")
        for line in iptables_save(node, backend).splitlines()
        if "UPROXY" in line
    ]
    for tool in ("ip6tables-nft-save", "ip6tables-legacy-save"):
        saved = node.run(tool, check=False).stdout
        parts += [line for line in saved.splitlines() if "UPROXY" in line]
    for family in ("ip", "ip6"):
        table = node.run("nft", "list", "table", family, "uproxy", check=False)
        if table.returncode == 0:
            parts.append(table.stdout)
    return "\n".join(parts)


def cli_cleanup(node: Namespace) -> None:
    done = node.run(sys.executable, "-m", "uproxy", "cleanup", "--log-format", "json", check=False)
    assert done.returncode == 0, done.stdout + done.stderr


def wait_until(check: Any, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


@pytest.fixture(params=KERNEL_MODES)
def mode(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    require_tools("nft" if name == "nftables" else "iptables-nft-restore")
    return name


@pytest.fixture
def world(net: Network, tmp_path: Path, mode: str) -> Iterator[tuple[Topology, Path]]:
    require_tools("socat", "dnsmasq", "dig")
    topo = build_topology(net, backends=3)
    topo.node.sysctl("net.ipv4.ip_forward", "1")
    start_backends(topo)
    config = tmp_path / "manifests"
    config.mkdir()
    write(config / "services.yaml", *manifests())
    try:
        yield topo, config
    finally:
        cli_cleanup(topo.node)


def test_every_address_kind_forwards_tcp_and_udp(world: tuple[Topology, Path], mode: str) -> None:
    topo, config = world
    uproxy = start_uproxy(topo.node, config, mode)
    client, node = topo.client, topo.node
    for ns in (client, node):
        seen = Counter(ask(ns, "tcp", WEB_VIP, 80) for _ in range(12))
        assert set(seen) == {"be1", "be2", "be3"}, (ns, seen)
    for host, port in [(NODE_IP, 30080), (REMOTE_EIP, 80), (LB_IP, 80)]:
        assert ask(client, "tcp", host, port) in {"be1", "be2", "be3"}, (host, port)
    for ns in (client, node):  # dig takes replies only from the address it asked
        answers = Counter(dig(ns, DNS_VIP) for _ in range(8))
        assert set(answers) == {"10.0.0.1", "10.0.0.2"}, (ns, answers)
    port = uproxy.wait_event("metrics_listening")["port"]
    admin = f"http://127.0.0.1:{port}"
    assert node.run("curl", "-s", f"{admin}/proxyMode").stdout.strip() == mode
    metrics = node.run("curl", "-s", f"{admin}/metrics").stdout
    assert 'uproxy_rule_syncs_total{kind="full"}' in metrics, metrics[-2000:]
    status = node.run(sys.executable, "-m", "uproxy", "status", "--address", f"127.0.0.1:{port}")
    assert "default/web:http" in status.stdout and WEB_VIP in status.stdout, status.stdout
    assert uproxy.stop(signal.SIGTERM) == 0


def test_three_endpoints_share_300_connections(world: tuple[Topology, Path], mode: str) -> None:
    topo, config = world
    uproxy = start_uproxy(topo.node, config, mode)
    script = (
        "import socket, collections\n"
        "c = collections.Counter()\n"
        "for _ in range(300):\n"
        f"    s = socket.create_connection(('{WEB_VIP}', 80), timeout=5)\n"
        "    c[s.recv(100).decode().strip()] += 1\n"
        "    s.close()\n"
        "print(dict(c))\n"
    )
    counts = eval(topo.client.python(script, timeout=120).stdout.strip())
    assert set(counts) == {"be1", "be2", "be3"}, counts
    assert all(60 <= n <= 140 for n in counts.values()), counts
    assert uproxy.stop(signal.SIGTERM) == 0


def test_affinity_sticks_then_moves_after_its_timeout(
    world: tuple[Topology, Path], mode: str
) -> None:
    topo, config = world
    uproxy = start_uproxy(topo.node, config, mode)
    sticky = Counter(ask(topo.client, "tcp", STICKY_VIP, 80) for _ in range(20))
    assert len(sticky) == 1 and sum(sticky.values()) == 20, sticky
    first = next(iter(sticky))
    seen = {first}
    for _ in range(10):  # after 2 s idle the next pick is random again: 1/3 to stay each time
        time.sleep(3)
        seen.add(ask(topo.client, "tcp", STICKY_VIP, 80))
        if len(seen) > 1:
            break
    assert len(seen) > 1, seen
    assert uproxy.stop(signal.SIGTERM) == 0


def test_a_service_without_endpoints_refuses_at_once(
    world: tuple[Topology, Path], mode: str
) -> None:
    topo, config = world
    uproxy = start_uproxy(topo.node, config, mode)
    # A timeout would need the full 2 s and say TimeoutError; a refusal answers at once.
    assert ask(topo.client, "tcp", EMPTY_VIP, 80, timeout=2) == "ERR ConnectionRefusedError"
    assert ask(topo.node, "tcp", EMPTY_VIP, 80, timeout=2) == "ERR ConnectionRefusedError"
    assert uproxy.stop(signal.SIGTERM) == 0


def test_external_policy_local_keeps_the_client_address_and_hairpin_works(
    world: tuple[Topology, Path], mode: str
) -> None:
    topo, config = world
    be1 = topo.backends[0]
    be1.start("socat", "TCP-LISTEN:8081,fork,reuseaddr", "SYSTEM:echo $SOCAT_PEERADDR")
    peer_port = [{"name": "http", "port": 8081, "protocol": "TCP"}]
    objects = local_policy_manifests()
    objects[1]["ports"] = peer_port
    write(config / "local.yaml", *objects)
    uproxy = start_uproxy(topo.node, config, mode)
    # This node is node-a: NodePort traffic reaches node-a's endpoint with the client's address.
    seen = Counter(ask(topo.client, "tcp", NODE_IP, 30081) for _ in range(6))
    assert seen == {CLIENT_IP: 6}, seen
    # Hairpin: a backend calling its own service is answered (masqueraded, so replies return).
    assert ask(be1, "tcp", WEB_VIP, 80) in {"be1", "be2", "be3"}
    # Until be1 picks itself (each try 1 in 3; 40 misses in a row: under 1 in 10 million).
    answers = set()
    for _ in range(40):
        answers.add(ask(be1, "tcp", WEB_VIP, 80))
        if "be1" in answers:
            break
    assert "be1" in answers, answers
    assert uproxy.stop(signal.SIGTERM) == 0


def test_a_udp_client_that_keeps_sending_follows_an_endpoint_change(
    world: tuple[Topology, Path], mode: str
) -> None:
    topo, config = world
    write(config / "services.yaml", *manifests(dns_backends=["10.20.1.2"]))
    uproxy = start_uproxy(topo.node, config, mode)
    # dig from one fixed source port: the same conntrack entry unless uproxy deletes it.
    argv = ("dig", "+short", "+tries=1", "+time=2", "-b", f"{CLIENT_IP}#40555")

    def query() -> str:
        return topo.client.run(*argv, f"@{DNS_VIP}", "a.svc.test").stdout.strip()

    assert query() == "10.0.0.1"
    mark = len(uproxy.events)
    write(config / "services.yaml", *manifests(dns_backends=["10.20.2.2"]))
    uproxy.wait_event("sync_done", after=mark, changed_services=1, timeout=15)
    # Right away: conntrack must not keep the client's flow on the removed endpoint.
    assert query() == "10.0.0.2"
    assert uproxy.stop(signal.SIGTERM) == 0


def test_sigkill_an_edit_and_a_restart_leave_no_stale_rules(
    world: tuple[Topology, Path], mode: str
) -> None:
    topo, config = world
    first = start_uproxy(topo.node, config, mode)
    assert "sticky" in kernel_state(topo.node)
    first.stop(signal.SIGKILL)
    write(config / "services.yaml", *manifests(with_sticky=False))
    second = start_uproxy(topo.node, config, mode)
    state = kernel_state(topo.node)
    assert "sticky" not in state, state
    assert ask(topo.client, "tcp", WEB_VIP, 80) in {"be1", "be2", "be3"}
    assert second.stop(signal.SIGTERM) == 0
    cli_cleanup(topo.node)
    assert kernel_state(topo.node) == ""


def test_switching_between_userspace_and_this_mode_leaves_nothing_of_the_other(
    world: tuple[Topology, Path], mode: str
) -> None:
    topo, config = world
    userspace = start_uproxy(topo.node, config, "userspace")
    assert "UPROXY-PORTALS" in kernel_state(topo.node)
    userspace.stop(signal.SIGKILL)
    kernel = start_uproxy(topo.node, config, mode)
    state = kernel_state(topo.node)
    assert "UPROXY-PORTALS" not in state and "UPROXY-PROXY" not in state, state
    assert ask(topo.client, "tcp", WEB_VIP, 80) in {"be1", "be2", "be3"}
    kernel.stop(signal.SIGKILL)
    back = start_uproxy(topo.node, config, "userspace")
    state = kernel_state(topo.node)
    assert "table ip uproxy" not in state, state
    assert ask(topo.client, "tcp", WEB_VIP, 80) in {"be1", "be2", "be3"}
    assert back.stop(signal.SIGTERM) == 0


# -- IPv6 ------------------------------------------------------------------------------------

IPV6_MODES = ["nftables"]  # the iptables mode is IPv4 only so far (README: the mode table)
NODE6, CLIENT6 = "fd00:10::1", "fd00:10::2"
DUAL_V4, DUAL_V6 = "10.96.0.60", "fd00:96::60"


def add_ipv6(topo: Topology) -> None:
    """IPv6 beside the IPv4 addresses: on the same veths, without duplicate address detection's
    delay, all inside the test's own namespaces."""
    client_dev = topo.client.run("ip", "-o", "link", "show").stdout.split("veth")[1].split("@")[0]
    topo.client.run("ip", "-6", "addr", "add", f"{CLIENT6}/64", "dev", f"veth{client_dev}", "nodad")
    node_links = topo.node.run("ip", "-o", "link", "show").stdout
    node_devs = [part.split("@")[0] for part in node_links.split(": ") if part.startswith("veth")]
    topo.node.run("ip", "-6", "addr", "add", f"{NODE6}/64", "dev", node_devs[0], "nodad")
    topo.client.run("ip", "-6", "route", "add", "default", "via", NODE6)
    topo.node.run("ip", "-6", "route", "add", "fd00:96::/64", "dev", node_devs[0])
    topo.node.sysctl("net.ipv6.conf.all.forwarding", "1")
    for n, (end, dev) in enumerate(zip(topo.backends, node_devs[1:], strict=False), start=1):
        topo.node.run("ip", "-6", "addr", "add", f"fd00:20:{n}::1/64", "dev", dev, "nodad")
        end_dev = end.run("ip", "-o", "link", "show").stdout.split("veth")[1].split("@")[0]
        end.run("ip", "-6", "addr", "add", f"fd00:20:{n}::2/64", "dev", f"veth{end_dev}", "nodad")
        end.run("ip", "-6", "route", "add", "default", "via", f"fd00:20:{n}::1")
        end.start("socat", "TCP6-LISTEN:8080,ipv6only=1,fork,reuseaddr", f"SYSTEM:echo be{n}-v6")


def dual_stack_manifests() -> list[Any]:
    dual = service(
        "dual",
        [{"name": "http", "port": 80, "nodePort": 30090}],
        cluster_ip=DUAL_V4,
        clusterIPs=[DUAL_V4, DUAL_V6],
        ipFamilies=["IPv4", "IPv6"],
        type="NodePort",
        affinity_timeout=600,
    )
    v4 = endpoint_slice("dual", HTTP, BACKEND_IPS[:2], name="dual-v4")
    v6 = endpoint_slice(
        "dual", HTTP, ["fd00:20:1::2", "fd00:20:2::2"], name="dual-v6", address_type="IPv6"
    )
    return [dual, v4, v6]


@pytest.mark.parametrize("mode", IPV6_MODES)
def test_ipv6_and_dual_stack_services(net: Network, tmp_path: Path, mode: str) -> None:
    require_tools("socat", "nft")
    topo = build_topology(net, backends=2)
    topo.node.sysctl("net.ipv4.ip_forward", "1")
    start_backends(topo)
    add_ipv6(topo)
    config = tmp_path / "manifests"
    config.mkdir()
    write(config / "services.yaml", *dual_stack_manifests())
    try:
        uproxy = start_uproxy(topo.node, config, mode)
        for ns in (topo.client, topo.node):
            assert ask(ns, "tcp", DUAL_V4, 80) in {"be1", "be2"}, ns
            # Affinity over IPv6 too: one backend, every time.
            v6 = Counter(ask(ns, "tcp", DUAL_V6, 80) for _ in range(8))
            assert len(v6) == 1 and set(v6) <= {"be1-v6", "be2-v6"}, (ns, v6)
        assert ask(topo.client, "tcp", NODE6, 30090) in {"be1-v6", "be2-v6"}  # IPv6 NodePort
        assert "table ip6 uproxy" in kernel_state(topo.node)
        assert uproxy.stop(signal.SIGTERM) == 0
    finally:
        cli_cleanup(topo.node)
    assert kernel_state(topo.node) == ""
