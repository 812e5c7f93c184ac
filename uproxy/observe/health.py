"""The health signal: healthy while changes reach the kernel, unhealthy when they stop doing so.

kube-proxy's userspace mode answered 200 whatever happened. Here a probe fails when a source has
never delivered its initial state, or when a change (or a failing periodic resync) has gone
unapplied for longer than twice the sync period.

Node eligibility is kube-proxy's `nodeEligible`: false while this node is being deleted or is
tainted ToBeDeletedByClusterAutoscaler, which turns /healthz (not /livez, nor the service
health checks) to 503 so that load balancers drain the node first. Whoever watches this node's
Node object sets it (`set_node_eligible`); until then it is true, as in kube-proxy.
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
    # The same two instants as seconds since this Health was made (Go's monotonic reading).
    last_updated_uptime: float | None = None
    current_uptime: float = 0.0


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
        self._last_success_mono: float | None = None
        self._started = monotonic()
        self.node_eligible = True
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
        self._last_success_mono = self._monotonic()
        self._behind_since = still_pending_since

    def sync_failed(self) -> None:
        self.change_queued()

    def set_node_eligible(self, eligible: bool) -> None:
        self.node_eligible = eligible

    @property
    def synced(self) -> bool:
        """Whether a sync has ever applied the sources' state."""
        return self._last_success_wall is not None

    def report(self) -> HealthReport:
        """The proxy's own health, whatever the node's eligibility (kube-proxy's Health())."""
        now_wall = self._wall()
        now_mono = self._monotonic()

        def answer(healthy: bool, reason: str) -> HealthReport:
            last_mono = self._last_success_mono
            return HealthReport(
                healthy,
                self._last_success_wall,
                now_wall,
                reason,
                last_updated_uptime=None if last_mono is None else last_mono - self._started,
                current_uptime=now_mono - self._started,
            )

        if not self._sources_synced:
            return answer(False, "sources not synced yet")
        if self._last_success_wall is None:
            return answer(False, "no successful sync yet")
        behind = self._behind_since
        if behind is not None and now_mono - behind > self._timeout:
            waited = round(now_mono - behind, 1)
            return answer(False, f"changes unapplied for {waited}s (limit {self._timeout:g}s)")
        return answer(True, "ok")
