"""`uproxy run --kubeconfig` end to end, against the test API server, with real backends.

The loopback tests need no root: the API server runs in this process (on its own loop in a
thread), uproxy as a real process with `--no-portals` on 127.0.0.1. The last test runs the API
server and uproxy (with portals) in network namespaces and reaches a ClusterIP.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests import backends as be
from tests.integration.netns import Namespace, network
from tests.kubeapi import ThreadedKubeApi, make_endpoint_slice, make_service
from tests.kubeconfig import write_kubeconfig
from tests.uproxy_process import UproxyProcess, loopback_run_args

WEB = "default/web:http"
API = "default/api:http"


def start(kubeconfig: Path) -> UproxyProcess:
    return UproxyProcess(loopback_run_args(None, "--kubeconfig", str(kubeconfig)))


def http_get(port: int) -> str:
    out = subprocess.run(
        ["curl", "-s", "--max-time", "5", f"http://127.0.0.1:{port}/"],
        capture_output=True,
        text=True,
        check=False,
    )
    return out.stdout


def eventually(check: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def backend_slice(name: str, service: str, port: int) -> dict[str, Any]:
    return make_endpoint_slice(name, service, ["127.0.0.1"], ports=[{"name": "http", "port": port}])


@pytest.fixture
def api() -> Iterator[ThreadedKubeApi]:
    with ThreadedKubeApi(bookmark_interval=0.5) as server:
        yield server


@pytest.fixture
def kubeconfig(tmp_path: Path, api: ThreadedKubeApi) -> Path:
    return write_kubeconfig(tmp_path / "kubeconfig", api.url, api.token)


@pytest.fixture
def uproxy(kubeconfig: Path) -> Iterator[Callable[[], UproxyProcess]]:
    started: list[UproxyProcess] = []

    def run() -> UproxyProcess:
        started.append(start(kubeconfig))
        return started[-1]

    yield run
    for process in started:
        process.__exit__()


def test_services_follow_the_api(api: ThreadedKubeApi, uproxy: Callable[[], UproxyProcess]) -> None:
    with be.tcp_backend(be.named_http("one")) as one, be.tcp_backend(be.named_http("two")) as two:
        api.apply(make_service("web"))
        api.apply(backend_slice("web-1", "web", one.port))
        proc = uproxy()
        port = proc.port_of(WEB)
        assert http_get(port) == "one"

        api.apply(backend_slice("web-1", "web", two.port))  # update
        eventually(lambda: http_get(port) == "two", "the updated endpoint")

        api.apply(make_service("api", cluster_ip="10.96.0.20"))  # add
        api.apply(backend_slice("api-1", "api", one.port))
        assert http_get(proc.port_of(API)) == "one"

        api.delete("Service", "default", "api")  # delete
        proc.wait_event("listener_stopped", service=API)
        assert http_get(port) == "two"
        assert proc.count("listener_started", service=WEB) == 1
        assert proc.stop() == 0


def test_api_outage_keeps_serving_and_catches_up(
    api: ThreadedKubeApi, uproxy: Callable[[], UproxyProcess]
) -> None:
    with be.tcp_backend(be.named_http("kept")) as backend:
        api.apply(make_service("web"))
        api.apply(backend_slice("web-1", "web", backend.port))
        proc = uproxy()
        port = proc.port_of(WEB)
        assert http_get(port) == "kept"

        api.stop()
        down = time.monotonic()
        # Changed while the server is away, and its history lost (410 Gone on return).
        api.apply(make_service("api", cluster_ip="10.96.0.20"))
        api.apply(backend_slice("api-1", "api", backend.port))
        api.compact()
        while time.monotonic() - down < 4:
            assert http_get(port) == "kept"
            time.sleep(0.25)
        assert proc.count("kube_watch_error") >= 2
        api.start()

        # Services and slices are separate lists: the endpoints may follow a moment later.
        api_port = proc.port_of(API)
        eventually(lambda: http_get(api_port) == "kept", "the service added during the outage")
        proc.wait_event("kube_watch_expired")
        api.apply(make_service("late", cluster_ip="10.96.0.30"))  # a change after the return
        api.apply(backend_slice("late-1", "late", backend.port))
        late_port = proc.port_of("default/late:http")
        eventually(lambda: http_get(late_port) == "kept", "the service added after the outage")
        assert http_get(port) == "kept"
        # The relist found web unchanged: its listener was never touched.
        assert proc.count("listener_stopped") == 0
        assert proc.count("listener_started", service=WEB) == 1
        assert proc.stop() == 0


def write_manifests(path: Path, *objects: dict[str, Any]) -> None:
    """Replace `path` atomically, as an editor or a ConfigMap update would."""
    staged = path.with_suffix(".staged")
    staged.write_text(yaml.safe_dump_all(objects))
    staged.replace(path)


def test_each_source_owns_its_objects_and_the_api_wins_a_conflict(
    tmp_path: Path, api: ThreadedKubeApi, kubeconfig: Path
) -> None:
    manifest = tmp_path / "services.yaml"
    file_web = make_service("web")
    file_other = make_service("other", cluster_ip="10.96.0.40")
    with (
        be.tcp_backend(be.named_http("from-api")) as from_api,
        be.tcp_backend(be.named_http("from-file")) as from_file,
    ):
        file_slice = backend_slice("web-file", "web", from_file.port)
        other_slice = backend_slice("other-file", "other", from_file.port)
        write_manifests(manifest, file_web, file_slice, file_other, other_slice)
        api.apply(make_service("web"))
        api.apply(backend_slice("web-1", "web", from_api.port))
        args = loopback_run_args(manifest, "--kubeconfig", str(kubeconfig))
        with UproxyProcess(args) as proc:
            port = proc.port_of(WEB)
            conflict = proc.wait_event("source_conflict", object="default/web")
            assert conflict["sources"] == ["kubernetes", "manifests"]
            assert conflict["winner"] == "kubernetes"
            assert {http_get(port) for _ in range(4)} == {"from-api"}

            # The file drops its default/web: the API's stays, untouched.
            write_manifests(manifest, file_other, other_slice)
            proc.wait_event("manifests_loaded", services=1)
            assert {http_get(port) for _ in range(4)} == {"from-api"}
            write_manifests(manifest, file_web, file_slice, file_other, other_slice)
            eventually(lambda: proc.count("source_conflict") == 2, "the conflict, reported again")
            assert {http_get(port) for _ in range(4)} == {"from-api"}

            # The API deletes its default/web: the file's copy takes over, with its slices.
            api.delete("Service", "default", "web")
            eventually(lambda: http_get(port) == "from-file", "the file's default/web")
            assert {http_get(port) for _ in range(4)} == {"from-file"}
            assert proc.count("listener_stopped", service=WEB) == 0
            assert proc.stop() == 0


def test_5000_services_time_to_first_full_sync(
    api: ThreadedKubeApi, uproxy: Callable[[], UproxyProcess]
) -> None:
    count = 5000
    with be.tcp_backend(be.named_http("bulk")) as backend:
        objects = []
        for i in range(count):
            name = f"svc-{i}"
            objects.append(make_service(name, cluster_ip=f"10.96.{i // 250}.{i % 250 + 1}"))
            objects.append(backend_slice(f"{name}-1", name, backend.port))
        api.apply_all(objects)
        started = time.monotonic()
        proc = uproxy()
        deadline = started + 120
        while True:
            synced = [
                e
                for e in list(proc.events)
                if e.get("event") == "sync_done" and e.get("service_ports", 0) >= count
            ]
            if synced:
                break
            assert time.monotonic() < deadline and proc.proc.poll() is None, proc.lines[-20:]
            time.sleep(0.05)
        elapsed = time.monotonic() - started
        print(
            f"\n{count} services: first full sync {elapsed:.2f}s after start "
            f"(sync itself {synced[0]['duration_ms']} ms)"
        )
        assert http_get(proc.port_of(f"default/svc-{count - 1}:http")) == "bulk"
        assert proc.stop(timeout=60) == 0


# --- in network namespaces, with portals ------------------------------------------------------

CLUSTER_IP = "10.96.0.10"
NEW_IP = "10.96.0.20"
CLIENT_IP, NODE_IP = "10.10.0.2", "10.10.0.1"
APISERVER_IP = "10.30.0.2"
BACKEND_IP = "10.20.1.2"

NAMED_SERVER = r"""
import socket, sys, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(64)
print('{"event": "backend_ready"}', flush=True)
def serve(c):
    with c:
        c.recv(100)  # speak only when spoken to, as HTTP does
        c.sendall(sys.argv[1].encode() + b"\n")
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""

ASK = r"""
import socket, sys
try:
    with socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3) as s:
        s.settimeout(3)
        s.sendall(b"hello\n")
        print(s.recv(100).decode().strip())
except OSError as exc:
    print("ERR", type(exc).__name__)
"""

CONTROL = r"""
import json, sys
from pathlib import Path
from tests.kubeapi import KubeApiControl
url, token, ca, method, args = sys.argv[1:6]
result = getattr(KubeApiControl(url, token, Path(ca)), method)(*json.loads(args))
print(json.dumps(result))
"""


@pytest.mark.root
def test_cluster_ip_through_portals_in_a_node_namespace(tmp_path: Path) -> None:
    def ask(ns: Namespace, host: str) -> str:
        return ns.python(ASK, host, "80", timeout=20).stdout.strip()

    with network() as net:
        client, node = net.namespace("client"), net.namespace("node")
        control_plane, backend = net.namespace("apiserver"), net.namespace("backend")
        _, node_dev = net.link(client, f"{CLIENT_IP}/24", node, f"{NODE_IP}/24")
        net.link(node, "10.30.0.1/24", control_plane, f"{APISERVER_IP}/24")
        net.link(node, "10.20.1.1/24", backend, f"{BACKEND_IP}/24")
        client.route("default", via=NODE_IP)
        backend.route("default", via="10.20.1.1")
        control_plane.route("default", via="10.30.0.1")
        # A node routes its service CIDR somewhere; without a route, local connects fail early.
        node.route("10.96.0.0/16", dev=node_dev)

        backend.start_python("-c", NAMED_SERVER, "be1").wait_event("backend_ready")
        slice_ports = [{"name": "http", "port": 8080}]
        fixtures = tmp_path / "fixtures.yaml"
        fixtures.write_text(
            yaml.safe_dump_all(
                [
                    make_service("web", cluster_ip=CLUSTER_IP),
                    make_endpoint_slice("web-1", "web", [BACKEND_IP], ports=slice_ports),
                ]
            )
        )
        kubeconfig = tmp_path / "kubeconfig"
        apiserver = control_plane.start_python(
            "-m", "tests.kubeapi", "--host", APISERVER_IP, "--port", "6443",
            "--tls-dir", str(tmp_path / "pki"), "--fixtures", str(fixtures),
            "--kubeconfig", str(kubeconfig), "--token", "node-token",
        )  # fmt: skip
        url = apiserver.wait_event("kubeapi_ready", timeout=20)["url"]

        def control(method: str, *args: Any) -> Any:
            ca = str(tmp_path / "pki" / "ca.crt")
            argv = (url, "node-token", ca, method, json.dumps(args))
            return json.loads(control_plane.python(CONTROL, *argv).stdout)

        proxy = node.start_python(
            "-m", "uproxy", "run", "--kubeconfig", str(kubeconfig),
            "--sync-period", "1s", "--min-sync-period", "0", "--log-format", "json",
        )  # fmt: skip
        try:
            proxy.wait_event("portals_synced", timeout=30)
            assert ask(client, CLUSTER_IP) == "be1"
            assert ask(node, CLUSTER_IP) == "be1"

            control(
                "apply",
                make_service("api", cluster_ip=NEW_IP),
                make_endpoint_slice("api-1", "api", [BACKEND_IP], ports=slice_ports),
            )
            eventually(lambda: ask(client, NEW_IP) == "be1", "the added service")

            mark = len(proxy.events)
            control("outage", 3.0)
            proxy.wait_event("kube_watch_error", after=mark, timeout=20)
            assert ask(client, CLUSTER_IP) == "be1"  # the API is down, the service is not
            eventually(lambda: _reachable(control), "the API server back", timeout=30)
            control("delete", "services", "default", "api")
            eventually(lambda: ask(client, NEW_IP).startswith("ERR"), "the deleted service")
            assert ask(client, CLUSTER_IP) == "be1"
        finally:
            proxy.stop(signal.SIGTERM)
            node.run(sys.executable, "-m", "uproxy", "cleanup", "--log-format", "json", check=False)


def _reachable(control: Callable[..., Any]) -> bool:
    try:
        control("state")
    except RuntimeError:  # the control client's process failed: still down
        return False
    return True
