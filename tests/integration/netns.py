"""Network namespaces for tests: create, wire, run things inside, and always tear down.

    with network() as net:
        client, node = net.namespace("client"), net.namespace("node")
        net.link(client, "10.10.0.2/24", node, "10.10.0.1/24")
        client.route("default", via="10.10.0.1")
        server = node.start("socat", "TCP-LISTEN:80,fork", "SYSTEM:echo hi")
        print(client.run("socat", "-", "TCP:10.10.0.1:80").stdout)

Everything happens inside namespaces this module creates (with unique names, `lo` up, made by
uproxy/netns.py like the demo's and the benchmark's): the root namespace's links, routes and
firewall are never touched. Leaving the `with` block, by success or failure, stops every process
started here and deletes every namespace (their veths go with them). `sweep()` removes what this
run left behind, and with `all_runs` also the namespaces of test runs that were killed.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from uproxy import netns as core

REPO = Path(__file__).resolve().parents[2]
PREFIX = "upxt"  # every namespace this harness creates starts with this
_OWNER = core.NamespaceOwner(PREFIX)
_SEQ = itertools.count(1)


def _check(proc: subprocess.CompletedProcess[str], argv: Sequence[str]) -> None:
    if proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}"
        )


def host_run(
    *argv: str, check: bool = True, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run a command in the namespace the tests run in (only ever `ip netns` bookkeeping)."""
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if check:
        _check(proc, argv)
    return proc


def missing_tools(*tools: str) -> list[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return [t for t in tools if shutil.which(t, path=path) is None]


_UDP_ANSWERER = r"""
import socket, sys
host, port, answer = sys.argv[1], int(sys.argv[2]), sys.argv[3]
family = socket.AF_INET6 if ":" in host else socket.AF_INET
sock = socket.socket(family, socket.SOCK_DGRAM)
sock.bind((host, port))
while True:
    data, peer = sock.recvfrom(65535)
    sock.sendto((answer.replace("{peer}", peer[0]) + "\n").encode(), peer)
"""


class Process:
    """A process whose output lines (stdout and stderr merged) are collected; JSON lines are
    also parsed as events, so tests can wait for `{"event": "listener_started", ...}`."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdin: bool = False,
    ) -> None:
        self.argv = list(argv)
        self.proc = subprocess.Popen(
            self.argv,
            stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd or REPO,
            env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})},
            start_new_session=True,  # its own process group: stop() reaches its children too
        )
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._new: queue.Queue[None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    self.events.append(event)
            self._new.put(None)
        self._new.put(None)

    def send(self, line: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(line.rstrip("\n") + "\n")
        self.proc.stdin.flush()

    def send_json(self, obj: Any) -> None:
        self.send(json.dumps(obj))

    def tail(self, n: int = 40) -> str:
        return "\n".join(self.lines[-n:])

    def _wait(self, found: Callable[[], Any], what: str, timeout: float) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = found()
            if result is not None:
                return result
            remaining = deadline - time.monotonic()
            exited = self.proc.poll() is not None and not self._reader.is_alive()
            if remaining <= 0 or exited:
                raise AssertionError(
                    f"{what} not seen within {timeout}s from {' '.join(self.argv[:6])} "
                    f"(exit={self.proc.poll()}); output tail:\n{self.tail()}"
                )
            with contextlib.suppress(queue.Empty):
                self._new.get(timeout=min(remaining, 0.1))

    def wait_event(
        self, name: str, timeout: float = 15.0, *, after: int = 0, **fields: Any
    ) -> dict[str, Any]:
        """The first JSON event from index `after` on named `name` whose fields match."""

        def found() -> dict[str, Any] | None:
            for event in self.events[after:]:
                if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                    return event
            return None

        result: dict[str, Any] = self._wait(found, f"event {name} {fields}", timeout)
        return result

    def wait_any(
        self, names: Sequence[str], timeout: float = 15.0, *, after: int = 0
    ) -> dict[str, Any]:
        """The first JSON event from index `after` on whose name is one of `names`."""

        def found() -> dict[str, Any] | None:
            return next((e for e in self.events[after:] if e.get("event") in names), None)

        result: dict[str, Any] = self._wait(found, f"one of the events {list(names)}", timeout)
        return result

    def wait_line(self, pattern: str, timeout: float = 15.0) -> str:
        regex = re.compile(pattern)
        result: str = self._wait(
            lambda: next((line for line in self.lines if regex.search(line)), None),
            f"a line matching {pattern!r}",
            timeout,
        )
        return result

    def send_signal(self, sig: int) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int:
        """Signal the process group and wait; SIGKILL if it does not exit in time."""
        self.send_signal(sig)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.send_signal(signal.SIGKILL)
            code = self.proc.wait(timeout=10)
        self._reader.join(timeout=5)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not self._reader.is_alive():
                with contextlib.suppress(OSError):
                    pipe.close()
        return code


class Namespace:
    def __init__(self, name: str) -> None:
        self.name = name
        self.processes: list[Process] = []

    def __repr__(self) -> str:
        return f"Namespace({self.name})"

    def argv(self, *argv: str) -> list[str]:
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout: float = 30,
        input: str | None = None,
        env: Mapping[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside and capture its output; RuntimeError on failure if `check`."""
        full = self.argv(*argv)
        proc = subprocess.run(
            full,
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=REPO,
            env={**os.environ, **(env or {})},
        )
        if check:
            _check(proc, full)
        return proc

    def sh(self, script: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return self.run("sh", "-c", script, **kwargs)

    def python(self, code: str, *args: str, **kwargs: Any) -> subprocess.CompletedProcess[str]:
        """Run Python code inside, with the repository importable."""
        return self.run(sys.executable, "-c", code, *args, **kwargs)

    def start(self, *argv: str, **kwargs: Any) -> Process:
        """Start a long-running process inside; it is stopped when the network is torn down."""
        process = Process(self.argv(*argv), **kwargs)
        self.processes.append(process)
        return process

    def start_python(self, *args: str, **kwargs: Any) -> Process:
        return self.start(sys.executable, *args, **kwargs)

    def start_udp_answerer(self, host: str, port: int, answer: str) -> Process:
        """A UDP server on host:port that answers every datagram with `answer` (`{peer}` in it
        becomes the sender's address). One socket, one process: socat's `UDP-RECVFROM,fork`
        loses datagrams that arrive while the child for the previous one still holds the
        socket (seen here: 2 of 100 back-to-back queries on loopback unanswered; through uproxy
        on a loaded machine, one query in a few tens)."""
        return self.start_python("-c", _UDP_ANSWERER, host, str(port), answer)

    def route(self, destination: str, *, via: str | None = None, dev: str | None = None) -> None:
        argv = ["ip", "route", "replace", destination]
        if via is not None:
            argv += ["via", via]
        if dev is not None:
            argv += ["dev", dev]
        self.run(*argv)

    def add_address(self, cidr: str, dev: str = "lo") -> None:
        self.run("ip", "addr", "add", cidr, "dev", dev)

    def sysctl(self, key: str, value: str) -> None:
        """Set a per-namespace sysctl (net.ipv4.conf.*, net.ipv4.ip_forward, ...) inside."""
        self.run("sysctl", "-qw", f"{key}={value}")


class Network:
    """Namespaces and the veth pairs between them; `close()` removes all of it."""

    def __init__(self) -> None:
        self.namespaces: list[Namespace] = []
        self._links = itertools.count(1)

    def namespace(self, role: str) -> Namespace:
        name = _OWNER.name(f"{next(_SEQ)}-{re.sub(r'[^a-z0-9]', '', role.lower())[:10]}")
        ns = Namespace(name)
        self.namespaces.append(ns)  # registered first: a failure half-way still removes it
        core.create(name)
        return ns

    def link(
        self, a: Namespace, a_cidr: str | None, b: Namespace, b_cidr: str | None
    ) -> tuple[str, str]:
        """A veth pair between `a` and `b` (created inside `a`, never in the root namespace),
        addressed and up. Returns the interface names (in a, in b)."""
        n = next(self._links)
        a_dev, b_dev = f"veth{n}a", f"veth{n}b"
        core.add_veth(a.name, a_dev, b.name, b_dev)
        for ns, dev, cidr in ((a, a_dev, a_cidr), (b, b_dev, b_cidr)):
            if cidr is not None:
                ns.run("ip", "addr", "add", cidr, "dev", dev)
            ns.run("ip", "link", "set", dev, "up")
        return a_dev, b_dev

    def close(self) -> None:
        for ns in self.namespaces:
            for process in ns.processes:
                with contextlib.suppress(Exception):
                    process.stop(signal.SIGTERM, timeout=5)
        for ns in reversed(self.namespaces):
            core.delete(ns.name)
        self.namespaces.clear()

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextlib.contextmanager
def network() -> Iterator[Network]:
    net = Network()
    try:
        yield net
    finally:
        net.close()


def our_namespaces(all_runs: bool = False) -> list[str]:
    """Namespaces of this run, and with `all_runs` those of earlier test runs that are gone."""
    return _OWNER.owned() + (_OWNER.stale() if all_runs else [])


def sweep(all_runs: bool = False) -> None:
    """Delete namespaces left behind by this run (and, with `all_runs`, by killed runs)."""
    _OWNER.delete_owned()
    if all_runs:
        _OWNER.sweep_stale()


def cli_cleanup(ns: Namespace) -> None:
    """`uproxy cleanup` in `ns`, after killing any uproxy a failed test left running there (the
    instance lock would rightly refuse the cleanup beside a live one)."""
    for process in ns.processes:
        if process.proc.poll() is None and "uproxy" in process.argv and "run" in process.argv:
            process.stop(signal.SIGKILL)
    done = ns.run(sys.executable, "-m", "uproxy", "cleanup", "--log-format", "json", check=False)
    assert done.returncode == 0, done.stdout + done.stderr
