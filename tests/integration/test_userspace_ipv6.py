"""The userspace mode over IPv6 and dual stack, on both iptables backends, end to end in the
test's own namespaces (the topology of tests/integration/ipv6_topology.py).

Backend N answers TCP :8080 with `beN` / `beN-v6` and UDP :5353 with `beN-udp` /
`beN-v6-udp`, so every answer names the family the listener dialled.
"""

from __future__ import annotations

import signal
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import require_tools
from tests.integration.ipv6_topology import (
    BACKEND_IPS,
    DUAL_V4,
    DUAL_V6,
    NODE6,
    add_ipv6,
    dual_stack_manifests,
)
from tests.integration.netns import Namespace, Network, cli_cleanup
from tests.integration.test_portals import BACKENDS, Topology, build_topology, require_backend
from tests.manifests import endpoint_slice, service, write

pytestmark = pytest.mark.root

UDP_V4, UDP_V6 = "10.96.0.61", "fd00:96::61"
V6_ONLY = "fd00:96::62"
DNS = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
V6_BACKENDS = ["fd00:20:1::2", "fd00:20:2::2"]
TCP_V4, TCP_V6 = {"be1", "be2"}, {"be1-v6", "be2-v6"}
UDP_ANSWERS_V4, UDP_ANSWERS_V6 = {"be1-udp", "be2-udp"}, {"be1-v6-udp", "be2-v6-udp"}

# Either family. UDP from a connected socket: the kernel delivers a reply only when it comes
# from the very address and port the datagram went to, so an answer proves the reply's source.
CLIENT = r"""
import socket, sys
proto, host, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
try:
    if proto == "tcp":
        s = socket.create_connection((host, port), timeout=3)
        s.settimeout(3)
        print(s.recv(300).decode().strip())
    else:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        s = socket.socket(family, socket.SOCK_DGRAM)
        s.connect((host, port))
        s.settimeout(3)
        s.send(b"ping")
        print(s.recv(300).decode().strip())
except OSError as exc:
    print("ERR", type(exc).__name__)
"""


def ask(ns: Namespace, proto: str, host: str, port: int) -> str:
    return ns.python(CLIENT, proto, host, str(port), timeout=30).stdout.strip()


def manifests() -> list[Any]:
    udp = service(
        "udp", DNS, cluster_ip=UDP_V4, clusterIPs=[UDP_V4, UDP_V6], ipFamilies=["IPv4", "IPv6"]
    )
    v6_only = service(
        "v6only",
        [{"name": "http", "port": 80, "nodePort": 30091}],
        cluster_ip=V6_ONLY,
        ipFamilies=["IPv6"],
        type="NodePort",
    )
    http = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    return [
        *dual_stack_manifests(),
        udp,
        endpoint_slice("udp", DNS, BACKEND_IPS, name="udp-v4"),
        endpoint_slice("udp", DNS, V6_BACKENDS, name="udp-v6", address_type="IPv6"),
        v6_only,
        endpoint_slice("v6only", http, V6_BACKENDS, name="v6only", address_type="IPv6"),
    ]


def start_backends(topo: Topology) -> None:
    for n, end in enumerate(topo.backends, start=1):
        end.start("socat", "TCP-LISTEN:8080,fork,reuseaddr", f"SYSTEM:echo be{n}")
        end.start_udp_answerer(f"10.20.{n}.2", 5353, f"be{n}-udp")
        # (IPv6 :8080 and :5353: add_ipv6)
    for n, end in enumerate(topo.backends, start=1):  # every socat is listening
        for proto, host, answer in [
            ("tcp", f"10.20.{n}.2", f"be{n}"),
            ("tcp", f"fd00:20:{n}::2", f"be{n}-v6"),
            ("udp", f"10.20.{n}.2", f"be{n}-udp"),
            ("udp", f"fd00:20:{n}::2", f"be{n}-v6-udp"),
        ]:
            deadline = time.monotonic() + 10
            while ask(end, proto, host, 8080 if proto == "tcp" else 5353) != answer:
                assert time.monotonic() < deadline, f"backend be{n} does not answer {host}"
                time.sleep(0.05)


@pytest.fixture
def topo(net: Network) -> Topology:
    require_tools("socat")
    topo = build_topology(net, backends=2)
    add_ipv6(topo)
    start_backends(topo)
    return topo


def start_uproxy(node: Namespace, config: Path, backend: str, *extra: str) -> Any:
    process = node.start_python(
        "-m", "uproxy", "run", "--config", str(config), "--iptables-backend", backend,
        "--min-sync-period", "0", "--log-format", "json",
        "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0",
        *extra,
    )  # fmt: skip
    process.wait_event("sync_done", timeout=30)
    return process


def uproxy_lines(ns: Namespace, family: str) -> list[str]:
    tool = "ip6tables" if family == "6" else "iptables"
    return [
        f"{backend}: {line}"
        for backend in BACKENDS
        for line in ns.run(f"{tool}-{backend}-save").stdout.splitlines()
        if "UPROXY" in line
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ipv6_and_dual_stack_services(topo: Topology, tmp_path: Path, backend: str) -> None:
    require_backend(backend)
    require_tools(f"ip6tables-{backend}-save", f"ip6tables-{backend}-restore")
    config = tmp_path / "manifests"
    config.mkdir()
    write(config / "services.yaml", *manifests())
    try:
        uproxy = start_uproxy(topo.node, config, backend)
        for ns in (topo.client, topo.node):
            # Each ClusterIP of a dual-stack service reaches its own family's endpoints.
            assert ask(ns, "tcp", DUAL_V4, 80) in TCP_V4, ns
            v6 = Counter(ask(ns, "tcp", DUAL_V6, 80) for _ in range(6))
            assert len(v6) == 1 and set(v6) <= TCP_V6, (ns, v6)  # ClientIP affinity over IPv6
            assert ask(ns, "tcp", V6_ONLY, 80) in TCP_V6, ns
            assert ask(ns, "udp", UDP_V4, 5353) in UDP_ANSWERS_V4, ns
            assert ask(ns, "udp", UDP_V6, 5353) in UDP_ANSWERS_V6, ns
        for port in (30090, 30091):  # NodePorts on the node's IPv6 address
            assert ask(topo.client, "tcp", NODE6, port) in TCP_V6, port
        assert ask(topo.node, "tcp", "::1", 30091) in TCP_V6
        six = uproxy_lines(topo.node, "6")
        assert [line for line in six if line.startswith(f"{backend}: ") and DUAL_V6 in line], six
        assert not [line for line in six if "10.96." in line]
        assert uproxy.stop(signal.SIGTERM) == 0
    finally:
        cli_cleanup(topo.node)
    assert uproxy_lines(topo.node, "6") == [] and uproxy_lines(topo.node, "4") == []


@pytest.mark.parametrize("backend", BACKENDS)
def test_specific_ipv6_bind_address_and_ipv6_nodeport_addresses(
    topo: Topology, tmp_path: Path, backend: str
) -> None:
    """`--bind-address` of IPv6 serves IPv6 alone (DNAT to it); `--nodeport-addresses` CIDRs of
    either family limit each family's NodePorts."""
    require_backend(backend)
    config = tmp_path / "manifests"
    config.mkdir()
    write(config / "services.yaml", *manifests())
    topo.node.add_address("fd00:30::1/64", dev="lo")
    topo.client.run("ip", "-6", "route", "add", "fd00:30::/64", "via", NODE6)
    try:
        start_uproxy(
            topo.node, config, backend,
            "--bind-address", NODE6, "--nodeport-addresses", "10.10.0.0/24,fd00:30::/64",
        )  # fmt: skip
        assert ask(topo.client, "tcp", DUAL_V6, 80) in TCP_V6
        assert ask(topo.node, "tcp", DUAL_V6, 80) in TCP_V6
        assert ask(topo.client, "udp", UDP_V6, 5353) in UDP_ANSWERS_V6
        assert ask(topo.client, "tcp", "fd00:30::1", 30091) in TCP_V6
        assert ask(topo.client, "tcp", NODE6, 30091) == "ERR ConnectionRefusedError"
        assert "DNAT --to-destination [fd00:10::1]:" in "\n".join(uproxy_lines(topo.node, "6"))
        assert uproxy_lines(topo.node, "4") == []  # an IPv6 bind address: no IPv4 portals
    finally:
        cli_cleanup(topo.node)
    assert uproxy_lines(topo.node, "6") == []
