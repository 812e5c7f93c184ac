"""The conntrack flusher: queued off the sync, coalesced, deleted by its owned worker. Assertions
are on the fake conntrack table and the fake netfilter tables."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import pytest

from tests.unit.test_iptables_proxier import dns, ep, make, state
from uproxy.flow_flusher import CHUNK, FlowFlusher, Flushers
from uproxy.kernel.conntrack import UdpFlow, UdpFlowMatch, delete_argv
from uproxy.kernel.fake import FakeConntrack
from uproxy.proxier.iptables_rules import SVC_PREFIX

KEPT = UdpFlow("10.0.0.2", 5000, "10.96.0.53", 53, "10.1.0.8", 53)
STALE = UdpFlow("10.0.0.2", 5001, "10.96.0.53", 53, "10.1.0.9", 53)


class GatedConntrack(FakeConntrack):
    """A fake table whose deletions wait for `gate`: a flush that takes as long as the test says."""

    def __init__(self, flows: Sequence[UdpFlow] = ()) -> None:
        super().__init__(flows)
        self.gate = asyncio.Event()

    async def __call__(self, matches: Sequence[UdpFlowMatch]) -> int:
        await self.gate.wait()
        return await super().__call__(matches)


@contextlib.asynccontextmanager
async def running(flusher: FlowFlusher | Flushers) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.ensure_future(flusher.run())
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_the_sync_only_queues_and_the_worker_deletes_after_the_rules_are_in() -> None:
    table = FakeConntrack()
    flusher = FlowFlusher(table)
    proxier, _, clock = make(conntrack=flusher)
    endpoints = (ep("10.1.0.8", 53), ep("10.1.0.9", 53))
    await proxier.sync(state((dns(), endpoints)))
    async with running(flusher):
        await flusher.idle()  # the first sync's flush of every UDP port
    table.flows = [KEPT, STALE]
    clock.now += 1
    await proxier.sync(state((dns(), endpoints[:1])))
    assert table.flows == [KEPT, STALE]  # queued, not yet deleted: the sync did not wait
    assert flusher.pending
    async with running(flusher):
        await flusher.idle()
    assert table.flows == [KEPT]
    assert flusher.pending == 0


async def test_a_change_is_applied_while_a_big_flush_runs() -> None:
    table = GatedConntrack([KEPT, STALE])
    flusher = FlowFlusher(table)
    proxier, fake, clock = make(conntrack=flusher)
    endpoints = (ep("10.1.0.8", 53), ep("10.1.0.9", 53))
    async with running(flusher):
        await proxier.sync(state((dns(), endpoints)))  # first sync: every UDP port flushed
        await asyncio.sleep(0)
        assert table.flows == [KEPT, STALE]  # the flush is held at the gate
        clock.now += 1
        await proxier.sync(state((dns(), endpoints[:1])))  # applied meanwhile
        (svc,) = [c for c in fake.chains("nat") if c.startswith(SVC_PREFIX)]
        assert len([r for r in fake.rules("nat", svc) if "UPROXY-SEP-" in r]) == 1
        assert table.flows == [KEPT, STALE]
        table.gate.set()
        await flusher.idle()
    assert table.flows == []  # the first sync's match took every flow to 10.96.0.53:53


async def test_pending_matches_coalesce() -> None:
    table = FakeConntrack([STALE])
    flusher = FlowFlusher(table)
    match = UdpFlowMatch.endpoint("10.1.0.9", 53)
    assert await flusher([match]) == 1
    assert await flusher([match, match]) == 0
    assert flusher.pending == 1
    async with running(flusher):
        await flusher.idle()
    assert table.flows == [] and flusher.deleted == 1


async def test_more_matches_than_a_chunk_are_all_deleted() -> None:
    flows = [UdpFlow("10.0.0.2", 5000, "10.96.0.53", 1000 + i, "10.1.0.8", 53) for i in range(99)]
    table = FakeConntrack([*flows, KEPT])
    flusher = FlowFlusher(table)
    await flusher([UdpFlowMatch.destination("10.96.0.53", 1000 + i) for i in range(99)])
    assert flusher.pending > CHUNK
    async with running(flusher):
        await flusher.idle()
    assert table.flows == [KEPT]


async def test_flushers_keep_one_worker_per_family_and_stop_when_cancelled() -> None:
    tables = {
        4: FakeConntrack([STALE]),
        6: FakeConntrack([UdpFlow("fd00::2", 1, "fd00::53", 53, "fd00::9", 53)]),
    }
    flushers = Flushers(lambda family: tables[family])
    assert flushers.family(4) is flushers.family(4)
    await flushers.family(4)([UdpFlowMatch.endpoint("10.1.0.9", 53)])
    await flushers.family(6)([UdpFlowMatch.destination("fd00::53", 53)])
    async with running(flushers) as task:
        await flushers.idle()
        assert not task.done()
    assert tables[4].flows == [] and tables[6].flows == []
    with pytest.raises(RuntimeError):
        flushers.family(6)


async def test_flushers_without_any_family_run_until_cancelled() -> None:
    flushers = Flushers(lambda family: FakeConntrack())
    async with running(flushers) as task:
        await asyncio.sleep(0)
        assert not task.done()


@pytest.mark.parametrize(
    ("match", "family", "argv"),
    [
        (
            UdpFlowMatch.destination("10.96.0.53", 53),
            4,
            "-D -f ipv4 -p udp --orig-dst 10.96.0.53 --dport 53",
        ),
        (UdpFlowMatch.destination(None, 30053), 4, "-D -f ipv4 -p udp --dport 30053"),
        (
            UdpFlowMatch.endpoint("10.1.0.9", 53),
            4,
            "-D -f ipv4 -p udp --reply-src 10.1.0.9 --reply-port-src 53",
        ),
        (
            UdpFlowMatch.destination("fd00:96::53", 53),
            6,
            "-D -f ipv6 -p udp --orig-dst fd00:96::53 --dport 53",
        ),
        (UdpFlowMatch.destination(None, 30053), 6, "-D -f ipv6 -p udp --dport 30053"),
        (
            UdpFlowMatch.tcp_without_nat("10.96.0.10", 80),
            4,
            "-D -f ipv4 -p tcp --orig-dst 10.96.0.10 --dport 80 --reply-src 10.96.0.10",
        ),
        (
            UdpFlowMatch.tcp_redirected("10.96.0.10", 80, 39167),
            4,
            "-D -f ipv4 -p tcp --orig-dst 10.96.0.10 --dport 80 --reply-port-src 39167",
        ),
        (
            UdpFlowMatch.tcp_redirected(None, 30080, 39167),
            6,
            "-D -f ipv6 -p tcp --dport 30080 --reply-port-src 39167",
        ),
    ],
)
def test_each_match_is_one_filtered_conntrack_delete(
    match: UdpFlowMatch, family: int, argv: str
) -> None:
    assert " ".join(delete_argv(match, family)) == argv  # type: ignore[arg-type]
