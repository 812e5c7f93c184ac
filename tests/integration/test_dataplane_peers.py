"""The userspace data plane under real clients, against the real kernel, in namespaces.

    client 10.10.0.2 -- 10.10.0.1 node (uproxy run, portals) 10.20.1.1 -- 10.20.1.2 backend

- Short connections: the backend's FIN reaches the client with (or right behind) the reply, so
  the client closes passively and keeps no TIME_WAIT socket per connection.
- Dead peers: a client that vanishes without a FIN (its packets dropped inside its own
  namespace) no longer holds uproxy's sockets once keepalive, the idle timeout or the linger
  time has run out.
- UDP: one client port talking to two addresses of one service port gets two sessions, each
  answered from its own address.

Sockets are counted with `ss` in the node namespace (those of the uproxy process), in bounded
wait loops: a test waits for the state it expects, it never asserts how long that took.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.integration.conftest import require_tools
from tests.integration.netns import Namespace, Network, Process
from tests.manifests import endpoint_slice, service, write

pytestmark = pytest.mark.root

CLIENT_IP, NODE_IP, NODE_IP2, BACKEND_IP = "10.10.0.2", "10.10.0.1", "10.10.0.3", "10.20.1.2"
WEB_VIP, HOLD_VIP, BIG_VIP, DNS_VIP = "10.96.0.10", "10.96.0.11", "10.96.0.12", "10.96.0.53"
DNS_EIP = "203.0.113.53"  # an externalIP of the dns service, routed to the node
BIG_REPLY = 200_000  # fits under the proxy's write high-water mark, not in a tiny window

# The backend: :8080 answers one HTTP request and closes; :8081 reads and never answers;
# :8082 reads until EOF, then sends BIG_REPLY bytes and closes; :9053/udp echoes.
BACKEND = r"""
import asyncio, socket, sys
BIG = int(sys.argv[2])
REPLY = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

class Web(asyncio.Protocol):
    def connection_made(self, t): self.t, self.buf = t, b""
    def data_received(self, d):
        self.buf += d
        if b"\r\n\r\n" in self.buf:
            self.t.write(REPLY)
            self.t.write_eof()  # the FIN right behind the reply, as nginx's lingering close
            self.t.close()

class Hold(asyncio.Protocol):
    pass

class Big(asyncio.Protocol):
    def connection_made(self, t): self.t = t
    def eof_received(self):
        self.t.write(b"x" * BIG)
        self.t.close()
        return True

class Echo(asyncio.DatagramProtocol):
    def connection_made(self, t): self.t = t
    def datagram_received(self, d, addr): self.t.sendto(d, addr)

async def main():
    loop = asyncio.get_running_loop()
    ip = sys.argv[1]
    for proto, port in ((Web, 8080), (Hold, 8081), (Big, 8082)):
        await loop.create_server(proto, ip, port, backlog=4096)
    await loop.create_datagram_endpoint(Echo, local_addr=(ip, 9053))
    print("serving", flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
"""

# A client that connects, sends a line and then holds the connection without reading.
# With "halfclose" it shuts its write side after the line; with a receive buffer size it sets
# SO_RCVBUF first, so that what the proxy sends it piles up in the proxy.
HOLDER = r"""
import socket, sys, time
host, mode, rcvbuf = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket()
if rcvbuf:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
s.connect((host, 80))
s.sendall(b"hello\n")
if mode == "halfclose":
    s.shutdown(socket.SHUT_WR)
print("connected", s.getsockname()[1], flush=True)
time.sleep(3600)
"""

# Drops everything in and out of the namespace it is loaded in: a peer that vanished.
VANISH = """
table inet vanish {
    chain in { type filter hook input priority 0; policy drop; }
    chain out { type filter hook output priority 0; policy drop; }
}
"""


@dataclass
class Topology:
    client: Namespace
    node: Namespace
    backend: Namespace


@pytest.fixture
def topo(net: Network) -> Topology:
    require_tools("nft", "ss")
    client, node, backend = net.namespace("client"), net.namespace("node"), net.namespace("be")
    _, node_dev = net.link(client, f"{CLIENT_IP}/24", node, f"{NODE_IP}/24")
    node.add_address(f"{NODE_IP2}/24", dev=node_dev)  # a second address of the node
    net.link(node, "10.20.1.1/24", backend, f"{BACKEND_IP}/24")
    client.route("default", via=NODE_IP)
    backend.route("default", via="10.20.1.1")
    backend.start_python("-c", BACKEND, BACKEND_IP, str(BIG_REPLY)).wait_line("serving")
    return Topology(client, node, backend)


def write_services(config: Path) -> None:
    def tcp(name: str, vip: str, port: int) -> list[dict[str, object]]:
        return [
            service(name, [{"name": "http", "port": 80, "targetPort": port}], cluster_ip=vip),
            endpoint_slice(name, [{"name": "http", "port": port}], [BACKEND_IP]),
        ]

    udp = [{"name": "dns", "port": 9053, "protocol": "UDP"}]
    write(
        config / "services.yaml",
        *tcp("web", WEB_VIP, 8080),
        *tcp("hold", HOLD_VIP, 8081),
        *tcp("big", BIG_VIP, 8082),
        service(
            "dns",
            [{"name": "dns", "port": 53, "targetPort": 9053, "protocol": "UDP"}],
            cluster_ip=DNS_VIP,
            externalIPs=[DNS_EIP],
        ),
        endpoint_slice("dns", udp, [BACKEND_IP]),
    )


@pytest.fixture
def config(tmp_path: Path) -> Path:
    directory = tmp_path / "manifests"
    directory.mkdir()
    write_services(directory)
    return directory


def start_uproxy(topo: Topology, config: Path, *extra: str) -> Process:
    process = topo.node.start_python(
        "-m", "uproxy", "run", "--config", str(config), "--min-sync-period", "0",
        "--log-format", "json", "--log-level", "debug",
        "--healthz-bind-address", "127.0.0.1:0", "--metrics-bind-address", "127.0.0.1:0",
        *extra,
    )  # fmt: skip
    for name in ("default/web:http", "default/hold:http", "default/big:http", "default/dns:dns"):
        process.wait_event("listener_started", service=name, timeout=30)
    if "--no-portals" not in extra:
        process.wait_event("portals_synced", timeout=30)
    return process


def uproxy_sockets(node: Namespace, process: Process) -> int:
    """TCP sockets (not listeners) the uproxy process holds open."""
    out = node.run("ss", "-Htanp").stdout
    owned = f"pid={process.pid},"
    return sum(1 for line in out.splitlines() if owned in line and not line.startswith("LISTEN"))


def wait_sockets(node: Namespace, process: Process, want: int, within: float) -> int:
    """Until uproxy holds `want` TCP sockets; the last count seen (bounded loop)."""
    deadline = time.monotonic() + within
    while True:
        count = uproxy_sockets(node, process)
        if count == want or time.monotonic() > deadline:
            return count
        time.sleep(0.1)


def vanish(ns: Namespace) -> None:
    ns.run("nft", "-f", "-", input=VANISH)


@pytest.fixture(params=["uvloop", "asyncio"])
def event_loop_name(request: pytest.FixtureRequest) -> Iterator[str]:
    yield str(request.param)


# -- dead peers -----------------------------------------------------------------------------


def hold_connection(
    topo: Topology, process: Process, vip: str, mode: str = "open", rcvbuf: int = 0
) -> Process:
    baseline = uproxy_sockets(topo.node, process)
    holder = topo.client.start_python("-c", HOLDER, vip, mode, str(rcvbuf))
    holder.wait_line("connected")
    assert wait_sockets(topo.node, process, baseline + 2, within=10) == baseline + 2
    return holder


def test_keepalive_frees_the_sockets_of_a_client_that_vanished(
    topo: Topology, config: Path, event_loop_name: str
) -> None:
    uproxy = start_uproxy(
        topo, config, "--event-loop", event_loop_name,
        "--tcp-keepalive-idle", "1s", "--tcp-keepalive-interval", "1s",
        "--tcp-keepalive-count", "2",
    )  # fmt: skip
    baseline = uproxy_sockets(topo.node, uproxy)
    hold_connection(topo, uproxy, HOLD_VIP)
    vanish(topo.client)
    # idle 1 s + 2 unanswered probes 1 s apart: gone after about 3 s; allowed ten times that.
    assert wait_sockets(topo.node, uproxy, baseline, within=30) == baseline


def test_idle_timeout_closes_a_connection_silent_both_ways(
    topo: Topology, config: Path, event_loop_name: str
) -> None:
    uproxy = start_uproxy(
        topo, config, "--event-loop", event_loop_name, "--no-tcp-keepalive",
        "--tcp-idle-timeout", "2s", "--tcp-linger-timeout", "1s",
    )  # fmt: skip
    baseline = uproxy_sockets(topo.node, uproxy)
    hold_connection(topo, uproxy, HOLD_VIP)
    vanish(topo.client)
    assert wait_sockets(topo.node, uproxy, baseline, within=30) == baseline
    assert any(e.get("event") == "tcp_idle_timeout" for e in uproxy.events)


def test_linger_bounds_a_closed_connection_to_a_peer_that_never_reads(
    topo: Topology, config: Path, event_loop_name: str
) -> None:
    """The backend answers BIG_REPLY bytes and closes; the client (alive, 4 KiB receive buffer)
    never reads them. uproxy has closed the connection with data still to deliver."""
    uproxy = start_uproxy(
        topo, config, "--event-loop", event_loop_name, "--no-tcp-keepalive",
        "--tcp-linger-timeout", "1s",
    )  # fmt: skip
    baseline = uproxy_sockets(topo.node, uproxy)
    holder = topo.client.start_python("-c", HOLDER, BIG_VIP, "halfclose", "4096")
    holder.wait_line("connected")
    uproxy.wait_event("tcp_linger_expired", timeout=30)
    assert wait_sockets(topo.node, uproxy, baseline, within=30) == baseline


# -- short connections ----------------------------------------------------------------------


def time_wait(ns: Namespace) -> int:
    return len(ns.run("ss", "-Htan", "state", "time-wait").stdout.splitlines())


def test_short_connections_leave_the_client_no_time_wait(
    topo: Topology, config: Path, event_loop_name: str
) -> None:
    """wrk with `Connection: close`, the client namespace with a pod's default sysctls: the
    backend's FIN comes with the reply, so the client closes second and keeps no TIME_WAIT."""
    require_tools("wrk")
    start_uproxy(topo, config, "--event-loop", event_loop_name)
    before = time_wait(topo.client)
    out = topo.client.run(
        "wrk", "-t1", "-c32", "-d4s", "-H", "Connection: close", f"http://{WEB_VIP}/",
        timeout=60,
    ).stdout  # fmt: skip
    done = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    grown = time_wait(topo.client) - before
    assert done > 1000, out
    assert grown < 0.2 * done, f"{grown} new TIME_WAIT sockets for {done} connections\n{out}"


# -- UDP ------------------------------------------------------------------------------------

TWO_ADDRESSES = r"""
import socket, sys
port = int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("", 40555))
s.settimeout(3)
targets = sys.argv[1:3]
for n, host in enumerate(targets * 3):
    s.sendto(f"{host} {n}".encode(), (host, port))
got = set()
try:
    while len(got) < 6:
        data, addr = s.recvfrom(1000)
        got.add((data.decode(), addr[0]))
except OSError as exc:
    print("ERR", type(exc).__name__)
for data, addr in sorted(got):
    print(data, "from", addr)
"""


def assert_each_answered_from_its_address(out: str, first: str, second: str) -> None:
    lines = out.splitlines()
    assert "ERR" not in out, out
    for n in range(6):
        host = (first, second)[n % 2]
        assert f"{host} {n} from {host}" in lines, out


def test_one_client_port_to_two_virtual_ips_of_one_service_port(
    topo: Topology, config: Path, event_loop_name: str
) -> None:
    """Through the portals: the ClusterIP and an externalIP, from one client port."""
    start_uproxy(topo, config, "--event-loop", event_loop_name, "--udp-timeout", "10s")
    out = topo.client.python(TWO_ADDRESSES, DNS_VIP, DNS_EIP, "53").stdout
    assert_each_answered_from_its_address(out, DNS_VIP, DNS_EIP)


def test_one_client_port_to_two_node_addresses_gets_two_sessions(
    topo: Topology, config: Path, event_loop_name: str
) -> None:
    """No NAT in between: the listener itself sees one client port arrive at two of its
    addresses, and must answer each from the address it was sent to."""
    uproxy = start_uproxy(
        topo, config, "--event-loop", event_loop_name, "--udp-timeout", "10s", "--no-portals"
    )
    port = next(
        e["port"]
        for e in uproxy.events
        if e.get("event") == "listener_started" and e["service"] == "default/dns:dns"
    )
    out = topo.client.python(TWO_ADDRESSES, NODE_IP, NODE_IP2, str(port)).stdout
    assert_each_answered_from_its_address(out, NODE_IP, NODE_IP2)
