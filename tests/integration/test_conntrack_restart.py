"""Restarts and conntrack, against the real kernel in the test's own namespaces:

    client 10.10.0.2 --veth-- node 10.10.0.1 (uproxy) --veth-- backends 10.20.N.2

- SIGKILL under TCP load (a loop of connects from a few fixed source ports, so entries are
  reused) and a restart: no request made after the first sync fails;
- a restart with a big UDP conntrack table: the entries to the services' addresses go, the
  others stay, and uproxy's memory is reported;
- IPv6: a stale UDP flow to an IPv6 ClusterIP is deleted like an IPv4 one (nftables mode).
"""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from tests.integration.conftest import require_tools
from tests.integration.ipv6_topology import add_ipv6
from tests.integration.netns import Namespace, Network, Process, cli_cleanup
from tests.integration.test_portals import DNS_VIP, WEB_VIP, build_topology, start_backends
from tests.manifests import endpoint_slice, service, write

pytestmark = pytest.mark.root

BACKENDS = ["10.20.1.2", "10.20.2.2"]
HTTP = [{"name": "http", "port": 8080, "protocol": "TCP"}]
UDP = [{"name": "dns", "port": 53, "protocol": "UDP"}]
OTHER_VIP = "10.96.0.99"  # no service: its entries are not uproxy's to delete

# A loop of TCP requests from fixed source ports, one JSON line each: start time, answer.
LOAD = r"""
import json, socket, sys, time, itertools
host, port, until = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
for sport in itertools.cycle(range(31000, 31040)):
    if time.time() > until:
        break
    started = time.time()
    try:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", sport))
        s.settimeout(1.0)
        s.connect((host, port))
        answer = s.recv(100).decode().strip()
    except OSError as exc:
        answer = "ERR " + type(exc).__name__
    finally:
        s.close()
    print(json.dumps({"t": started, "answer": answer}), flush=True)
"""

# Conntrack entries made through netlink, as heavy UDP traffic from many source ports leaves them.
FILL = r"""
import sys
from pyroute2 import Conntrack
from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple
with Conntrack() as ct:
    for spec in sys.argv[1:]:
        dst, count = spec.split(":")
        for i in range(int(count)):
            src, sport = f"10.10.{1 + i // 50000}.{1 + i % 250}", 1024 + i % 50000
            o = NFCTAttrTuple(saddr=src, daddr=dst, proto=17, sport=sport, dport=53)
            ct.entry("add", tuple_orig=o, tuple_reply=o.reverse(), timeout=600)
"""


def manifests(config: Path) -> None:
    write(
        config / "services.yaml",
        service("web", [{"name": "http", "port": 80, "targetPort": 8080}], cluster_ip=WEB_VIP),
        endpoint_slice("web", HTTP, BACKENDS),
        service(
            "dns",
            [{"name": "dns", "port": 53, "protocol": "UDP", "targetPort": 53}],
            cluster_ip=DNS_VIP,
        ),
        endpoint_slice("dns", UDP, BACKENDS),
    )


def start_uproxy(node: Namespace, config: Path, mode: str) -> Process:
    process = node.start_python(
        "-m", "uproxy", "run", "--mode", mode, "--config", str(config),
        "--min-sync-period", "0", "--log-format", "json",
        "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0",
    )  # fmt: skip
    return process


def entries(node: Namespace, *argv: str) -> int:
    out = node.run("conntrack", "-L", *argv, check=False)
    return sum(1 for line in out.stdout.splitlines() if line.strip())


def rss_mb(pid_in_ns: Process) -> float:
    # `ip netns exec` execs the command: the process's pid is uproxy's.
    for line in Path(f"/proc/{pid_in_ns.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


@pytest.mark.parametrize("mode", ["userspace", "iptables"])
def test_sigkill_under_tcp_load_then_restart_fails_nothing_after_the_first_sync(
    net: Network, tmp_path: Path, mode: str
) -> None:
    require_tools("socat", "dnsmasq", "conntrack")
    topo = build_topology(net, backends=2)
    topo.node.sysctl("net.ipv4.ip_forward", "1")
    start_backends(topo)
    manifests(tmp_path)
    try:
        first = start_uproxy(topo.node, tmp_path, mode)
        first.wait_event("sync_done", timeout=30)
        load = topo.client.start_python("-c", LOAD, WEB_VIP, "80", str(time.time() + 8))
        time.sleep(1.5)  # load through the first run
        first.stop(signal.SIGKILL)
        second = start_uproxy(topo.node, tmp_path, mode)
        second.wait_event("sync_done", timeout=30)
        if mode == "userspace":  # the portals' start-up deletes un-NATed TCP entries
            # Each family flushes on its own: the IPv4 one is this service's.
            second.wait_event("conntrack_flush_done", timeout=30, family="ipv4")
        synced = time.time()
        assert load.proc.wait(timeout=30) == 0
        results = [json.loads(line) for line in load.lines if line.startswith("{")]
        after = [r for r in results if r["t"] > synced]
        failed = [r for r in after if not r["answer"].startswith("be")]
        print(f"{mode}: {len(results)} requests, {len(after)} after the first sync")
        assert after, load.tail()
        assert failed == [], (failed[:5], second.tail(20))
        assert second.stop(signal.SIGTERM) == 0
    finally:
        cli_cleanup(topo.node)


def test_a_restart_with_a_big_udp_table_deletes_only_the_services_entries(
    net: Network, tmp_path: Path
) -> None:
    require_tools("socat", "dnsmasq", "conntrack")
    topo = build_topology(net, backends=2)
    start_backends(topo)
    manifests(tmp_path)
    try:
        first = start_uproxy(topo.node, tmp_path, "userspace")
        first.wait_event("sync_done", timeout=30)  # its nat rules make the namespace track
        first.stop(signal.SIGKILL)
        topo.node.python(FILL, f"{DNS_VIP}:10000", f"{OTHER_VIP}:10000", timeout=300)
        assert entries(topo.node, "-p", "udp", "--orig-dst", DNS_VIP) == 10000
        second = start_uproxy(topo.node, tmp_path, "userspace")
        second.wait_event("sync_done", timeout=30)
        before = rss_mb(second)
        done = second.wait_event("conntrack_flush_done", timeout=120, family="ipv4")
        after = rss_mb(second)
        print(f"flush: {done}; RSS {before:.1f} -> {after:.1f} MB")
        assert done["deleted"] >= 10000
        assert entries(topo.node, "-p", "udp", "--orig-dst", DNS_VIP) == 0
        assert entries(topo.node, "-p", "udp", "--orig-dst", OTHER_VIP) == 10000
        assert second.stop(signal.SIGTERM) == 0
    finally:
        cli_cleanup(topo.node)


def test_a_stale_ipv6_udp_flow_is_deleted_at_the_first_sync(net: Network, tmp_path: Path) -> None:
    require_tools("socat", "dnsmasq", "conntrack", "nft")
    topo = build_topology(net, backends=2)
    start_backends(topo)
    add_ipv6(topo)
    v6_vip, other = "fd00:96::53", "fd00:96::99"
    write(
        tmp_path / "services.yaml",
        service(
            "dns6",
            [{"name": "dns", "port": 53, "protocol": "UDP"}],
            cluster_ip=v6_vip,
            clusterIPs=[v6_vip],
            ipFamilies=["IPv6"],
        ),
        endpoint_slice("dns6", UDP, ["fd00:20:1::2"], address_type="IPv6"),
    )
    try:
        first = start_uproxy(topo.node, tmp_path, "nftables")
        first.wait_event("sync_done", timeout=30)
        first.stop(signal.SIGKILL)
        for dst in (v6_vip, other):  # a client's flow, as if it had no NAT yet
            topo.node.run(
                "conntrack", "-I", "-p", "udp", "-s", "fd00:10::2", "-d", dst,
                "--sport", "5353", "--dport", "53", "-t", "600",
            )  # fmt: skip
        assert entries(topo.node, "-f", "ipv6", "-p", "udp", "--orig-dst", v6_vip) == 1
        second = start_uproxy(topo.node, tmp_path, "nftables")
        second.wait_event("sync_done", timeout=30)
        second.wait_event("conntrack_flush_done", timeout=30, family="ipv6")
        assert entries(topo.node, "-f", "ipv6", "-p", "udp", "--orig-dst", v6_vip) == 0
        assert entries(topo.node, "-f", "ipv6", "-p", "udp", "--orig-dst", other) == 1
        assert second.stop(signal.SIGTERM) == 0
    finally:
        cli_cleanup(topo.node)
