"""A bounded-frequency runner, after kube-proxy's async.BoundedFrequencyRunner.

Requests are coalesced: however many arrive, syncs start at most once per `min_interval`, and at
least once per `max_interval` (the periodic resync that repairs drift). A failed sync is retried
with capped exponential backoff, never sooner than `min_interval`.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import structlog

from uproxy.backoff import Backoff

log = structlog.get_logger(__name__)


class SyncRunner:
    def __init__(
        self,
        sync: Callable[[], Awaitable[None]],
        *,
        min_interval: float,
        max_interval: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sync = sync
        self._min_interval = min_interval
        self._max_interval = max_interval
        self._clock = clock
        self._requested = asyncio.Event()
        self._last_start: float | None = None
        self._backoff = Backoff(max(min_interval, 0.5), max_interval)

    def request(self) -> None:
        """Ask for a sync soon (coalesced with any other pending request). Never blocks."""
        self._requested.set()

    @property
    def consecutive_failures(self) -> int:
        return self._backoff.failures

    async def run(self) -> None:
        """Run syncs until cancelled. A sync's exception is logged and retried, never raised."""
        while True:
            await self._wait_for_turn()
            self._requested.clear()
            self._last_start = self._clock()
            try:
                await self._sync()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                delay = self._backoff.next_delay()
                log.error(
                    "sync_failed",
                    error=str(exc),
                    error_type=type(exc).__name__,
                    failures=self._backoff.failures,
                    retry_in=delay,
                    exc_info=exc if self._backoff.failures == 1 else None,
                )
                self._schedule_retry(delay)
            else:
                self._backoff.reset()

    async def _wait_for_turn(self) -> None:
        # The periodic resync: wake up even without a request.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._requested.wait(), timeout=self._max_interval)
        if self._last_start is not None:
            wait = self._last_start + self._min_interval - self._clock()
            if wait > 0:
                await asyncio.sleep(wait)

    def _schedule_retry(self, delay: float) -> None:
        # A retry is a request that becomes due later; call_later keeps no task to own.
        asyncio.get_running_loop().call_later(delay, self._requested.set)
