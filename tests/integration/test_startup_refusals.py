"""What uproxy refuses at start, through the real CLI: a second instance in one network
namespace (and `uproxy cleanup` beside a running one), missing privileges, and a --bind-address
that is not local. Each refusal is one `fatal` (or `cleanup_failed`) event and exit code 1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.netns import Namespace, Network
from tests.uproxy_process import REPO, UproxyProcess, loopback_run_args

EXAMPLES = REPO / "examples"
AS_NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")
RUN = (
    "run",
    "--config",
    str(EXAMPLES),
    "--log-format",
    "json",
    "--healthz-bind-address",
    "127.0.0.1:0",
    "--metrics-bind-address",
    "127.0.0.1:0",
)


def events(proc: subprocess.CompletedProcess[str], name: str) -> list[dict[str, Any]]:
    found = []
    for line in (proc.stdout + proc.stderr).splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict) and event.get("event") == name:
            found.append(event)
    return found


def uproxy(
    ns: Namespace, *args: str, prefix: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return ns.run(*prefix, sys.executable, "-m", "uproxy", *args, check=False, timeout=60)


@pytest.mark.root
def test_a_second_instance_and_cleanup_refuse_while_one_runs_and_not_after_it_died(
    net: Network,
) -> None:
    node = net.namespace("node")
    first = node.start_python("-m", "uproxy", *RUN)
    first.wait_event("sync_done", timeout=30)

    second = uproxy(node, *RUN, "--healthz-bind-address", "", "--metrics-bind-address", "")
    assert second.returncode == 1, second.stdout + second.stderr
    [fatal] = events(second, "fatal")
    assert fatal["error_type"] == "InstanceLocked"
    assert (
        f"another uproxy (pid {first.pid}) is running in this network namespace" in (fatal["error"])
    )

    cleanup = uproxy(node, "cleanup", "--log-format", "json")
    assert cleanup.returncode == 1, cleanup.stdout + cleanup.stderr
    [failed] = events(cleanup, "cleanup_failed")
    assert f"pid {first.pid}" in failed["error"] and "live rules" in failed["error"]
    assert "UPROXY-PORTALS" in node.run("iptables-save", "-t", "nat").stdout  # untouched

    first.stop(signal.SIGKILL)  # no chance to clean up: the kernel drops the lock
    again = node.start_python("-m", "uproxy", *RUN)
    again.wait_event("sync_done", timeout=30)
    assert again.stop(signal.SIGTERM) == 0
    cleanup = uproxy(node, "cleanup", "--log-format", "json")
    assert cleanup.returncode == 0, cleanup.stdout + cleanup.stderr


@pytest.mark.root
def test_instances_in_different_namespaces_do_not_conflict(net: Network) -> None:
    one, two = net.namespace("one"), net.namespace("two")
    first = one.start_python("-m", "uproxy", *RUN)
    second = two.start_python("-m", "uproxy", *RUN)
    first.wait_event("sync_done", timeout=30)
    second.wait_event("sync_done", timeout=30)
    assert first.stop(signal.SIGTERM) == 0 and second.stop(signal.SIGTERM) == 0
    for ns in (one, two):
        assert uproxy(ns, "cleanup", "--log-format", "json").returncode == 0


@pytest.mark.root
def test_an_explicit_lock_file_is_shared_by_whoever_names_it(net: Network, tmp_path: Path) -> None:
    one, two = net.namespace("one"), net.namespace("two")
    lock = str(tmp_path / "uproxy.lock")
    first = one.start_python("-m", "uproxy", *RUN, "--no-portals", "--lock-file", lock)
    first.wait_event("sync_done", timeout=30)
    refused = uproxy(two, *RUN, "--no-portals", "--lock-file", lock)
    assert refused.returncode == 1
    assert f"pid {first.pid}" in events(refused, "fatal")[0]["error"]
    assert first.stop(signal.SIGTERM) == 0


@pytest.mark.root
def test_without_privileges_portals_and_cleanup_say_what_is_needed(net: Network) -> None:
    node = net.namespace("node")
    for args, what in (((), "portals (the default)"), (("--mode", "iptables"), "--mode iptables")):
        refused = uproxy(node, *RUN, *args, prefix=AS_NOBODY)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        [fatal] = events(refused, "fatal")
        assert fatal["error_type"] == "PrivilegeError"
        assert fatal["error"].startswith(f"{what}: root or CAP_NET_ADMIN")
        assert "--no-portals" in fatal["error"]
        assert not events(refused, "leftovers_cleanup_failed")  # nothing was tried

    cleanup = uproxy(node, "cleanup", "--log-format", "json", prefix=AS_NOBODY)
    assert cleanup.returncode == 1, cleanup.stdout + cleanup.stderr
    [failed] = events(cleanup, "cleanup_failed")
    assert "root or CAP_NET_ADMIN" in failed["error"] and "nothing was removed" in failed["error"]

    # What the message suggests works as written.
    listeners = node.start(*AS_NOBODY, sys.executable, "-m", "uproxy", *RUN, "--no-portals")
    listeners.wait_event("listener_started", service="default/web:http", timeout=30)
    listeners.wait_event("sync_done")
    assert listeners.stop(signal.SIGTERM) == 0


def test_a_bind_address_that_is_not_local_is_a_start_up_error() -> None:
    args = loopback_run_args(EXAMPLES, "--bind-address", "192.0.2.1")
    with UproxyProcess(args) as proc:
        fatal = proc.wait_event("fatal", timeout=30)
        assert proc.proc.wait(timeout=30) == 1
    assert fatal["error"].startswith("--bind-address 192.0.2.1 is not an address of this host")
    assert proc.count("listener_failed") == 0
