"""IPv6 beside the IPv4 test topology of tests/integration/test_portals.py, for every mode's
IPv6 and dual-stack tests:

    client 10.10.0.2 fd00:10::2 --veth-- node 10.10.0.1 fd00:10::1 --veth-- backends
                                               10.20.N.1 fd00:20:N::1    10.20.N.2 fd00:20:N::2

Backend N answers TCP :8080 with `beN-v6` and UDP :5353 with `beN-v6-udp` over IPv6 (`beN` over
IPv4: start_backends).
"""

from __future__ import annotations

from typing import Any

from tests.integration.test_portals import Topology
from tests.manifests import endpoint_slice, service

HTTP = [{"name": "http", "port": 8080, "protocol": "TCP"}]
DNS = [{"name": "dns", "port": 5353, "protocol": "UDP"}]
BACKEND_IPS = ["10.20.1.2", "10.20.2.2"]
BACKEND_IPS6 = ["fd00:20:1::2", "fd00:20:2::2"]

NODE6, CLIENT6 = "fd00:10::1", "fd00:10::2"
DUAL_V4, DUAL_V6, ONLY_V6 = "10.96.0.60", "fd00:96::60", "fd00:96::80"


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
        end.start_udp_answerer(f"fd00:20:{n}::2", 5353, f"be{n}-v6-udp")


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


def ipv6_only_manifests() -> list[Any]:
    """An IPv6-only Service without affinity, TCP :80 and UDP :53."""
    only = service(
        "only6",
        [
            {"name": "http", "port": 80, "protocol": "TCP"},
            {"name": "dns", "port": 53, "protocol": "UDP"},
        ],
        cluster_ip=ONLY_V6,
        ipFamilies=["IPv6"],
    )
    return [only, endpoint_slice("only6", HTTP + DNS, BACKEND_IPS6, address_type="IPv6")]
