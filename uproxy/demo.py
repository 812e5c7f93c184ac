"""The demo: a client, uproxy and its backends, on one Linux host with nothing but uproxy,
iproute2 and iptables (`uproxy demo`, as root), and the roles the compose demo's containers run.

`uproxy demo` builds this in network namespaces, the same shape as docker-compose.yml:

    client 10.250.1.2 --veth-- 10.250.1.1  node  10.250.2.1 (bridge) --veths-- web-a   .11
        route 10.96.0.0/16                  uproxy run, portals                  web-b   .12
        via the node                                                             web-c   .13
                                                                                 resolver .53

Services (as examples/compose/): web 10.96.0.10:80 (round robin over web-a/b/c:8080), sticky
10.96.0.20:8080 (the same backends, ClientIP affinity), dns 10.96.0.53:53/UDP (resolver:5353).
The client calls the virtual IPs and prints who answered; then everything is torn down, on
success, failure, Ctrl-C or SIGTERM. Only namespaces it creates are touched (their names start
with `uproxy-demo-<pid>-`), never the host's own network; a demo killed outright (SIGKILL) leaves
namespaces behind that the next run removes.

`python -m uproxy.demo ROLE` runs one piece, in a namespace or a container:

    http --name web-a [--port 8080]            answers every GET with its name
    dns --name resolver [--port 5353]          answers every A question with --answer
    client [--route-via uproxy] [...]          calls the services, prints the client's view

Roles are plain standard library: each handles SIGTERM (a container's PID 1 ignores it unless
a handler is installed, and `docker compose down` would then wait 10 s before killing it).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import http.client
import http.server
import ipaddress
import json
import os
import queue
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, NoReturn, TextIO

# -- the topology, shared by both demos ---------------------------------------------------------

SERVICE_CIDR = "10.96.0.0/16"
WEB_VIP, WEB_PORT = "10.96.0.10", 80
STICKY_VIP, STICKY_PORT = "10.96.0.20", 8080
DNS_VIP, DNS_PORT = "10.96.0.53", 53
HTTP_BACKEND_PORT = 8080
DNS_BACKEND_PORT = 5353
WEB_BACKENDS = ("web-a", "web-b", "web-c")  # compose service names, namespace roles
RESOLVER = "resolver"
DNS_ANSWER = "192.0.2.53"  # TEST-NET-1: what the resolver answers for every name
DNS_QUESTION = "demo.uproxy.test"

FRONT_NET = "10.250.1"  # client <-> node
BACK_NET = "10.250.2"  # node <-> backends (a bridge inside the node namespace)
NODE_FRONT_IP, CLIENT_IP, NODE_BACK_IP = f"{FRONT_NET}.1", f"{FRONT_NET}.2", f"{BACK_NET}.1"
BACKEND_IPS = {name: f"{BACK_NET}.{11 + i}" for i, name in enumerate(WEB_BACKENDS)}
RESOLVER_IP = f"{BACK_NET}.53"

NS_PREFIX = "uproxy-demo-"


def _say(*parts: object, file: TextIO | None = None) -> None:
    print(*parts, file=file or sys.stdout, flush=True)


def _exit_on_sigterm() -> None:
    """SIGTERM ends the role like Ctrl-C does: PID 1 in a container gets no default action."""

    def stop(signum: int, _: FrameType | None) -> NoReturn:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)


# -- role: HTTP backend -------------------------------------------------------------------------


def serve_http(name: str, port: int, bind: str = "0.0.0.0") -> int:
    body = f"{name}\n".encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            # The peer is uproxy (a userspace proxy dials the backend itself), not the client.
            _say(f"{name}: {self.command} {self.path} from {self.client_address[0]}")

    _exit_on_sigterm()
    server = http.server.ThreadingHTTPServer((bind, port), Handler)
    server.daemon_threads = True
    _say(f"{name}: HTTP on {bind}:{port}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# -- role: DNS backend (and the client's query) -------------------------------------------------


def _encode_name(name: str) -> bytes:
    labels = [label.encode() for label in name.rstrip(".").split(".") if label]
    return b"".join(struct.pack("B", len(label)) + label for label in labels) + b"\0"


def _skip_name(packet: bytes, offset: int) -> int:
    """The offset just past the (possibly compressed) name at `offset`."""
    while True:
        length = packet[offset]
        if length & 0xC0 == 0xC0:
            return offset + 2
        offset += 1 + length
        if length == 0:
            return offset


def dns_query(name: str, qid: int) -> bytes:
    header = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0)  # recursion desired, one question
    return header + _encode_name(name) + struct.pack("!HH", 1, 1)  # A, IN


def dns_answer(query: bytes, answer: str, ttl: int = 30) -> bytes | None:
    """The reply to `query`: an A record with `answer` for A questions, no records for others
    (NOERROR), None for what is not a query."""
    if len(query) < 12:
        return None
    qid, flags, qdcount = struct.unpack("!HHH", query[:6])
    if flags & 0x8000 or qdcount != 1:
        return None
    try:
        end = _skip_name(query, 12)
        qtype, qclass = struct.unpack("!HH", query[end : end + 4])
    except (IndexError, struct.error):
        return None
    question = query[12 : end + 4]
    is_a = qtype == 1 and qclass == 1
    # QR, AA, RD copied from the query; NOERROR.
    header = struct.pack("!HHHHHH", qid, 0x8400 | (flags & 0x0100), 1, int(is_a), 0, 0)
    reply = header + question
    if is_a:
        reply += struct.pack("!HHHIH", 0xC00C, 1, 1, ttl, 4) + socket.inet_aton(answer)
    return reply


def parse_a_records(reply: bytes, qid: int) -> list[str]:
    """The IPv4 addresses in a reply to query `qid`; ValueError for anything else."""
    try:
        rid, flags, qdcount, ancount = struct.unpack("!HHHH", reply[:8])
        if rid != qid or not flags & 0x8000:
            raise ValueError("not the reply to our query")
        if flags & 0xF:
            raise ValueError(f"rcode {flags & 0xF}")
        offset = 12
        for _ in range(qdcount):
            offset = _skip_name(reply, offset) + 4
        addresses = []
        for _ in range(ancount):
            offset = _skip_name(reply, offset)
            rtype, _rclass, _ttl, length = struct.unpack("!HHIH", reply[offset : offset + 10])
            offset += 10
            if rtype == 1 and length == 4:
                addresses.append(socket.inet_ntoa(reply[offset : offset + 4]))
            offset += length
    except (IndexError, struct.error) as exc:
        raise ValueError(f"malformed reply: {exc}") from None
    return addresses


def serve_dns(name: str, port: int, answer: str, bind: str = "0.0.0.0") -> int:
    _exit_on_sigterm()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, port))
    _say(f"{name}: DNS on {bind}:{port}/udp, every A question answered with {answer}")
    try:
        while True:
            query, peer = sock.recvfrom(4096)
            reply = dns_answer(query, answer)
            if reply is not None:
                sock.sendto(reply, peer)
                _say(f"{name}: DNS query from {peer[0]}")
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


# -- role: client -------------------------------------------------------------------------------


def http_get(host: str, port: int, timeout: float = 3.0) -> str:
    """One request on a fresh connection (each one is a new choice for the balancer)."""
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Connection": "close"})
        response = conn.getresponse()
        return response.read().decode(errors="replace").strip()
    finally:
        conn.close()


def ask_dns(host: str, port: int, name: str, timeout: float = 2.0, tries: int = 3) -> list[str]:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        # Connected: only a reply from the very address asked is accepted, as resolvers do.
        sock.connect((host, port))
        qid = random.randrange(1 << 16)
        for attempt in range(tries):
            sock.send(dns_query(name, qid))
            try:
                return parse_a_records(sock.recv(4096), qid)
            except TimeoutError:
                if attempt == tries - 1:
                    raise
        raise TimeoutError  # unreachable: tries >= 1


def _add_route(cidr: str, via_host: str, deadline: float) -> str:
    """Route the service CIDR through the node (a pod's traffic reaches ClusterIPs through its
    node the same way). In compose, `via_host` is the uproxy service's name."""
    while True:
        try:
            via = socket.getaddrinfo(via_host, None, socket.AF_INET)[0][4][0]
            break
        except socket.gaierror:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    subprocess.run(["ip", "route", "replace", cidr, "via", str(via)], check=True)
    return str(via)


# Refused, reset or unreachable: until uproxy's portals and endpoints are in place.
_NOT_YET = (OSError, http.client.HTTPException)


def _until_answered(call: Callable[[], str], deadline: float) -> str:
    while True:
        try:
            return call()
        except _NOT_YET:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


@dataclass
class ClientArgs:
    web: tuple[str, int] = (WEB_VIP, WEB_PORT)
    sticky: tuple[str, int] = (STICKY_VIP, STICKY_PORT)
    dns: tuple[str, int] = (DNS_VIP, DNS_PORT)
    requests: int = 6
    backends: int = len(WEB_BACKENDS)
    wait: float = 60.0
    route_via: str | None = None
    service_cidr: str = SERVICE_CIDR


def run_client(args: ClientArgs) -> int:
    """Print the client's view of the three services; 0 when it is what uproxy promises."""
    _exit_on_sigterm()
    deadline = time.monotonic() + args.wait
    if args.route_via:
        via = _add_route(args.service_cidr, args.route_via, deadline)
        _say(f"route {args.service_cidr} via {via} ({args.route_via})")
    web_host, web_port = args.web
    _until_answered(lambda: http_get(web_host, web_port), deadline)
    # Endpoints named by hostname appear as uproxy resolves them: wait until every backend has
    # answered once, so that the round shown below is a full rotation.
    seen: set[str] = set()
    while len(seen) < args.backends and time.monotonic() < deadline:
        try:
            seen.add(http_get(web_host, web_port))
        except _NOT_YET:
            time.sleep(0.2)
    ok = True

    def show(label: str, target: tuple[str, int], proto: str, mode: str, text: str) -> None:
        where = f"{target[0]}:{target[1]}/{proto}"
        _say(f"{label:<7} {where:<20} {mode:<12} {text}")

    web = [http_get(web_host, web_port) for _ in range(args.requests)]
    show("web", args.web, "TCP", "round robin", " ".join(web))
    sticky_host, sticky_port = args.sticky
    _until_answered(lambda: http_get(sticky_host, sticky_port), deadline)
    sticky = [http_get(sticky_host, sticky_port) for _ in range(args.requests)]
    show("sticky", args.sticky, "TCP", "ClientIP", " ".join(sticky))
    try:
        answers = ask_dns(args.dns[0], args.dns[1], DNS_QUESTION)
        show("dns", args.dns, "UDP", "", f"{DNS_QUESTION} A {' '.join(answers)}")
    except (OSError, ValueError) as exc:
        show("dns", args.dns, "UDP", "", f"no answer: {exc!r}")
        answers, ok = [], False

    counts = Counter(web)
    _say(
        f"round robin: {len(counts)} backends answered "
        + ", ".join(f"{name} {n}x" for name, n in sorted(counts.items()))
    )
    sticky_counts = Counter(sticky)
    if len(sticky_counts) == 1:
        _say(f"affinity: all {len(sticky)} requests from this client went to {sticky[0]}")
    else:
        _say(f"affinity BROKEN: {dict(sticky_counts)}")
        ok = False
    if len(counts) < args.backends:
        _say(f"expected {args.backends} backends in the rotation, saw {sorted(counts)}")
        ok = False
    if not answers:
        ok = False
    _say("client: OK" if ok else "client: FAILED")
    return 0 if ok else 1


# -- `uproxy demo`: the namespaces ---------------------------------------------------------------


class DemoError(Exception):
    pass


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived: stop and tear down."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _ip(*argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *argv], capture_output=True, text=True, timeout=30, check=False)
    if check and proc.returncode != 0:
        raise DemoError(f"ip {' '.join(argv)}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc


def _netns_names() -> list[str]:
    out = _ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_namespace(name: str) -> None:
    """Kill whatever still runs inside, then delete it (veths and rules inside go with it)."""
    pids = _ip("netns", "pids", name, check=False).stdout.split()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pid), signal.SIGKILL)
    _ip("netns", "del", name, check=False)


def sweep_stale_namespaces() -> list[str]:
    """Namespaces of demos that are gone (killed outright), removed; their names."""
    removed = []
    for name in _netns_names():
        match = re.fullmatch(rf"{re.escape(NS_PREFIX)}(\d+)-.+", name)
        if match and int(match.group(1)) != os.getpid() and not _pid_alive(int(match.group(1))):
            _remove_namespace(name)
            removed.append(name)
    return removed


class _Child:
    """A process inside a namespace, in its own session (the terminal's Ctrl-C reaches only the
    demo, which then stops everything in order); its output lines are collected."""

    def __init__(self, label: str, argv: Sequence[str], echo: TextIO | None = None) -> None:
        self.label = label
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # Importable from any working directory, installed or run from a checkout.
        package_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        self._echo = echo
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.rstrip("\n")
            self.lines.append(line)
            if self._echo is not None:
                _say(line, file=self._echo)
            self._new.put(line)
        self._new.put(None)

    def wait_for(self, found: Callable[[str], bool], what: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        if any(found(seen) for seen in list(self.lines)):
            return
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DemoError(f"{self.label}: no {what} within {timeout:.0f}s\n{self.tail()}")
            try:
                line = self._new.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise DemoError(
                    f"{self.label} exited ({self.proc.wait()}) before {what}\n{self.tail()}"
                )
            if found(line):
                return

    def wait(self) -> int:
        code = self.proc.wait()
        self._reader.join(timeout=5)
        return code

    def tail(self, n: int = 25) -> str:
        return "\n".join(f"  {line}" for line in self.lines[-n:])

    def stop(self, timeout: float) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        self._reader.join(timeout=2)


def _json_event(line: str, name: str) -> bool:
    with contextlib.suppress(ValueError):
        event = json.loads(line)
        return isinstance(event, dict) and event.get("event") == name
    return False


@dataclass
class _Demo:
    requests: int
    iptables_backend: str
    verbose: bool
    run_id: str = field(default_factory=lambda: f"{NS_PREFIX}{os.getpid()}")
    namespaces: dict[str, str] = field(default_factory=dict)  # role -> name, before creation
    children: list[_Child] = field(default_factory=list)
    workdir: Path | None = None

    # -- building ---------------------------------------------------------------------------

    def namespace(self, role: str) -> str:
        name = f"{self.run_id}-{role}"
        self.namespaces[role] = name  # recorded first: an interrupt mid-creation still removes it
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")
        return name

    def build(self) -> None:
        node = self.namespace("node")
        client = self.namespace("client")
        _ip("-n", client, "link", "add", "eth0", "type", "veth", "peer", "to-client", "netns", node)
        _ip("-n", client, "addr", "add", f"{CLIENT_IP}/24", "dev", "eth0")
        _ip("-n", client, "link", "set", "eth0", "up")
        _ip("-n", node, "addr", "add", f"{NODE_FRONT_IP}/24", "dev", "to-client")
        _ip("-n", node, "link", "set", "to-client", "up")
        # The route compose's client adds too: service IPs are reached through the node.
        _ip("-n", client, "route", "add", SERVICE_CIDR, "via", NODE_FRONT_IP)
        _ip("-n", node, "link", "add", "back", "type", "bridge")
        _ip("-n", node, "addr", "add", f"{NODE_BACK_IP}/24", "dev", "back")
        _ip("-n", node, "link", "set", "back", "up")
        for role, address in [*BACKEND_IPS.items(), (RESOLVER, RESOLVER_IP)]:
            ns = self.namespace(role)
            peer = f"to-{role}"
            _ip("-n", ns, "link", "add", "eth0", "type", "veth", "peer", peer, "netns", node)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            _ip("-n", ns, "link", "set", "eth0", "up")
            _ip("-n", node, "link", "set", peer, "master", "back", "up")

    def start(self, role: str, *argv: str, echo: bool = False) -> _Child:
        child = _Child(
            role,
            ["ip", "netns", "exec", self.namespaces[role], *argv],
            echo=sys.stdout if echo else None,
        )
        self.children.append(child)
        return child

    def start_backends(self) -> None:
        role = [sys.executable, "-m", "uproxy.demo"]
        started = [
            self.start(name, *role, "http", "--name", name, "--port", str(HTTP_BACKEND_PORT))
            for name in BACKEND_IPS
        ]
        started.append(
            self.start(
                RESOLVER,
                *role,
                "dns",
                "--name",
                RESOLVER,
                "--port",
                str(DNS_BACKEND_PORT),
                "--answer",
                DNS_ANSWER,
            )
        )
        for child in started:
            child.wait_for(lambda line: " on " in line, "listening line", timeout=20)

    def write_manifests(self) -> Path:
        import yaml

        self.workdir = Path(tempfile.mkdtemp(prefix="uproxy-demo-"))
        path = self.workdir / "demo.yaml"
        path.write_text(yaml.safe_dump_all(demo_manifests(), sort_keys=False))
        return self.workdir

    def start_uproxy(self, config: Path) -> _Child:
        uproxy = self.start(
            "node",
            sys.executable,
            "-m",
            "uproxy",
            "run",
            "--config",
            str(config),
            "--iptables-backend",
            self.iptables_backend,
            "--healthz-bind-address",
            f"{NODE_FRONT_IP}:10256",
            "--metrics-bind-address",
            "127.0.0.1:10249",
            "--log-format",
            "json",
            echo=self.verbose,
        )
        uproxy.wait_for(lambda line: _json_event(line, "sync_done"), "first sync", timeout=30)
        return uproxy

    def run_client(self) -> int:
        client = self.start(
            "client",
            sys.executable,
            "-m",
            "uproxy.demo",
            "client",
            "--requests",
            str(self.requests),
            "--wait",
            "30",
            echo=True,
        )
        return client.wait()

    def show_status(self) -> None:
        uproxy = ["ip", "netns", "exec", self.namespaces["node"], sys.executable, "-m", "uproxy"]
        done = subprocess.run(
            [*uproxy, "status", "--address", "127.0.0.1:10249"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode == 0:
            _say("\nuproxy's view (uproxy status):")
            _say(done.stdout.rstrip())

    # -- tearing down -----------------------------------------------------------------------

    def teardown(self) -> int:
        for child in reversed(self.children):  # client, uproxy, then the backends
            with contextlib.suppress(Exception):
                child.stop(timeout=8 if child.label == "node" else 3)
        mine = set(self.namespaces.values())
        mine.update(n for n in _netns_names() if n.startswith(f"{self.run_id}-"))
        for name in sorted(mine):
            _remove_namespace(name)
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return len(mine)


def demo_manifests() -> list[dict[str, Any]]:
    """The Services of examples/compose/, with the backends' addresses in the namespaces."""

    def service(
        name: str, vip: str, port: int, protocol: str = "TCP", spec: dict[str, object] | None = None
    ) -> Any:
        port_name = "dns" if protocol == "UDP" else "http"
        target = DNS_BACKEND_PORT if protocol == "UDP" else HTTP_BACKEND_PORT
        return {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": name, "namespace": "default"},
            "spec": {
                "clusterIP": vip,
                "ports": [
                    {"name": port_name, "protocol": protocol, "port": port, "targetPort": target}
                ],
                **(spec or {}),
            },
        }

    def endpoints(name: str, addresses: Sequence[str], protocol: str = "TCP") -> Any:
        port_name = "dns" if protocol == "UDP" else "http"
        port = DNS_BACKEND_PORT if protocol == "UDP" else HTTP_BACKEND_PORT
        return {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": f"{name}-1",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": name},
            },
            "addressType": "IPv4",
            "ports": [{"name": port_name, "protocol": protocol, "port": port}],
            "endpoints": [{"addresses": [a], "conditions": {"ready": True}} for a in addresses],
        }

    affinity: dict[str, object] = {
        "sessionAffinity": "ClientIP",
        "sessionAffinityConfig": {"clientIP": {"timeoutSeconds": 600}},
    }
    backends = list(BACKEND_IPS.values())
    return [
        service("web", WEB_VIP, WEB_PORT),
        endpoints("web", backends),
        service("sticky", STICKY_VIP, STICKY_PORT, spec=affinity),
        endpoints("sticky", backends),
        service("dns", DNS_VIP, DNS_PORT, "UDP"),
        endpoints("dns", [RESOLVER_IP], "UDP"),
    ]


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[list[int]]:
    """SIGINT, SIGTERM and SIGHUP raise Interrupted (once: a second one during teardown is
    ignored, so teardown always finishes); the previous handlers come back afterwards."""
    received: list[int] = []

    def handler(signum: int, _: FrameType | None) -> None:
        if received:
            return
        received.append(signum)
        raise Interrupted(signum)

    wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in wanted}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _problems() -> str | None:
    if sys.platform != "linux":
        return "the demo needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the demo needs root (it creates network namespaces): run it with sudo"
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool, path=path) is None:
            return f"`{tool}` not found (apt-get install {package})"
    return None


def run_demo(
    *,
    requests: int = 6,
    iptables_backend: str = "auto",
    keep_running: bool = False,
    verbose: bool = False,
) -> int:
    """`uproxy demo`: build, run, show the client's view, tear down. Exit code: 0 when the
    client saw round robin, affinity and a DNS answer; 1 when not (or on an error); 2 when
    the host cannot run it; 128+N when stopped by signal N."""
    problem = _problems()
    if problem is not None:
        _say(f"uproxy demo: {problem}", file=sys.stderr)
        return 2
    demo = _Demo(requests=requests, iptables_backend=iptables_backend, verbose=verbose)
    code = 1
    client_done = False
    with _signals_interrupt() as received:
        try:
            stale = sweep_stale_namespaces()
            if stale:
                _say(f"removed {len(stale)} namespaces left by an earlier demo")
            _say(f"building namespaces {demo.run_id}-{{client,node,web-a,web-b,web-c,resolver}}")
            demo.build()
            demo.start_backends()
            config = demo.write_manifests()
            _say(f"starting uproxy in {demo.namespaces['node']} (manifests: {config})")
            demo.start_uproxy(config)
            _say(f"\nthe client ({CLIENT_IP}) calls the services' virtual IPs:")
            code = demo.run_client()
            client_done = True
            demo.show_status()
            if keep_running:
                client = demo.namespaces["client"]
                _say(
                    f"\nrunning until Ctrl-C; try:\n"
                    f"  ip netns exec {client} curl -s http://{WEB_VIP}/\n"
                    f"  ip netns exec {client} curl -s http://{STICKY_VIP}:{STICKY_PORT}/\n"
                    f"  ip netns exec {client} dig +short @{DNS_VIP} {DNS_QUESTION}\n"
                    f"  ip netns exec {demo.namespaces['node']} uproxy status"
                )
                signal.pause()
        except Interrupted as exc:
            _say(f"\n{exc}: stopping", file=sys.stderr)
            if not (keep_running and client_done):  # there, Ctrl-C is the way out
                code = 128 + exc.signum
        except DemoError as exc:
            _say(f"uproxy demo: {exc}", file=sys.stderr)
            code = 1
        finally:
            # An interrupt from here on is ignored (see _signals_interrupt): teardown finishes.
            received.append(0)
            removed = demo.teardown()
            _say(f"torn down: {removed} namespaces removed")
    return code


# -- python -m uproxy.demo ROLE ------------------------------------------------------------------


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    ipaddress.ip_address(host)
    return host, int(port)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m uproxy.demo", description="uproxy's demo and the pieces it runs."
    )
    roles = parser.add_subparsers(dest="role", required=True)
    whole = roles.add_parser("run", help="the whole demo in network namespaces (= uproxy demo)")
    whole.add_argument("--requests", type=int, default=6)
    whole.add_argument("--iptables-backend", choices=["auto", "legacy", "nft"], default="auto")
    whole.add_argument("--keep-running", action="store_true")
    whole.add_argument("--verbose", action="store_true")
    http_role = roles.add_parser("http", help="an HTTP backend that answers with its name")
    http_role.add_argument("--name", required=True)
    http_role.add_argument("--port", type=int, default=HTTP_BACKEND_PORT)
    dns_role = roles.add_parser("dns", help="a DNS server answering A questions")
    dns_role.add_argument("--name", required=True)
    dns_role.add_argument("--port", type=int, default=DNS_BACKEND_PORT)
    dns_role.add_argument("--answer", default=DNS_ANSWER)
    client = roles.add_parser("client", help="call the services and print who answered")
    defaults = ClientArgs()
    client.add_argument("--web", type=_host_port, default=defaults.web)
    client.add_argument("--sticky", type=_host_port, default=defaults.sticky)
    client.add_argument("--dns", type=_host_port, default=defaults.dns)
    client.add_argument("--requests", type=int, default=defaults.requests)
    client.add_argument("--backends", type=int, default=defaults.backends)
    client.add_argument("--wait", type=float, default=defaults.wait, help="seconds")
    client.add_argument(
        "--route-via", default=None, help="add a route for --service-cidr via this host (root)"
    )
    client.add_argument("--service-cidr", default=defaults.service_cidr)
    args = parser.parse_args(argv)
    if args.role == "run":
        return run_demo(
            requests=args.requests,
            iptables_backend=args.iptables_backend,
            keep_running=args.keep_running,
            verbose=args.verbose,
        )
    if args.role == "http":
        return serve_http(args.name, args.port)
    if args.role == "dns":
        return serve_dns(args.name, args.port, args.answer)
    fields = {f.name: getattr(args, f.name) for f in dataclasses.fields(ClientArgs)}
    try:
        return run_client(ClientArgs(**fields))
    except (*_NOT_YET, subprocess.CalledProcessError) as exc:
        _say(f"client: FAILED: {exc!r}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
