"""The kernel modes over IPv6 and dual stack, end to end in the test's own namespaces:

    client 10.10.0.2 fd00:10::2 --veth-- node 10.10.0.1 fd00:10::1 --veth-- backends
                                               10.20.N.1 fd00:20:N::1    10.20.N.2 fd00:20:N::2

Backend N answers TCP :8080 with `beN` over IPv4 and `beN-v6` over IPv6.
"""

from __future__ import annotations

import signal
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import require_tools
from tests.integration.netns import Namespace, Network
from tests.integration.test_kernel_modes import nft_rules
from tests.integration.test_portals import Topology, ask, build_topology, start_backends
from tests.manifests import endpoint_slice, service, write

pytestmark = pytest.mark.root

HTTP = [{"name": "http", "port": 8080, "protocol": "TCP"}]
BACKEND_IPS = ["10.20.1.2", "10.20.2.2"]


def start_uproxy(node: Namespace, config: Path, mode: str) -> Any:
    process = node.start_python(
        "-m", "uproxy", "run", "--mode", mode, "--config", str(config),
        "--min-sync-period", "0", "--log-format", "json",
        "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0",
    )  # fmt: skip
    process.wait_event("sync_done", timeout=30)
    return process


def cli_cleanup(node: Namespace) -> None:
    done = node.run(sys.executable, "-m", "uproxy", "cleanup", "--log-format", "json", check=False)
    assert done.returncode == 0, done.stdout + done.stderr


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
        assert [r for r in nft_rules(topo.node) if r.startswith("ip6 ")]
        assert uproxy.stop(signal.SIGTERM) == 0
    finally:
        cli_cleanup(topo.node)
    assert nft_rules(topo.node) == []
