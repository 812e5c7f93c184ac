"""The benchmark's own network: client -- veth -- node (the proxy) -- veth -- backend.

Namespaces come from uproxy/netns.py under the prefix `ubench-` (the benchmark's pid and start
time are in every name), so a run's namespaces are recognisable, two runs never collide, and
leftovers of a run that was killed with SIGKILL are removed by the next run, even if its pid has
been reused since. The veth pairs are created directly inside the namespaces, so no interface
ever appears in the root namespace, and every sysctl written is a per-namespace one, inside
those namespaces. Nothing here touches the root namespace's firewall, routes or sysctls.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from uproxy import netns

OWNER = netns.NamespaceOwner("ubench-")

CLIENT_IP = "10.0.1.2"
NODE_CLIENT_SIDE_IP = "10.0.1.1"  # the node's address facing the client: where HAProxy and
NODE_BACKEND_SIDE_IP = "10.0.2.1"  # nginx listen; the backend side is the node's other leg
BACKEND_IP = "10.0.2.2"
# Virtual IPs live in no namespace: the client routes them to the node, where NAT takes them.
DNAT_VIP = "10.96.0.2"
SERVICE_VIP = "10.96.0.10"

# Per-namespace sysctls. The client keeps a pod's defaults (no ephemeral-port or TIME_WAIT
# tuning): a proxy that makes the client close first must show it. The node and the backend
# get only server-side settings a node or a server is commonly given: forwarding, listen
# backlogs, and a short conntrack TIME_WAIT that keeps the node's conntrack table (NAT
# contenders) small after a few hundred thousand short connections.
_CLIENT_SYSCTLS: dict[str, str] = {}
_NODE_SYSCTLS = {
    "net.ipv4.ip_forward": "1",
    "net.core.somaxconn": "65535",
    "net.ipv4.tcp_max_syn_backlog": "65535",
    "net.netfilter.nf_conntrack_tcp_timeout_time_wait": "5",
}
_BACKEND_SYSCTLS = {
    "net.core.somaxconn": "65535",
    "net.ipv4.tcp_max_syn_backlog": "65535",
}


class CommandFailed(RuntimeError):
    pass


def run(argv: Sequence[str], *, check: bool = True, timeout: float = 60.0) -> str:
    """Run a short command; its stdout. Raises CommandFailed with stderr when it fails."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise CommandFailed(f"{' '.join(argv)}: exit {proc.returncode}: {proc.stderr.strip()}")
    return proc.stdout


def remove_stale_namespaces() -> list[str]:
    """Delete namespaces left by earlier benchmark runs whose process is gone (SIGKILL, power
    loss). Namespaces of a run that is still alive are left alone."""
    return OWNER.sweep_stale()


def netns_exec(ns: str, argv: Sequence[str]) -> list[str]:
    return netns.exec_argv(ns, argv)


def set_sysctls(ns: str, values: dict[str, str]) -> None:
    for key, value in values.items():
        path = Path("/proc/sys") / key.replace(".", "/")
        # Written through `ip netns exec` so that /proc/sys is the namespace's own.
        run(netns_exec(ns, ["sh", "-c", f'echo "{value}" > {path}']))


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
    topo = Topology(
        client=OWNER.name(f"{tag}c"), node=OWNER.name(f"{tag}n"), backend=OWNER.name(f"{tag}b")
    )
    for ns in topo.namespaces:
        netns.create(ns)
    # veth pairs born inside the namespaces; names are namespace-local.
    netns.add_veth(topo.node, "n0", topo.client, "c0")
    netns.add_veth(topo.node, "n1", topo.backend, "b0")
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
    names = [OWNER.name(f"{tag}{role}") for role in "cnb"]
    try:
        yield _build(tag)
    finally:
        # Whichever of them exist, even if _build failed half-way.
        for ns in set(names) & set(netns.list_namespaces()):
            netns.delete(ns)


@contextlib.contextmanager
def single_namespace(tag: str) -> Iterator[str]:
    """One empty namespace (loopback up), for control-plane measurements."""
    name = OWNER.name(tag)
    try:
        netns.create(name)
        yield name
    finally:
        if name in netns.list_namespaces():
            netns.delete(name)


def remove_all_own_namespaces() -> None:
    """Every namespace of this process: the last line of defence at exit."""
    OWNER.delete_owned()
