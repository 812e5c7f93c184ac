"""The IPVS suite runs only inside the test VM (tests/vm/run.py boots it); anywhere else every
test here is skipped, with the reason, so the host's pytest run stays green."""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import pytest

from tests.integration import netns

HERE = Path(__file__).resolve().parent
TOOLS = ("ip", "ipvsadm", "socat", "iptables-nft", "iptables-nft-save")


@functools.cache
def vm_skip_reason() -> str | None:
    """Why the IPVS suite cannot run here, or None when it can."""
    if os.environ.get("UPROXY_IN_VM") != "1":
        return (
            "IPVS end-to-end tests run inside the QEMU VM only: python3 tests/vm/run.py "
            "(tests/integration/test_ipvs_vm.py runs it as part of the normal suite)"
        )
    if os.geteuid() != 0:
        return "needs root inside the VM"
    missing = netns.missing_tools(*TOOLS)
    if missing:
        return f"needs {', '.join(missing)} on the host (tests/vm/run.py installs them)"
    if not Path("/proc/net/ip_vs").exists():
        # ipvsadm opens the IPVS netlink family, which makes the kernel load ip_vs on demand.
        subprocess.run(["ipvsadm", "-Ln"], capture_output=True, check=False, timeout=60)
    if not Path("/proc/net/ip_vs").exists():
        return "the VM's kernel has no IPVS (ip_vs did not load)"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    mine = [item for item in items if HERE in item.path.parents]
    if not mine:
        return
    reason = vm_skip_reason()
    if reason is not None:
        for item in mine:
            item.add_marker(pytest.mark.skip(reason=reason))
