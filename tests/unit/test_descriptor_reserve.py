"""The admin servers' spare descriptors, on a stateful fake descriptor table."""

from __future__ import annotations

import asyncio
import errno

from uproxy.observe.health import Health
from uproxy.observe.metrics import Metrics
from uproxy.observe.reserve import LOW_WATER, DescriptorReserve
from uproxy.observe.server import ObserveConfig, ObserveServer


class FakeDescriptors:
    """A process's descriptor table with a limit: open fails with EMFILE when it is full."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.open_fds: set[int] = set()
        self._next = 100

    def open(self) -> int:
        if len(self.open_fds) >= self.limit:
            raise OSError(errno.EMFILE, "Too many open files")
        self._next += 1
        self.open_fds.add(self._next)
        return self._next

    def close(self, fd: int) -> None:
        self.open_fds.remove(fd)

    def reserve(self, size: int) -> DescriptorReserve:
        return DescriptorReserve(
            size, open_spare=self.open, close_spare=self.close, count_free=self.free
        )

    def free(self) -> int:
        return self.limit - len(self.open_fds)


def test_refill_takes_spares_up_to_size() -> None:
    table = FakeDescriptors(limit=100)
    reserve = table.reserve(4)
    assert reserve.refill() and reserve.held == 4 and len(table.open_fds) == 4


def test_a_released_spare_frees_a_descriptor_for_someone_else() -> None:
    table = FakeDescriptors(limit=4)
    reserve = table.reserve(4)
    reserve.refill()
    assert reserve.release_one()
    accepted = table.open()  # the admin connection takes the freed slot
    assert reserve.held == 3 and reserve.used == 1
    assert not reserve.refill()  # still out: the reserve cannot be made whole
    table.close(accepted)
    assert reserve.refill() and reserve.held == 4


def test_exhausted_while_few_descriptors_are_free_though_the_reserve_is_whole() -> None:
    table = FakeDescriptors(limit=LOW_WATER + 4)
    reserve = table.reserve(2)
    assert not reserve.exhausted()
    taken = [table.open() for _ in range(4)]  # LOW_WATER - 2 free now
    assert reserve.held == 2 and reserve.exhausted()
    for fd in taken:
        table.close(fd)
    assert not reserve.exhausted()


def test_release_with_nothing_left_says_so() -> None:
    table = FakeDescriptors(limit=1)
    reserve = table.reserve(1)
    reserve.refill()
    assert reserve.release_one()
    assert not reserve.release_one()
    assert table.open_fds == set()


def test_close_gives_every_spare_back() -> None:
    table = FakeDescriptors(limit=10)
    reserve = table.reserve(3)
    reserve.refill()
    reserve.close()
    assert table.open_fds == set() and reserve.held == 0


async def _get(port: int, path: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\n\r\n".encode())
    await writer.drain()
    answer = await reader.read()
    writer.close()
    await writer.wait_closed()
    return answer


async def test_healthz_says_degraded_while_descriptors_are_exhausted() -> None:
    table = FakeDescriptors(limit=LOW_WATER + 2)
    reserve = table.reserve(2)
    health = Health(30)
    health.sources_synced()
    health.sync_succeeded(None)
    server = ObserveServer(
        ObserveConfig(healthz=("127.0.0.1", 0), metrics=("127.0.0.1", 0), mode="userspace"),
        health,
        Metrics(list),
        list,
        reserve=reserve,
    )
    await server.start()
    try:
        healthz, metrics = server.ports["healthz"], server.ports["metrics"]
        whole = await _get(healthz, "/healthz")
        assert whole.startswith(b"HTTP/1.1 200") and b"X-Uproxy-Degraded" not in whole
        # The data plane took every descriptor, and one spare was given up to it.
        assert reserve.release_one()
        taken = [table.open() for _ in range(LOW_WATER + 1)]
        for port, path in ((healthz, "/healthz"), (healthz, "/livez"), (metrics, "/healthz")):
            answer = await _get(port, path)
            assert answer.startswith(b"HTTP/1.1 200"), path
            assert b"X-Uproxy-Degraded: descriptors exhausted\r\n" in answer, path
        assert b'"nodeEligible": true' in await _get(healthz, "/healthz")
        for fd in taken:
            table.close(fd)
        assert b"X-Uproxy-Degraded" not in await _get(healthz, "/healthz")
    finally:
        await server.stop()
    assert table.open_fds == set()
