"""The demo's roles: an HTTP backend, a DNS backend and the client, each a process of its own
in a network namespace (`uproxy demo`) or a container (docker-compose.yml).

They are started as `uproxy demo-role ROLE ...`:

    http --name web-a [--port 8080]            answers every GET with its name
    dns --name resolver [--port 5353]          answers every A question with --answer
    client [--route-via uproxy] [...]          calls the services, prints the client's view

Each handles SIGTERM: a container's PID 1 ignores it unless a handler is installed, and
`docker compose down` would then wait 10 s before killing it.
"""

from __future__ import annotations

import http.client
import http.server
import random
import signal
import socket
import socketserver
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn, TextIO

from dnslib import QTYPE, RR, A, DNSError, DNSRecord

from uproxy.demo.services import (
    DNS_PORT,
    DNS_QUESTION,
    DNS_VIP,
    SERVICE_CIDR,
    STICKY_PORT,
    STICKY_VIP,
    WEB_BACKENDS,
    WEB_PORT,
    WEB_VIP,
)

_CLASS_IN = 1


def say(*parts: object, file: TextIO | None = None) -> None:
    print(*parts, file=file or sys.stdout, flush=True)


def _exit_on_sigterm() -> None:
    """SIGTERM ends the role like Ctrl-C does: PID 1 in a container gets no default action."""

    def stop(signum: int, _: FrameType | None) -> NoReturn:
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, stop)


# -- HTTP backend -------------------------------------------------------------------------------


class _HttpServer(http.server.ThreadingHTTPServer):
    # socketserver listens with a backlog of 5: a burst of clients overflows it and their SYNs
    # are dropped (a second's retransmit each), which no real backend does.
    request_queue_size = 128

    def server_bind(self) -> None:
        # HTTPServer's own asks DNS for the host's name (socket.getfqdn), which in a demo
        # namespace with no resolver waits out a timeout: seconds per backend.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name, self.server_port = str(host), int(port)


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
            say(f"{name}: {self.command} {self.path} from {self.client_address[0]}")

    _exit_on_sigterm()
    server = _HttpServer((bind, port), Handler)
    server.daemon_threads = True
    say(f"{name}: HTTP on {bind}:{port}")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


# -- DNS backend (and the client's query) -------------------------------------------------------


def dns_answer(query: bytes, answer: str, ttl: int = 30) -> bytes | None:
    """The reply to `query`: an A record with `answer` for A questions, no records for others
    (NOERROR), None for what is not a query."""
    try:
        request = DNSRecord.parse(query)
    except DNSError:
        return None
    if request.header.qr or len(request.questions) != 1:
        return None
    # Authoritative, recursion desired copied from the query, recursion not available.
    reply = request.reply(ra=0, aa=1)
    question = request.q
    if question.qtype == QTYPE.A and question.qclass == _CLASS_IN:
        reply.add_answer(RR(question.qname, QTYPE.A, rdata=A(answer), ttl=ttl))
    packed: bytes = reply.pack()
    return packed


def parse_a_records(reply: bytes, qid: int) -> list[str]:
    """The IPv4 addresses in a reply to query `qid`; ValueError for anything else."""
    try:
        record = DNSRecord.parse(reply)
    except DNSError as exc:
        raise ValueError(f"malformed reply: {exc}") from None
    if record.header.id != qid or not record.header.qr:
        raise ValueError("not the reply to our query")
    if record.header.rcode:
        raise ValueError(f"rcode {record.header.rcode}")
    return [str(rr.rdata) for rr in record.rr if rr.rtype == QTYPE.A]


def serve_dns(name: str, port: int, answer: str, bind: str = "0.0.0.0") -> int:
    _exit_on_sigterm()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind((bind, port))
    say(f"{name}: DNS on {bind}:{port}/udp, every A question answered with {answer}")
    try:
        while True:
            query, peer = sock.recvfrom(4096)
            reply = dns_answer(query, answer)
            if reply is not None:
                sock.sendto(reply, peer)
                say(f"{name}: DNS query from {peer[0]}")
    except KeyboardInterrupt:
        pass
    finally:
        sock.close()
    return 0


# -- client -------------------------------------------------------------------------------------


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
    query = DNSRecord.question(name, "A")
    query.header.id = qid = random.randrange(1 << 16)
    packed: bytes = query.pack()
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        # Connected: only a reply from the very address asked is accepted, as resolvers do.
        sock.connect((host, port))
        for attempt in range(tries):
            sock.send(packed)
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
    try:
        return _run_client(args)
    except (*_NOT_YET, subprocess.CalledProcessError) as exc:
        say(f"client: FAILED: {exc!r}")
        return 1


def _run_client(args: ClientArgs) -> int:
    _exit_on_sigterm()
    deadline = time.monotonic() + args.wait
    if args.route_via:
        via = _add_route(args.service_cidr, args.route_via, deadline)
        say(f"route {args.service_cidr} via {via} ({args.route_via})")
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
        say(f"{label:<7} {where:<20} {mode:<12} {text}")

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
    say(
        f"round robin: {len(counts)} backends answered "
        + ", ".join(f"{name} {n}x" for name, n in sorted(counts.items()))
    )
    sticky_counts = Counter(sticky)
    if len(sticky_counts) == 1:
        say(f"affinity: all {len(sticky)} requests from this client went to {sticky[0]}")
    else:
        say(f"affinity BROKEN: {dict(sticky_counts)}")
        ok = False
    if len(counts) < args.backends:
        say(f"expected {args.backends} backends in the rotation, saw {sorted(counts)}")
        ok = False
    if not answers:
        ok = False
    say("client: OK" if ok else "client: FAILED")
    return 0 if ok else 1
