"""The one interface every proxy mode implements."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

from uproxy.dataplane.stats import PortStats
from uproxy.model import Endpoint, ProxyState, ServicePort, ServicePortName

# The service ports whose Service or endpoints changed since the previous successful sync, or
# None: anything may have changed (the first sync, the periodic full sync, after a failure).
Changed = frozenset[ServicePortName] | None


@dataclass(frozen=True, slots=True)
class PortView:
    """What the proxier knows about one service port, for status and metrics."""

    service: ServicePort
    proxy_port: int
    endpoints: tuple[Endpoint, ...]  # every known endpoint, with its conditions
    in_use: frozenset[Endpoint]  # the ones new connections go to
    per_endpoint: dict[Endpoint, int]  # open connections or UDP sessions by endpoint
    connections: int
    affinity_entries: int
    stats: PortStats
    ejected: frozenset[Endpoint] = frozenset()  # skipped after failed dials (userspace)
    ejections: int = 0  # ever, on this port


async def drain(proxier: Proxier, grace: float, hurry: asyncio.Event) -> None:
    """`proxier.shutdown(grace)`, cut to an immediate shutdown once `hurry` is set (a second
    signal)."""
    hurried = asyncio.ensure_future(hurry.wait())
    draining = asyncio.ensure_future(proxier.shutdown(grace))
    try:
        await asyncio.wait([draining, hurried], return_when=asyncio.FIRST_COMPLETED)
        if not draining.done():
            draining.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await draining
            await proxier.shutdown(0)
    finally:
        hurried.cancel()


async def each_then_first_failure(calls: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Await every call, even when one fails, so one IP family's trouble never holds back the
    other's changes; then raise the first failure for the runner to retry."""
    failure: Exception | None = None
    for call in calls:
        try:
            await call()
        except Exception as exc:
            failure = failure or exc
    if failure is not None:
        raise failure


@dataclass(slots=True)
class SyncCounters:
    """Running totals of a kernel mode's rule syncs, read by /metrics at scrape time."""

    full_syncs: int = 0  # read the kernel back and converged everything
    partial_syncs: int = 0  # wrote only what changed
    partial_failures: int = 0  # partial writes the kernel refused (a full sync followed)
    rules_written: int = 0


@runtime_checkable
class CountsSyncs(Protocol):
    """A proxier that keeps `SyncCounters` (the kernel rule modes)."""

    def sync_counters(self) -> SyncCounters: ...


class Proxier(Protocol):
    async def sync(self, state: ProxyState, changed: Changed = None) -> None:
        """Converge to `state`. Level-triggered and idempotent; raises on a failed sync, which the
        runner retries. Must leave whatever was already working in place when it fails.

        `changed` lets a sync do work proportional to the change: only those service ports can
        differ from the previous sync's `state`. None asks for a full pass over everything."""

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, give open connections up to `grace` seconds, then close everything."""

    def view(self) -> list[PortView]:
        """What each service port looks like now, for /status and /metrics. Cheap; never raises."""
