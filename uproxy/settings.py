"""One frozen Settings object: the CLI builds it, everything else only reads it."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from uproxy.dataplane.tcp_options import TcpOptions
from uproxy.errors import SettingsError

EventLoopName = Literal["uvloop", "asyncio"]
LogFormat = Literal["auto", "console", "json"]
FqdnFamilies = Literal["service", "IPv4", "IPv6", "both"]
IptablesBackend = Literal["auto", "legacy", "nft"]
ProxyMode = Literal["userspace", "ipvs", "iptables", "nftables"]

_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_SECONDS = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}


def parse_duration(text: str) -> float:
    """Parse a Go-style duration as kube-proxy's flags take them ("250ms", "1m30s"); seconds.

    A bare number is taken as seconds for convenience.
    """
    text = text.strip()
    try:
        return float(text)
    except ValueError:
        pass
    pos = 0
    total = 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            break
        total += float(match.group(1)) * _UNIT_SECONDS[match.group(2)]
        pos = match.end()
    if pos != len(text) or not text:
        raise SettingsError(f"invalid duration {text!r} (expected for example 250ms, 1s, 1m30s)")
    return total


def parse_port_range(text: str) -> tuple[int, int] | None:
    """kube-proxy's --proxy-port-range: "" (kernel-chosen), "30000-30100", "30000+100", "30000"."""
    text = text.strip()
    if not text:
        return None
    try:
        if "+" in text:
            base, extra = text.split("+", 1)
            low, high = int(base), int(base) + int(extra)
        elif "-" in text:
            lo_text, hi_text = text.split("-", 1)
            low, high = int(lo_text), int(hi_text)
        else:
            low = high = int(text)
    except ValueError:
        raise SettingsError(
            f"invalid port range {text!r} (expected LOW-HIGH or BASE+SIZE)"
        ) from None
    if not (1 <= low <= high <= 65535):
        raise SettingsError(
            f"invalid port range {text!r}: ports must satisfy 1 <= low <= high <= 65535"
        )
    return (low, high)


def parse_workers(text: str, usable_cpus: int) -> int:
    """--workers: a count, or "auto" for the CPUs this process may run on."""
    text = text.strip()
    if text == "auto":
        return max(1, usable_cpus)
    try:
        count = int(text)
    except ValueError:
        raise SettingsError(f"--workers: {text!r} is not a number or 'auto'") from None
    if count < 1:
        raise SettingsError(f"--workers: {count} must be at least 1")
    return count


def parse_bind_address(text: str, flag: str) -> tuple[str, int] | None:
    """kube-proxy's HOST:PORT (IPv6 as [::1]:PORT); "" disables the server."""
    text = text.strip()
    if not text:
        return None
    host, sep, port_text = text.rpartition(":")
    host = host.strip("[]")
    try:
        if not sep:
            raise ValueError
        ipaddress.ip_address(host)
        port = int(port_text)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise SettingsError(
            f"{flag}: {text!r} is not IP:PORT (for example 0.0.0.0:10256)"
        ) from None
    return host, port


@dataclass(frozen=True, slots=True)
class Settings:
    config_paths: tuple[Path, ...] = ()
    # The Kubernetes API source: any of these enables it.
    kubeconfig: Path | None = None
    kube_context: str | None = None
    master: str | None = None
    in_cluster: bool = False
    mode: ProxyMode = "userspace"
    bind_address: str = "0.0.0.0"
    proxy_port_range: tuple[int, int] | None = None
    hostname: str = ""
    # This node's topology zone when given by flag; None: from this node's Node object.
    node_zone: str | None = None
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    udp_timeout: float = 0.25
    udp_max_sessions: int = 10000
    shutdown_grace: float = 5.0
    # The userspace TCP data plane: keepalive on both legs, idle timeout, linger on close.
    tcp_keepalive: bool = True
    tcp_keepalive_idle: float = 15.0
    tcp_keepalive_interval: float = 15.0
    tcp_keepalive_count: int = 9
    tcp_idle_timeout: float | None = None  # None: connections may stay idle for ever
    tcp_linger_timeout: float = 30.0
    event_loop: EventLoopName = "uvloop"
    log_level: str = "info"
    log_format: LogFormat = "auto"
    # Netfilter portals (`--no-portals` runs the listeners only, for sidecars and tests).
    portals: bool = True
    iptables_backend: IptablesBackend = "auto"
    nodeport_addresses: tuple[str, ...] = ()
    cleanup_on_exit: bool = False
    dns_refresh_period: float = 10.0
    # Which families FQDN endpoints resolve to: the Service's own (its virtual IPs' families, or
    # both when it has none), or one or both regardless.
    fqdn_families: FqdnFamilies = "service"
    # kube-proxy's ports; None disables the server.
    # IPVS mode.
    ipvs_scheduler: str = "rr"
    ipvs_graceful_period: float = 15.0
    ipvs_strict_arp: bool = False
    # The kernel NAT modes (iptables, nftables): kube-proxy's --cluster-cidr, --masquerade-all.
    # The pods' CIDR, one per family (comma-separated, as kube-proxy's): ClusterIP traffic from
    # outside it is masqueraded. Read it per family with `cluster_cidr_of`.
    cluster_cidr: str | None = None
    masquerade_all: bool = False
    # Forwarding processes of the userspace mode; 1: the main process forwards, as ever.
    workers: int = 1
    healthz_bind_address: tuple[str, int] | None = ("0.0.0.0", 10256)
    metrics_bind_address: tuple[str, int] | None = ("127.0.0.1", 10249)
    # One instance per network namespace (uproxy/instance_lock.py); None: the namespace's own
    # file under /run/uproxy, taken only when this instance changes kernel state.
    lock_file: Path | None = None

    @property
    def changes_kernel_state(self) -> bool:
        """False only for a listeners-only sidecar (`--no-portals` in userspace mode)."""
        return self.mode != "userspace" or self.portals

    @property
    def uses_kubernetes_api(self) -> bool:
        return self.kubeconfig is not None or self.master is not None or self.in_cluster

    def cluster_cidr_of(self, family: int) -> str | None:
        """The --cluster-cidr of one IP family (4 or 6), normalised; None when not given."""
        for network in self._cluster_cidrs():
            if network.version == family:
                return str(network)
        return None

    def _cluster_cidrs(self) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
        """kube-proxy's --cluster-cidr: one CIDR, or a comma-separated one per family."""
        if self.cluster_cidr is None:
            return []
        networks = []
        for part in self.cluster_cidr.split(","):
            try:
                networks.append(ipaddress.ip_network(part.strip(), strict=False))
            except ValueError:
                raise SettingsError(
                    f"--cluster-cidr: {part.strip()!r} is not a CIDR "
                    "(for example 10.244.0.0/16, or 10.244.0.0/16,fd00:10:244::/56 for both "
                    "IP families)"
                ) from None
        if len(networks) > 2 or len({n.version for n in networks}) != len(networks):
            raise SettingsError(
                f"--cluster-cidr: {self.cluster_cidr!r}: at most one CIDR per IP family "
                "(for example 10.244.0.0/16,fd00:10:244::/56)"
            )
        return networks

    def tcp_options(self) -> TcpOptions:
        """The data plane's TCP socket options, for the listeners of every worker."""
        return TcpOptions(
            keepalive=self.tcp_keepalive,
            keepalive_idle=self.tcp_keepalive_idle,
            keepalive_interval=self.tcp_keepalive_interval,
            keepalive_count=self.tcp_keepalive_count,
            idle_timeout=self.tcp_idle_timeout,
            linger_timeout=self.tcp_linger_timeout,
        )

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_address(self.bind_address)
        except ValueError:
            raise SettingsError(
                f"--bind-address: {self.bind_address!r} is not an IP address"
            ) from None
        for cidr in self.nodeport_addresses:
            try:
                ipaddress.ip_network(cidr, strict=False)
            except ValueError:
                raise SettingsError(f"--nodeport-addresses: {cidr!r} is not a CIDR") from None
        if self.cluster_cidr is not None:
            self._cluster_cidrs()  # refuses what is not one CIDR per family
        if self.min_sync_period < 0:
            raise SettingsError("--min-sync-period must not be negative")
        if self.sync_period <= 0:
            raise SettingsError("--sync-period must be positive")
        if self.udp_timeout <= 0:
            raise SettingsError("--udp-timeout must be positive")
        if self.udp_max_sessions < 1:
            raise SettingsError("--udp-max-sessions must be at least 1")
        if self.shutdown_grace < 0:
            raise SettingsError("--shutdown-grace must not be negative")
        if self.workers < 1:
            raise SettingsError("--workers must be at least 1")
        if self.workers > 1 and self.mode != "userspace":
            raise SettingsError(
                f"--workers {self.workers}: only the userspace mode has forwarding workers "
                f"(in {self.mode} mode the kernel forwards); use --workers 1"
            )
        # The kernel's limits: TCP_KEEPIDLE and TCP_KEEPINTVL 1..32767 s, TCP_KEEPCNT 1..127.
        for flag, value in (
            ("--tcp-keepalive-idle", self.tcp_keepalive_idle),
            ("--tcp-keepalive-interval", self.tcp_keepalive_interval),
        ):
            if not 0 < value <= 32767:
                raise SettingsError(f"{flag} must be between 1s and 32767s (got {value:g}s)")
        if not 1 <= self.tcp_keepalive_count <= 127:
            raise SettingsError("--tcp-keepalive-count must be between 1 and 127")
        if self.tcp_idle_timeout is not None and self.tcp_idle_timeout <= 0:
            raise SettingsError("--tcp-idle-timeout must be positive (0 on the command line: off)")
        if self.tcp_linger_timeout < 0:
            raise SettingsError("--tcp-linger-timeout must not be negative")
