"""The kernel modes over IPv6 and dual stack, end to end in the test's own namespaces:

    client 10.10.0.2 fd00:10::2 --veth-- node 10.10.0.1 fd00:10::1 --veth-- backends
                                               10.20.N.1 fd00:20:N::1    10.20.N.2 fd00:20:N::2

Backend N answers TCP :8080 with `beN` over IPv4 and `beN-v6` over IPv6, and UDP :5353 with
`beN-v6-udp` over IPv6. Every case runs for every mode in `IPV6_MODES`: the iptables mode on both
backends (ip6tables-legacy and ip6tables-nft) and the nftables mode.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import require_tools
from tests.integration.ipv6_topology import (
    DUAL_V4,
    DUAL_V6,
    NODE6,
    ONLY_V6,
    add_ipv6,
    dual_stack_manifests,
    ipv6_only_manifests,
)
from tests.integration.netns import Namespace, Network, cli_cleanup
from tests.integration.test_kernel_modes import BACKENDS, nft_rules, require_backend
from tests.integration.test_portals import ask, build_topology, start_backends
from tests.manifests import write

pytestmark = pytest.mark.root

# (mode, iptables backend): the iptables mode on both backends; the nftables mode has a table of
# its own (the backend only decides where other modes' leftovers are looked for).
IPV6_MODES = [("iptables", "legacy"), ("iptables", "nft"), ("nftables", "nft")]
TCP6_ANSWERS, UDP6_ANSWERS = {"be1-v6", "be2-v6"}, {"be1-v6-udp", "be2-v6-udp"}

# One datagram to an IPv6 address: the answer, or `ERR <exception>`.
UDP6_CLIENT = r"""
import socket, sys
host, port = sys.argv[1], int(sys.argv[2])
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
try:
    s.connect((host, port))  # a reply from any other source is never delivered
    s.settimeout(3)
    s.send(b"ping")
    print(s.recv(300).decode().strip())
except OSError as exc:
    print("ERR", type(exc).__name__)
"""


def ask_udp6(ns: Namespace, host: str, port: int) -> str:
    return ns.python(UDP6_CLIENT, host, str(port), timeout=20).stdout.strip()


def start_uproxy(node: Namespace, config: Path, mode: str, backend: str) -> Any:
    process = node.start_python(
        "-m", "uproxy", "run", "--mode", mode, "--config", str(config),
        "--iptables-backend", backend, "--min-sync-period", "0", "--sync-period", "1s",
        "--log-format", "json",
        "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0",
    )  # fmt: skip
    process.wait_event("sync_done", timeout=30)
    return process


def ipv6_rules(ns: Namespace, mode: str, backend: str) -> list[str]:
    """The IPv6 rules `mode` keeps in the kernel."""
    if mode == "iptables":
        return [line for line in ns.run(f"ip6tables-{backend}-save").stdout.splitlines()
                if "UPROXY" in line]  # fmt: skip
    return [r for r in nft_rules(ns) if r.startswith("ip6 ")]


def ip6tables_lines(ns: Namespace) -> list[str]:
    """Everything of uproxy's that either backend's ip6tables-save shows."""
    return [
        f"{b}: {line}"
        for b in BACKENDS
        for line in ns.run(f"ip6tables-{b}-save").stdout.splitlines()
        if "UPROXY" in line
    ]


def no_drift(uproxy: Any) -> None:
    """Two more periodic full syncs read the rules back and found nothing to repair: the IPv6
    rules are spelled exactly as the kernel prints them."""
    first = uproxy.wait_event("sync_done", timeout=15, full=True)
    mark = uproxy.events.index(first) + 1
    uproxy.wait_event("sync_done", timeout=15, after=mark, full=True)
    drift = [e for e in uproxy.events if str(e.get("event", "")).endswith("drift_repaired")]
    assert drift == [], drift


@pytest.mark.parametrize(("mode", "backend"), IPV6_MODES, ids=[f"{m}-{b}" for m, b in IPV6_MODES])
def test_ipv6_and_dual_stack_services(
    net: Network, tmp_path: Path, mode: str, backend: str
) -> None:
    require_tools("socat", "nft", f"ip6tables-{backend}-save", f"ip6tables-{backend}-restore")
    require_backend(backend)
    topo = build_topology(net, backends=2)
    topo.node.sysctl("net.ipv4.ip_forward", "1")
    start_backends(topo)
    add_ipv6(topo)
    config = tmp_path / "manifests"
    config.mkdir()
    write(config / "services.yaml", *dual_stack_manifests(), *ipv6_only_manifests())
    try:
        uproxy = start_uproxy(topo.node, config, mode, backend)
        skipped = [e for e in uproxy.events if str(e.get("event", "")).endswith("_unavailable")]
        assert skipped == [], skipped  # this host serves both families in every mode
        for ns in (topo.client, topo.node):
            assert ask(ns, "tcp", DUAL_V4, 80) in {"be1", "be2"}, ns
            # Affinity over IPv6 too: one backend, every time.
            v6 = Counter(ask(ns, "tcp", DUAL_V6, 80) for _ in range(8))
            assert len(v6) == 1 and set(v6) <= TCP6_ANSWERS, (ns, v6)
            assert ask(ns, "tcp", ONLY_V6, 80) in TCP6_ANSWERS, ns
            assert ask_udp6(ns, ONLY_V6, 53) in UDP6_ANSWERS, ns
        assert ask(topo.client, "tcp", NODE6, 30090) in TCP6_ANSWERS  # IPv6 NodePort
        assert ipv6_rules(topo.node, mode, backend)
        no_drift(uproxy)
        # One row for the dual-stack port in /status, with both families' endpoints.
        port = uproxy.wait_event("metrics_listening")["port"]
        status = topo.node.run("curl", "-sS", f"http://127.0.0.1:{port}/status").stdout
        ports = json.loads(status)["servicePorts"]
        (dual,) = [p for p in ports if p["name"] == "default/dual:http"]
        assert dual["clusterIPs"] == [DUAL_V4, DUAL_V6], dual
        addresses = {e["address"] for e in dual["endpoints"]}
        assert addresses == {"10.20.1.2:8080", "10.20.2.2:8080", "[fd00:20:1::2]:8080",
                             "[fd00:20:2::2]:8080"}, dual  # fmt: skip
        assert uproxy.stop(signal.SIGTERM) == 0
        assert ipv6_rules(topo.node, mode, backend)  # the kernel keeps forwarding after exit
    finally:
        cli_cleanup(topo.node)
    assert nft_rules(topo.node) == []
    assert ip6tables_lines(topo.node) == []
