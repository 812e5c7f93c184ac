"""Portals against the real kernel, on both iptables backends, in throwaway network namespaces.

Topology (each test builds its own and deletes it, whatever happens):

    client 10.10.0.2 --veth-- 10.10.0.1 node 10.20.N.1 --veth-- 10.20.N.2 backend N

The node runs either the *portal driver* (below: NetfilterPortals on a real backend plus tiny
listeners that answer with their service's name) or a real `uproxy run`. Services live on
10.96.0.0/16; the node routes that range out of its client-side veth, as a real node routes its
service CIDR somewhere, or node-local connects fail with ENETUNREACH before OUTPUT sees them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import signal
import socket
import struct
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import require_tools
from tests.integration.netns import Namespace, Network, Process, cli_cleanup

pytestmark = pytest.mark.root

BACKENDS = ["legacy", "nft"]
# The portal layer also runs on legacy's text path: what it falls back to without python-iptables.
FLAVOURS = ["legacy", "legacy-text", "nft"]
CLIENT_IP, NODE_IP = "10.10.0.2", "10.10.0.1"
WEB_VIP, DNS_VIP, STICKY_VIP = "10.96.0.10", "10.96.0.53", "10.96.0.20"
REMOTE_EIP = "203.0.113.7"  # an externalIP routed to the node but not on it
LOCAL_EIP = "198.51.100.7"  # an externalIP assigned to the node
WEB, DNS = "default/web:http", "default/dns:dns"
IP_PKTINFO = getattr(socket, "IP_PKTINFO", 8)  # Linux's value; the constant is Python 3.12+


# -- the client: one connection or datagram, printing the answer or the error --------------

CLIENT = r"""
import socket, sys
proto, host, port, sport = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
timeout = float(sys.argv[5])
try:
    if proto == "tcp":
        s = socket.create_connection((host, port), timeout=timeout)
        s.settimeout(timeout)
        print(s.recv(300).decode().strip())
    else:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("", sport))
        # Connected: a reply from any other source than host:port is never delivered (like dig).
        s.connect((host, port))
        s.settimeout(timeout)
        s.send(b"ping")
        print(s.recv(300).decode().strip())
except OSError as exc:
    print("ERR", type(exc).__name__)
"""


def ask(
    ns: Namespace, proto: str, host: str, port: int, sport: int = 0, timeout: float = 3.0
) -> str:
    """The answer, or `ERR <exception>`. Between namespaces on one host an answer takes
    milliseconds, so probes that are meant to fail pass a short `timeout`."""
    argv = (proto, host, str(port), str(sport), str(timeout))
    return ns.python(CLIENT, *argv, timeout=timeout + 20).stdout.strip()


def refused_or_dropped(ns: Namespace, proto: str, host: str, port: int, sport: int = 0) -> str:
    return ask(ns, proto, host, port, sport, timeout=0.5)


# -- the portal driver: runs inside the node namespace -------------------------------------


def driver_main(argv: Sequence[str] | None = None) -> None:
    """NetfilterPortals on a real backend, driven by JSON lines on stdin:

    {"op": "sync", "services": [{"name": "ns/svc:port", "protocol": "TCP", "port": 80,
     "cluster_ips": [...], ...}], "renew": ["ns/svc:port"]}   -> {"event": "synced", "ports": ...}
    {"op": "flush_at_start"} / {"op": "cleanup"}                -> {"event": "flushed" / "cleaned"}

    Each service port gets a listener on a kernel-chosen port that answers with the service
    name (TCP: name and the local address; UDP: sent with IP_PKTINFO from the very address the
    datagram arrived at, as uproxy's data plane does). Every `--resync` seconds it syncs again,
    as uproxy's runner does.
    """
    import uvloop

    parser = argparse.ArgumentParser()
    parser.add_argument("--backend", required=True, choices=FLAVOURS)
    parser.add_argument("--bind-address", default="0.0.0.0")
    parser.add_argument("--nodeport-addresses", default="")
    parser.add_argument("--resync", type=float, default=30.0)
    args = parser.parse_args(argv)
    from uproxy.logs import configure_logging

    configure_logging("debug", "json")
    uvloop.run(_drive(args))


class _Listeners:
    def __init__(self, bind: str) -> None:
        self.bind = bind
        self.ports: dict[str, int] = {}
        self._closers: dict[str, Any] = {}

    async def ensure(self, name: str, protocol: str, renew: bool) -> int:
        if name in self.ports and not renew:
            return self.ports[name]
        self.close(name)
        if protocol == "TCP":
            port, closer = await self._tcp(name)
        else:
            port, closer = self._udp(name)
        self.ports[name], self._closers[name] = port, closer
        return port

    def close(self, name: str) -> None:
        closer = self._closers.pop(name, None)
        self.ports.pop(name, None)
        if closer is not None:
            closer()

    async def _tcp(self, name: str) -> tuple[int, Any]:
        async def answer(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            local = writer.get_extra_info("sockname")
            writer.write(f"{name} {local[0]}\n".encode())
            with contextlib.suppress(OSError):
                await writer.drain()
            writer.close()

        server = await asyncio.start_server(answer, self.bind, 0)
        return server.sockets[0].getsockname()[1], server.close

    def _udp(self, name: str) -> tuple[int, Any]:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.IPPROTO_IP, IP_PKTINFO, 1)
        sock.bind((self.bind, 0))
        sock.setblocking(False)
        loop = asyncio.get_running_loop()

        def readable() -> None:
            with contextlib.suppress(BlockingIOError):
                while True:
                    _, ancillary, _, peer = sock.recvmsg(2048, socket.CMSG_SPACE(12))
                    cmsg = [d for lvl, typ, d in ancillary if typ == IP_PKTINFO]
                    _, _, arrived_at = struct.unpack("=I4s4s", cmsg[0])
                    pktinfo = struct.pack("=I4s4s", 0, arrived_at, b"\0" * 4)
                    sock.sendmsg(
                        [name.encode()], [(socket.IPPROTO_IP, IP_PKTINFO, pktinfo)], 0, peer
                    )

        loop.add_reader(sock.fileno(), readable)

        def close() -> None:
            loop.remove_reader(sock.fileno())
            sock.close()

        return sock.getsockname()[1], close


def _service_port(spec: dict[str, Any]) -> Any:
    from uproxy.model import Protocol, ServicePort, ServicePortName

    namespace, rest = spec["name"].split("/", 1)
    name, _, port_name = rest.partition(":")
    return ServicePort(
        ServicePortName(namespace, name, port_name),
        Protocol(spec["protocol"]),
        spec["port"],
        cluster_ips=tuple(spec.get("cluster_ips", ())),
        external_ips=tuple(spec.get("external_ips", ())),
        load_balancer_ips=tuple(spec.get("load_balancer_ips", ())),
        node_port=spec.get("node_port"),
    )


async def _drive(args: argparse.Namespace) -> None:
    import structlog

    from uproxy.kernel.conntrack import flush_udp_flows
    from uproxy.kernel.detect import open_backend, physdev_supported
    from uproxy.kernel.legacy_backend import LegacyNetfilter
    from uproxy.kernel.netfilter import Netfilter
    from uproxy.proxier.netfilter_portals import NetfilterPortals
    from uproxy.proxier.portals import Portal

    log = structlog.get_logger("driver")
    if args.backend == "legacy-text":
        netfilter: Netfilter = LegacyNetfilter(python_iptables=False)
    else:
        netfilter = open_backend(args.backend)
    portals = NetfilterPortals(
        netfilter,
        bind_address=args.bind_address,
        nodeport_addresses=[c for c in args.nodeport_addresses.split(",") if c],
        resync_period=args.resync,
        conntrack=flush_udp_flows,
        physdev=physdev_supported(),
        other_backends=[],
    )
    listeners = _Listeners(args.bind_address)
    current: dict[Any, Portal] = {}
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[str] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(commands.put_nowait, line)
        loop.call_soon_threadsafe(commands.put_nowait, '{"op": "exit"}')

    threading.Thread(target=read_stdin, daemon=True).start()

    # One at a time, and a resync takes the wanted portals when its turn comes: one that read
    # them before a command changed them would put back what the command just removed.
    turn = asyncio.Lock()

    async def resync() -> None:
        while True:
            await asyncio.sleep(args.resync)
            try:
                async with turn:
                    await portals.sync(current)
            except Exception as exc:
                log.error("driver_resync_failed", error=f"{type(exc).__name__}: {exc}")

    resyncer = asyncio.create_task(resync())
    log.info("driver_ready", backend=args.backend)
    while True:
        command = json.loads(await commands.get())
        op = command["op"]
        await turn.acquire()
        try:
            if op == "exit":
                break
            if op == "sync":
                wanted = {}
                for spec in command["services"]:
                    service = _service_port(spec)
                    renew = spec["name"] in command.get("renew", ())
                    port = await listeners.ensure(spec["name"], spec["protocol"], renew)
                    wanted[service.name] = Portal(service, port)
                keep = {spec["name"] for spec in command["services"]}
                for name in [n for n in listeners.ports if n not in keep]:
                    listeners.close(name)
                current = wanted
                await portals.sync(current)
                log.info("synced", ports=dict(listeners.ports))
            elif op == "flush_at_start":
                await portals.flush_at_start()
                log.info("flushed")
            elif op == "cleanup":
                await portals.cleanup()
                current = {}
                log.info("cleaned")
        except Exception as exc:
            log.error("driver_error", op=op, error=f"{type(exc).__name__}: {exc}")
        finally:
            turn.release()
    resyncer.cancel()


# -- the test topology ---------------------------------------------------------------------


@dataclass
class Topology:
    net: Network
    client: Namespace
    node: Namespace
    backends: list[Namespace]


def build_topology(net: Network, backends: int = 0) -> Topology:
    client, node = net.namespace("client"), net.namespace("node")
    _, node_dev = net.link(client, f"{CLIENT_IP}/24", node, f"{NODE_IP}/24")
    client.route("default", via=NODE_IP)
    node.route("10.96.0.0/16", dev=node_dev)
    node.add_address(f"{LOCAL_EIP}/32", dev="lo")
    ends = []
    for n in range(1, backends + 1):
        end = net.namespace(f"be{n}")
        net.link(node, f"10.20.{n}.1/24", end, f"10.20.{n}.2/24")
        end.route("default", via=f"10.20.{n}.1")
        ends.append(end)
    return Topology(net, client, node, ends)


def tool_of(flavour: str) -> str:
    """The iptables tools' backend of a driver flavour."""
    return "legacy" if flavour.startswith("legacy") else flavour


def require_backend(flavour: str) -> None:
    backend = tool_of(flavour)
    require_tools(f"iptables-{backend}-save", f"iptables-{backend}-restore", f"iptables-{backend}")
    if flavour == "legacy":
        # Not a skip: the text path has its own flavour, and this one must test python-iptables.
        import iptc  # noqa: F401


def iptables_save(ns: Namespace, backend: str) -> str:
    text = ns.run(f"iptables-{backend}-save").stdout
    return "\n".join(line for line in text.splitlines() if not line.startswith("#"))


def uproxy_lines(ns: Namespace) -> list[str]:
    """Everything of uproxy's that either backend's save tool shows."""
    return [
        f"{backend}: {line}"
        for backend in BACKENDS
        for line in iptables_save(ns, backend).splitlines()
        if "UPROXY" in line
    ]


class Driver:
    def __init__(self, node: Namespace, backend: str, *args: str) -> None:
        self.process: Process = node.start_python(
            "-c",
            "import sys; from tests.integration.test_portals import driver_main; "
            "driver_main(sys.argv[1:])",
            "--backend",
            backend,
            *args,
            stdin=True,
        )
        self.process.wait_event("driver_ready", timeout=20)

    def _call(self, command: dict[str, Any], reply: str) -> dict[str, Any]:
        mark = len(self.process.events)
        self.process.send_json(command)
        result = self.process.wait_any((reply, "driver_error"), timeout=20, after=mark)
        assert result["event"] == reply, result
        return result

    def sync(self, *services: dict[str, Any], renew: Sequence[str] = ()) -> dict[str, int]:
        ports: dict[str, int] = self._call(
            {"op": "sync", "services": list(services), "renew": list(renew)}, "synced"
        )["ports"]
        return ports

    def flush_at_start(self) -> None:
        self._call({"op": "flush_at_start"}, "flushed")

    def cleanup(self) -> None:
        self._call({"op": "cleanup"}, "cleaned")


def web(**fields: Any) -> dict[str, Any]:
    return {"name": WEB, "protocol": "TCP", "port": 80, "cluster_ips": [WEB_VIP], **fields}


def dns(**fields: Any) -> dict[str, Any]:
    return {"name": DNS, "protocol": "UDP", "port": 53, "cluster_ips": [DNS_VIP], **fields}


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    require_backend(name)
    return name


@pytest.fixture(params=FLAVOURS)
def flavour(request: pytest.FixtureRequest) -> str:
    name: str = request.param
    require_backend(name)
    return name


@pytest.fixture
def topo(net: Network) -> Topology:
    return build_topology(net)


# -- the portal layer on its own -----------------------------------------------------------


def test_every_address_kind_reaches_its_listener_tcp_and_udp(topo: Topology, flavour: str) -> None:
    backend = tool_of(flavour)
    driver = Driver(topo.node, flavour, "--resync", "60")
    everything = {"node_port": 30080, "external_ips": [REMOTE_EIP, LOCAL_EIP]}
    driver.sync(web(load_balancer_ips=["10.96.5.5"], **everything), dns(node_port=30053))
    c, n = topo.client, topo.node
    for host, port in [
        (WEB_VIP, 80),
        ("10.96.5.5", 80),
        (NODE_IP, 30080),
        (REMOTE_EIP, 80),
        (LOCAL_EIP, 80),
    ]:
        assert ask(c, "tcp", host, port).startswith(WEB), (host, port)
    assert ask(n, "tcp", WEB_VIP, 80) == f"{WEB} 127.0.0.1"  # OUTPUT: REDIRECT to loopback
    assert ask(n, "tcp", "127.0.0.1", 30080).startswith(WEB)
    assert ask(n, "tcp", NODE_IP, 30080).startswith(WEB)
    assert ask(n, "tcp", LOCAL_EIP, 80).startswith(WEB)
    # UDP replies must come from the address and port the client sent to (connected socket).
    for ns, host, port in [(c, DNS_VIP, 53), (n, DNS_VIP, 53), (c, NODE_IP, 30053)]:
        assert ask(ns, "udp", host, port) == DNS, (ns, host, port)

    listing = n.run(f"iptables-{backend}", "-t", "nat", "-S").stdout
    assert "-N UPROXY-PORTALS" in listing and f'--comment "{WEB}"' in listing
    if backend == "nft":  # what an admin's plain `iptables` shows on Debian 12
        assert "-N UPROXY-PORTALS" in n.run("iptables", "-t", "nat", "-S").stdout
        legacy_tables = n.sh("cat /proc/net/ip_tables_names 2>/dev/null || true").stdout
        assert legacy_tables.strip() == "", "nft mode must not create legacy tables"


def test_specific_bind_address_uses_dnat(topo: Topology, flavour: str) -> None:
    backend = tool_of(flavour)
    driver = Driver(topo.node, flavour, "--bind-address", NODE_IP, "--resync", "60")
    driver.sync(web(node_port=30080), dns())
    assert ask(topo.client, "tcp", WEB_VIP, 80) == f"{WEB} {NODE_IP}"
    assert ask(topo.node, "tcp", WEB_VIP, 80) == f"{WEB} {NODE_IP}"
    assert ask(topo.client, "tcp", NODE_IP, 30080).startswith(WEB)
    assert ask(topo.client, "udp", DNS_VIP, 53) == DNS
    assert ask(topo.node, "udp", DNS_VIP, 53) == DNS
    assert "DNAT --to-destination 10.10.0.1:" in iptables_save(topo.node, backend)


def test_nodeport_addresses_limit_where_nodeports_answer(topo: Topology, flavour: str) -> None:
    topo.node.add_address("10.30.0.1/24", dev="lo")
    driver = Driver(topo.node, flavour, "--nodeport-addresses", "10.30.0.0/24", "--resync", "60")
    driver.sync(web(node_port=30080))
    topo.client.route("10.30.0.0/24", via=NODE_IP)
    assert ask(topo.client, "tcp", "10.30.0.1", 30080).startswith(WEB)
    assert ask(topo.client, "tcp", NODE_IP, 30080) == "ERR ConnectionRefusedError"


def test_proxy_ports_are_not_a_side_door(topo: Topology, flavour: str) -> None:
    driver = Driver(topo.node, flavour, "--resync", "60")
    ports = driver.sync(web(), dns())
    assert ask(topo.client, "tcp", NODE_IP, ports[WEB]) == "ERR ConnectionRefusedError"
    assert refused_or_dropped(topo.client, "udp", NODE_IP, ports[DNS]) == "ERR TimeoutError"
    assert ask(topo.client, "tcp", WEB_VIP, 80).startswith(WEB)  # through the portal: fine
    assert ask(topo.node, "tcp", "127.0.0.1", ports[WEB]).startswith(WEB)  # node-local: fine


def test_resync_of_an_unchanged_kernel_finds_nothing_to_fix(topo: Topology, flavour: str) -> None:
    """Every rule kind reads back exactly as rendered, so level-triggered syncs never churn."""
    driver = Driver(topo.node, flavour, "--resync", "0.5")
    driver.sync(web(node_port=30080, external_ips=[REMOTE_EIP]), dns(node_port=30053))
    mark = len(driver.process.events)
    full = driver.process.wait_event("portals_synced", mode="full", after=mark, timeout=10)
    assert (full["rules_added"], full["rules_removed"]) == (0, 0), driver.process.tail()
    assert not [e for e in driver.process.events if e.get("event") == "portals_drift_repaired"]


def test_stale_rules_are_removed_and_hand_deleted_ones_come_back(
    topo: Topology, flavour: str
) -> None:
    backend = tool_of(flavour)
    driver = Driver(topo.node, flavour, "--resync", "1")
    ports = driver.sync(web(), dns(node_port=30053))
    driver.sync(web())
    saved = iptables_save(topo.node, backend)
    assert DNS not in saved and str(ports[DNS]) not in saved
    assert ask(topo.client, "tcp", WEB_VIP, 80).startswith(WEB)

    tool = f"iptables-{backend}"
    rule = next(line for line in iptables_save(topo.node, backend).splitlines() if WEB_VIP in line)
    mark = len(driver.process.events)
    topo.node.sh(f"{tool} -t nat {rule.replace('-A ', '-D ', 1)}")
    jump = next(
        line
        for line in iptables_save(topo.node, backend).splitlines()
        if line.startswith("-A OUTPUT") and "UPROXY-PORTALS" in line
    )
    topo.node.sh(f"{tool} -t nat {jump.replace('-A ', '-D ', 1)}")
    broken = refused_or_dropped(topo.node, "tcp", WEB_VIP, 80)
    repaired = [
        e for e in driver.process.events[mark:] if e.get("event") == "portals_drift_repaired"
    ]
    # The deletion took effect, unless a resync (every second) already repaired it meanwhile.
    assert broken.startswith("ERR") or repaired, broken
    driver.process.wait_event("portals_drift_repaired", after=mark, timeout=5)
    assert ask(topo.node, "tcp", WEB_VIP, 80).startswith(WEB)
    assert rule in iptables_save(topo.node, backend)


def test_restart_after_sigkill_reconciles_leftovers(topo: Topology, flavour: str) -> None:
    backend = tool_of(flavour)
    first = Driver(topo.node, flavour, "--resync", "60")
    old = first.sync(web(), dns())
    first.process.stop(signal.SIGKILL)
    assert f"--to-ports {old[WEB]}" in iptables_save(topo.node, backend)  # left behind

    second = Driver(topo.node, flavour, "--resync", "60")
    second.flush_at_start()
    new = second.sync(web(), dns())
    saved = iptables_save(topo.node, backend)
    assert f"--to-ports {old[WEB]}" not in saved or old[WEB] == new[WEB]
    assert f"--to-ports {new[WEB]}" in saved
    assert ask(topo.client, "tcp", WEB_VIP, 80).startswith(WEB)
    assert ask(topo.client, "udp", DNS_VIP, 53) == DNS


def test_udp_flows_are_not_pinned_to_dead_ports(topo: Topology, flavour: str) -> None:
    """A client that keeps one source port keeps its conntrack entry: uproxy must delete it
    when the portal appears and when it moves to another proxy port."""
    driver = Driver(topo.node, flavour, "--resync", "60")
    driver.sync(web())  # nat table in use, so conntrack tracks the first datagram
    assert refused_or_dropped(topo.client, "udp", DNS_VIP, 53, sport=40555) == "ERR TimeoutError"
    driver.sync(web(), dns())
    assert ask(topo.client, "udp", DNS_VIP, 53, sport=40555) == DNS
    before = driver.sync(web(), dns())
    after = driver.sync(web(), dns(), renew=[DNS])
    assert before[DNS] != after[DNS]
    assert ask(topo.client, "udp", DNS_VIP, 53, sport=40555) == DNS


def test_cleanup_leaves_the_host_as_it_found_it(topo: Topology, flavour: str) -> None:
    topo.node.run("iptables-nft", "-t", "nat", "-A", "POSTROUTING", "-j", "RETURN")  # foreign
    driver = Driver(topo.node, flavour, "--resync", "60")
    driver.sync(web(node_port=30080, external_ips=[REMOTE_EIP]), dns())
    assert uproxy_lines(topo.node)
    driver.cleanup()
    assert uproxy_lines(topo.node) == []
    assert "-A POSTROUTING -j RETURN" in iptables_save(topo.node, "nft")
    driver.sync(web())  # and the cli's cleanup removes it all as well, twice over
    for _ in range(2):
        done = topo.node.run(sys.executable, "-m", "uproxy", "cleanup", "--log-format", "json")
        assert done.returncode == 0
    assert uproxy_lines(topo.node) == []


# -- end to end: a real `uproxy run` in the node namespace ---------------------------------

STICKY = "default/sticky:http"
E2E_SERVICES = (WEB, STICKY, DNS)


def write_manifests(directory: Path, *, with_dns: bool = True) -> None:
    from tests.manifests import endpoint_slice, service, write

    backends = ["10.20.1.2", "10.20.2.2"]
    http = [{"name": "http", "port": 8080, "protocol": "TCP"}]
    objects = [
        service(
            "web",
            [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}],
            cluster_ip=WEB_VIP,
            type="NodePort",
            externalIPs=[REMOTE_EIP],
        ),
        endpoint_slice("web", http, backends),
        service(
            "sticky",
            [{"name": "http", "port": 80, "targetPort": 8080}],
            cluster_ip=STICKY_VIP,
            affinity_timeout=600,
        ),
        endpoint_slice("sticky", http, backends),
    ]
    if with_dns:
        objects += [
            service(
                "dns",
                [{"name": "dns", "port": 53, "protocol": "UDP"}],
                cluster_ip=DNS_VIP,
            ),
            endpoint_slice("dns", [{"name": "dns", "port": 53, "protocol": "UDP"}], backends),
        ]
    write(directory / "services.yaml", *objects)


def start_backends(topo: Topology) -> None:
    """Backend N answers TCP :8080 with `beN` and resolves *.svc.test to 10.0.0.N."""
    for n, end in enumerate(topo.backends, start=1):
        end.start("socat", "TCP-LISTEN:8080,fork,reuseaddr", f"SYSTEM:echo be{n}")
        end.start(
            "dnsmasq",
            "--no-daemon",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            f"--address=/svc.test/10.0.0.{n}",
            f"--listen-address=10.20.{n}.2",
            "--bind-interfaces",
            "--port=53",
            "--pid-file=",
            "--user=root",
            "--group=root",
            "--log-facility=-",
        ).wait_line("started, version", timeout=10)
    for n, end in enumerate(topo.backends, start=1):  # socat is listening
        deadline = time.monotonic() + 10
        while ask(end, "tcp", f"10.20.{n}.2", 8080) != f"be{n}":
            assert time.monotonic() < deadline, f"backend be{n} does not answer"
            time.sleep(0.05)


def start_uproxy(topo: Topology, config: Path, backend: str, *extra: str) -> Process:
    process = topo.node.start_python(
        "-m",
        "uproxy",
        "run",
        "--config",
        str(config),
        "--iptables-backend",
        backend,
        "--sync-period",
        "1s",
        "--min-sync-period",
        "0",
        "--log-format",
        "json",
        *extra,
    )
    for name in E2E_SERVICES:
        process.wait_event("listener_started", service=name, timeout=20)
    process.wait_event("portals_synced", timeout=20)
    return process


def proxy_ports(process: Process) -> dict[str, int]:
    return {
        e["service"]: int(e["port"]) for e in process.events if e.get("event") == "listener_started"
    }


def dig(ns: Namespace, server: str = DNS_VIP) -> str:
    out = ns.run("dig", "+short", "+tries=1", "+time=2", f"@{server}", "-p", "53", "a.svc.test")
    return out.stdout.strip() or f"no answer: {out.stderr.strip()}"


@pytest.fixture
def e2e(net: Network, tmp_path: Path, backend: str) -> Iterator[tuple[Topology, Path]]:
    require_tools("socat", "dnsmasq", "dig")
    topo = build_topology(net, backends=2)
    start_backends(topo)
    config = tmp_path / "manifests"
    config.mkdir()
    write_manifests(config)
    try:
        yield topo, config
    finally:
        cli_cleanup(topo.node)  # whatever the test did, leave the node clean


def test_uproxy_run_serves_every_path_and_cleans_up(
    e2e: tuple[Topology, Path], backend: str
) -> None:
    topo, config = e2e
    uproxy = start_uproxy(topo, config, backend)
    client, node = topo.client, topo.node

    for ns in (client, node):  # round robin over both backends, from outside and from the node
        seen = Counter(ask(ns, "tcp", WEB_VIP, 80) for _ in range(6))
        assert set(seen) == {"be1", "be2"}, (ns, seen)
    sticky = Counter(ask(client, "tcp", STICKY_VIP, 80) for _ in range(6))
    assert len(sticky) == 1 and set(sticky) <= {"be1", "be2"}, sticky
    assert ask(client, "tcp", NODE_IP, 30080) in {"be1", "be2"}  # NodePort
    assert ask(client, "tcp", REMOTE_EIP, 80) in {"be1", "be2"}  # externalIP
    for ns in (client, node):  # dig refuses replies from any other source than the VIP
        answers = Counter(dig(ns) for _ in range(6))
        assert set(answers) == {"10.0.0.1", "10.0.0.2"}, (ns, answers)

    listing = node.run(f"iptables-{backend}", "-t", "nat", "-S").stdout
    assert "-N UPROXY-PORTALS" in listing and f'--comment "{WEB}"' in listing, listing
    ports = proxy_ports(uproxy)
    assert ask(client, "tcp", NODE_IP, ports[WEB]) == "ERR ConnectionRefusedError"

    assert uproxy.stop(signal.SIGTERM) == 0
    cli_cleanup(node)
    assert uproxy_lines(node) == []
    cli_cleanup(node)  # nothing left to remove: still exit 0


def test_uproxy_run_reconciles_restarts_stale_services_and_hand_edits(
    e2e: tuple[Topology, Path], backend: str
) -> None:
    topo, config = e2e
    first = start_uproxy(topo, config, backend)
    old = proxy_ports(first)
    first.stop(signal.SIGKILL)
    assert any(f"--to-ports {old[WEB]}" in line for line in uproxy_lines(topo.node))

    second = start_uproxy(topo, config, backend)
    new = proxy_ports(second)
    redirects = set(re.findall(r"--to-ports (\d+)", iptables_save(topo.node, backend)))
    assert redirects == {str(p) for p in new.values()}, (redirects, new)
    assert ask(topo.client, "tcp", WEB_VIP, 80) in {"be1", "be2"}
    assert dig(topo.client) in {"10.0.0.1", "10.0.0.2"}

    write_manifests(config, with_dns=False)  # a removed service leaves no rule behind
    deadline = time.monotonic() + 10
    while DNS in iptables_save(topo.node, backend):
        assert time.monotonic() < deadline, iptables_save(topo.node, backend)
        time.sleep(0.1)

    saved = iptables_save(topo.node, backend)
    rule = next(line for line in saved.splitlines() if f"-d {WEB_VIP}/32" in line)
    mark = len(second.events)
    topo.node.sh(f"iptables-{backend} -t nat {rule.replace('-A ', '-D ', 1)}")
    broken = refused_or_dropped(topo.client, "tcp", WEB_VIP, 80)
    repaired = [e for e in second.events[mark:] if e.get("event") == "portals_drift_repaired"]
    assert broken.startswith("ERR") or repaired, broken  # unless a resync beat us to it
    deadline = time.monotonic() + 5  # --sync-period 1s: back within one period, plus slack
    while rule not in iptables_save(topo.node, backend):
        assert time.monotonic() < deadline, "hand-deleted rule not restored"
        time.sleep(0.1)
    assert ask(topo.client, "tcp", WEB_VIP, 80) in {"be1", "be2"}
    assert second.stop(signal.SIGTERM) == 0


def test_external_traffic_policy_local_keeps_external_traffic_on_this_node(
    e2e: tuple[Topology, Path], backend: str
) -> None:
    from tests.manifests import service, write

    topo, config = e2e
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": "local-1", "labels": {"kubernetes.io/service-name": "local"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.20.1.2"], "nodeName": "node-a"},
            {"addresses": ["10.20.2.2"], "nodeName": "node-b"},
        ],
    }
    local = service(
        "local",
        [{"name": "http", "port": 80, "nodePort": 30081}],
        cluster_ip="10.96.0.30",
        type="NodePort",
        externalTrafficPolicy="Local",
    )
    write(config / "local.yaml", local, slice_)
    uproxy = start_uproxy(topo, config, backend, "--hostname-override", "node-a")
    uproxy.wait_event("external_listener_started", service="default/local:http", timeout=20)
    uproxy.wait_event("portals_synced", timeout=20)
    # This node is node-a: external traffic (the NodePort) only reaches node-a's endpoint ...
    assert Counter(ask(topo.client, "tcp", NODE_IP, 30081) for _ in range(6)) == {"be1": 6}
    # ... while cluster traffic (the ClusterIP) still reaches every endpoint.
    assert set(Counter(ask(topo.client, "tcp", "10.96.0.30", 80) for _ in range(6))) == {
        "be1",
        "be2",
    }
    assert uproxy.stop(signal.SIGTERM) == 0


def test_cleanup_on_exit_leaves_no_rules(e2e: tuple[Topology, Path], backend: str) -> None:
    topo, config = e2e
    uproxy = start_uproxy(topo, config, backend, "--cleanup-on-exit")
    assert ask(topo.client, "tcp", WEB_VIP, 80) in {"be1", "be2"}
    assert uproxy_lines(topo.node) != []
    assert uproxy.stop(signal.SIGTERM) == 0
    assert uproxy_lines(topo.node) == []
