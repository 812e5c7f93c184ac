"""A dead endpoint under load costs no new connection (issue 18, "retries that learn").

The topology of test_kernel_modes, userspace mode: 20 concurrent clients open 600 short
connections to a ClusterIP with three endpoints while one endpoint is dead, either killed (its
port refuses at once) or vanished (its packets are dropped inside its namespace, as for a node
that is gone). Before uproxy learned, each retry took the next pick of the shared round-robin
position and so went back to the dead endpoint a third of the time: 1.1 % of new connections
failed. Now a retry never repeats an endpoint of its own, and the dead one is ejected after three
failures in a row, so none fails, and the ejection is logged once per ejection, not per connection.
"""

from __future__ import annotations

import json
import signal
from collections import Counter
from pathlib import Path

import pytest

from tests.integration.netns import Namespace
from tests.integration.test_kernel_modes import (
    BACKEND_IPS,
    WEB_VIP,
    Topology,
    start_uproxy,
)

pytestmark = pytest.mark.root

CONCURRENT = r"""
import json, socket, sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
host, workers, each = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def one(_):
    try:
        with socket.create_connection((host, 80), timeout=10) as s:
            s.settimeout(10)
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            data = b""
            while chunk := s.recv(4096):
                data += chunk
        return data.split(b"\r\n\r\n", 1)[1].split()[0].decode()
    except (OSError, IndexError) as exc:  # IndexError: closed without an answer
        return f"failed:{type(exc).__name__}"
with ThreadPoolExecutor(workers) as pool:
    seen = Counter(pool.map(one, range(workers * each)))
print(json.dumps(seen))
"""


def load(topology: Topology, each: int = 30) -> Counter[str]:
    """`each` connections from each of 20 concurrent clients: the backend that answered each,
    or `failed:<error>`."""
    out = topology.client.python(CONCURRENT, WEB_VIP, "20", str(each), timeout=300).stdout
    return Counter(json.loads(out))


def kill(backend: Namespace, death: str) -> None:
    """Make `backend`'s port 8080 dead: "killed" refuses at once (nothing listens any more),
    "vanished" drops every packet (gone without a word, as a node that is gone)."""
    verdict = "reject with tcp reset" if death == "killed" else "drop"
    backend.run("nft", "add table inet chaos")
    backend.run("nft", "add chain inet chaos input { type filter hook input priority 0; }")
    backend.run("nft", f"add rule inet chaos input tcp dport 8080 {verdict}")


@pytest.mark.parametrize("death", ["killed", "vanished"])
def test_a_dead_endpoint_fails_no_new_connection(topo: tuple[Topology, Path], death: str) -> None:
    topology, config = topo
    uproxy = start_uproxy(topology, config, "userspace", "nft")
    kill(topology.backends[1], death)  # be2
    seen = load(topology)
    assert sum(seen.values()) == 600
    assert not [k for k in seen if k.startswith("failed")], seen
    assert set(seen) == {"be1", "be3"}, seen

    ejections = [
        e
        for e in uproxy.events
        if e.get("event") == "endpoint_ejected" and e.get("endpoint") == f"{BACKEND_IPS[1]}:8080"
    ]
    # Logged once per ejection (each at least a second, doubling), never per connection.
    assert 1 <= len(ejections) <= 10, len(ejections)
    metrics = topology.node.run("curl", "-sS", "http://127.0.0.1:10249/metrics").stdout
    counted = [
        line
        for line in metrics.splitlines()
        if line.startswith("uproxy_endpoint_ejections_total") and "default/web:http" in line
    ]
    assert counted and 1 <= float(counted[0].split()[-1]) <= 10, counted
    assert uproxy.stop(signal.SIGTERM) == 0, uproxy.tail()
