"""`uproxy status` as a newcomer reads it, through the real CLI against a real `uproxy run`:
it says when nothing has synced yet, and marks virtual IPs that no portal makes reachable.

No root needed: listeners only (`--no-portals`) on loopback.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.manifests import endpoint_slice, service, write
from tests.uproxy_process import REPO, UproxyProcess, loopback_run_args


@pytest.fixture
def procs() -> Iterator[list[UproxyProcess]]:
    started: list[UproxyProcess] = []
    yield started
    for p in started:
        p.__exit__()


def status(proc: UproxyProcess, *extra: str) -> str:
    address = f"127.0.0.1:{proc.wait_event('metrics_listening')['port']}"
    return subprocess.run(
        [sys.executable, "-m", "uproxy", "status", "--address", address, *extra],
        capture_output=True,
        text=True,
        check=True,
        cwd=REPO,
        timeout=30,
    ).stdout


def test_not_synced_yet_differs_from_no_services(
    tmp_path: Path, procs: list[UproxyProcess]
) -> None:
    # An API server that never answers: the source never delivers, so nothing ever syncs.
    never = UproxyProcess(loopback_run_args(None, "--master", "http://127.0.0.1:9"))
    procs.append(never)
    assert status(never).splitlines() == [
        "not synced yet: the sources' state has not reached the proxy"
    ]
    assert json.loads(status(never, "--json"))["synced"] is False
    # Synced, with an EndpointSlice but no Service: there is nothing to list.
    write(tmp_path / "s.yaml", endpoint_slice("web", [{"port": 80}], ["127.0.0.1"]))
    empty = UproxyProcess(loopback_run_args(tmp_path))
    procs.append(empty)
    empty.wait_event("sync_done")
    assert status(empty).splitlines()[0] == "no service ports"


def test_no_portals_marks_virtual_ips_unreachable(
    tmp_path: Path, procs: list[UproxyProcess]
) -> None:
    write(
        tmp_path / "s.yaml", service("web", [{"name": "http", "port": 80}], cluster_ip="10.96.0.10")
    )
    proc = UproxyProcess(loopback_run_args(tmp_path))
    procs.append(proc)
    proc.wait_event("sync_done")
    header, row, note = status(proc).splitlines()
    assert header.startswith("SERVICE PORT")
    assert row.split()[:3] == ["default/web:http", "TCP", "10.96.0.10:80[no-portal]"]
    assert note.startswith("no portals (--no-portals): the virtual IPs marked [no-portal] are not")
    assert json.loads(status(proc, "--json"))["portals"] is False
