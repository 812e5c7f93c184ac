"""One proxier per IP family behind the one Proxier interface, as kube-proxy's metaproxier:
each family's proxier takes only its family's addresses and endpoints."""

from __future__ import annotations

from collections.abc import Sequence

from uproxy.model import ProxyState
from uproxy.proxier.base import Changed, CountsSyncs, PortView, Proxier, SyncCounters


class PerFamily:
    def __init__(self, proxiers: Sequence[Proxier]) -> None:
        self._proxiers = tuple(proxiers)

    async def sync(self, state: ProxyState, changed: Changed = None) -> None:
        # Every family syncs, even when one fails, so one family's trouble never holds back
        # the other's changes; the first failure is raised for the runner to retry.
        failure: Exception | None = None
        for proxier in self._proxiers:
            try:
                await proxier.sync(state, changed)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure

    async def shutdown(self, grace: float) -> None:
        for proxier in self._proxiers:
            await proxier.shutdown(grace)

    def view(self) -> list[PortView]:
        """One row per service port: the first family's that has it."""
        seen: dict[object, PortView] = {}
        for proxier in self._proxiers:
            for view in proxier.view():
                seen.setdefault(view.service.name, view)
        return list(seen.values())

    def sync_counters(self) -> SyncCounters:
        total = SyncCounters()
        for proxier in self._proxiers:
            if isinstance(proxier, CountsSyncs):
                counts = proxier.sync_counters()
                total.full_syncs += counts.full_syncs
                total.partial_syncs += counts.partial_syncs
                total.partial_failures += counts.partial_failures
                total.rules_written += counts.rules_written
        return total
