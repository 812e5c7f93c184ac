"""The admin port under idle, slowloris and garbage connections (issue 18, items 6 and 8).

uproxy runs (userspace mode) on the kernel-modes topology. A client on the node opens 2,000
idle connections, 500 slowloris connections (a request header trickled a byte at a time) and
500 connections that send garbage, all to the healthz port, in waves. Throughout, the ClusterIP
keeps forwarding and /healthz keeps answering; afterwards the process's descriptors return to
their baseline and its resident memory stays within a bound of where it started (it once grew
from 32 to 103 MB after 19,000 idle admin connections and stayed at 89 MB).
"""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

from tests.integration.test_kernel_modes import (
    WEB_VIP,
    Topology,
    start_uproxy,
    who,
)

pytestmark = pytest.mark.root

# Waves of abusive connections to the healthz port; prints how many it could open.
ABUSE = r"""
import resource, socket, sys, time
resource.setrlimit(resource.RLIMIT_NOFILE, (8192, 8192))
port = int(sys.argv[1])
opened = 0
for wave in range(4):
    idle = []
    for _ in range(500):
        try:
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=2))
            opened += 1
        except OSError:
            pass
    slow = []
    for _ in range(125):
        try:
            s = socket.create_connection(("127.0.0.1", port), timeout=2)
            slow.append(s)
            opened += 1
        except OSError:
            pass
    for byte in b"GET /healthz HTTP/1.1\r\nHost: x\r\n":
        for s in slow:
            try:
                s.send(bytes([byte]))
            except OSError:
                pass
        time.sleep(0.005)
    for _ in range(125):
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(bytes(range(256)) * 16 + b"\r\n\r\n")
                opened += 1
        except OSError:
            pass
    for s in idle + slow:
        s.close()
print("opened", opened, flush=True)
"""


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def descriptors(pid: int) -> int:
    return len(list(Path(f"/proc/{pid}/fd").iterdir()))


def healthz(topology: Topology) -> str:
    out = topology.node.run(
        "curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "5",
        "http://127.0.0.1:10256/healthz", check=False,
    )  # fmt: skip
    return out.stdout.strip()


def test_admin_abuse_costs_the_data_plane_nothing_and_memory_comes_back(
    topo: tuple[Topology, Path],
) -> None:
    topology, config = topo
    uproxy = start_uproxy(topology, config, "userspace", "nft")
    pid = uproxy.proc.pid  # `ip netns exec` execs uproxy in its place
    assert who(topology.client, WEB_VIP) in {"be1", "be2", "be3"}
    assert healthz(topology) == "200"
    baseline_fds, baseline_rss = descriptors(pid), rss_kib(pid)

    abuse = topology.node.start_python("-c", ABUSE, "10256")
    served = []
    while abuse.proc.poll() is None:
        served.append(who(topology.client, WEB_VIP))
        assert healthz(topology) == "200"
    line = abuse.wait_line("^opened", timeout=5)
    assert int(line.split()[1]) >= 1000, line
    assert served and set(served) <= {"be1", "be2", "be3"}, served

    after_fds = descriptors(pid)
    for _ in range(50):
        if after_fds <= baseline_fds:
            break
        topology.node.run("sleep", "0.2")
        after_fds = descriptors(pid)
    assert after_fds <= baseline_fds, (baseline_fds, after_fds)
    grown_mib = (rss_kib(pid) - baseline_rss) / 1024
    assert grown_mib < 20, f"resident memory grew {grown_mib:.1f} MiB and stayed"
    assert uproxy.stop(signal.SIGTERM) == 0, uproxy.tail()
