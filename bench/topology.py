"""The benchmark's own network: client -- veth -- node (the proxy) -- veth -- backend.

Every namespace is named `ubench-<pid>-<role>`, so a run's namespaces are recognisable, two runs
never collide, and leftovers of a run that was killed with SIGKILL can be removed by the next
run (its pid is gone). The veth pairs are created directly inside the namespaces
(`ip -n NS link add ... peer ... netns NS2`), so no interface ever appears in the root namespace,
and every sysctl written is a per-namespace one, inside those namespaces. Nothing here touches
the root namespace's firewall, routes or sysctls.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

PREFIX = "ubench-"
_NAME = re.compile(rf"^{PREFIX}(\d+)-(\w+)")

CLIENT_IP = "10.0.1.2"
NODE_CLIENT_SIDE_IP = "10.0.1.1"  # the node's address facing the client: where HAProxy and
NODE_BACKEND_SIDE_IP = "10.0.2.1"  # nginx listen; the backend side is the node's other leg
BACKEND_IP = "10.0.2.2"
# Virtual IPs live in no namespace: the client routes them to the node, where NAT takes them.
DNAT_VIP = "10.96.0.2"
SERVICE_VIP = "10.96.0.10"

# Per-namespace sysctls. Wide port ranges and TIME_WAIT reuse keep the connections-per-second
# load from running out of ephemeral ports; a short conntrack TIME_WAIT keeps the node's
# conntrack table (NAT contenders) small after a few hundred thousand short connections.
_CLIENT_SYSCTLS = {
    "net.ipv4.ip_local_port_range": "1024 65535",
    "net.ipv4.tcp_tw_reuse": "1",
}
_NODE_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.ipv4.ip_local_port_range": "1024 65535",
    "net.ipv4.tcp_tw_reuse": "1",
    "net.core.somaxconn": "65535",
    "net.ipv4.tcp_max_syn_backlog": "65535",
    "net.netfilter.nf_conntrack_tcp_timeout_time_wait": "5",
}
_BACKEND_SYSCTLS = {
    "net.core.somaxconn": "65535",
    "net.ipv4.tcp_max_syn_backlog": "65535",
    "net.ipv4.tcp_tw_reuse": "1",
}


class CommandFailed(RuntimeError):
    pass


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 60.0) -> str:
    """Run a short command; its stdout. Raises CommandFailed with stderr when it fails."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise CommandFailed(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def list_namespaces() -> list[str]:
    out = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _bench_alive(pid: int) -> bool:
    """Whether `pid` is still a running benchmark: a zombie (killed, not yet reaped) is not,
    nor is an unrelated process that reused the pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat[stat.rindex(")") + 2 :].split(" ", 1)[0]
    return state != "Z" and b"bench" in cmdline


def kill_namespace_processes(ns: str, *, grace: float = 2.0) -> None:
    """End every process still inside `ns`, which are all ones this benchmark started (the
    namespace is ours): a namespace with processes in it outlives `ip netns delete`."""
    pids = [int(p) for p in run(["ip", "netns", "pids", ns], check=False).split()]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if _pid_alive(p)]
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def delete_namespace(ns: str) -> None:
    kill_namespace_processes(ns)
    run(["ip", "netns", "delete", ns], check=False)


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces left by earlier benchmark runs whose process is gone (SIGKILL, power
    loss). Namespaces of a run that is still alive are left alone."""
    removed = []
    for ns in list_namespaces():
        match = _NAME.match(ns)
        if match and not _bench_alive(int(match.group(1))):
            delete_namespace(ns)
            removed.append(ns)
    return removed


def netns_exec(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def set_sysctls(ns: str, values: dict[str, str]) -> None:
    for key, value in values.items():
        path = Path("/proc/sys") / key.replace(".", "/")
        # Written through `ip netns exec` so that /proc/sys is the namespace's own.
        run(netns_exec(ns, ["sh", "-c", f'echo "{value}" > {path}']))


def create_namespace(name: str) -> None:
    run(["ip", "netns", "add", name])
    run(["ip", "-n", name, "link", "set", "lo", "up"])


@dataclass(frozen=True)
class Topology:
    client: str
    node: str
    backend: str

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.client, self.node, self.backend)

    def exec(self, ns: str, argv: Sequence[str]) -> list[str]:
        return netns_exec(ns, argv)


def _build(tag: str) -> Topology:
    base = f"{PREFIX}{os.getpid()}-{tag}"
    topo = Topology(client=f"{base}c", node=f"{base}n", backend=f"{base}b")
    for ns in topo.namespaces:
        create_namespace(ns)
    # veth pairs born inside the namespaces; names are namespace-local.
    run(["ip", "-n", topo.node, "link", "add", "n0", "type", "veth", "peer", "name", "c0",
         "netns", topo.client])  # fmt: skip
    run(["ip", "-n", topo.node, "link", "add", "n1", "type", "veth", "peer", "name", "b0",
         "netns", topo.backend])  # fmt: skip
    for ns, dev, cidr in (
        (topo.client, "c0", f"{CLIENT_IP}/24"),
        (topo.node, "n0", f"{NODE_CLIENT_SIDE_IP}/24"),
        (topo.node, "n1", f"{NODE_BACKEND_SIDE_IP}/24"),
        (topo.backend, "b0", f"{BACKEND_IP}/24"),
    ):
        run(["ip", "-n", ns, "addr", "add", cidr, "dev", dev])
        run(["ip", "-n", ns, "link", "set", dev, "up"])
    run(["ip", "-n", topo.client, "route", "add", "default", "via", NODE_CLIENT_SIDE_IP])
    run(["ip", "-n", topo.backend, "route", "add", "default", "via", NODE_BACKEND_SIDE_IP])
    set_sysctls(topo.client, _CLIENT_SYSCTLS)
    set_sysctls(topo.backend, _BACKEND_SYSCTLS)
    # The conntrack sysctls exist in every namespace (conntrack is built in or loaded).
    node_sysctls = dict(_NODE_SYSCTLS)
    if not Path("/proc/sys/net/netfilter/nf_conntrack_tcp_timeout_time_wait").exists():
        node_sysctls.pop("net.netfilter.nf_conntrack_tcp_timeout_time_wait")
    set_sysctls(topo.node, node_sysctls)
    return topo


@contextlib.contextmanager
def topology(tag: str) -> Iterator[Topology]:
    """A fresh client/node/backend topology, deleted on the way out whatever happens."""
    created: list[str] = []
    base = f"{PREFIX}{os.getpid()}-{tag}"
    try:
        topo = _build(tag)
        created = list(topo.namespaces)
        yield topo
    finally:
        # Delete whatever exists with our prefix for this tag, even if _build failed half-way.
        for ns in list_namespaces():
            if ns.startswith(base) or ns in created:
                delete_namespace(ns)


@contextlib.contextmanager
def single_namespace(tag: str) -> Iterator[str]:
    """One empty namespace (loopback up), for control-plane measurements."""
    name = f"{PREFIX}{os.getpid()}-{tag}"
    try:
        create_namespace(name)
        yield name
    finally:
        if name in list_namespaces():
            delete_namespace(name)


def remove_all_own_namespaces() -> None:
    """Every namespace of this process: the last line of defence at exit."""
    own = f"{PREFIX}{os.getpid()}-"
    for ns in list_namespaces():
        if ns.startswith(own):
            delete_namespace(ns)
