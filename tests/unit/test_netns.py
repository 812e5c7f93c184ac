from __future__ import annotations

import os
import subprocess

import pytest

from uproxy import netns


def test_start_time_of_a_live_process_and_of_a_gone_one() -> None:
    assert netns.process_start_time(os.getpid()) is not None
    child = subprocess.Popen(["true"])
    child.wait()
    assert netns.process_start_time(child.pid) is None


def test_names_carry_pid_and_start_time() -> None:
    owner = netns.NamespaceOwner("upxunit-")
    start = netns.process_start_time(os.getpid())
    assert owner.name("node") == f"upxunit-{os.getpid()}-t{start}-node"


def test_stale_means_owner_gone_or_pid_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    owner = netns.NamespaceOwner("upxunit-")
    me, start = os.getpid(), netns.process_start_time(os.getpid())
    names = [
        owner.name("mine"),
        f"upxunit-{me}-t{start + 1 if start is not None else 0}-reused",  # same pid, other start
        "upxunit-999999999-t1-gone",
        f"upxunit-{me}-old-shape",  # an older release's name: not ours to judge
        f"other-{me}-t1-prefix",
    ]
    monkeypatch.setattr(netns, "list_namespaces", lambda: names)
    assert owner.stale() == [names[1], names[2]]
    assert owner.owned() == [names[0]]
