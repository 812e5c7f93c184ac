"""Health, metrics, status and signals of a real `uproxy run` process, on loopback."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests import backends as be
from tests.manifests import backend_slices, service, write
from tests.uproxy_process import REPO, UproxyProcess, loopback_run_args


def start(config: Path, *extra: str) -> UproxyProcess:
    return UproxyProcess(loopback_run_args(config, *extra))


@pytest.fixture
def config(tmp_path: Path) -> Path:
    directory = tmp_path / "manifests"
    directory.mkdir()
    return directory


@pytest.fixture
def procs() -> Iterator[list[UproxyProcess]]:
    started: list[UproxyProcess] = []
    yield started
    for p in started:
        p.__exit__()


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metrics_url(proc: UproxyProcess, path: str) -> str:
    port = proc.wait_event("metrics_listening")["port"]
    return f"http://127.0.0.1:{port}{path}"


def healthz(proc: UproxyProcess) -> tuple[int, dict[str, Any], str]:
    """Status, body and uproxy's X-Uproxy-Reason header of /healthz."""
    port = proc.wait_event("healthz_listening")["port"]
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=5) as response:
            code, body, headers = response.status, response.read().decode(), response.headers
    except urllib.error.HTTPError as exc:
        code, body, headers = exc.code, exc.read().decode(), exc.headers
    return code, json.loads(body), headers.get("X-Uproxy-Reason", "")


def scrape(proc: UproxyProcess) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    _, text = get(metrics_url(proc, "/metrics"))
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def sample(samples: dict[Any, float], name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_until(predicate: Any, what: str, limit: float = 15.0) -> None:
    deadline = time.monotonic() + limit
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_metrics_move_with_real_traffic(config: Path, procs: list[UproxyProcess]) -> None:
    with be.tcp_backend(be.echo) as backend:
        write(
            config / "m.yaml",
            service("m", [{"name": "p", "port": 80}]),
            *backend_slices("m", "p", [("127.0.0.1", backend.port)]),
        )
        proc = start(config)
        procs.append(proc)
        port = proc.port_of("default/m:p")
        proc.wait_event("sync_done")
        key = {"service_port": "default/m:p", "protocol": "TCP"}
        before = scrape(proc)
        assert sample(before, "uproxy_connections_total", **key) == 0
        for _ in range(3):
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(b"x" * 1000)
                sock.shutdown(socket.SHUT_WR)
                while sock.recv(65536):
                    pass
        with socket.create_connection(("127.0.0.1", port), timeout=5) as held:
            held.sendall(b"y")
            assert held.recv(10) == b"y"
            during = scrape(proc)
            assert sample(during, "uproxy_connections_active", **key) == 1
        after = scrape(proc)
        assert sample(after, "uproxy_connections_total", **key) == 4
        assert sample(after, "uproxy_bytes_total", direction="in", **key) == 3001
        assert sample(after, "uproxy_bytes_total", direction="out", **key) == 3001
        assert sample(after, "uproxy_service_ports") == 1
        assert sample(after, "kubeproxy_sync_proxy_rules_duration_seconds_count") >= 1
        assert sample(after, "kubeproxy_sync_proxy_rules_last_timestamp_seconds") > 0
        assert get(metrics_url(proc, "/proxyMode")) == (200, "userspace")


def test_healthz_flips_when_syncs_fail_and_recovers(
    config: Path, procs: list[UproxyProcess]
) -> None:
    # The proxy may only use one port; occupying it makes every sync that needs a new listener
    # fail, which is a real failed sync, not a simulated one.
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    only_port = blocker.getsockname()[1]
    blocker.close()
    write(config / "a.yaml", service("a", [{"name": "p", "port": 80}]))
    proc = start(config, "--sync-period", "1s", "--proxy-port-range", str(only_port))
    procs.append(proc)
    proc.wait_event("sync_done")
    code, body, _ = healthz(proc)
    assert code == 200 and body["lastUpdated"] == body["currentTime"]

    # Take the port away and ask for a second listener: syncs now fail.
    write(config / "a.yaml")
    proc.wait_event("listener_stopped")
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", only_port))
        squatter.listen()
        write(config / "b.yaml", service("b", [{"name": "p", "port": 80}]))
        proc.wait_event("sync_failed")
        wait_until(lambda: healthz(proc)[0] == 503, "healthz 503")
        assert "unapplied" in healthz(proc)[2]
    # The port is free again: the retry succeeds and health comes back.
    proc.wait_event("listener_started", service="default/b:p")
    wait_until(lambda: healthz(proc)[0] == 200, "healthz 200 again")
    assert sample(scrape(proc), "uproxy_sync_failures_consecutive") == 0


def test_status_command_and_json(config: Path, procs: list[UproxyProcess]) -> None:
    with be.tcp_backend(be.echo) as backend:
        write(
            config / "s.yaml",
            service("web", [{"name": "http", "port": 80}], cluster_ip="10.96.0.10"),
            *backend_slices("web", "http", [("127.0.0.1", backend.port)]),
            service(
                "dns",
                [{"name": "dns", "port": 53, "protocol": "UDP"}],
                cluster_ip="10.96.0.53",
                affinity_timeout=60,
            ),
        )
        proc = start(config)
        procs.append(proc)
        proc.wait_event("sync_done")
        address = f"127.0.0.1:{proc.wait_event('metrics_listening')['port']}"
        web_port = proc.port_of("default/web:http")
        with socket.create_connection(("127.0.0.1", web_port), timeout=5) as held:
            held.sendall(b"z")
            assert held.recv(10) == b"z"
            out = subprocess.run(
                [sys.executable, "-m", "uproxy", "status", "--address", address],
                capture_output=True,
                text=True,
                check=True,
                cwd=REPO,
            ).stdout
            _, raw = get(f"http://{address}/status")
        lines = out.splitlines()
        assert lines[0].startswith("SERVICE PORT")
        web_line = next(line for line in lines if line.startswith("default/web:http"))
        assert "10.96.0.10:80" in web_line and str(web_port) in web_line
        assert f"127.0.0.1:{backend.port}(1)" in web_line  # one open connection
        dns_line = next(line for line in lines if line.startswith("default/dns:dns"))
        assert "ClientIP/60s" in dns_line and "<none>" in dns_line
        document = json.loads(raw)
        web = next(p for p in document["servicePorts"] if p["name"] == "default/web:http")
        assert web["proxyPort"] == web_port
        assert web["endpoints"][0]["connections"] == 1 and web["endpoints"][0]["inUse"]


def test_sighup_rereads_manifests_at_once(config: Path, procs: list[UproxyProcess]) -> None:
    path = config / "h.yaml"
    write(path, service("one", [{"name": "p", "port": 80}]))
    proc = start(config)
    procs.append(proc)
    proc.port_of("default/one:p")
    # Same size, same mtime: the file watcher cannot see this edit (as after `cp -p` or rsync).
    stat = path.stat()
    path.write_text(path.read_text().replace("name: one", "name: two"))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    time.sleep(1.0)
    assert proc.count("listener_started", service="default/two:p") == 0
    proc.proc.send_signal(signal.SIGHUP)
    proc.wait_event("reload_signal")
    proc.port_of("default/two:p")
    proc.wait_event("listener_stopped", service="default/one:p")


def test_second_sigterm_exits_at_once(config: Path, procs: list[UproxyProcess]) -> None:
    with be.tcp_backend(be.echo) as backend:
        write(
            config / "d.yaml",
            service("d", [{"name": "p", "port": 80}]),
            *backend_slices("d", "p", [("127.0.0.1", backend.port)]),
        )
        proc = start(config, "--shutdown-grace", "60s")
        procs.append(proc)
        port = proc.port_of("default/d:p")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as held:
            held.sendall(b"a")
            assert held.recv(10) == b"a"
            proc.proc.send_signal(signal.SIGTERM)
            proc.wait_event("draining")
            proc.proc.send_signal(signal.SIGTERM)
            # Far sooner than the 60 s grace: the second signal cuts the drain short.
            assert proc.proc.wait(timeout=10) == 0
            # The held connection was closed by the proxy (reset or EOF), not left open.
            held.settimeout(5)
            try:
                data = held.recv(10)
            except ConnectionResetError:
                data = b""
            assert data == b""
        proc.wait_event("second_stop_signal")


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (tests/run.sh installs it)")
def test_status_page_renders_in_a_browser(config: Path, procs: list[UproxyProcess]) -> None:
    write(
        config / "p.yaml",
        service("web", [{"name": "http", "port": 80}], cluster_ip="10.96.0.10"),
        *backend_slices("web", "http", [("127.0.0.1", 18081), ("127.0.0.1", 18082)]),
    )
    proc = start(config)
    procs.append(proc)
    proc.wait_event("sync_done")
    url = metrics_url(proc, "/")
    with tempfile.TemporaryDirectory() as profile:
        shot = Path(profile) / "status.png"
        flags = [
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            f"--user-data-dir={profile}",
        ]
        assert CHROMIUM is not None
        dom = subprocess.run(
            [CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=60
        ).stdout
        subprocess.run(
            [CHROMIUM, *flags, f"--screenshot={shot}", "--window-size=1200,400", url],
            capture_output=True,
            timeout=60,
        )
        assert shot.exists() and shot.stat().st_size > 1000
        keep = os.environ.get("UPROXY_KEEP_SCREENSHOT")
        if keep:
            shutil.copy(shot, keep)
    assert '<table id="status">' in dom
    assert "default/web:http" in dom and "10.96.0.10:80" in dom
    assert "127.0.0.1:18081(0)" in dom and "127.0.0.1:18082(0)" in dom
