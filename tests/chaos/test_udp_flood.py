"""A UDP flood from many source ports leaves a steady client its replies (issue 18, item 5).

The topology of test_kernel_modes, userspace mode, with a small session cap. A flood sender in
the client namespace cycles over 25,000 source ports against the DNS ClusterIP, bounded in rate
(about 30,000 datagrams/s) and in time, while a steady client on another address of the client
namespace sends 100 queries from one fixed source port, one every 50 ms without waiting for the
answers (so a lost reply never lets its session go idle). With the default receive buffer the
kernel dropped a quarter to a half of the flood in front of uproxy (UdpRcvbufErrors), and the
steady client's datagrams with it: 45-71 of 100 replies. A bigger buffer alone queued long
enough to expire the steady session, which the cap then refused. At the cap the flood's new
sessions are refused cheaply, counted, and logged at most once a second; the steady client's
established session is served.
"""

from __future__ import annotations

import itertools
import json
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import require_tools
from tests.integration.netns import Namespace, Network, cli_cleanup
from tests.integration.test_kernel_modes import (
    CLIENT_IP,
    DNS_VIP,
    Topology,
    build_topology,
    manifests,
    start_backends,
    start_uproxy,
    write_manifests,
)

pytestmark = pytest.mark.root

STEADY_IP = "10.10.0.3"  # a second address of the client namespace: not one of the flood's
MAX_SESSIONS = 1000
FLOOD_PORTS = 25_000
RSS_BOUND_KB = 150 * 1024

# A DNS query for a.svc.test with the given id.
QUERY = r"""
import struct
def query(ident):
    name = b"".join(bytes([len(p)]) + p for p in b"a.svc.test".split(b".")) + b"\0"
    return struct.pack("!HHHHHH", ident, 0x0100, 1, 0, 0, 0) + name + struct.pack("!HH", 1, 1)
"""

# Floods from FLOOD_PORTS source ports at about `rate` datagrams/s until a line on stdin (or
# `limit` seconds), then prints what it sent. A socket per datagram: the replies find no one.
FLOOD = (
    QUERY
    + r"""
import json, socket, sys, threading, time
host, target = sys.argv[1], (sys.argv[6], 53)
first, count, rate, limit = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5])
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
payload = query(0x4242)
sent = failed = 0
burst = max(1, rate // 100)
start = time.monotonic()
print("flooding", flush=True)
i = 0
while not stop.is_set() and time.monotonic() - start < limit:
    for _ in range(burst):
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((host, first + i))
                s.sendto(payload, target)
            sent += 1
        except OSError:
            failed += 1
        i = (i + 1) % count
    # Paced against the clock, so a slow moment is not made up for with a burst.
    ahead = sent / rate - (time.monotonic() - start)
    if ahead > 0:
        time.sleep(ahead)
print(json.dumps({"sent": sent, "failed": failed, "seconds": time.monotonic() - start}), flush=True)
"""
)

# One fixed source port: a first query (retried) establishes the session, then on "go" from
# stdin `n` queries one every `gap` seconds, answers matched by id, then prints the tally.
STEADY = (
    QUERY
    + r"""
import json, select, socket, sys, time
host, port, server = sys.argv[1], int(sys.argv[2]), sys.argv[3]
n, gap = int(sys.argv[4]), float(sys.argv[5])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((host, port))
s.connect((server, 53))
s.settimeout(1)
for attempt in range(10):
    s.send(query(1))
    try:
        s.recv(512)
        break
    except OSError:
        pass
else:
    sys.exit("no first answer")
print("ready", flush=True)
sys.stdin.readline()
s.setblocking(False)
answered = set()
def drain(until):
    while True:
        left = until - time.monotonic()
        if left <= 0:
            return
        if select.select([s], [], [], left)[0]:
            try:
                data = s.recv(512)
            except OSError:
                continue
            if len(data) >= 2:
                answered.add(int.from_bytes(data[:2], "big"))
for ident in range(100, 100 + n):
    try:
        s.send(query(ident))
    except OSError:
        pass
    drain(time.monotonic() + gap)
drain(time.monotonic() + 1)  # the last answers
print(json.dumps({"sent": n, "answered": len(answered & set(range(100, 100 + n)))}), flush=True)
"""
)


@pytest.fixture
def topo(net: Network, tmp_path: Path) -> Iterator[tuple[Topology, Path]]:
    require_tools("dnsmasq", "nft")
    topology = build_topology(net)
    topology.client.run("ip", "addr", "add", f"{STEADY_IP}/24", "dev", "veth1a")
    start_backends(topology)
    config = tmp_path / "manifests"
    config.mkdir()
    write_manifests(config, manifests())
    try:
        yield topology, config
    finally:
        cli_cleanup(topology.node)


def rcvbuf_errors(ns: Namespace) -> int:
    """UdpRcvbufErrors of the namespace: datagrams the kernel dropped for a full socket buffer."""
    lines = [line.split() for line in ns.run("cat", "/proc/net/snmp").stdout.splitlines()]
    header, values = next(p for p in itertools.pairwise(lines) if p[0][0] == "Udp:")
    return int(values[header.index("RcvbufErrors")])


def peak_rss_kb(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1])


def test_a_steady_client_keeps_its_replies_under_a_many_source_port_flood(
    topo: tuple[Topology, Path],
) -> None:
    topology, config = topo
    uproxy = start_uproxy(
        topology, config, "userspace", "nft", "--udp-max-sessions", str(MAX_SESSIONS)
    )
    steady = topology.client.start_python(
        "-c", STEADY, STEADY_IP, "40053", DNS_VIP, "100", "0.05", stdin=True
    )
    steady.wait_line("^ready$", timeout=20)
    errors_before = rcvbuf_errors(topology.node)

    flood = topology.client.start_python(
        "-c", FLOOD, CLIENT_IP, "20000", str(FLOOD_PORTS), "30000", "60", DNS_VIP, stdin=True
    )
    flood.wait_line("^flooding$", timeout=60)
    steady.send("go")
    tally = json.loads(steady.wait_line(r'^\{"sent"', timeout=60))
    flood.send("stop")
    sent = json.loads(flood.wait_line(r'^\{"sent"', timeout=30))
    errors = rcvbuf_errors(topology.node) - errors_before
    rss = peak_rss_kb(uproxy.pid)
    capped = [e for e in uproxy.events if e.get("event") == "udp_session_cap_reached"]
    refused = sum(e["refused"] for e in capped)
    # The figures, for the README's table (pytest -s shows them).
    print(f"steady={tally} flood={sent} rcvbuf_errors={errors} refused={refused} rss_kb={rss}")

    assert sent["sent"] > FLOOD_PORTS  # the flood went round its source ports at least once
    assert tally["answered"] >= 0.9 * tally["sent"], (tally, sent, errors)
    assert rss < RSS_BOUND_KB, rss
    # The cap was reached and said so, at most once a second, not once per refused datagram.
    assert refused > 0, uproxy.tail()
    assert len(capped) <= sent["seconds"] + 2, len(capped)
    metrics = topology.node.run("curl", "-s", "http://127.0.0.1:10249/metrics").stdout
    exported = [
        line
        for line in metrics.splitlines()
        if line.startswith("uproxy_udp_refused_total{") and 'service_port="default/dns:dns"' in line
    ]
    assert exported and float(exported[0].split()[-1]) >= refused, metrics
    assert uproxy.stop(signal.SIGTERM) == 0, uproxy.tail()
