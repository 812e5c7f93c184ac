"""IPVS mode (in progress): the capability check comes first so that the mode fails clearly."""

from __future__ import annotations

from pathlib import Path

from uproxy.errors import KernelError
from uproxy.proxier.base import Proxier
from uproxy.settings import Settings


def ipvs_available(proc: Path = Path("/proc/net/ip_vs")) -> bool:
    return proc.exists()


def build_ipvs_proxier(settings: Settings) -> Proxier:
    if not ipvs_available():
        raise KernelError(
            "IPVS mode needs the kernel's IP_VS support, which this kernel does not have "
            "(no /proc/net/ip_vs; try 'modprobe ip_vs'); run with --mode userspace instead"
        )
    raise KernelError("IPVS mode is not available in this build yet; use --mode userspace")
