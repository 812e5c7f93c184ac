"""The kernel forwarding modes against the real kernel, on both iptables backends.

Every test runs a real `uproxy run --mode MODE` inside the node namespace of its own topology:

    client 10.10.0.2 --veth-- 10.10.0.1 node 10.20.N.1 --veth-- 10.20.N.2 backend N (N = 1..3)

Backend N answers HTTP on :8080 with `beN <the address it saw the client as>` and DNS on :53
with 10.0.0.N for *.svc.test (dnsmasq). The client routes everything through the node (the
ClusterIPs, externalIP 203.0.113.7 and LoadBalancer IP 192.0.2.80 included); the node forwards
(net.ipv4.ip_forward=1, set only inside the node namespace) and routes anything else into a veth
that leads nowhere, as a node routes its service CIDR somewhere.

The tests assert behaviour only, for every mode in `KERNEL_MODES`; `kernel_rules` is the one
helper that knows how a mode's rules look.
"""

from __future__ import annotations

import signal
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import require_tools
from tests.integration.netns import Namespace, Network, Process, cli_cleanup

pytestmark = pytest.mark.root

BACKENDS = ["legacy", "nft"]
# (mode, iptables backend): the iptables mode on both backends; the nftables mode has a table of
# its own, and the backend only decides where the other modes' leftovers it removes are looked for.
KERNEL_MODES = [("iptables", "legacy"), ("iptables", "nft"), ("nftables", "nft")]

CLIENT_IP, NODE_IP = "10.10.0.2", "10.10.0.1"
WEB_VIP, DNS_VIP, STICKY_VIP, BRIEF_VIP = "10.96.0.10", "10.96.0.53", "10.96.0.20", "10.96.0.21"
EMPTY_VIP, LOCAL_VIP, HAIRPIN_VIP = "10.96.0.40", "10.96.0.30", "10.96.0.31"
EXTERNAL_IP, LB_IP = "203.0.113.7", "192.0.2.80"
NODE_NAME = "node-a"
BACKEND_IPS = ["10.20.1.2", "10.20.2.2", "10.20.3.2"]
NAMES = {ip: f"be{n}" for n, ip in enumerate(BACKEND_IPS, start=1)}

BACKEND = r"""
import http.server, socketserver, sys
name = sys.argv[1]
class Server(http.server.ThreadingHTTPServer):
    allow_reuse_address = True
    # socketserver's backlog of 5 drops the SYNs of a burst of clients (a second's retransmit
    # each, which a dial timeout takes for a dead endpoint); real backends listen with more.
    request_queue_size = 128
    def server_bind(self):
        # HTTPServer's own asks DNS for the host's name (socket.getfqdn), which in a namespace
        # with no resolver waits out a timeout: 6 s per backend.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]
class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.0"
    def do_GET(self):
        body = f"{name} {self.client_address[0]}\n".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = Server((sys.argv[2], 8080), Handler)
print("serving", flush=True)
server.serve_forever()
"""

# Many connections in one process: each a new connection (and so a new NAT decision).
MANY = r"""
import socket, sys
from collections import Counter
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
seen = Counter()
for _ in range(n):
    with socket.create_connection((host, port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.0\r\n\r\n")
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    seen[data.split(b"\r\n\r\n", 1)[1].split()[0].decode()] += 1
print(" ".join(f"{k}={v}" for k, v in sorted(seen.items())))
"""


# -- the topology --------------------------------------------------------------------------


@dataclass
class Topology:
    net: Network
    client: Namespace
    node: Namespace
    backends: list[Namespace]


def build_topology(net: Network) -> Topology:
    client, node = net.namespace("client"), net.namespace("node")
    net.link(client, f"{CLIENT_IP}/24", node, f"{NODE_IP}/24")
    client.route("default", via=NODE_IP)
    # Where the node sends what it has no endpoint for. Not back out of the client's veth: the
    # ICMP redirect that would cost shares the per-host ICMP budget with REJECT's answer.
    # (A veth pair inside the node: this host's kernel has no dummy interfaces.)
    node.run("ip", "link", "add", "nowhere0", "type", "veth", "peer", "name", "nowhere1")
    for dev in ("nowhere0", "nowhere1"):
        node.run("ip", "link", "set", dev, "up")
    node.route("default", dev="nowhere0")
    node.sysctl("net.ipv4.ip_forward", "1")
    ends = []
    for n, ip in enumerate(BACKEND_IPS, start=1):
        end = net.namespace(f"be{n}")
        net.link(node, f"10.20.{n}.1/24", end, f"{ip}/24")
        end.route("default", via=f"10.20.{n}.1")
        ends.append(end)
    return Topology(net, client, node, ends)


def start_backends(topo: Topology) -> None:
    for n, (end, ip) in enumerate(zip(topo.backends, BACKEND_IPS, strict=True), start=1):
        end.start_python("-c", BACKEND, f"be{n}", ip).wait_line("serving", timeout=10)
        end.start(
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            f"--address=/svc.test/10.0.0.{n}",
            f"--listen-address={ip}",
            "--bind-interfaces",
            "--port=53",
            "--pid-file=",
            "--user=root",
            "--group=root",
            "--log-facility=-",
        ).wait_line("started, version", timeout=10)


# -- manifests -------------------------------------------------------------------------------


def _service(name: str, ports: list[dict[str, Any]], vip: str, **spec: Any) -> dict[str, Any]:
    status = spec.pop("status", None)
    body: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {"clusterIP": vip, "ports": ports, **spec},
    }
    if status is not None:
        body["status"] = status
    return body


def _slice(
    service: str, port: int, addresses: list[str], protocol: str = "TCP", **nodes: str
) -> dict[str, Any]:
    name = "dns" if protocol == "UDP" else "http"
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": f"{service}-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": service},
        },
        "addressType": "IPv4",
        "ports": [{"name": name, "port": port, "protocol": protocol}],
        "endpoints": [
            {"addresses": [ip], "conditions": {"ready": True}, "nodeName": nodes.get(ip, "node-b")}
            for ip in addresses
        ],
    }


def manifests(
    *, dns_endpoints: list[str] | None = None, with_dns: bool = True, web: list[str] | None = None
) -> list[dict[str, Any]]:
    lb = {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    http = [{"name": "http", "port": 80, "targetPort": 8080}]
    objects = [
        _service(
            "web",
            [{**http[0], "nodePort": 30080}],
            WEB_VIP,
            type="LoadBalancer",
            externalIPs=[EXTERNAL_IP],
            status=lb,
        ),
        _slice("web", 8080, web if web is not None else BACKEND_IPS),
        _service("sticky", http, STICKY_VIP, sessionAffinity="ClientIP"),
        _slice("sticky", 8080, BACKEND_IPS),
        _service(
            "brief",
            http,
            BRIEF_VIP,
            sessionAffinity="ClientIP",
            sessionAffinityConfig={"clientIP": {"timeoutSeconds": 1}},
        ),
        _slice("brief", 8080, BACKEND_IPS),
        _service("empty", [{**http[0], "nodePort": 30040}], EMPTY_VIP, type="NodePort"),
        _service(
            "local",
            [{**http[0], "nodePort": 30081}],
            LOCAL_VIP,
            type="NodePort",
            externalTrafficPolicy="Local",
        ),
        _slice("local", 8080, BACKEND_IPS[:2], **{BACKEND_IPS[0]: NODE_NAME}),
        _service("hairpin", http, HAIRPIN_VIP),
        _slice("hairpin", 8080, BACKEND_IPS[:1]),
    ]
    if with_dns:
        udp = [{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]
        objects += [
            _service(
                "dns", udp, DNS_VIP, type="LoadBalancer", externalIPs=[EXTERNAL_IP], status=lb
            ),
            _slice("dns", 53, dns_endpoints or BACKEND_IPS, protocol="UDP"),
        ]
    return objects


def write_manifests(config: Path, objects: list[dict[str, Any]]) -> None:
    tmp = config / ".services.yaml.tmp"
    tmp.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    tmp.replace(config / "services.yaml")


# -- uproxy and the rules of each mode ------------------------------------------------------


def start_uproxy(topo: Topology, config: Path, mode: str, backend: str, *extra: str) -> Process:
    process = topo.node.start_python(
        "-m",
        "uproxy",
        "run",
        "--mode",
        mode,
        "--config",
        str(config),
        "--iptables-backend",
        backend,
        "--hostname-override",
        NODE_NAME,
        "--min-sync-period",
        "0",
        "--log-format",
        "json",
        *extra,
    )
    process.wait_event("sync_done", timeout=30)
    return process


def wait_for_change(process: Process, mark: int) -> None:
    """Until a sync after event `mark` has applied a change from the sources."""
    deadline = time.monotonic() + 15
    while not any(
        e.get("event") == "sync_done" and e.get("changed_services", 0) > 0
        for e in process.events[mark:]
    ):
        assert time.monotonic() < deadline, process.tail()
        time.sleep(0.05)


def save(ns: Namespace, backend: str) -> str:
    text = ns.run(f"iptables-{backend}-save").stdout
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def uproxy_lines(ns: Namespace) -> list[str]:
    """Everything of uproxy's that either iptables backend's save tool shows."""
    return [
        f"{b}: {line}" for b in BACKENDS for line in save(ns, b).splitlines() if "UPROXY" in line
    ]


def nft_rules(ns: Namespace) -> list[str]:
    """The rules of uproxy's nftables tables (both families), as `table chain: rule`."""
    out = []
    for family in ("ip", "ip6"):
        listing = ns.run("nft", "list", "table", family, "uproxy", check=False)
        chain = ""
        for line in listing.stdout.splitlines():
            text = line.strip()
            if text.startswith("chain "):
                chain = text.split()[1]
            elif chain and text and text != "}" and not text.startswith("type "):
                out.append(f"{family} {chain}: {text}")
            if text == "}":
                chain = ""
    return out


def kernel_rules(ns: Namespace, mode: str, backend: str) -> list[str]:
    """The rules `mode` keeps in the kernel, one string each (the only mode-specific helper)."""
    if mode == "iptables":
        return [line for line in save(ns, backend).splitlines() if "UPROXY" in line]
    if mode == "nftables":
        return nft_rules(ns)
    raise AssertionError(f"no rule reader for mode {mode}")


def require_backend(backend: str) -> None:
    require_tools(f"iptables-{backend}-save", f"iptables-{backend}-restore", f"iptables-{backend}")
    if backend == "legacy":
        try:
            import iptc  # noqa: F401
        except Exception as exc:
            pytest.skip(f"python-iptables cannot load libiptc: {exc}")


# -- clients ---------------------------------------------------------------------------------


def curl(ns: Namespace, host: str, port: int = 80, max_time: float = 3) -> str:
    """`beN <address the backend saw>`, or `ERR exit=N <curl's message>`."""
    out = ns.run("curl", "-sS", "--max-time", str(max_time), f"http://{host}:{port}/", check=False)
    if out.returncode != 0:
        return f"ERR exit={out.returncode} {out.stderr.strip()}"
    return out.stdout.strip()


def who(ns: Namespace, host: str, port: int = 80) -> str:
    return curl(ns, host, port).split()[0]


def many(ns: Namespace, host: str, n: int) -> Counter[str]:
    out = ns.python(MANY, host, "80", str(n), timeout=120).stdout.split()
    return Counter({k: int(v) for k, v in (item.split("=") for item in out)})


def dig(ns: Namespace, server: str, port: int = 53, source_port: int | None = None) -> str:
    argv = ["dig", "+short", "+tries=1", "+time=2", f"@{server}", "-p", str(port)]
    if source_port is not None:
        argv += ["-b", f"{CLIENT_IP}#{source_port}"]
    out = ns.run(*argv, "a.svc.test", check=False)
    return out.stdout.strip() or f"no answer: {out.stderr.strip()}"


def require_mode(mode: str, backend: str) -> None:
    """Skip (with the reason) unless this host has the tools of `mode` on iptables `backend`."""
    require_backend(backend)
    if mode == "nftables":
        require_tools("nft")


# -- fixtures --------------------------------------------------------------------------------


@pytest.fixture(params=KERNEL_MODES, ids=[f"{m}-{b}" for m, b in KERNEL_MODES])
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    mode, backend = request.param
    require_mode(mode, backend)
    return str(mode), str(backend)


@pytest.fixture
def mode(case: tuple[str, str]) -> str:
    return case[0]


@pytest.fixture
def backend(case: tuple[str, str]) -> str:
    return case[1]


@pytest.fixture
def topo(net: Network, tmp_path: Path) -> Iterator[tuple[Topology, Path]]:
    require_tools("curl", "dig", "dnsmasq")
    topology = build_topology(net)
    start_backends(topology)
    config = tmp_path / "manifests"
    config.mkdir()
    write_manifests(config, manifests())
    try:
        yield topology, config
    finally:
        cli_cleanup(topology.node)  # whatever the test did, leave the node clean


# -- the tests -------------------------------------------------------------------------------


def test_every_address_kind_forwards_tcp_and_udp(
    topo: tuple[Topology, Path], mode: str, backend: str
) -> None:
    topology, config = topo
    uproxy = start_uproxy(topology, config, mode, backend)
    client, node = topology.client, topology.node
    be = set(NAMES.values())
    for ns in (client, node):
        assert who(ns, WEB_VIP) in be, ns
        assert dig(ns, DNS_VIP) in {"10.0.0.1", "10.0.0.2", "10.0.0.3"}, ns
    for address, port in ((NODE_IP, 30080), (EXTERNAL_IP, 80), (LB_IP, 80)):
        answer = curl(client, address, port)
        # Cluster policy: the reply must come back through this node, so the backend sees it.
        assert answer.split()[0] in be and answer.split()[1].startswith("10.20."), answer
    for address, port in ((NODE_IP, 30053), (EXTERNAL_IP, 53), (LB_IP, 53)):
        assert dig(client, address, port) in {"10.0.0.1", "10.0.0.2", "10.0.0.3"}, address
    # ClusterIP traffic from the client keeps its address (no --cluster-cidr, no masquerade).
    assert curl(client, WEB_VIP).split()[1] == CLIENT_IP
    assert node.run("curl", "-sS", "http://127.0.0.1:10249/proxyMode").stdout == mode
    metrics = node.run("curl", "-sS", "http://127.0.0.1:10249/metrics").stdout
    assert 'uproxy_rule_syncs_total{kind="full"}' in metrics, metrics[-2000:]
    status = node.run(sys.executable, "-m", "uproxy", "status")
    assert "default/web:http" in status.stdout and WEB_VIP in status.stdout, status.stdout
    assert uproxy.stop(signal.SIGTERM) == 0


def test_new_connections_spread_evenly_over_three_endpoints(
    topo: tuple[Topology, Path], mode: str, backend: str
) -> None:
    topology, config = topo
    uproxy = start_uproxy(topology, config, mode, backend)
    seen = many(topology.client, WEB_VIP, 300)
    assert set(seen) == set(NAMES.values()), seen
    assert all(60 <= count <= 140 for count in seen.values()), seen
    assert uproxy.stop(signal.SIGTERM) == 0


def test_client_ip_affinity_sticks_then_moves_after_its_timeout(
    topo: tuple[Topology, Path], mode: str, backend: str
) -> None:
    topology, config = topo
    uproxy = start_uproxy(topology, config, mode, backend)
    sticky = many(topology.client, STICKY_VIP, 20)
    assert list(sticky.values()) == [20], sticky
    brief = many(topology.client, BRIEF_VIP, 20)  # within its 1 s timeout it sticks too
    assert list(brief.values()) == [20], brief
    # After the timeout the choice is made anew: with three endpoints, eight fresh choices all
    # landing on one endpoint would happen once in 2,187 runs.
    chosen = set()
    for _ in range(8):
        time.sleep(1.5)
        chosen.add(who(topology.client, BRIEF_VIP))
    assert len(chosen) > 1, chosen
    assert uproxy.stop(signal.SIGTERM) == 0


def test_a_service_without_endpoints_refuses_at_once(
    topo: tuple[Topology, Path], mode: str, backend: str
) -> None:
    topology, config = topo
    uproxy = start_uproxy(topology, config, mode, backend)
    for ns, host, port in (
        (topology.client, EMPTY_VIP, 80),
        (topology.node, EMPTY_VIP, 80),
        (topology.client, NODE_IP, 30040),
    ):
        answer = curl(ns, host, port, max_time=2)
        # exit 7 (could not connect), not 28 (the --max-time timeout): refused at once.
        assert answer.startswith("ERR exit=7"), (host, answer)
    assert uproxy.stop(signal.SIGTERM) == 0


def test_external_policy_local_keeps_the_client_address_and_hairpin_works(
    topo: tuple[Topology, Path], mode: str, backend: str
) -> None:
    topology, config = topo
    uproxy = start_uproxy(topology, config, mode, backend)
    answers = Counter(curl(topology.client, NODE_IP, 30081) for _ in range(6))
    # Only this node's endpoint (be1) serves external traffic, and it sees the real client.
    assert answers == {f"be1 {CLIENT_IP}": 6}, answers
    # Cluster traffic to the same service still reaches every endpoint.
    assert {who(topology.client, LOCAL_VIP) for _ in range(12)} == {"be1", "be2"}
    # be1 calling a service whose only endpoint is itself (masqueraded, so it answers via us).
    assert curl(topology.backends[0], HAIRPIN_VIP) == "be1 10.20.1.1"
    assert uproxy.stop(signal.SIGTERM) == 0


def test_a_udp_client_that_keeps_sending_follows_an_endpoint_change_at_once(
    topo: tuple[Topology, Path], mode: str, backend: str
) -> None:
    topology, config = topo
    write_manifests(config, manifests(dns_endpoints=BACKEND_IPS[:1]))
    uproxy = start_uproxy(topology, config, mode, backend)
    for _ in range(3):  # one flow: the same source port every time
        assert dig(topology.client, DNS_VIP, source_port=40053) == "10.0.0.1"
    mark = len(uproxy.events)
    write_manifests(config, manifests(dns_endpoints=BACKEND_IPS[1:2]))
    wait_for_change(uproxy, mark)
    # The flush runs off the sync, right after it: its end is the moment the flow moves.
    uproxy.wait_event("conntrack_flush_done", after=mark, timeout=15, family="ipv4")
    # be1 still answers: only deleting the flow's conntrack entry moves it to be2.
    assert dig(topology.client, DNS_VIP, source_port=40053) == "10.0.0.2"
    assert uproxy.stop(signal.SIGTERM) == 0


def test_sigkill_an_edited_manifest_and_a_restart_leave_no_stale_rule_then_cleanup(
    topo: tuple[Topology, Path], mode: str, backend: str
) -> None:
    topology, config = topo
    first = start_uproxy(topology, config, mode, backend)
    assert any("default/dns:dns" in r for r in kernel_rules(topology.node, mode, backend))
    first.stop(signal.SIGKILL)
    write_manifests(config, manifests(with_dns=False, web=BACKEND_IPS[2:]))
    second = start_uproxy(topology, config, mode, backend)
    rules = kernel_rules(topology.node, mode, backend)
    assert not [r for r in rules if "default/dns:dns" in r], rules
    assert not [r for r in rules if "10.20.1.2:8080" in r and "default/web:http" in r], rules
    assert {who(topology.client, WEB_VIP) for _ in range(6)} == {"be3"}
    assert "10.0.0." not in dig(topology.client, DNS_VIP)
    assert second.stop(signal.SIGTERM) == 0
    assert kernel_rules(topology.node, mode, backend)  # the kernel keeps forwarding after exit
    cli_cleanup(topology.node)
    assert uproxy_lines(topology.node) == []
    assert kernel_rules(topology.node, mode, backend) == []
    cli_cleanup(topology.node)  # nothing left to remove: still exit 0


def chains(ns: Namespace) -> set[str]:
    """uproxy's chains in either backend, as `backend table chain`."""
    out = set()
    for backend in BACKENDS:
        table = ""
        for line in save(ns, backend).splitlines():
            if line.startswith("*"):
                table = line[1:]
            elif line.startswith(":UPROXY-"):
                out.add(f"{backend} {table} {line[1:].split()[0]}")
    return out


def test_switching_userspace_to_kernel_mode_and_back_leaves_nothing_of_the_other(
    topo: tuple[Topology, Path], mode: str, backend: str
) -> None:
    topology, config = topo
    userspace = start_uproxy(topology, config, "userspace", backend)
    assert who(topology.client, WEB_VIP) in NAMES.values()
    assert userspace.stop(signal.SIGTERM) == 0
    userspace_chains = chains(topology.node)
    assert any("REDIRECT" in line for line in uproxy_lines(topology.node))

    kernel = start_uproxy(topology, config, mode, backend)
    assert who(topology.client, WEB_VIP) in NAMES.values()
    assert curl(topology.client, WEB_VIP).split()[1] == CLIENT_IP  # the kernel forwarded it
    assert not [line for line in uproxy_lines(topology.node) if "REDIRECT" in line]
    # Only a name both modes use may remain (nat UPROXY-NODEPORTS), with the kernel mode's rules.
    shared = chains(topology.node) & userspace_chains
    assert shared <= {f"{backend} nat UPROXY-NODEPORTS"}, shared
    assert kernel.stop(signal.SIGTERM) == 0

    back = start_uproxy(topology, config, "userspace", backend)
    assert who(topology.client, WEB_VIP) in NAMES.values()
    assert chains(topology.node) == userspace_chains
    kernel_only = [
        line for line in uproxy_lines(topology.node) if "-j DNAT" in line or "MARK" in line
    ]
    assert kernel_only == []
    assert nft_rules(topology.node) == []  # nor an nftables table
    assert back.stop(signal.SIGTERM) == 0


def test_cleanup_on_exit_leaves_no_rule(
    topo: tuple[Topology, Path], mode: str, backend: str
) -> None:
    topology, config = topo
    uproxy = start_uproxy(topology, config, mode, backend, "--cleanup-on-exit")
    assert who(topology.client, WEB_VIP) in NAMES.values()
    assert uproxy.stop(signal.SIGTERM) == 0
    assert uproxy_lines(topology.node) == []
    assert kernel_rules(topology.node, mode, backend) == []
