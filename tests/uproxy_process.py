"""Run `uproxy` as a real process and follow its JSON log."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent


def loopback_run_args(config: Path | None, *extra: str) -> list[str]:
    """`uproxy run` as the loopback tests use it: listeners only, on 127.0.0.1, JSON logs, no
    sync delay, and health/metrics on free ports (several proxies run side by side in tests).
    `config` None leaves the source to `extra` (for example --kubeconfig)."""
    source = [] if config is None else ["--config", str(config)]
    return [
        "run",
        *source,
        "--no-portals",
        "--bind-address",
        "127.0.0.1",
        "--log-format",
        "json",
        "--min-sync-period",
        "0",
        "--healthz-bind-address",
        "127.0.0.1:0",
        "--metrics-bind-address",
        "127.0.0.1:0",
        *extra,
    ]


class UproxyProcess:
    """`python -m uproxy ARGS`, optionally behind a prefix such as `ip netns exec NS`."""

    def __init__(
        self,
        args: Sequence[str],
        *,
        prefix: Sequence[str] = (),
        preexec_fn: Callable[[], None] | None = None,
        python_args: Sequence[str] = ("-m", "uproxy"),
        cwd: Path = REPO,
        env: Mapping[str, str] | None = None,
    ) -> None:
        cmd = [*prefix, sys.executable, *python_args, *args]
        self.proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=cwd,
            env={**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"},
            preexec_fn=preexec_fn,
        )
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self._new: queue.Queue[dict[str, Any]] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict):
                self.events.append(event)
                self._new.put(event)

    def wait_event(self, name: str, timeout: float = 15.0, **fields: Any) -> dict[str, Any]:
        """The first event (past or future) named `name` whose fields match."""
        deadline = time.monotonic() + timeout
        seen = 0
        while True:
            for event in self.events[seen:]:
                seen += 1
                if event.get("event") == name and all(event.get(k) == v for k, v in fields.items()):
                    return event
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self.proc.poll() is not None and self._new.empty()):
                raise AssertionError(
                    f"no {name} {fields} event; exit={self.proc.poll()}; log tail:\n"
                    + "\n".join(self.lines[-30:])
                )
            try:
                self._new.get(timeout=min(remaining, 0.2))
            except queue.Empty:
                pass

    def count(self, name: str, **fields: Any) -> int:
        return sum(
            1
            for e in list(self.events)
            if e.get("event") == name and all(e.get(k) == v for k, v in fields.items())
        )

    def port_of(self, service: str, timeout: float = 15.0) -> int:
        """The proxy port of the newest listener for `service`."""
        self.wait_event("listener_started", timeout=timeout, service=service)
        matches = [
            e
            for e in self.events
            if e.get("event") == "listener_started" and e["service"] == service
        ]
        return int(matches[-1]["port"])

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._close_output()

    def _close_output(self) -> None:
        """Once the process is gone, the reader sees EOF and the pipe can be closed."""
        self._reader.join(timeout=5)
        if self.proc.stdout is not None and not self._reader.is_alive():
            self.proc.stdout.close()

    def __enter__(self) -> UproxyProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_output()
