"""IPVS mode: the record of the virtual servers uproxy created, which survives a restart."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable
from pathlib import Path

from uproxy.errors import KernelError
from uproxy.kernel.ipvs import VirtualServer
from uproxy.model import Protocol
from uproxy.proxier.ipvs_desired import normal_ip


class OwnedServers:
    """The virtual servers uproxy created, in a file under /run (see the module docstring);
    None keeps it in memory (tests).

    Entries are added before the virtual servers are created and removed only after they were
    deleted, or once the kernel no longer has them, so whatever exists and is uproxy's stays on
    record, whatever failed in between."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._servers: set[VirtualServer] | None = None  # None: not read yet

    def load(self) -> set[VirtualServer]:
        if self._servers is None:
            self._servers = self._read()
        return set(self._servers)

    def add(self, servers: Iterable[VirtualServer]) -> None:
        self._write(self.load() | set(servers))

    def discard(self, servers: Iterable[VirtualServer]) -> None:
        self._write(self.load() - set(servers))

    def clear(self) -> None:
        self._servers = None
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def _read(self) -> set[VirtualServer]:
        if self.path is None:
            return set()
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return set()
        except OSError as exc:
            raise KernelError(f"cannot read {self.path}: {exc}") from None
        out = set()
        for line in text.splitlines():
            parts = line.split()
            if len(parts) != 3 or parts[0] not in ("TCP", "UDP"):
                continue
            ip = normal_ip(parts[1])
            if ip is not None and parts[2].isdigit():
                out.add(VirtualServer(Protocol(parts[0]), ip, int(parts[2])))
        return out

    def _write(self, servers: set[VirtualServer]) -> None:
        if servers == self._servers:
            return
        if self.path is not None:
            text = "".join(f"{vs.protocol.value} {vs.ip} {vs.port}\n" for vs in sorted(servers))
            try:
                self.path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
                tmp = self.path.with_name(f".{self.path.name}.tmp")
                tmp.write_text(text)
                os.replace(tmp, self.path)
            except OSError as exc:
                self._servers = None  # unknown now: read it again next time
                raise KernelError(f"cannot write {self.path}: {exc}") from None
        self._servers = servers
