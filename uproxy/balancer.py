"""Round robin with optional ClientIP affinity, per service port.

Pure: no I/O, the clock and the shuffle are injected, so every rule here is unit-testable.
Semantics follow kube-proxy's userspace LoadBalancerRR: a shuffled endpoint list walked round
robin, reshuffled and reset only when the set of endpoints really changes; ClientIP affinity is a
sliding window refreshed on every use.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from uproxy.model import Endpoint

Clock = Callable[[], float]
Shuffle = Callable[[list[Endpoint]], None]


@dataclass(slots=True)
class _Affinity:
    endpoint: Endpoint
    last_used: float


@dataclass(slots=True)
class _Pool:
    endpoints: list[Endpoint]
    affinity_timeout: float | None
    next_index: int = 0
    affinity: dict[str, _Affinity] = field(default_factory=dict)


class LoadBalancer:
    """Picks endpoints for one service port."""

    __slots__ = ("_clock", "_pool", "_shuffle")

    def __init__(self, *, clock: Clock = time.monotonic, shuffle: Shuffle = random.shuffle) -> None:
        self._clock = clock
        self._shuffle = shuffle
        self._pool = _Pool(endpoints=[], affinity_timeout=None)

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(self._pool.endpoints)

    @property
    def affinity_entries(self) -> int:
        return len(self._pool.affinity)

    def update(self, endpoints: Iterable[Endpoint], affinity_timeout: float | None) -> None:
        """Adopt a new endpoint set; a no-op when the set and affinity setting are unchanged."""
        pool = self._pool
        wanted = set(endpoints)
        if affinity_timeout != pool.affinity_timeout:
            pool.affinity_timeout = affinity_timeout
            pool.affinity.clear()
        if wanted == set(pool.endpoints):
            return
        shuffled = sorted(wanted)
        self._shuffle(shuffled)
        pool.endpoints = shuffled
        pool.next_index = 0
        # An affinity entry for an endpoint that is gone must never route traffic again.
        stale = [ip for ip, entry in pool.affinity.items() if entry.endpoint not in wanted]
        for ip in stale:
            del pool.affinity[ip]

    def pick(self, client_ip: str, *, reset_affinity: bool = False) -> Endpoint | None:
        """The endpoint for a new connection or flow from `client_ip`; None when there is none.

        `reset_affinity` is set after a failed dial so that the retry moves to another endpoint.
        """
        pool = self._pool
        if not pool.endpoints:
            return None
        timeout = pool.affinity_timeout
        now = 0.0
        if timeout is not None:
            now = self._clock()
            entry = pool.affinity.get(client_ip)
            if entry is not None and not reset_affinity and now - entry.last_used < timeout:
                entry.last_used = now
                return entry.endpoint
        endpoint = pool.endpoints[pool.next_index % len(pool.endpoints)]
        pool.next_index = (pool.next_index + 1) % len(pool.endpoints)
        if timeout is not None:
            pool.affinity[client_ip] = _Affinity(endpoint, now)
        return endpoint

    def sweep(self) -> int:
        """Drop expired affinity entries; returns how many were dropped."""
        timeout = self._pool.affinity_timeout
        if timeout is None or not self._pool.affinity:
            return 0
        now = self._clock()
        expired = [ip for ip, e in self._pool.affinity.items() if now - e.last_used >= timeout]
        for ip in expired:
            del self._pool.affinity[ip]
        return len(expired)
