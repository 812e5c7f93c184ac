"""This node's own addresses, read once at start (kube-proxy detects its node IP once too)."""

from __future__ import annotations

import json
import subprocess

import structlog

log = structlog.get_logger(__name__)


def parse_addresses(text: str) -> tuple[str, ...]:
    """The global-scope addresses in `ip -j address show` output, in order."""
    out: list[str] = []
    for link in json.loads(text or "[]"):
        for info in link.get("addr_info", ()):
            local = info.get("local")
            if info.get("scope") == "global" and isinstance(local, str) and local not in out:
                out.append(local)
    return tuple(out)


def node_ips() -> tuple[str, ...]:
    """The node's global addresses; () when they cannot be read (loadBalancerSourceRanges'
    allowFromNode is then off, which only matters for a node calling its own LB VIP)."""
    try:
        proc = subprocess.run(
            ["ip", "-j", "address", "show"], capture_output=True, text=True, timeout=10, check=True
        )
        return parse_addresses(proc.stdout)
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        log.warning("node_ips_unknown", error=str(exc))
        return ()
