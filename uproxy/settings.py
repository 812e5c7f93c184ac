"""One frozen Settings object: the CLI builds it, everything else only reads it."""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from uproxy.errors import SettingsError

EventLoopName = Literal["uvloop", "asyncio"]
LogFormat = Literal["auto", "console", "json"]
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
    min_sync_period: float = 1.0
    sync_period: float = 30.0
    udp_timeout: float = 0.25
    udp_max_sessions: int = 10000
    shutdown_grace: float = 5.0
    event_loop: EventLoopName = "uvloop"
    log_level: str = "info"
    log_format: LogFormat = "auto"
    # Netfilter portals (`--no-portals` runs the listeners only, for sidecars and tests).
    portals: bool = True
    iptables_backend: IptablesBackend = "auto"
    nodeport_addresses: tuple[str, ...] = ()
    cleanup_on_exit: bool = False
    dns_refresh_period: float = 10.0
    # kube-proxy's ports; None disables the server.
    # IPVS mode.
    ipvs_scheduler: str = "rr"
    ipvs_graceful_period: float = 15.0
    ipvs_strict_arp: bool = False
    # The kernel NAT modes (iptables, nftables): kube-proxy's --cluster-cidr, --masquerade-all.
    cluster_cidr: str | None = None  # IPv4 pod CIDR: ClusterIP traffic from outside is masqueraded
    masquerade_all: bool = False
    healthz_bind_address: tuple[str, int] | None = ("0.0.0.0", 10256)
    metrics_bind_address: tuple[str, int] | None = ("127.0.0.1", 10249)

    @property
    def uses_kubernetes_api(self) -> bool:
        return self.kubeconfig is not None or self.master is not None or self.in_cluster

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
            try:
                network = ipaddress.ip_network(self.cluster_cidr, strict=False)
            except ValueError:
                raise SettingsError(
                    f"--cluster-cidr: {self.cluster_cidr!r} is not a CIDR "
                    "(for example 10.244.0.0/16)"
                ) from None
            if network.version != 4:
                raise SettingsError(
                    f"--cluster-cidr: {self.cluster_cidr!r} is IPv6; the kernel modes are IPv4"
                )
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
