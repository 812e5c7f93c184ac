from __future__ import annotations

import asyncio
from collections.abc import Callable

from uproxy.runner import SyncRunner


async def wait_for(predicate: Callable[[], bool], limit: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not predicate():
        assert asyncio.get_running_loop().time() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


async def test_requests_are_coalesced() -> None:
    calls = 0

    async def sync() -> None:
        nonlocal calls
        calls += 1

    runner = SyncRunner(sync, min_interval=0.2, max_interval=60)
    task = asyncio.create_task(runner.run())
    try:
        for _ in range(50):
            runner.request()
        await wait_for(lambda: calls >= 1)
        for _ in range(50):
            runner.request()
        await wait_for(lambda: calls >= 2)
        await asyncio.sleep(0.05)
        # 100 requests in two bursts: one sync per burst, never one per request.
        assert calls == 2
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_periodic_resync_without_requests() -> None:
    calls = 0

    async def sync() -> None:
        nonlocal calls
        calls += 1

    runner = SyncRunner(sync, min_interval=0, max_interval=0.05)
    task = asyncio.create_task(runner.run())
    try:
        await wait_for(lambda: calls >= 3)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def test_failed_sync_is_retried_and_never_raises() -> None:
    outcomes = [RuntimeError("kernel said no"), RuntimeError("again"), None]
    calls = 0

    async def sync() -> None:
        nonlocal calls
        outcome = outcomes[min(calls, len(outcomes) - 1)]
        calls += 1
        if outcome is not None:
            raise outcome

    runner = SyncRunner(sync, min_interval=0.01, max_interval=60)
    runner.request()
    task = asyncio.create_task(runner.run())
    try:
        await wait_for(lambda: calls >= 3)
        assert runner.consecutive_failures == 0
        assert not task.done()
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
