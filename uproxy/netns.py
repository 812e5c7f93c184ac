"""Network namespaces owned by one process, for the demo, the benchmark and the tests.

Every name is `<prefix><pid>-t<start>-<suffix>`: the owner's pid and its start time (in clock
ticks since boot, from /proc/<pid>/stat). A namespace whose owner is gone, killed outright
before it could clean up, is recognisable as stale even after its pid was reused by another
process, because that one started at a different time. Each user keeps its own prefix, and a
sweep only ever looks at names with its own prefix, so concurrent users never touch each
other's namespaces; names of other shapes (older releases) are left alone too.

Veth pairs are created inside the namespaces (`ip -n A link add ... peer ... netns B`), so no
interface ever appears in the root namespace; nothing here touches the root namespace's
links, routes, firewall or sysctls.

All of this is synchronous: call it from plain code or a worker thread, not from an event loop.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from pyroute2 import netns as _pyroute2_netns


class NetnsError(RuntimeError):
    """An `ip` command failed; the message carries its stderr."""


def ip(*argv: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    """Run `ip ARGV...` and capture its output; NetnsError on failure when `check`."""
    proc = subprocess.run(
        ["ip", *argv], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and proc.returncode != 0:
        detail = proc.stderr.strip() or proc.stdout.strip()
        raise NetnsError(f"ip {' '.join(argv)}: exit {proc.returncode}: {detail}")
    return proc


def exec_argv(name: str, argv: Sequence[str]) -> list[str]:
    """`argv`, to be run inside namespace `name`."""
    return ["ip", "netns", "exec", name, *argv]


def list_namespaces() -> list[str]:
    return sorted(_pyroute2_netns.listnetns())


def create(name: str) -> None:
    """A new namespace with `lo` up."""
    ip("netns", "add", name)
    ip("-n", name, "link", "set", "lo", "up")


def add_veth(a: str, a_dev: str, b: str, b_dev: str) -> None:
    """A veth pair born inside namespace `a` (`a_dev`) with its peer moved to `b` (`b_dev`)."""
    ip("-n", a, "link", "add", a_dev, "type", "veth", "peer", "name", b_dev, "netns", b)


def process_start_time(pid: int) -> int | None:
    """When `pid` started (clock ticks since boot), or None if it is gone or a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # Fields after the command name, which is in parentheses and may itself contain spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] == "Z":
        return None
    return int(fields[19])  # field 22 of proc(5); fields[0] is field 3


def processes_in(name: str) -> list[int]:
    return [int(pid) for pid in ip("netns", "pids", name, check=False).stdout.split()]


def kill_processes(name: str, *, grace: float = 2.0) -> None:
    """End everything still running inside `name`: SIGTERM, then SIGKILL after `grace` seconds.

    A namespace with processes in it outlives `ip netns delete`. Only namespaces of our own are
    ever passed here, so whatever runs inside was started by us.
    """
    pids = processes_in(name)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if process_start_time(p) is not None]
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def delete(name: str, *, grace: float = 2.0) -> None:
    """Kill whatever still runs inside, then delete it (its veths and rules go with it)."""
    kill_processes(name, grace=grace)
    ip("netns", "delete", name, check=False)


class NamespaceOwner:
    """The namespaces one process creates under `prefix`, and the stale ones of dead owners."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        pid = os.getpid()
        self.run_id = f"{prefix}{pid}-t{process_start_time(pid)}"
        self._stale_name = re.compile(rf"{re.escape(prefix)}(\d+)-t(\d+)-.+")

    def name(self, suffix: str) -> str:
        return f"{self.run_id}-{suffix}"

    def create(self, suffix: str) -> str:
        name = self.name(suffix)
        create(name)
        return name

    def owned(self) -> list[str]:
        """Every namespace of this owner that exists now."""
        return [n for n in list_namespaces() if n.startswith(f"{self.run_id}-")]

    def delete_owned(self, *, grace: float = 2.0) -> list[str]:
        removed = self.owned()
        for name in removed:
            delete(name, grace=grace)
        return removed

    def stale(self) -> list[str]:
        """Namespaces under our prefix whose owner is no longer running."""
        found = []
        for name in list_namespaces():
            match = self._stale_name.fullmatch(name)
            if match and process_start_time(int(match.group(1))) != int(match.group(2)):
                found.append(name)
        return found

    def sweep_stale(self, *, grace: float = 2.0) -> list[str]:
        """Delete the namespaces of owners that died without cleaning up; their names."""
        removed = self.stale()
        for name in removed:
            delete(name, grace=grace)
        return removed
