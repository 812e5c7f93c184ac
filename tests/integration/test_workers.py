"""`uproxy run --workers 2` (userspace mode) against the real kernel.

The topology, backends and manifests are test_kernel_modes.py's; the client namespace gets a
few more addresses, so that "several clients" are several source addresses. Which worker took
a connection is read from `uproxy_worker_connections_total{worker=...}`, and the workers' pids
from their `worker_started` events.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import require_tools
from tests.integration.netns import Namespace, Network, Process, cli_cleanup
from tests.integration.test_kernel_modes import (
    BACKEND_IPS,
    CLIENT_IP,
    DNS_VIP,
    NAMES,
    STICKY_VIP,
    WEB_VIP,
    Topology,
    _service,
    _slice,
    build_topology,
    manifests,
    require_backend,
    start_backends,
    start_uproxy,
    write_manifests,
)

pytestmark = pytest.mark.root

STICKY_DNS_VIP = "10.96.0.54"
CLIENTS = [CLIENT_IP, *(f"10.10.0.{n}" for n in range(3, 11))]
ANSWERS = {f"10.0.0.{n}" for n in range(1, 4)}

# Connections from given source addresses, each new; prints {source: {backend: count}}.
FROM_SOURCES = r"""
import json, socket, sys
from collections import Counter
host, port, n, sources = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4:]
seen = {}
for source in sources:
    counts = Counter()
    for _ in range(n):
        s = socket.socket()
        s.settimeout(10)
        s.bind((source, 0))
        s.connect((host, port))
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
        s.close()
        counts[data.split(b"\r\n\r\n", 1)[1].split()[0].decode()] += 1
    seen[source] = dict(counts)
print(json.dumps(seen))
"""

# Opens one idle connection per source, says "open", then on "go" sends each its request and
# prints the backends that answered: connections that live through a drain.
HELD = r"""
import socket, sys
host, port, sources = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
conns = []
for source in sources:
    s = socket.socket()
    s.settimeout(20)
    s.bind((source, 0))
    s.connect((host, port))
    conns.append(s)
print("open", flush=True)
sys.stdin.readline()
answers = []
for s in conns:
    s.sendall(b"GET / HTTP/1.0\r\n\r\n")
    data = b""
    while chunk := s.recv(4096):
        data += chunk
    answers.append(data.split(b"\r\n\r\n", 1)[1].split()[0].decode() if data else "EMPTY")
print("answers " + " ".join(answers), flush=True)
"""


def worker_manifests() -> list[dict[str, object]]:
    udp = [{"name": "dns", "port": 53, "protocol": "UDP"}]
    return [
        *manifests(),
        _service("dnssticky", udp, STICKY_DNS_VIP, sessionAffinity="ClientIP"),
        _slice("dnssticky", 53, BACKEND_IPS, protocol="UDP"),
    ]


def add_client_addresses(client: Namespace) -> None:
    listing = client.run("ip", "-o", "-4", "addr", "show").stdout
    dev = next(line.split()[1] for line in listing.splitlines() if f" {CLIENT_IP}/" in line)
    for address in CLIENTS[1:]:
        client.add_address(f"{address}/24", dev=dev)


@pytest.fixture
def topo(net: Network, tmp_path: Path) -> Iterator[tuple[Topology, Path]]:
    require_tools("curl", "dig", "dnsmasq")
    require_backend("nft")
    topology = build_topology(net)
    add_client_addresses(topology.client)
    start_backends(topology)
    config = tmp_path / "manifests"
    config.mkdir()
    write_manifests(config, worker_manifests())
    try:
        yield topology, config
    finally:
        cli_cleanup(topology.node)


def start(topology: Topology, config: Path, *extra: str) -> Process:
    return start_uproxy(topology, config, "userspace", "nft", "--workers", "2", *extra)


def worker_pids(process: Process) -> dict[int, int]:
    """The newest pid of each worker."""
    pids = {}
    for event in process.events:
        if event.get("event") == "worker_started":
            pids[event["worker"]] = event["pid"]
    return pids


def metrics(node: Namespace) -> dict[str, float]:
    text = node.run("curl", "-sS", "http://127.0.0.1:10249/metrics").stdout
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def per_worker(node: Namespace, name: str = "uproxy_worker_connections_total") -> list[float]:
    values = metrics(node)
    return [values.get(f'{name}{{worker="{w}"}}', 0.0) for w in range(2)]


def settled(node: Namespace, expected_total: float, timeout: float = 15) -> list[float]:
    """The per-worker totals once they add up to `expected_total` (workers report each second)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = per_worker(node)
        if sum(counts) >= expected_total or time.monotonic() > deadline:
            return counts
        time.sleep(0.2)


def from_sources(ns: Namespace, host: str, n: int, sources: list[str]) -> dict[str, Counter[str]]:
    out = ns.python(FROM_SOURCES, host, "80", str(n), *sources, timeout=120).stdout
    return {source: Counter(counts) for source, counts in json.loads(out).items()}


def dig_from(ns: Namespace, server: str, source: str, port: int) -> str:
    """One query from `source`:`port`. The port is the caller's: two queries from one kernel-
    chosen port (about one run in a hundred here) would be one session, not two."""
    argv = ["dig", "+short", "+tries=1", "+time=2", "-b", f"{source}#{port}", f"@{server}"]
    argv.append("a.svc.test")
    out = ns.run(*argv, check=False)
    return out.stdout.strip() or f"no answer: {out.stderr.strip()}"


def test_round_robin_spreads_one_client_over_endpoints_and_workers(
    topo: tuple[Topology, Path],
) -> None:
    topology, config = topo
    uproxy = start(topology, config)
    before = settled(topology.node, 0)
    seen = from_sources(topology.client, WEB_VIP, 300, [CLIENT_IP])[CLIENT_IP]
    assert set(seen) == set(NAMES.values()), seen
    assert all(60 <= count <= 140 for count in seen.values()), seen
    after = settled(topology.node, sum(before) + 300)
    took = [a - b for a, b in zip(after, before, strict=True)]
    # Without affinity the kernel's 4-tuple hash spreads even one client over both workers.
    assert sum(took) == 300 and min(took) > 0, took
    assert uproxy.stop(signal.SIGTERM) == 0


def test_client_ip_affinity_holds_across_workers(topo: tuple[Topology, Path]) -> None:
    topology, config = topo
    uproxy = start(topology, config)
    node = topology.node
    before = settled(node, 0)
    one = from_sources(topology.client, STICKY_VIP, 20, [CLIENT_IP])[CLIENT_IP]
    assert list(one.values()) == [20], one
    after = settled(node, sum(before) + 20)
    took = sorted(a - b for a, b in zip(after, before, strict=True))
    assert took == [0, 20], took  # one client, one worker
    # Several clients: each sticks to its endpoint, and they land on both workers.
    before = after
    seen = from_sources(topology.client, STICKY_VIP, 20, CLIENTS)
    assert all(list(counts.values()) == [20] for counts in seen.values()), seen
    after = settled(node, sum(before) + 20 * len(CLIENTS))
    took = [a - b for a, b in zip(after, before, strict=True)]
    assert sum(took) == 20 * len(CLIENTS) and min(took) > 0, took
    assert uproxy.stop(signal.SIGTERM) == 0


def test_udp_sessions_from_several_clients(topo: tuple[Topology, Path]) -> None:
    topology, config = topo
    uproxy = start(topology, config)
    client, node = topology.client, topology.node
    for source in CLIENTS:
        assert dig_from(client, DNS_VIP, source, 40000) in ANSWERS, source
    # With affinity every query of one client (each from a new source port, so a new session)
    # reaches one worker, and so the one endpoint its affinity table holds.
    answers = {
        source: {dig_from(client, STICKY_DNS_VIP, source, 40001 + n) for n in range(8)}
        for source in CLIENTS
    }
    assert all(len(seen) == 1 and seen <= ANSWERS for seen in answers.values()), answers
    sessions = len(CLIENTS) * 9
    deadline = time.monotonic() + 15
    while True:
        values = metrics(node)
        total = values.get(
            'uproxy_connections_total{protocol="UDP",service_port="default/dns:dns"}', 0
        ) + values.get(
            'uproxy_connections_total{protocol="UDP",service_port="default/dnssticky:dns"}', 0
        )
        if total >= sessions or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert total == sessions, values
    assert uproxy.stop(signal.SIGTERM) == 0


def test_a_killed_worker_is_restarted_and_new_connections_never_fail(
    topo: tuple[Topology, Path],
) -> None:
    topology, config = topo
    uproxy = start(topology, config)
    pids = worker_pids(uproxy)
    assert sorted(pids) == [0, 1], pids
    mark = len(uproxy.events)
    os.kill(pids[0], signal.SIGKILL)
    # Straight after the kill: connections hashed to the dead worker's socket wait in its
    # backlog (the main process holds the socket) until the new worker takes it over.
    seen = from_sources(topology.client, WEB_VIP, 10, CLIENTS)
    assert sum(sum(c.values()) for c in seen.values()) == 10 * len(CLIENTS), seen
    died = uproxy.wait_event("worker_died", after=mark, worker=0)
    assert died["pid"] == pids[0] and died["status"] == -signal.SIGKILL, died
    restarted = uproxy.wait_event("worker_started", after=mark, worker=0, restarts=1)
    assert restarted["pid"] != pids[0]
    sticky = from_sources(topology.client, STICKY_VIP, 20, CLIENTS)
    assert all(list(counts.values()) == [20] for counts in sticky.values()), sticky
    values = metrics(topology.node)
    assert values['uproxy_worker_restarts_total{worker="0"}'] == 1, values
    assert values['uproxy_worker_restarts_total{worker="1"}'] == 0, values
    assert values["uproxy_workers_running"] == 2, values
    status = json.loads(topology.node.run("curl", "-sS", "http://127.0.0.1:10249/status").stdout)
    assert status["workers"] == [
        {"worker": 0, "pid": restarted["pid"], "live": True, "restarts": 1},
        {"worker": 1, "pid": pids[1], "live": True, "restarts": 0},
    ], status["workers"]
    assert uproxy.stop(signal.SIGTERM) == 0


def test_sigterm_drains_every_worker(topo: tuple[Topology, Path]) -> None:
    topology, config = topo
    uproxy = start(topology, config, "--shutdown-grace", "20s")
    held = topology.client.start_python("-c", HELD, WEB_VIP, "80", *CLIENTS, stdin=True)
    held.wait_line("^open", timeout=20)
    deadline = time.monotonic() + 15
    while min(per_worker(topology.node, "uproxy_worker_connections_active")) == 0:
        assert time.monotonic() < deadline, per_worker(topology.node)
        time.sleep(0.2)
    mark = len(uproxy.events)
    os.kill(uproxy.pid, signal.SIGTERM)  # the main process alone: it tells the workers
    for worker in (0, 1):
        uproxy.wait_event("draining", after=mark, worker=worker)
    assert uproxy.proc.poll() is None
    held.send("go")
    answers = held.wait_line("^answers", timeout=20).split()[1:]
    assert len(answers) == len(CLIENTS) and set(answers) <= set(NAMES.values()), answers
    assert uproxy.proc.wait(timeout=20) == 0
    exited = [e for e in uproxy.events[mark:] if e.get("event") == "worker_exited"]
    assert sorted((e["worker"], e["status"]) for e in exited) == [(0, 0), (1, 0)], exited
    assert not any(e.get("event") == "drain_incomplete" for e in uproxy.events), uproxy.tail()


def test_metrics_add_up_to_the_connections_made(topo: tuple[Topology, Path]) -> None:
    topology, config = topo
    uproxy = start(topology, config)
    made = from_sources(topology.client, WEB_VIP, 25, CLIENTS)
    made_sticky = from_sources(topology.client, STICKY_VIP, 5, CLIENTS)
    assert sum(sum(c.values()) for c in made.values()) == 25 * len(CLIENTS)
    expected = 30 * len(CLIENTS)
    counts = settled(topology.node, expected)
    assert sum(counts) == expected and min(counts) > 0, counts
    values = metrics(topology.node)
    web = 'uproxy_connections_total{protocol="TCP",service_port="default/web:http"}'
    sticky = 'uproxy_connections_total{protocol="TCP",service_port="default/sticky:http"}'
    assert values[web] == 25 * len(CLIENTS), values
    assert values[sticky] == 5 * len(CLIENTS) == sum(sum(c.values()) for c in made_sticky.values())
    status = json.loads(topology.node.run("curl", "-sS", "http://127.0.0.1:10249/status").stdout)
    web_status = next(p for p in status["servicePorts"] if p["name"] == "default/web:http")
    assert web_status["connections"] == 0, web_status  # every connection has finished
    assert (
        web_status["proxyPort"]
        == uproxy.wait_event("listener_started", service="default/web:http")["port"]
    )
    assert uproxy.stop(signal.SIGTERM) == 0
