"""Choosing and opening an iptables backend, as kube-proxy's iptables-wrapper does, and the kernel
features the rules depend on."""

from __future__ import annotations

import contextlib
import platform
import re
from pathlib import Path

import structlog

from uproxy.errors import KernelError
from uproxy.kernel.legacy_backend import LegacyNetfilter
from uproxy.kernel.netfilter import (
    OWN_PREFIX,
    BackendChoice,
    BackendName,
    Family,
    Netfilter,
    ToolMissing,
    find_tool,
    run_tool_quietly,
    tool_prefix,
)
from uproxy.kernel.nft_backend import NftNetfilter

log = structlog.get_logger(__name__)


_KUBELET_HINT = re.compile(r"^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY)\b", re.MULTILINE)


def _rule_count(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("-"))


def _iptables_mode() -> BackendName | None:
    """Which backend the host's plain `iptables` command is."""
    version = run_tool_quietly(["iptables", "--version"])
    if "nf_tables" in version:
        return "nft"
    if "legacy" in version:
        return "legacy"
    return None


def detect_backend(choice: BackendChoice = "auto") -> BackendName:
    """The host's iptables mode, decided as kube-proxy's iptables-wrapper does.

    1. The kubelet's hint chains (KUBE-IPTABLES-HINT, KUBE-KUBELET-CANARY) in mangle: the mode the
       node already uses. nft is checked with `-t mangle`; legacy is dumped whole, because
       `iptables-legacy-save -t mangle` would create the legacy mangle table.
    2. Else the backend holding more rules.
    3. Else (both empty) whichever backend the host's `iptables` command is.
    """
    if choice != "auto":
        return choice
    nft_mangle = run_tool_quietly(["iptables-nft-save", "-t", "mangle"]) + run_tool_quietly(
        ["ip6tables-nft-save", "-t", "mangle"]
    )
    if _KUBELET_HINT.search(nft_mangle):
        return "nft"
    legacy = run_tool_quietly(["iptables-legacy-save"]) + run_tool_quietly(
        ["ip6tables-legacy-save"]
    )
    if _KUBELET_HINT.search(legacy):
        return "legacy"
    nft_rules = _rule_count(
        run_tool_quietly(["iptables-nft-save"]) + run_tool_quietly(["ip6tables-nft-save"])
    )
    legacy_rules = _rule_count(legacy)
    if legacy_rules != nft_rules:
        return "legacy" if legacy_rules > nft_rules else "nft"
    mode = _iptables_mode()
    if mode is not None:
        return mode
    if find_tool("iptables-nft-restore"):
        return "nft"
    if find_tool("iptables-legacy-restore"):
        return "legacy"
    raise KernelError("no iptables tools found (install the iptables package)")


def _open(name: BackendName, family: Family) -> Netfilter:
    return NftNetfilter(family) if name == "nft" else LegacyNetfilter(family)


def open_backend(name: BackendName, family: Family = 4) -> Netfilter:
    """The real backend `name` for `family`; KernelError when its tools are missing."""
    prefix = tool_prefix(name, family)
    for tool in (f"{prefix}-save", f"{prefix}-restore"):
        if find_tool(tool) is None:
            raise ToolMissing(f"{tool} not found (install the iptables package)")
    return _open(name, family)


def build_netfilter(choice: BackendChoice = "auto", family: Family = 4) -> Netfilter:
    """Detect (for "auto") and open the backend uproxy runs on; logs the choice."""
    name = detect_backend(choice)
    log.info(
        "iptables_backend",
        backend=name,
        family=family,
        chosen_by="flag" if choice != "auto" else "detected",
    )
    return open_backend(name, family)


def physdev_supported() -> bool:
    """Whether the kernel has the physdev match (registered, or available as a module)."""
    with contextlib.suppress(OSError):
        if "physdev" in Path("/proc/net/ip_tables_matches").read_text().split():
            return True
    if Path("/sys/module/xt_physdev").exists():
        return True
    modules = Path("/lib/modules", platform.release(), "kernel/net/netfilter")
    return any(modules.glob("xt_physdev.ko*")) if modules.is_dir() else False


def other_backend(name: BackendName) -> BackendName:
    return "legacy" if name == "nft" else "nft"


def open_installed(name: BackendName, family: Family = 4) -> Netfilter | None:
    """Backend `name` for `family` if its save tool is installed (for cleanup), else None."""
    if find_tool(f"{tool_prefix(name, family)}-save") is None:
        return None
    return _open(name, family)


def open_if_holding_own_rules(name: BackendName, family: Family = 4) -> list[Netfilter]:
    """Backend `name` when it holds rules of uproxy's (an earlier run on it), else nothing.

    Looks before opening: the legacy backend loads python-iptables (about 20 MB resident for the
    life of the process), which an nft host with nothing of uproxy's in legacy never needs.
    """
    prefix = tool_prefix(name, family)
    if find_tool(f"{prefix}-save") is None or find_tool(f"{prefix}-restore") is None:
        return []
    if OWN_PREFIX not in run_tool_quietly([f"{prefix}-save"]):
        return []
    return [_open(name, family)]


_VERSION = re.compile(r"v(\d+)\.(\d+)\.(\d+)")


def random_fully_supported(name: BackendName) -> bool:
    """Whether MASQUERADE can take --random-fully: iptables 1.6.2 or later, as kube-proxy checks
    (every kernel iptables >= 1.6.2 runs on has NF_NAT_RANGE_PROTO_RANDOM_FULLY)."""
    match = _VERSION.search(run_tool_quietly([f"iptables-{name}", "--version"]))
    if match is None:
        return False
    return tuple(int(part) for part in match.groups()) >= (1, 6, 2)
