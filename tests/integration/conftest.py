"""Integration fixtures: tests marked `root` skip, with the reason, where they cannot run."""

from __future__ import annotations

import functools
import os
import subprocess
from collections.abc import Iterator

import pytest

from tests.integration import netns


@functools.cache
def root_skip_reason() -> str | None:
    """Why tests needing root / CAP_NET_ADMIN cannot run here, or None when they can."""
    if os.geteuid() != 0:
        return "needs root (CAP_NET_ADMIN) for network namespaces and netfilter"
    missing = netns.missing_tools("ip")
    if missing:
        return "needs iproute2's `ip` (apt-get install iproute2)"
    probe = f"{netns.PREFIX}probe{os.getpid()}"
    try:
        added = netns.host_run("ip", "netns", "add", probe, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot run `ip netns add`: {exc}"
    if added.returncode != 0:
        return f"cannot create network namespaces (CAP_SYS_ADMIN/CAP_NET_ADMIN?): {added.stderr}"
    netns.host_run("ip", "netns", "del", probe, check=False)
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root_items = [item for item in items if item.get_closest_marker("root") is not None]
    if not root_items:
        return
    reason = root_skip_reason()
    if reason is not None:
        for item in root_items:
            item.add_marker(pytest.mark.skip(reason=reason))


def require_tools(*tools: str) -> None:
    """Skip the calling test when a command it drives is not installed."""
    missing = netns.missing_tools(*tools)
    if missing:
        pytest.skip(f"needs {', '.join(missing)} (see tests/run.sh for the Debian packages)")


@pytest.fixture
def net() -> Iterator[netns.Network]:
    """A fresh set of namespaces for one test, torn down whatever happens."""
    with netns.network() as network:
        yield network


@pytest.fixture(scope="session", autouse=True)
def _sweep_namespaces() -> Iterator[None]:
    """Belt and braces: nothing of this run's survives the session."""
    yield
    if os.geteuid() == 0:
        netns.sweep()
