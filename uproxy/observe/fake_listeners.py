"""A stateful fake of the health check listeners, for tests: which addresses and ports are
open, what each answers, and ports another process holds."""

from __future__ import annotations

import errno
import os

from uproxy.observe.http import Response, Route
from uproxy.observe.service_health import ALL_ADDRESSES, HealthCheckListener


class _Listener:
    def __init__(self, owner: FakeListeners, address: tuple[str, int]) -> None:
        self._owner = owner
        self._address = address

    async def close(self) -> None:
        self._owner.listening.pop(self._address, None)


class FakeListeners:
    def __init__(self) -> None:
        self.listening: dict[tuple[str, int], Route] = {}
        self.held_elsewhere: set[int] = set()  # ports some other process listens on
        self.opened_total = 0

    def _clashes(self, host: str, port: int) -> bool:
        if port in self.held_elsewhere:
            return True
        return any(
            p == port and (h == host or ALL_ADDRESSES in (h, host)) for h, p in self.listening
        )

    async def open(self, host: str, port: int, answer: Route) -> HealthCheckListener:
        if self._clashes(host, port):
            raise OSError(errno.EADDRINUSE, os.strerror(errno.EADDRINUSE))
        self.listening[(host, port)] = answer
        self.opened_total += 1
        return _Listener(self, (host, port))

    async def ask(self, host: str, port: int) -> Response:
        """What a client connecting to host:port gets (KeyError: nothing listens there)."""
        return await self.listening[(host, port)]()
