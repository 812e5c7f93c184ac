"""The admin server stays off the forwarding path: a real `uproxy run` with thousands of service
ports keeps splicing connections while /status is fetched over and over, and while more admin
connections are open than the cap allows (the extra ones are closed at once, unanswered)."""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import backends as be
from tests.manifests import backend_slices, service, write
from tests.uproxy_process import UproxyProcess, loopback_run_args

ROWS = 2000  # service ports besides the one carrying traffic
CAP = 64  # the admin servers' default connection cap


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[tuple[UproxyProcess, int, int, int]]:
    with be.tcp_backend(be.echo) as backend:
        idle = [service(f"idle{i}", [{"name": "p", "port": 80}]) for i in range(ROWS)]
        write(
            tmp_path / "many.yaml",
            service("echo", [{"name": "p", "port": 80}]),
            *backend_slices("echo", "p", [("127.0.0.1", backend.port)]),
            *idle,
        )
        process = UproxyProcess(loopback_run_args(tmp_path))
        try:
            process.wait_event("sync_done", timeout=120, service_ports=ROWS + 1)
            echo_port = process.port_of("default/echo:p")
            metrics = process.wait_event("metrics_listening")
            assert metrics["max_connections"] == CAP
            healthz = process.wait_event("healthz_listening")["port"]
            yield process, echo_port, metrics["port"], healthz
        finally:
            process.__exit__()


def round_trip(port: int, payload: bytes) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
    return got == payload


def fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        body: bytes = response.read()
        return body


def test_forwarding_goes_on_while_status_is_fetched_repeatedly(
    proc: tuple[UproxyProcess, int, int, int],
) -> None:
    _, echo_port, metrics_port, _ = proc
    stop = threading.Event()
    rows_seen: list[int] = []
    errors: list[BaseException] = []

    def hammer(path: str) -> None:
        try:
            while not stop.is_set():
                body = fetch(f"http://127.0.0.1:{metrics_port}{path}")
                if path == "/status":
                    rows_seen.append(len(json.loads(body)["servicePorts"]))
                else:
                    rows_seen.append(body.count(b"uproxy_connections_active{"))
        except BaseException as exc:
            errors.append(exc)

    fetchers = [
        threading.Thread(target=hammer, args=(path,))
        for path in ("/status", "/status", "/status", "/metrics")
    ]
    for thread in fetchers:
        thread.start()
    try:
        served = sum(round_trip(echo_port, f"hello {i}".encode() * 50) for i in range(300))
    finally:
        stop.set()
        for thread in fetchers:
            thread.join(timeout=60)
    assert not errors, errors
    assert served == 300  # every connection through the proxy was spliced, byte for byte
    assert rows_seen and all(rows == ROWS + 1 for rows in rows_seen)


def test_idle_admin_connections_at_the_cap_never_lock_a_probe_out(
    proc: tuple[UproxyProcess, int, int, int],
) -> None:
    _, echo_port, metrics_port, healthz_port = proc
    held = [socket.create_connection(("127.0.0.1", metrics_port), timeout=10) for _ in range(CAP)]
    try:
        # The cap is full of connections that never asked: a newcomer that asks is answered,
        # in the slot of the oldest idle one, which is closed.
        answered = 0
        for _ in range(20):
            with socket.create_connection(("127.0.0.1", metrics_port), timeout=10) as extra:
                extra.sendall(b"GET /proxyMode HTTP/1.1\r\n\r\n")
                reply = b""
                while chunk := extra.recv(4096):
                    reply += chunk
                answered += reply.endswith(b"userspace")
        # One slot changed hands; the newcomers after it found the slot free again.
        evicted = held[0].recv(100) == b""
        # The younger held connections are still answered (within the 5 s request timeout).
        held[-1].sendall(b"GET /proxyMode HTTP/1.1\r\n\r\n")
        answer = b""
        while chunk := held[-1].recv(4096):
            answer += chunk
        served = sum(round_trip(echo_port, b"x" * 10_000) for _ in range(100))
        # The healthz port has a cap of its own and still answers.
        assert fetch(f"http://127.0.0.1:{healthz_port}/livez").startswith(b'{"lastUpdated": "')
    finally:
        for sock in held:
            sock.close()
    assert answered == 20
    assert evicted
    assert served == 100
    assert answer.startswith(b"HTTP/1.1 200 OK") and answer.endswith(b"userspace")
    # With the held connections gone (once the server has seen them close), it answers again.
    deadline = time.monotonic() + 10
    while True:
        try:
            assert fetch(f"http://127.0.0.1:{metrics_port}/proxyMode") == b"userspace"
            break
        except (ConnectionError, urllib.error.URLError):
            assert time.monotonic() < deadline
            time.sleep(0.1)
