"""The health signal: healthy while changes reach the kernel, unhealthy when they stop doing so.

kube-proxy's userspace mode answered 200 whatever happened. Here a probe fails when a source has
never delivered its initial state, or when a change (or a failing periodic resync) has gone
unapplied for longer than twice the sync period.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class HealthReport:
    healthy: bool
    last_updated: float | None  # wall-clock time of the last successful sync
    current_time: float
    reason: str


class Health:
    """Fed by the app at every change and sync; read by /healthz. Clock-injected for tests."""

    def __init__(
        self,
        sync_period: float,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._timeout = 2 * sync_period
        self._monotonic = monotonic
        self._wall = wall
        self._sources_synced = False
        self._last_success_wall: float | None = None
        # Since when something has been waiting to reach the kernel (monotonic), if it is.
        self._behind_since: float | None = None

    def change_queued(self) -> None:
        if self._behind_since is None:
            self._behind_since = self._monotonic()

    def sources_synced(self) -> None:
        self._sources_synced = True

    def sync_succeeded(self, still_pending_since: float | None) -> None:
        """A sync applied everything it took; `still_pending_since` is what arrived meanwhile."""
        self._last_success_wall = self._wall()
        self._behind_since = still_pending_since

    def sync_failed(self) -> None:
        self.change_queued()

    def report(self) -> HealthReport:
        now_wall = self._wall()
        if not self._sources_synced:
            return HealthReport(False, self._last_success_wall, now_wall, "sources not synced yet")
        if self._last_success_wall is None:
            return HealthReport(False, None, now_wall, "no successful sync yet")
        behind = self._behind_since
        if behind is not None and self._monotonic() - behind > self._timeout:
            waited = round(self._monotonic() - behind, 1)
            reason = f"changes unapplied for {waited}s (limit {self._timeout:g}s)"
            return HealthReport(False, self._last_success_wall, now_wall, reason)
        return HealthReport(True, self._last_success_wall, now_wall, "ok")
