"""Daemons started inside the benchmark's namespaces, and what the kernel says about them.

`ip netns exec` execs the command in place, so the pid Popen returns is the daemon's own pid and
the daemon is stopped by that pid (and its children by theirs), never by name.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class DaemonFailed(RuntimeError):
    pass


class Daemon:
    """A long-running process; its output goes to `log_path` (or is followed line by line)."""

    def __init__(
        self,
        argv: Sequence[str],
        log_path: Path,
        *,
        env: Mapping[str, str] | None = None,
        on_line: Callable[[str], None] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.argv = list(argv)
        self.log_path = log_path
        self._log: IO[str] = open(log_path, "w")  # noqa: SIM115 (closed in stop)
        self._reader: threading.Thread | None = None
        self.proc = subprocess.Popen(
            self.argv,
            stdout=subprocess.PIPE if on_line else self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
            cwd=cwd,
            # Its own session: a Ctrl-C in the terminal reaches the benchmark, which then stops
            # its daemons in order, instead of killing them under a load generator mid-run.
            start_new_session=True,
        )
        if on_line is not None:
            self._reader = threading.Thread(target=self._follow, args=(on_line,), daemon=True)
            self._reader.start()

    def _follow(self, on_line: Callable[[str], None]) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._log.write(line)
            on_line(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def check_alive(self, what: str) -> None:
        if not self.alive():
            raise DaemonFailed(f"{what} exited with {self.proc.returncode}: {self.tail()}")

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            self._log.flush()
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> None:
        """Signal the daemon, wait, then SIGKILL it and any children it left behind."""
        children = tree_pids(self.pid) if self.alive() else []
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.pid, signal.SIGKILL)
                self.proc.wait(timeout=5)
        for pid in children:
            if pid != self.pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        if self._reader is not None:
            self._reader.join(timeout=5)
        with contextlib.suppress(OSError):
            self._log.close()


class JsonLogDaemon(Daemon):
    """A daemon logging JSON lines (uproxy's `--log-format json`), waited on by event name."""

    def __init__(self, argv: Sequence[str], log_path: Path, **kw: Any) -> None:
        self.events: list[dict[str, Any]] = []
        self._new: queue.Queue[None] = queue.Queue()
        super().__init__(argv, log_path, on_line=self._line, **kw)

    def _line(self, line: str) -> None:
        try:
            event = json.loads(line)
        except ValueError:
            return
        if isinstance(event, dict):
            self.events.append(event)
            self._new.put(None)

    def wait_event(self, name: str, timeout: float = 20.0, **fields: Any) -> dict[str, Any]:
        """The first event (past or future) named `name` whose fields match."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                seen += 1
                if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                    return event
            if time.monotonic() > deadline or not self.alive():
                if not self.alive():
                    time.sleep(0.2)  # let the reader catch the last lines
                raise DaemonFailed(f"no {name} {fields} event within {timeout}s: {self.tail()}")
            with contextlib.suppress(queue.Empty):
                self._new.get(timeout=0.1)


# -- /proc accounting ------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name is in parentheses and may hold spaces: split after the last ')'.
    return text[text.rindex(")") + 2 :].split()


def tree_pids(root: int) -> list[int]:
    """`root` and all its descendants (nginx master + workers, for example)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        fields = _stat_fields(int(entry))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(parents.get(pid, []))
    return out


def cpu_seconds(pids: Sequence[int]) -> float:
    """User + system CPU time of these processes (all their threads)."""
    total = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / CLOCK_TICKS


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_bytes(pids: Sequence[int]) -> int:
    return sum(_status_kib(pid, "VmRSS") for pid in pids) * 1024


def reset_peak_rss(pids: Sequence[int]) -> None:
    """Reset VmHWM to the current RSS (`echo 5 > clear_refs`), so the next peak is this load's."""
    for pid in pids:
        with contextlib.suppress(OSError):
            Path(f"/proc/{pid}/clear_refs").write_text("5")


def peak_rss_bytes(pids: Sequence[int]) -> int:
    """Sum of each process's peak RSS since the last reset (an upper bound for the tree)."""
    return sum(_status_kib(pid, "VmHWM") for pid in pids) * 1024


@dataclass
class Usage:
    cpu_s: float
    peak_rss: int


class UsageMeter:
    """CPU seconds and peak RSS of a process tree across one load."""

    def __init__(self, root: int | None) -> None:
        self.root = root
        self._pids: list[int] = []
        self._cpu0 = 0.0

    def __enter__(self) -> UsageMeter:
        if self.root is not None:
            self._pids = tree_pids(self.root)
            reset_peak_rss(self._pids)
            self._cpu0 = cpu_seconds(self._pids)
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def read(self) -> Usage | None:
        if self.root is None:
            return None
        return Usage(cpu_seconds(self._pids) - self._cpu0, peak_rss_bytes(self._pids))
