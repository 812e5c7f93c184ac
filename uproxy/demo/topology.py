"""`uproxy demo`'s network: namespaces in the shape of docker-compose.yml, and the processes in
them.

    client 10.250.1.2 --veth-- 10.250.1.1  node  10.250.2.1 (bridge) --veths-- web-a   .11
        route 10.96.0.0/16                  uproxy run, portals                  web-b   .12
        via the node                                                             web-c   .13
                                                                                 resolver .53

Only namespaces it creates are touched (uproxy/netns.py names them `uproxy-demo-<pid>-t<start>-
<role>`), never the host's own network; a demo killed outright (SIGKILL) leaves namespaces
behind that the next run removes.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from uproxy import netns
from uproxy.demo.roles import say
from uproxy.demo.services import (
    DNS_ANSWER,
    DNS_BACKEND_PORT,
    DNS_PORT,
    DNS_VIP,
    HTTP_BACKEND_PORT,
    RESOLVER,
    SERVICE_CIDR,
    STICKY_PORT,
    STICKY_VIP,
    WEB_BACKENDS,
    WEB_PORT,
    WEB_VIP,
)

FRONT_NET = "10.250.1"  # client <-> node
BACK_NET = "10.250.2"  # node <-> backends (a bridge inside the node namespace)
NODE_FRONT_IP, CLIENT_IP, NODE_BACK_IP = f"{FRONT_NET}.1", f"{FRONT_NET}.2", f"{BACK_NET}.1"
BACKEND_IPS = {name: f"{BACK_NET}.{11 + i}" for i, name in enumerate(WEB_BACKENDS)}
RESOLVER_IP = f"{BACK_NET}.53"

OWNER = netns.NamespaceOwner("uproxy-demo-")
# Children are stopped in order first; whatever is left in a namespace after that is killed.
_LEFTOVER_GRACE = 0.0


class DemoError(Exception):
    pass


def _ip(*argv: str) -> None:
    try:
        netns.ip(*argv)
    except netns.NetnsError as exc:
        raise DemoError(str(exc)) from None


def sweep_stale_namespaces() -> list[str]:
    """Namespaces of demos that are gone (killed outright), removed; their names."""
    return OWNER.sweep_stale(grace=_LEFTOVER_GRACE)


def _role_argv(role: str, *argv: str) -> list[str]:
    return [sys.executable, "-m", "uproxy", "demo-role", role, *argv]


class Child:
    """A process inside a namespace, in its own session (the terminal's Ctrl-C reaches only the
    demo, which then stops everything in order); its output lines are collected."""

    def __init__(self, label: str, argv: Sequence[str], echo: TextIO | None = None) -> None:
        self.label = label
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        # Importable from any working directory, installed or run from a checkout.
        package_root = str(Path(__file__).resolve().parents[2])
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
                say(line, file=self._echo)
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
class Demo:
    requests: int
    iptables_backend: str
    verbose: bool
    run_id: str = OWNER.run_id
    namespaces: dict[str, str] = field(default_factory=dict)  # role -> name, before creation
    children: list[Child] = field(default_factory=list)
    workdir: Path | None = None

    # -- building ---------------------------------------------------------------------------

    def namespace(self, role: str) -> str:
        name = OWNER.name(role)
        self.namespaces[role] = name  # recorded first: an interrupt mid-creation still removes it
        try:
            netns.create(name)
        except netns.NetnsError as exc:
            raise DemoError(str(exc)) from None
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

    def start(self, role: str, *argv: str, echo: bool = False) -> Child:
        child = Child(
            role,
            netns.exec_argv(self.namespaces[role], argv),
            echo=sys.stdout if echo else None,
        )
        self.children.append(child)
        return child

    def start_backends(self) -> None:
        http = ("--port", str(HTTP_BACKEND_PORT))
        started = [
            self.start(name, *_role_argv("http", "--name", name, *http)) for name in BACKEND_IPS
        ]
        dns = ("--name", RESOLVER, "--port", str(DNS_BACKEND_PORT), "--answer", DNS_ANSWER)
        started.append(self.start(RESOLVER, *_role_argv("dns", *dns)))
        for child in started:
            child.wait_for(lambda line: " on " in line, "listening line", timeout=20)

    def write_manifests(self) -> Path:
        import yaml

        self.workdir = Path(tempfile.mkdtemp(prefix="uproxy-demo-"))
        path = self.workdir / "demo.yaml"
        path.write_text(yaml.safe_dump_all(demo_manifests(), sort_keys=False))
        return self.workdir

    def start_uproxy(self, config: Path) -> Child:
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
        argv = _role_argv("client", "--requests", str(self.requests), "--wait", "30")
        return self.start("client", *argv, echo=True).wait()

    def show_status(self) -> None:
        uproxy = [sys.executable, "-m", "uproxy", "status", "--address", "127.0.0.1:10249"]
        done = subprocess.run(
            netns.exec_argv(self.namespaces["node"], uproxy),
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode == 0:
            say("\nuproxy's view (uproxy status):")
            say(done.stdout.rstrip())

    # -- tearing down -----------------------------------------------------------------------

    def teardown(self) -> int:
        for child in reversed(self.children):  # client, uproxy, then the backends
            with contextlib.suppress(Exception):
                child.stop(timeout=8 if child.label == "node" else 3)
        mine = set(self.namespaces.values()) | set(OWNER.owned())
        for name in sorted(mine):
            netns.delete(name, grace=_LEFTOVER_GRACE)
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
