"""Start-up checks that turn a newcomer's mistake into one clear error before anything starts:
missing privileges (instead of a raw iptables error) and a --bind-address that is not local
(instead of a listener retried every second)."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from pathlib import Path

from uproxy.errors import UproxyError

CAP_NET_ADMIN = 12  # linux/capability.h
PRIVILEGE = "root or CAP_NET_ADMIN (containers: --cap-add NET_ADMIN --cap-add NET_RAW)"
LISTENERS_ONLY = "`uproxy run --no-portals --bind-address 127.0.0.1` runs the listeners without it"


class PrivilegeError(UproxyError):
    """uproxy was asked to change kernel state it is not allowed to change."""


def has_net_admin(status: Path = Path("/proc/self/status")) -> bool:
    """Whether this process holds CAP_NET_ADMIN in its effective set (root usually does)."""
    try:
        text = status.read_text()
    except OSError:
        return os.geteuid() == 0
    for line in text.splitlines():
        if line.startswith("CapEff:"):
            return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    return os.geteuid() == 0


def require_net_admin(
    what: str, consequence: str, *, status: Path = Path("/proc/self/status")
) -> None:
    """PrivilegeError saying `what` needs the privilege this process lacks, then `consequence`
    (what happened, or how to do without)."""
    if not has_net_admin(status):
        raise PrivilegeError(
            f"{what}: {PRIVILEGE} is needed, and this process (uid {os.geteuid()}) has neither; "
            f"{consequence}"
        )


def check_bind_address(address: str) -> None:
    """UproxyError when no socket can bind `address` here (not an address of this host or
    network namespace); the wildcard addresses always pass."""
    ip = ipaddress.ip_address(address)
    if ip.is_unspecified:
        return
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((address, 0))
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL:
                raise UproxyError(f"--bind-address {address}: cannot bind: {exc}") from None
            raise UproxyError(
                f"--bind-address {address} is not an address of this host (or of this network "
                "namespace); use one that `ip -br address` lists, or 0.0.0.0 for all of them"
            ) from None
