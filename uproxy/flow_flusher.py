"""Conntrack deletion off the sync: one owned worker per IP family, coalescing what is pending.

A proxier calls the flusher (a `UdpFlowCleaner`) after its rules are in, as before; the call
only queues the matches and returns, so the sync and its lock are released at once and a
service change made during a big flush is applied meanwhile. Deleting later than the rules is
what correctness needs (a deleted entry is re-created by the rules in force), and deleting a
match twice is harmless, so pending matches are a set: a burst of syncs costs one flush.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import structlog

from uproxy.kernel.conntrack import Family, UdpFlowCleaner, UdpFlowMatch

log = structlog.get_logger(__name__)

# Matches per call of the cleaner: a cancelled worker (shutdown) waits for one chunk at most.
CHUNK = 32


class FlowFlusher:
    """Queues matches; `run()` (the owner's task) deletes them with `cleaner`."""

    def __init__(self, cleaner: UdpFlowCleaner, *, name: str = "conntrack") -> None:
        self._cleaner = cleaner
        self.name = name
        self._pending: set[UdpFlowMatch] = set()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self.deleted = 0

    async def __call__(self, matches: Sequence[UdpFlowMatch]) -> int:
        """Queue `matches`; returns how many were new to the queue."""
        before = len(self._pending)
        self._pending.update(matches)
        if self._pending:
            self._idle.clear()
            self._wake.set()
        return len(self._pending) - before

    @property
    def pending(self) -> int:
        return len(self._pending)

    async def idle(self) -> None:
        """Until nothing is queued or being deleted."""
        await self._idle.wait()

    async def run(self) -> None:
        """Delete what is queued, for ever; the owner cancels it."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            matches = deleted = 0
            while self._pending:
                batch = sorted(self._pending, key=lambda m: (m.tcp, m.reply, m.ip or "", m.port))
                chunk = batch[:CHUNK]
                self._pending.difference_update(chunk)
                matches += len(chunk)
                deleted += await self._cleaner(chunk)
            self.deleted += deleted
            log.info("conntrack_flush_done", family=self.name, matches=matches, deleted=deleted)
            self._idle.set()


class Flushers:
    """The flushers of one process, one per IP family, made on first use; `run()` runs them
    all until cancelled (the app owns that task)."""

    def __init__(self, make: Callable[[Family], UdpFlowCleaner]) -> None:
        self._make = make
        self._flushers: dict[Family, FlowFlusher] = {}
        self._started = False

    def family(self, family: Family) -> FlowFlusher:
        if self._started:
            raise RuntimeError("flushers are made before they run")
        flusher = self._flushers.get(family)
        if flusher is None:
            flusher = self._flushers[family] = FlowFlusher(self._make(family), name=f"ipv{family}")
        return flusher

    async def idle(self) -> None:
        for flusher in list(self._flushers.values()):
            await flusher.idle()

    async def run(self) -> None:
        self._started = True
        runs = [asyncio.ensure_future(f.run()) for f in self._flushers.values()]
        if not runs:  # nothing to do, but an owned task that ends would stop the app
            await asyncio.Event().wait()
        try:
            await asyncio.gather(*runs)
        finally:
            for task in runs:
                task.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
