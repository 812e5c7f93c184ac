"""/healthz keeps answering while the data plane is out of descriptors (issue 18, item 4).

uproxy runs (userspace mode) with `prlimit --nofile=256`, and a client opens 1,000 connections
to a ClusterIP and holds them, so the data plane runs out of descriptors and its accepts fail.
Throughout, /healthz (and the metrics port's /healthz and /metrics) is probed with curl: every
probe gets its answer, 200 with kube-proxy's body, and every health answer says the process is
degraded (`X-Uproxy-Degraded: descriptors exhausted`) rather than dead. After the client lets
go, the ClusterIP forwards again and the degraded header goes away.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import require_tools
from tests.integration.netns import Namespace, Process
from tests.integration.test_kernel_modes import (
    NODE_NAME,
    WEB_VIP,
    Topology,
    who,
)

pytestmark = pytest.mark.root

DESCRIPTORS = 256
CLIENTS = 1000

# Opens CLIENTS connections (the handshake completes in the kernel even when uproxy cannot
# accept), says how many, and holds them until a line arrives on stdin.
HOLDER = r"""
import resource, socket, sys
resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))
host, n = sys.argv[1], int(sys.argv[2])
held = []
for _ in range(n):
    s = socket.socket()
    s.setblocking(False)
    s.connect_ex((host, 80))
    held.append(s)
print("holding", len(held), flush=True)
sys.stdin.readline()
for s in held:
    s.close()
print("released", flush=True)
"""


def start_limited_uproxy(topology: Topology, config: Path) -> Process:
    process = topology.node.start(
        "prlimit",
        f"--nofile={DESCRIPTORS}:{DESCRIPTORS}",
        sys.executable,
        "-m",
        "uproxy",
        "run",
        "--mode",
        "userspace",
        "--config",
        str(config),
        "--iptables-backend",
        "nft",
        "--hostname-override",
        NODE_NAME,
        "--min-sync-period",
        "0",
        "--log-format",
        "json",
    )
    process.wait_event("sync_done", timeout=30)
    return process


def probe(node: Namespace, url: str) -> tuple[str, str]:
    """The status line and headers (lower-cased names) and the body of one curl request."""
    done = node.run("curl", "-sS", "-i", "--max-time", "10", url, check=False)
    head, _, body = done.stdout.replace("\r\n", "\n").partition("\n\n")
    return head.lower() if done.returncode == 0 else f"curl failed: {done.stderr}", body


def test_healthz_answers_degraded_while_descriptors_are_exhausted(
    topo: tuple[Topology, Path],
) -> None:
    require_tools("prlimit")
    topology, config = topo
    uproxy = start_limited_uproxy(topology, config)
    assert who(topology.client, WEB_VIP) in {"be1", "be2", "be3"}
    healthy, _ = probe(topology.node, "http://127.0.0.1:10256/healthz")
    assert healthy.startswith("http/1.1 200") and "x-uproxy-degraded" not in healthy, healthy

    holder = topology.client.start_python("-c", HOLDER, WEB_VIP, str(CLIENTS), stdin=True)
    holder.wait_line("holding", timeout=60)
    # The data plane has run out: its accept failed with EMFILE and it paused.
    uproxy.wait_event("accept_paused", timeout=60)

    answers: list[str] = []
    for _ in range(10):
        for url in (
            "http://127.0.0.1:10256/healthz",
            "http://127.0.0.1:10256/livez",
            "http://127.0.0.1:10249/healthz",
            "http://127.0.0.1:10249/metrics",
        ):
            head, body = probe(topology.node, url)
            assert head.startswith("http/1.1 200"), (url, head, uproxy.tail())
            if url.endswith(":10256/healthz"):
                assert '"nodeEligible": true' in body, body
            if not url.endswith("/metrics"):
                answers.append(head)
    # The clients hold every descriptor the data plane could take: each health answer says so.
    plain = [a for a in answers if "x-uproxy-degraded: descriptors exhausted" not in a]
    assert not plain, plain[:2]
    assert uproxy.proc.poll() is None, uproxy.tail()

    holder.send("let go")
    holder.wait_line("released", timeout=30)
    # Forwarding comes back (the paused accept retries with backoff: wait for it, untimed).
    deadline = time.monotonic() + 60
    while who(topology.client, WEB_VIP) not in {"be1", "be2", "be3"}:
        assert time.monotonic() < deadline, uproxy.tail()
    served = {who(topology.client, WEB_VIP) for _ in range(10)}
    assert served <= {"be1", "be2", "be3"} and served, served
    while "x-uproxy-degraded" in probe(topology.node, "http://127.0.0.1:10256/healthz")[0]:
        assert time.monotonic() < deadline, uproxy.tail()
    assert uproxy.stop(signal.SIGTERM) == 0, uproxy.tail()
