"""The userspace mode with --workers N > 1: the main process's proxier plus N forwarders.

The main process runs the ordinary UserspaceProxier, whose listeners here only hold sockets
(uproxy/workers/held.py): it allocates the proxy ports and owns the portals, exactly as with one
process. Each sync is then sent to every worker, whose own UserspaceProxier builds real
listeners on the handed sockets; the sync is done when all of them have applied it.
"""

from __future__ import annotations

import structlog

from uproxy.errors import UproxyError
from uproxy.model import ProxyState
from uproxy.proxier.base import Changed, PortView
from uproxy.proxier.userspace import ListenerStartError, UserspaceProxier
from uproxy.workers.aggregate import aggregate
from uproxy.workers.held import HeldSockets
from uproxy.workers.supervisor import Supervisor

log = structlog.get_logger(__name__)


class WorkerSyncError(UproxyError):
    """Some worker did not apply a sync; the runner retries it (a full sync)."""


class WorkersProxier:
    def __init__(self, local: UserspaceProxier, held: HeldSockets, supervisor: Supervisor) -> None:
        self._local = local
        self._held = held
        self.supervisor = supervisor
        self._started = False

    async def sync(self, state: ProxyState, changed: Changed = None) -> None:
        if not self._started:
            self._started = True
            await self.supervisor.start()
        local_error: ListenerStartError | None = None
        try:
            await self._local.sync(state, changed)
        except ListenerStartError as exc:
            local_error = exc  # the workers still get every port that did start
        self._held.steer(state)
        errors = await self.supervisor.apply(state, changed, self._held.take_new())
        self._held.synced()
        if local_error is not None:
            raise local_error
        if errors:
            raise WorkerSyncError("; ".join(errors))

    async def shutdown(self, grace: float) -> None:
        # The held copies first: a socket no worker accepts on any more must not queue clients.
        await self._local.shutdown(0)
        if self._started:
            await self.supervisor.stop(grace)
            await self.supervisor.close()

    def view(self) -> list[PortView]:
        return aggregate(self._local.view(), self.supervisor.views(), self.supervisor.carried)
