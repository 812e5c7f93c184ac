"""The supervisor with a fake process factory: each fake worker is a task speaking the real
channel protocol, recording what it was told, and able to die on request."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable, Iterator

import pytest

from uproxy.backoff import Backoff
from uproxy.dataplane.stats import PortStats
from uproxy.model import Protocol, ProxyState, ServicePort, ServicePortName
from uproxy.observe.status import WorkerStatus
from uproxy.proxier.base import PortView
from uproxy.settings import Settings
from uproxy.workers.channel import Channel, ChannelClosed
from uproxy.workers.messages import Applied, Apply, Init, Report, SocketKey, Stop
from uproxy.workers.supervisor import Supervisor

WEB = ServicePortName("default", "web", "http")
SERVICE = ServicePort(WEB, Protocol.TCP, 80, cluster_ips=("10.96.0.10",))
STATE = ProxyState(services={WEB: SERVICE})


class FakeWorker:
    """A worker process: answers every Apply, exits on Stop or when killed."""

    def __init__(self, index: int, pid: int, end: socket.socket, hold_acks: bool) -> None:
        self.index, self.pid = index, pid
        self.channel = Channel(end)
        self.applied: list[tuple[Apply, int]] = []  # each Apply and how many sockets came
        self.init: Init | None = None
        self.release = asyncio.Event()
        if not hold_acks:
            self.release.set()
        self.stopped_with: float | None = None
        self._exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.task = asyncio.get_running_loop().create_task(self._serve())

    async def _serve(self) -> None:
        try:
            while True:
                message, sockets = await self.channel.receive()
                for sock in sockets:
                    sock.close()
                if isinstance(message, Init):
                    self.init = message
                elif isinstance(message, Apply):
                    self.applied.append((message, len(sockets)))
                    await self.release.wait()
                    view = PortView(SERVICE, 1, (), frozenset(), {}, 0, 0, PortStats(total=3))
                    await self.channel.send(Applied(message.seq, None, [view]))
                elif isinstance(message, Stop):
                    self.stopped_with = message.grace
                    self.exit(0)
                    return
        except ChannelClosed:
            self.exit(1)

    def exit(self, status: int) -> None:
        self.channel.close()
        if not self._exit.done():
            self._exit.set_result(status)

    async def wait(self) -> int:
        return await self._exit

    def kill(self) -> None:
        self.task.cancel()
        self.exit(-9)


class FakeSpawner:
    def __init__(self) -> None:
        self.started: list[FakeWorker] = []
        self.hold_acks = False

    async def __call__(self, index: int, end: socket.socket) -> FakeWorker:
        worker = FakeWorker(index, 1000 + len(self.started), end.dup(), self.hold_acks)
        self.started.append(worker)
        return worker

    def current(self, index: int) -> FakeWorker:
        return [w for w in self.started if w.index == index][-1]

    async def close(self) -> None:
        for worker in self.started:
            worker.task.cancel()
        await asyncio.gather(*(w.task for w in self.started), return_exceptions=True)


@pytest.fixture
def groups() -> Iterator[dict[SocketKey, list[socket.socket]]]:
    held = {(WEB, "cluster"): [socket.socket(), socket.socket()]}
    yield held
    for group in held.values():
        for sock in group:
            sock.close()


async def until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(5):
        while not condition():
            await asyncio.sleep(0.01)


def supervisor(spawner: FakeSpawner, groups: dict[SocketKey, list[socket.socket]]) -> Supervisor:
    return Supervisor(
        2,
        spawner,
        Settings(workers=2),
        lambda: groups,
        report_interval=1.0,
        restart_backoff=Backoff(0.01, 0.01),
    )


async def test_a_sync_is_done_only_when_every_worker_has_applied_it(
    groups: dict[SocketKey, list[socket.socket]],
) -> None:
    spawner = FakeSpawner()
    spawner.hold_acks = True
    sup = supervisor(spawner, groups)
    await sup.start()
    apply = asyncio.ensure_future(sup.apply(STATE, None, groups))
    await until(lambda: all(w.applied for w in spawner.started))
    spawner.current(0).release.set()
    await asyncio.sleep(0.05)
    assert not apply.done()  # worker 1 has not answered yet
    spawner.current(1).release.set()
    assert await apply == []
    assert [len(w.applied) for w in spawner.started] == [1, 1]
    assert [w.applied[0][1] for w in spawner.started] == [1, 1]  # each got its own socket
    assert [v.stats.total for views in sup.views() for v in views] == [3, 3]
    await sup.stop(1.0)
    assert [w.stopped_with for w in spawner.started] == [1.0, 1.0]
    await sup.close()
    await spawner.close()


async def test_a_dead_worker_is_restarted_with_the_whole_state_and_counted(
    groups: dict[SocketKey, list[socket.socket]],
) -> None:
    spawner = FakeSpawner()
    sup = supervisor(spawner, groups)
    await sup.start()
    assert await sup.apply(STATE, None, groups) == []
    first = spawner.current(0)
    other = spawner.current(1)
    first.kill()
    await until(lambda: len(spawner.started) == 3 and bool(spawner.current(0).applied))
    again = spawner.current(0)
    assert again is not first and again.init is not None and again.init.index == 0
    ((full, sockets),) = again.applied
    assert full.state == STATE and full.changed is None and full.keys == ((WEB, "cluster"),)
    assert sockets == 1
    assert [slot.restarts for slot in sup.slots] == [1, 0]
    assert spawner.current(1) is other  # the other worker carried on
    # The dead worker's counters are carried, so the sum never goes backwards.
    assert sup.carried[WEB].total == 3
    await until(lambda: sup.slots[0].live)
    assert sup.statuses() == [
        WorkerStatus(0, again.pid, live=True, restarts=1),
        WorkerStatus(1, other.pid, live=True, restarts=0),
    ]
    assert await sup.apply(STATE, frozenset({WEB}), {}) == []
    assert len(other.applied) == 2
    await sup.stop(1.0)
    await sup.close()
    await spawner.close()


async def test_a_sync_fails_while_a_worker_is_gone(
    groups: dict[SocketKey, list[socket.socket]],
) -> None:
    spawner = FakeSpawner()
    spawner.hold_acks = True
    sup = supervisor(spawner, groups)
    await sup.start()
    apply = asyncio.ensure_future(sup.apply(STATE, None, groups))
    await until(lambda: all(w.applied for w in spawner.started))
    spawner.current(1).release.set()
    spawner.current(0).kill()  # dies before it answers
    errors = await apply
    assert errors == ["worker 0 exited before applying the sync"]
    await sup.stop(0.5)
    await sup.close()
    await spawner.close()


async def test_no_restart_once_stopping(groups: dict[SocketKey, list[socket.socket]]) -> None:
    spawner = FakeSpawner()
    sup = supervisor(spawner, groups)
    await sup.start()
    await sup.stop(0.5)
    assert len(spawner.started) == 2
    assert [slot.restarts for slot in sup.slots] == [0, 0]
    await sup.close()
    await spawner.close()


async def test_reports_refresh_the_views(groups: dict[SocketKey, list[socket.socket]]) -> None:
    spawner = FakeSpawner()
    sup = supervisor(spawner, groups)
    await sup.start()
    worker = spawner.current(1)
    view = PortView(SERVICE, 1, (), frozenset(), {}, 2, 0, PortStats(active=2, total=9))
    await worker.channel.send(Report([view]))
    await until(lambda: sup.views()[1] == [view])
    await sup.stop(0.5)
    await sup.close()
    await spawner.close()
