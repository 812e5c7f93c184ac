"""`uproxy demo`: the no-Docker demo, run as a user runs it, and interrupted as users do."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration.conftest import require_tools
from tests.integration.netns import Process, host_run

pytestmark = pytest.mark.root

BACKENDS = {"web-a", "web-b", "web-c"}
ROLE = re.compile(r"-m uproxy demo-role (http|dns|client) ")


def demo_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "uproxy", "demo", *args]


def namespaces_of(pid: int) -> list[str]:
    listing = host_run("ip", "netns", "list", check=False).stdout
    return [line.split()[0] for line in listing.splitlines() if f"uproxy-demo-{pid}-" in line]


def demo_processes() -> set[int]:
    """Processes the demo starts: its roles and its uproxy (which reads a uproxy-demo- dir)."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if ROLE.search(cmdline) or "/uproxy-demo-" in cmdline:
            found.add(int(entry.name))
    return found


def root_uproxy_rules() -> list[str]:
    lines = []
    for tool in ("iptables-legacy-save", "iptables-nft-save"):
        out = host_run(tool, check=False).stdout
        lines += [line for line in out.splitlines() if "UPROXY" in line]
    return lines


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tools("ip", "iptables-legacy-save", "iptables-nft-save")


def test_demo_shows_every_backend_affinity_and_a_dns_answer() -> None:
    before = demo_processes()
    demo = subprocess.Popen(
        demo_argv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        output, _ = demo.communicate(timeout=120)
    finally:
        demo.kill()
    assert demo.returncode == 0, output

    web = re.search(r"^web\s+10\.96\.0\.10:80/TCP\s+round robin\s+(.+)$", output, re.M)
    sticky = re.search(r"^sticky\s+10\.96\.0\.20:8080/TCP\s+ClientIP\s+(.+)$", output, re.M)
    dns = re.search(r"^dns\s+10\.96\.0\.53:53/UDP\s+(.+)$", output, re.M)
    assert web and sticky and dns, output
    assert set(web.group(1).split()) == BACKENDS, output
    answers = sticky.group(1).split()
    assert len(answers) == 6 and len(set(answers)) == 1 and answers[0] in BACKENDS, output
    assert dns.group(1).split() == ["demo.uproxy.test", "A", "192.0.2.53"], output
    assert "torn down: 6 namespaces removed" in output

    assert namespaces_of(demo.pid) == []
    assert demo_processes() <= before
    assert root_uproxy_rules() == []


@pytest.mark.parametrize(
    ("when", "sig", "expected_code"),
    [
        ("namespace", signal.SIGINT, 130),  # while the namespaces are being built
        ("uproxy", signal.SIGINT, 130),  # while uproxy starts
        ("uproxy", signal.SIGTERM, 143),
        ("running", signal.SIGINT, 0),  # --keep-running: Ctrl-C is the way out
    ],
)
def test_interrupted_demo_leaves_nothing_behind(
    when: str, sig: signal.Signals, expected_code: int
) -> None:
    before = demo_processes()
    demo = Process(demo_argv("--keep-running"))
    try:
        if when == "namespace":
            deadline = time.monotonic() + 20
            while not namespaces_of(demo.pid):
                assert time.monotonic() < deadline and demo.proc.poll() is None, demo.tail()
                time.sleep(0.005)
        elif when == "uproxy":
            demo.wait_line(r"^starting uproxy", timeout=30)
        else:
            demo.wait_line(r"^running until Ctrl-C", timeout=60)
        # To the demo alone, as a terminal's Ctrl-C reaches it: its children run in sessions of
        # their own and are stopped by the demo.
        os.kill(demo.pid, sig)
        code = demo.proc.wait(timeout=60)
    finally:
        demo.stop(signal.SIGKILL, timeout=5)
    assert code == expected_code, demo.tail()
    assert "torn down:" in "\n".join(demo.lines), demo.tail()
    assert namespaces_of(demo.pid) == [], demo.tail()
    assert demo_processes() <= before, demo.tail()
    assert root_uproxy_rules() == []


def test_keep_running_hints_work_as_typed() -> None:
    """Every command the demo suggests works when pasted into a shell that has no venv on PATH,
    with the demo started as the README starts it (the venv's `uproxy` script)."""
    uproxy = Path(sys.executable).with_name("uproxy")
    demo = Process([str(uproxy), "demo", "--keep-running"])
    try:
        demo.wait_line(r"^running until Ctrl-C", timeout=60)
        demo.wait_line(r"^  ip netns exec \S+ .*status$", timeout=10)
        hints = [line.strip() for line in demo.lines if line.startswith("  ip netns exec ")]
        assert len(hints) == 4, demo.tail()
        bare = {
            **os.environ,
            "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        }
        bare.pop("VIRTUAL_ENV", None)
        for hint in hints:
            done = subprocess.run(
                ["bash", "-c", hint], capture_output=True, text=True, env=bare, timeout=30
            )
            assert done.returncode == 0 and done.stdout.strip(), (hint, done.stderr)
        assert done.stdout.startswith("SERVICE PORT"), done.stdout  # the last: uproxy status
        os.kill(demo.pid, signal.SIGINT)
        assert demo.proc.wait(timeout=60) == 0, demo.tail()
    finally:
        demo.stop(signal.SIGKILL, timeout=5)
    assert namespaces_of(demo.pid) == [], demo.tail()
