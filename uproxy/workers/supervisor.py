"""Starts N worker processes, feeds them every sync, restarts the ones that die.

After uvicorn's multiprocess supervisor: a fixed number of slots, each kept filled. Unlike
uvicorn's workers, ours are told what to do: a slot's process gets the current state and every
socket in force when it (re)starts, then each sync; a sync is done when every worker has said
it applied it.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

import structlog

from uproxy.backoff import Backoff
from uproxy.dataplane.stats import PortStats
from uproxy.model import ProxyState, ServicePortName
from uproxy.observe.status import WorkerStatus
from uproxy.proxier.base import Changed, PortView
from uproxy.settings import Settings
from uproxy.workers.aggregate import carry
from uproxy.workers.channel import Channel, ChannelClosed, channel_pair
from uproxy.workers.messages import Applied, Apply, Init, Report, SocketKey, Stop

log = structlog.get_logger(__name__)

# A worker that lived this long before dying starts over with the shortest restart delay.
STABLE_AFTER = 10.0
# How long past the shutdown grace a worker may take to exit before it is killed.
EXIT_MARGIN = 5.0


class WorkerProcess(Protocol):
    @property
    def pid(self) -> int: ...
    async def wait(self) -> int:
        """The exit status, once the process has exited."""

    def kill(self) -> None: ...


# (worker index, the worker's end of its channel) -> the started process. The caller closes its
# copy of the worker's end afterwards.
Spawn = Callable[[int, socket.socket], Awaitable[WorkerProcess]]


class WorkerGone(Exception):
    """The worker exited before it answered."""


@dataclass(eq=False)
class Slot:
    index: int
    process: WorkerProcess | None = None
    channel: Channel | None = None
    live: bool = False
    restarts: int = 0
    views: list[PortView] = field(default_factory=list)
    pending: dict[int, asyncio.Future[Applied]] = field(default_factory=dict)
    started_at: float = 0.0


class Supervisor:
    def __init__(
        self,
        count: int,
        spawn: Spawn,
        settings: Settings,
        sockets: Callable[[], Mapping[SocketKey, list[socket.socket]]],
        *,
        report_interval: float = 1.0,
        ack_timeout: float = 60.0,
        restart_backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.slots = [Slot(i) for i in range(count)]
        self._spawn = spawn
        self._settings = settings
        self._sockets = sockets  # every group in force, for a worker that starts over
        self._report_interval = report_interval
        self._ack_timeout = ack_timeout
        self._backoff = {i: restart_backoff or Backoff(0.2, 10.0) for i in range(count)}
        self._clock = clock
        self._state: ProxyState | None = None
        self._seq = 0
        self._stopping = False
        self._tasks: list[asyncio.Task[None]] = []
        # Counters of workers that died, so that sums never go backwards.
        self.carried: dict[ServicePortName, PortStats] = {}

    @property
    def restarts(self) -> int:
        return sum(slot.restarts for slot in self.slots)

    def statuses(self) -> list[WorkerStatus]:
        return [
            WorkerStatus(
                slot.index,
                slot.process.pid if slot.process is not None and slot.live else None,
                slot.live,
                slot.restarts,
            )
            for slot in self.slots
        ]

    async def start(self) -> None:
        """Start every worker; each slot is then watched (and refilled) by a task of ours."""
        loop = asyncio.get_running_loop()
        for slot in self.slots:
            with contextlib.suppress(Exception):  # a failed start is retried by the watch
                await self._launch(slot)
        self._tasks = [
            loop.create_task(self._watch(slot), name=f"worker-{slot.index}") for slot in self.slots
        ]

    async def apply(
        self,
        state: ProxyState,
        changed: Changed,
        new: Mapping[SocketKey, list[socket.socket]],
    ) -> list[str]:
        """Send a sync to every worker and wait until each has applied it; the problems."""
        self._state = state
        self._seq += 1
        keys = tuple(new)
        errors: list[str] = []
        waiting: list[tuple[Slot, asyncio.Future[Applied]]] = []
        loop = asyncio.get_running_loop()
        for slot in self.slots:
            if not slot.live or slot.channel is None:
                errors.append(f"worker {slot.index} is not running")
                continue
            ack: asyncio.Future[Applied] = loop.create_future()
            slot.pending[self._seq] = ack
            fds = [group[slot.index].fileno() for group in new.values()]
            try:
                await slot.channel.send(Apply(self._seq, state, changed, keys), fds)
            except ChannelClosed:
                slot.pending.pop(self._seq, None)
                errors.append(f"worker {slot.index} is not running")
                continue
            waiting.append((slot, ack))
        for slot, ack in waiting:
            try:
                applied = await asyncio.wait_for(ack, self._ack_timeout)
            except WorkerGone:
                errors.append(f"worker {slot.index} exited before applying the sync")
            except TimeoutError:
                errors.append(f"worker {slot.index} did not answer within {self._ack_timeout}s")
            else:
                if applied.error:
                    errors.append(f"worker {slot.index}: {applied.error}")
            finally:
                slot.pending.pop(self._seq, None)
        return errors

    def views(self) -> list[list[PortView]]:
        return [slot.views for slot in self.slots]

    async def stop(self, grace: float) -> None:
        """Drain every worker within `grace`; kill what is still there after EXIT_MARGIN more.
        Called again (a second signal) with a shorter grace, it hurries them."""
        self._stopping = True
        for slot in self.slots:
            if slot.channel is not None:
                with contextlib.suppress(ChannelClosed):
                    await slot.channel.send(Stop(grace))
        if self._tasks:
            _, running = await asyncio.wait(self._tasks, timeout=grace + EXIT_MARGIN)
            for slot, task in zip(self.slots, self._tasks, strict=True):
                if task in running and slot.process is not None:
                    log.warning("worker_killed", worker=slot.index, pid=slot.process.pid)
                    with contextlib.suppress(ProcessLookupError):
                        slot.process.kill()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for slot in self.slots:
            if slot.process is not None and slot.live:
                with contextlib.suppress(ProcessLookupError):
                    slot.process.kill()
            if slot.channel is not None:
                slot.channel.close()

    # --- one slot ------------------------------------------------------------------------------

    async def _launch(self, slot: Slot) -> None:
        ours, theirs = channel_pair()
        try:
            process = await self._spawn(slot.index, theirs)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        slot.process, slot.channel = process, Channel(ours)
        slot.views, slot.started_at = [], self._clock()
        log.info("worker_started", worker=slot.index, pid=process.pid, restarts=slot.restarts)
        try:
            await slot.channel.send(Init(slot.index, self._settings, self._report_interval))
            if self._state is not None:
                # Starting over: the whole state, and a socket of every group in force.
                groups = self._sockets()
                fds = [group[slot.index].fileno() for group in groups.values()]
                await slot.channel.send(Apply(0, self._state, None, tuple(groups)), fds)
        except ChannelClosed:
            return  # it died at once; the watch sees it exit
        slot.live = True

    async def _watch(self, slot: Slot) -> None:
        while True:
            if slot.process is not None:
                status = await self._follow(slot)
                if self._stopping:
                    log.info("worker_exited", worker=slot.index, status=status)
                    return
                self._died(slot, status)
                await asyncio.sleep(self._backoff[slot.index].next_delay())
            if self._stopping:
                return
            try:
                await self._launch(slot)
            except Exception as exc:
                slot.process = None
                delay = self._backoff[slot.index].next_delay()
                log.error("worker_start_failed", worker=slot.index, error=str(exc), retry_in=delay)
                await asyncio.sleep(delay)

    async def _follow(self, slot: Slot) -> int:
        """Read the worker's messages until it is gone; its exit status."""
        assert slot.process is not None and slot.channel is not None
        try:
            while True:
                message, sockets = await slot.channel.receive()
                for sock in sockets:
                    sock.close()
                if isinstance(message, Applied):
                    slot.views = message.views
                    ack = slot.pending.get(message.seq)
                    if ack is not None and not ack.done():
                        ack.set_result(message)
                    elif message.error:
                        log.error("worker_sync_failed", worker=slot.index, error=message.error)
                elif isinstance(message, Report):
                    slot.views = message.views
        except ChannelClosed:
            pass
        finally:
            slot.live = False
            slot.channel.close()
            for ack in slot.pending.values():
                if not ack.done():
                    ack.set_exception(WorkerGone())
        if not self._stopping:
            # It closed its channel: whatever it is doing, it no longer follows syncs.
            with contextlib.suppress(ProcessLookupError):
                slot.process.kill()
        return await slot.process.wait()

    def _died(self, slot: Slot, status: int) -> None:
        assert slot.process is not None
        lived = self._clock() - slot.started_at
        backoff = self._backoff[slot.index]
        if lived >= STABLE_AFTER:
            backoff.reset()
        carry(self.carried, slot.views)
        slot.views = []
        slot.restarts += 1
        log.error(
            "worker_died",
            worker=slot.index,
            pid=slot.process.pid,
            status=status,
            restarts=slot.restarts,
        )
