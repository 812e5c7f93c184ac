"""The contenders: what a user could put between clients and a backend, all on the same path.

Every contender is reached from the client namespace and forwards through the node namespace to
the same backend. Each names the address the client uses (`Target`): the backend itself (direct),
a virtual IP (kernel DNAT, uproxy's portals and iptables mode) or the node's own address
(HAProxy, nginx, which listen there as a user would configure them). Userspace proxies run one
thread / worker each: uproxy is one event loop, and on a machine where generator, backend and
proxy share the cores, more threads only add contention; the choice is the same for all, so the
ratios compare engines.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from bench import servers, topology
from bench.procs import Daemon, JsonLogDaemon
from bench.servers import PORT_HTTP, PORT_IPERF, PORT_UDP
from bench.topology import Topology

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Target:
    host: str  # TCP (HTTP on 80, iperf3 on 5201) and UDP (9000) are all reached here
    udp: bool = True  # False: this contender does not proxy UDP


class Contender:
    key = ""
    label = ""
    in_kernel = False  # no process of its own: CPU and memory are not attributable
    udp_note = ""  # why UDP is not measured, when it is not

    def unavailable(self) -> str:
        """Why this contender cannot run on this machine ('' when it can)."""
        return ""

    def start(self, topo: Topology, workdir: Path) -> Target:
        raise NotImplementedError

    def stop(self) -> None:
        return None

    @property
    def pid(self) -> int | None:
        return None

    def alive(self) -> bool:
        return True

    def tail(self) -> str:
        return ""


class Direct(Contender):
    key = "direct"
    label = "direct"
    in_kernel = True

    def start(self, topo: Topology, workdir: Path) -> Target:
        return Target(topology.BACKEND_IP)  # routed by the node, no NAT: the physical limit


class KernelDnat(Contender):
    key = "dnat"
    label = "kernel DNAT"
    in_kernel = True

    def unavailable(self) -> str:
        return "" if servers.tool("iptables-nft-restore") else "iptables-nft-restore missing"

    def start(self, topo: Topology, workdir: Path) -> Target:
        # In the node namespace only (a fresh one per contender and run).
        rules = [
            "*nat",
            *(
                f"-A PREROUTING -d {topology.DNAT_VIP}/32 -p {proto} -j DNAT "
                f"--to-destination {topology.BACKEND_IP}"
                for proto in ("tcp", "udp")
            ),
            "COMMIT",
            "",
        ]
        argv = topology.netns_exec(topo.node, ["iptables-nft-restore", "--noflush"])
        subprocess.run(argv, input="\n".join(rules), text=True, check=True, timeout=30)
        return Target(topology.DNAT_VIP)


class _DaemonContender(Contender):
    def __init__(self) -> None:
        self.daemon: Daemon | None = None

    def stop(self) -> None:
        if self.daemon is not None:
            self.daemon.stop()
            self.daemon = None

    @property
    def pid(self) -> int | None:
        return self.daemon.pid if self.daemon is not None else None

    def alive(self) -> bool:
        return self.daemon is not None and self.daemon.alive()

    def tail(self) -> str:
        return self.daemon.tail(5) if self.daemon is not None else ""


def haproxy_conf() -> str:
    sections = []
    for name, port in (("http", PORT_HTTP), ("iperf", PORT_IPERF)):
        sections.append(
            f"listen {name}\n"
            f"    bind {topology.NODE_CLIENT_SIDE_IP}:{port}\n"
            f"    server backend {topology.BACKEND_IP}:{port}\n"
        )
    # Splice forced both ways: measured here, `splice-auto` hardly ever spliced on veth and moved
    # ~30% less bulk TCP for ~40% more CPU, while small HTTP exchanges showed no difference
    # beyond noise. HAProxy at its best is the fair reference.
    return (
        "global\n"
        "    nbthread 1\n"
        # HAProxy reserves two descriptors per connection plus splice pipes (maxconn / 4 of
        # them, two descriptors each) and refuses to start when the limit cannot cover that.
        f"    maxconn {(servers.NOFILE - 500) // 3}\n"
        "defaults\n"
        "    mode tcp\n"
        "    option splice-request\n"
        "    option splice-response\n"
        "    timeout connect 5s\n"
        "    timeout client 600s\n"
        "    timeout server 600s\n" + "".join(sections)
    )


class HAProxy(_DaemonContender):
    key = "haproxy"
    label = "HAProxy"
    udp_note = "HAProxy does not proxy UDP"

    def unavailable(self) -> str:
        return "" if servers.tool("haproxy") else "haproxy not installed (apt-get install haproxy)"

    def start(self, topo: Topology, workdir: Path) -> Target:
        workdir.mkdir(parents=True, exist_ok=True)
        conf = workdir / "haproxy.cfg"
        conf.write_text(haproxy_conf())
        haproxy = servers.tool("haproxy")
        assert haproxy is not None
        argv = topology.netns_exec(topo.node, [haproxy, "-db", "-f", str(conf)])
        self.daemon = Daemon(argv, workdir / "haproxy.out")
        servers.wait_listening(topo.node, PORT_HTTP)
        self.daemon.check_alive("haproxy")
        return Target(topology.NODE_CLIENT_SIDE_IP, udp=False)


def nginx_stream_conf(workdir: Path) -> str:
    ip, backend = topology.NODE_CLIENT_SIDE_IP, topology.BACKEND_IP
    return f"""
load_module {servers.NGINX_STREAM_MODULE};
worker_processes 1;
{servers.nginx_common(workdir)}
events {{ worker_connections {servers.NOFILE // 2}; }}
stream {{
    proxy_timeout 600s;
    server {{ listen {ip}:{PORT_HTTP} backlog=65535; proxy_pass {backend}:{PORT_HTTP}; }}
    server {{ listen {ip}:{PORT_IPERF}; proxy_pass {backend}:{PORT_IPERF}; }}
    server {{ listen {ip}:{PORT_UDP} udp; proxy_pass {backend}:{PORT_UDP}; proxy_timeout 10s; }}
}}
"""


class NginxStream(_DaemonContender):
    key = "nginx"
    label = "nginx stream"

    def unavailable(self) -> str:
        if servers.tool("nginx") is None:
            return "nginx not installed (apt-get install nginx libnginx-mod-stream)"
        if not servers.NGINX_STREAM_MODULE.exists():
            return "nginx stream module missing (apt-get install libnginx-mod-stream)"
        return ""

    def start(self, topo: Topology, workdir: Path) -> Target:
        conf = nginx_stream_conf(workdir)
        self.daemon = servers.start_nginx(topo.node, conf, workdir, "nginx-stream")
        servers.wait_listening(topo.node, PORT_HTTP)
        self.daemon.check_alive("nginx stream")
        return Target(topology.NODE_CLIENT_SIDE_IP)


def uproxy_manifests() -> list[dict[str, Any]]:
    ports = [
        {"name": "http", "port": PORT_HTTP, "protocol": "TCP"},
        {"name": "iperf", "port": PORT_IPERF, "protocol": "TCP"},
        {"name": "udp", "port": PORT_UDP, "protocol": "UDP"},
    ]
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "bench", "namespace": "default"},
        "spec": {"clusterIP": topology.SERVICE_VIP, "ports": ports},
    }
    slice_ = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": "bench-1",
            "namespace": "default",
            "labels": {"kubernetes.io/service-name": "bench"},
        },
        "addressType": "IPv4",
        "ports": ports,
        "endpoints": [{"addresses": [topology.BACKEND_IP], "conditions": {"ready": True}}],
    }
    return [service, slice_]


class Uproxy(_DaemonContender):
    """`uproxy run` with its portals (netfilter REDIRECT of the ClusterIP to its listeners)."""

    wrapper: tuple[str, ...] = ()  # a command the uproxy process is started through

    def __init__(
        self,
        loop: str,
        extra: Sequence[str] = (),
        key: str = "",
        label: str = "",
        wrapper: Sequence[str] = (),
    ):
        super().__init__()
        self.loop = loop
        self.extra = tuple(extra)
        if wrapper:  # else the class's (the IPVS contender runs inside a VM helper)
            self.wrapper = tuple(wrapper)
        self.key = key or f"uproxy-{loop}"
        self.label = label or f"uproxy {loop}"

    def start(self, topo: Topology, workdir: Path) -> Target:
        config = workdir / "manifests"
        config.mkdir(parents=True, exist_ok=True)
        (config / "bench.yaml").write_text(yaml.safe_dump_all(uproxy_manifests(), sort_keys=False))
        argv = [
            sys.executable, "-m", "uproxy", "run",
            "--config", str(config),
            "--log-format", "json",
            "--event-loop", self.loop,
            "--healthz-bind-address", "127.0.0.1:0",
            "--metrics-bind-address", "127.0.0.1:0",
            # nft: Debian 12's default iptables; a fresh namespace has nothing to detect from.
            "--iptables-backend", "nft",
            "--shutdown-grace", "1s",
            "--cleanup-on-exit",
            *self.extra,
        ]  # fmt: skip
        env = {"PYTHONUNBUFFERED": "1"}
        self.daemon = JsonLogDaemon(
            topology.netns_exec(topo.node, [*self.wrapper, *argv]),
            workdir / "uproxy.log",
            env=env,
            cwd=REPO,
        )
        self.daemon.wait_event("sync_done", timeout=30)
        return Target(topology.SERVICE_VIP)


class UproxyIpvs(Uproxy):
    """uproxy's IPVS mode, measured when both the kernel and uproxy have it.

    IPVS mode records the virtual servers it owns in /run/uproxy, which `ip netns exec` shares
    with the host; a private tmpfs over /run (in a mount namespace of its own, the process
    keeps its pid through the execs) keeps the benchmark's throwaway state off the host."""

    wrapper = (
        "unshare", "--mount", "--propagation", "private",
        "sh", "-c", 'mount -t tmpfs uproxy-bench /run && exec "$@"', "sh",
    )  # fmt: skip

    def __init__(self) -> None:
        super().__init__("uvloop", ["--proxy-mode", "ipvs"], "uproxy-ipvs", "uproxy IPVS")

    def unavailable(self) -> str:
        reasons = []
        if not Path("/proc/net/ip_vs").exists():
            reasons.append("the kernel has no IPVS (/proc/net/ip_vs absent, CONFIG_IP_VS unset)")
        if not _uproxy_has_ipvs():
            reasons.append("uproxy has no IPVS mode yet (no `--proxy-mode ipvs`)")
        return "; ".join(reasons)


class UproxyIptables(Uproxy):
    """uproxy's iptables mode: its NAT rules forward in the kernel, as kube-proxy's default
    mode does. The CPU figures are uproxy's process, which only syncs; the packets' cost is
    the kernel's, as for the kernel DNAT contender."""

    def __init__(self) -> None:
        super().__init__(
            "uvloop", ["--proxy-mode", "iptables"], "uproxy-iptables", "uproxy iptables"
        )


class UproxyNftables(Uproxy):
    """uproxy's nftables mode: the kernel's NAT forwards, through uproxy's own table."""

    def __init__(self) -> None:
        super().__init__("uvloop", ["--mode", "nftables"], "uproxy-nftables", "uproxy nftables")

    def unavailable(self) -> str:
        from uproxy.kernel.netfilter import find_tool

        return "" if find_tool("nft") else "nft not installed (Debian's nftables package)"


def _uproxy_has_ipvs() -> bool:
    out = subprocess.run(
        [sys.executable, "-m", "uproxy", "run", "--help"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=30,
        check=False,
    ).stdout
    return "--proxy-mode" in out and "ipvs" in out


def userspace_workers(workers: int, pin_proxy: str | None = None) -> Uproxy:
    """uproxy userspace on uvloop with --workers N, optionally pinned (`taskset -c CPUS`)."""
    pin = ("taskset", "-c", pin_proxy) if pin_proxy else ()
    suffix = f"-pin{pin_proxy.replace(',', '_')}" if pin_proxy else ""
    return Uproxy(
        "uvloop",
        ["--workers", str(workers)],
        f"uproxy-uvloop-w{workers}{suffix}",
        f"uproxy uvloop {workers}w" + (f" on CPU {pin_proxy}" if pin_proxy else ""),
        wrapper=pin,
    )


def all_contenders(workers: Sequence[int] = (2,), pin_proxy: str | None = None) -> list[Contender]:
    pinned: list[Contender] = []
    if pin_proxy:
        pinned = [userspace_workers(n, pin_proxy) for n in (1, *workers)]
    return [
        Direct(),
        KernelDnat(),
        HAProxy(),
        NginxStream(),
        Uproxy("uvloop"),
        *(userspace_workers(n) for n in workers),
        *pinned,
        Uproxy("asyncio"),
        UproxyIptables(),
        UproxyIpvs(),
        UproxyNftables(),
    ]
