"""The userspace core end to end: a real `uproxy run` process, real sockets on loopback.

These run without root: listeners only (`--no-portals`), traffic only to 127.0.0.0/8.
"""

from __future__ import annotations

import hashlib
import os
import resource
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests import backends as be
from tests.manifests import backend_slices, service, write
from tests.uproxy_process import UproxyProcess, loopback_run_args

pytestmark = pytest.mark.parametrize("event_loop_name", ["uvloop", "asyncio"])


def start(config: Path, event_loop_name: str, *extra: str, **kw: object) -> UproxyProcess:
    args = loopback_run_args(config, "--event-loop", event_loop_name, *extra)
    return UproxyProcess(args, **kw)  # type: ignore[arg-type]


@pytest.fixture
def config(tmp_path: Path) -> Path:
    directory = tmp_path / "manifests"
    directory.mkdir()
    return directory


def tcp_service(config: Path, name: str, ports: list[tuple[str, int]], **kw: object) -> None:
    write(
        config / f"{name}.yaml",
        service(name, [{"name": "p", "port": 80}], **kw),  # type: ignore[arg-type]
        *backend_slices(name, "p", ports),
    )


def connect(port: int, host: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection((host, port), timeout=10)


def http_get(port: int) -> str:
    out = subprocess.run(
        ["curl", "-s", "--max-time", "5", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout


@pytest.fixture
def proc_cleanup() -> Iterator[list[UproxyProcess]]:
    procs: list[UproxyProcess] = []
    yield procs
    for p in procs:
        p.__exit__()


def test_100_mb_both_ways_with_matching_digest(
    config: Path, event_loop_name: str, proc_cleanup: list[UproxyProcess]
) -> None:
    with be.tcp_backend(be.echo) as backend:
        tcp_service(config, "bulk", [("127.0.0.1", backend.port)])
        proc = start(config, event_loop_name)
        proc_cleanup.append(proc)
        port = proc.port_of("default/bulk:p")
        total = 100 * 1024 * 1024
        chunk = os.urandom(1024 * 1024)
        sent = hashlib.sha256()
        received = hashlib.sha256()
        got = 0
        with connect(port) as sock:
            sock.settimeout(30)

            def send() -> None:
                for _ in range(total // len(chunk)):
                    sock.sendall(chunk)
                    sent.update(chunk)
                sock.shutdown(socket.SHUT_WR)

            sender = threading.Thread(target=send)
            sender.start()
            while data := sock.recv(1 << 20):
                received.update(data)
                got += len(data)
            sender.join()
        assert got == total
        assert received.hexdigest() == sent.hexdigest()
        assert proc.stop() == 0


def test_half_close_client_still_reads_whole_reply(
    config: Path, event_loop_name: str, proc_cleanup: list[UproxyProcess]
) -> None:
    reply = 5 * 1024 * 1024
    with be.tcp_backend(be.reply_after_eof(reply)) as backend:
        tcp_service(config, "half", [("127.0.0.1", backend.port)])
        proc = start(config, event_loop_name)
        proc_cleanup.append(proc)
        port = proc.port_of("default/half:p")
        with connect(port) as sock:
            sock.sendall(b"q" * 300_000)
            sock.shutdown(socket.SHUT_WR)
            data = bytearray()
            while chunk := sock.recv(1 << 20):
                data += chunk
        (counted,) = struct.unpack("!Q", data[:8])
        assert counted == 300_000
        assert len(data) - 8 == reply


def test_server_that_speaks_first_and_closes_loses_nothing(
    config: Path, event_loop_name: str, proc_cleanup: list[UproxyProcess]
) -> None:
    # The backend's greeting can arrive before the client leg is attached: it must be held.
    with be.tcp_backend(be.greet_and_close) as backend:
        tcp_service(config, "greet", [("127.0.0.1", backend.port)])
        proc = start(config, event_loop_name)
        proc_cleanup.append(proc)
        port = proc.port_of("default/greet:p")
        replies: Counter[bytes] = Counter()
        for _ in range(300):
            with connect(port) as sock:
                data = b""
                while chunk := sock.recv(1024):
                    data += chunk
                replies[data] += 1
        assert replies == {b"hello from the backend\n": 300}


def test_backend_reset_reaches_client(
    config: Path, event_loop_name: str, proc_cleanup: list[UproxyProcess]
) -> None:
    with be.tcp_backend(be.reset_after_read) as backend:
        tcp_service(config, "rst", [("127.0.0.1", backend.port)])
        proc = start(config, event_loop_name)
        proc_cleanup.append(proc)
        port = proc.port_of("default/rst:p")
        with connect(port) as sock:
            sock.sendall(b"hello")
            with pytest.raises(ConnectionResetError):
                while sock.recv(1024):
                    pass


def test_refusing_endpoint_is_skipped(
    config: Path, event_loop_name: str, proc_cleanup: list[UproxyProcess]
) -> None:
    dead = be.free_port()
    with be.tcp_backend(be.named_http("alive")) as backend:
        tcp_service(config, "retry", [("127.0.0.1", dead), ("127.0.0.1", backend.port)])
        proc = start(config, event_loop_name)
        proc_cleanup.append(proc)
        port = proc.port_of("default/retry:p")
        answers = [http_get(port) for _ in range(10)]
        assert answers == ["alive"] * 10


def test_no_endpoints_closes_client_at_once(
    config: Path, event_loop_name: str, proc_cleanup: list[UproxyProcess]
) -> None:
    tcp_service(config, "empty", [])
    proc = start(config, event_loop_name)
    proc_cleanup.append(proc)
    port = proc.port_of("default/empty:p")
    with connect(port) as sock:
        # Closed by the proxy (EOF or reset), not left hanging: a hang would raise TimeoutError.
        sock.settimeout(5)
        try:
            assert sock.recv(1024) == b""
        except ConnectionResetError:
            pass


def test_round_robin_and_affinity(
    config: Path, event_loop_name: str, proc_cleanup: list[UproxyProcess]
) -> None:
    with be.tcp_backend(be.named_http("a")) as a, be.tcp_backend(be.named_http("b")) as b:
        addrs = [("127.0.0.1", a.port), ("127.0.0.1", b.port)]
        tcp_service(config, "rr", addrs)
        tcp_service(config, "sticky", addrs, affinity_timeout=600)
        proc = start(config, event_loop_name)
        proc_cleanup.append(proc)
        rr = Counter(http_get(proc.port_of("default/rr:p")) for _ in range(10))
        assert rr == {"a": 5, "b": 5}
        sticky = Counter(http_get(proc.port_of("default/sticky:p")) for _ in range(10))
        assert len(sticky) == 1 and sum(sticky.values()) == 10


def test_udp_60000_byte_datagrams_both_ways(
    config: Path, event_loop_name: str, proc_cleanup: list[UproxyProcess]
) -> None:
    echo = be.UdpEcho()
    try:
        write(
            config / "udp.yaml",
            service("big", [{"name": "u", "port": 53, "protocol": "UDP"}]),
            *backend_slices("big", "u", [("127.0.0.1", echo.port)], protocol="UDP"),
        )
        proc = start(config, event_loop_name, "--bind-address", "0.0.0.0")
        proc_cleanup.append(proc)
        port = proc.port_of("default/big:u")
        payload = os.urandom(60_000)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(5)
            # 127.0.0.7 is local but not the primary address: the reply must still come from it.
            client.sendto(payload, ("127.0.0.7", port))
            data, source = client.recvfrom(65535)
        assert data == payload
        assert source == ("127.0.0.7", port)
    finally:
        echo.close()


def test_manifest_edit_adds_port_without_disturbing_others(
    config: Path, event_loop_name: str, proc_cleanup: list[UproxyProcess]
) -> None:
    with be.tcp_backend(be.echo) as backend:
        tcp_service(config, "first", [("127.0.0.1", backend.port)])
        proc = start(config, event_loop_name)
        proc_cleanup.append(proc)
        first_port = proc.port_of("default/first:p")
        with connect(first_port) as held:
            held.sendall(b"before")
            assert held.recv(100) == b"before"
            tcp_service(config, "second", [("127.0.0.1", backend.port)])
            second_port = proc.port_of("default/second:p")
            with connect(second_port) as other:
                other.sendall(b"new")
                assert other.recv(100) == b"new"
            held.sendall(b"after")
            assert held.recv(100) == b"after"
        assert proc.count("listener_started", service="default/first:p") == 1


def test_broken_manifest_keeps_last_good_state(
    config: Path, event_loop_name: str, proc_cleanup: list[UproxyProcess]
) -> None:
    with be.tcp_backend(be.named_http("kept")) as backend:
        tcp_service(config, "web", [("127.0.0.1", backend.port)])
        proc = start(config, event_loop_name)
        proc_cleanup.append(proc)
        port = proc.port_of("default/web:p")
        broken = service("web", [{"name": "p", "port": 80, "protocol": "SCTP"}])
        write(config / "web.yaml", broken)
        error = proc.wait_event("manifest_invalid")
        assert "web.yaml" in str(error["path"]) and "spec.ports[0].protocol" in str(error)
        assert http_get(port) == "kept"
        assert proc.count("listener_stopped") == 0


def test_sigterm_lets_open_connection_finish(
    config: Path, event_loop_name: str, proc_cleanup: list[UproxyProcess]
) -> None:
    with be.tcp_backend(be.echo) as backend:
        tcp_service(config, "drain", [("127.0.0.1", backend.port)])
        proc = start(config, event_loop_name, "--shutdown-grace", "10s")
        proc_cleanup.append(proc)
        port = proc.port_of("default/drain:p")
        with connect(port) as sock:
            sock.sendall(b"one")
            assert sock.recv(10) == b"one"
            proc.proc.send_signal(signal.SIGTERM)
            proc.wait_event("draining")
            # The listener is gone, the established connection still works.
            with pytest.raises(OSError):
                connect(port).close()
            sock.sendall(b"two")
            assert sock.recv(10) == b"two"
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(10) == b""
        # The last connection ended: the process exits by itself, cleanly, before the grace.
        assert proc.proc.wait(timeout=8) == 0
        proc.wait_event("stopped")
        assert proc.count("drain_incomplete") == 0


def test_out_of_descriptors_pauses_accepting_then_recovers(
    config: Path, event_loop_name: str, proc_cleanup: list[UproxyProcess]
) -> None:
    limit = 64

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))

    with be.tcp_backend(be.echo) as backend:
        tcp_service(config, "fd", [("127.0.0.1", backend.port)])
        proc = start(config, event_loop_name, preexec_fn=low_limit)
        proc_cleanup.append(proc)
        port = proc.port_of("default/fd:p")
        # Each spliced connection costs the proxy two descriptors: exhaust them.
        clients = [connect(port) for _ in range(limit)]
        try:
            proc.wait_event("accept_paused")
        finally:
            for c in clients:
                c.close()
        # Once descriptors are free again the same listener serves new clients.
        deadline = time.monotonic() + 10
        while True:
            try:
                with connect(port) as sock:
                    sock.settimeout(2)
                    sock.sendall(b"back")
                    if sock.recv(10) == b"back":
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "listener did not recover"
            time.sleep(0.1)
        assert proc.proc.poll() is None
