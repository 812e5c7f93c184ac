"""Endpoint churn under load loses nothing, in every mode this kernel has (issue 18).

While 20 concurrent clients open short connections to a ClusterIP (rounds of 600, until at least
three rewrites have reached the proxy), the service's EndpointSlice is rewritten ten times a
second, each time to another two of the three backends, which all keep serving (a rolling
update's view from the proxy). No request may fail: the userspace mode keeps open connections on
the endpoint they started with, the kernel modes keep them in conntrack, and every sync replaces
the rules in one transaction.
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter
from pathlib import Path

import pytest

from tests.chaos.test_dead_endpoint import load
from tests.integration.conftest import require_tools
from tests.integration.test_kernel_modes import (
    BACKEND_IPS,
    KERNEL_MODES,
    Topology,
    manifests,
    require_backend,
    start_uproxy,
    write_manifests,
)

pytestmark = pytest.mark.root

MODES = [("userspace", "nft"), *KERNEL_MODES]
ROUNDS_MAX = 20
PAIRS = [BACKEND_IPS[:2], BACKEND_IPS[1:], [BACKEND_IPS[0], BACKEND_IPS[2]]]


@pytest.mark.parametrize(("mode", "backend"), MODES, ids=[f"{m}-{b}" for m, b in MODES])
def test_slice_rewrites_under_load_lose_no_request(
    topo: tuple[Topology, Path], mode: str, backend: str
) -> None:
    require_backend(backend)
    if mode == "nftables":
        require_tools("nft")
    topology, config = topo
    uproxy = start_uproxy(topology, config, mode, backend)
    stop = threading.Event()
    rewrites = 0

    def churn() -> None:
        nonlocal rewrites
        while not stop.is_set():
            write_manifests(config, manifests(with_dns=False, web=PAIRS[rewrites % 3]))
            rewrites += 1
            time.sleep(0.1)

    def applied() -> int:
        return sum(
            1
            for e in uproxy.events[mark:]
            if e.get("event") == "sync_done" and e.get("changed_services", 0) > 0
        )

    writer = threading.Thread(target=churn, daemon=True)
    mark = len(uproxy.events)
    writer.start()
    seen: Counter[str] = Counter()
    rounds = 0
    try:
        # Load in rounds until at least three rewrites have reached the proxy (the manifest
        # source coalesces them, looking about once a second): a fast machine can finish one
        # round before the first rewrite is applied.
        while rounds < ROUNDS_MAX and (rounds < 2 or applied() < 3):
            seen += load(topology, each=30)
            rounds += 1
    finally:
        stop.set()
        writer.join(timeout=5)
    assert sum(seen.values()) == 600 * rounds
    assert not [k for k in seen if k.startswith("failed")], seen
    assert set(seen) == {"be1", "be2", "be3"}, seen
    assert applied() >= 3, f"only {applied()} endpoint changes reached the proxy in {rounds} rounds"
    assert uproxy.stop(signal.SIGTERM) == 0, uproxy.tail()
