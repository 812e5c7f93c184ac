"""Round robin with optional ClientIP affinity and passive ejection, per service port.

Pure: no I/O, the clock and the shuffle are injected, so every rule here is unit-testable.
Semantics follow kube-proxy's userspace LoadBalancerRR: a shuffled endpoint list walked round
robin, reshuffled and reset only when the set of endpoints really changes; ClientIP affinity is a
sliding window refreshed on every use.

On top of that, what kube-proxy lacked and HAProxy (`observe layer4`, `redispatch`) and Envoy
(outlier detection) have: a dial retry never goes back to an endpoint this connection already
tried while an untried one exists, and an endpoint whose dials fail `EJECT_AFTER` times in a row
is skipped for a while (1 s, doubling per ejection to 30 s). When that while is over it comes back
on probation: one more failure ejects it again for longer, one success clears its record. An
endpoint is never skipped when every endpoint is ejected: an ejected endpoint beats none.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass, field

from uproxy.model import Endpoint

Clock = Callable[[], float]
Shuffle = Callable[[list[Endpoint]], None]

EJECT_AFTER = 3  # consecutive failed dials
EJECT_BASE = 1.0  # seconds; doubles per ejection in a row
EJECT_CAP = 30.0


@dataclass(slots=True)
class _Health:
    """An endpoint's dial record; only endpoints that failed lately have one."""

    failures: int = 0  # in a row
    ejected_until: float = 0.0
    next_ejection: float = EJECT_BASE
    probation: bool = False  # back from an ejection, not yet proven


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

    __slots__ = ("_clock", "_ejected", "_health", "_pool", "_shuffle", "ejections")

    def __init__(self, *, clock: Clock = time.monotonic, shuffle: Shuffle = random.shuffle) -> None:
        self._clock = clock
        self._shuffle = shuffle
        self._pool = _Pool(endpoints=[], affinity_timeout=None)
        self._health: dict[Endpoint, _Health] = {}
        # Endpoints skipped until their time is up; empty on the fast path.
        self._ejected: set[Endpoint] = set()
        self.ejections = 0  # ever, for metrics

    @property
    def endpoints(self) -> tuple[Endpoint, ...]:
        return tuple(self._pool.endpoints)

    @property
    def affinity_entries(self) -> int:
        return len(self._pool.affinity)

    @property
    def ejected(self) -> frozenset[Endpoint]:
        """The endpoints new connections skip right now."""
        self._release_ejected()
        return frozenset(self._ejected)

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
        for gone in self._health.keys() - wanted:
            del self._health[gone]
        self._ejected &= wanted

    def pick(self, client_ip: str, *, tried: Collection[Endpoint] = ()) -> Endpoint | None:
        """The endpoint for a new connection or flow from `client_ip`; None when there is none.

        `tried` are the endpoints this connection's failed dials went to: a retry leaves its
        affinity behind and takes an endpoint not among them while one exists.
        """
        pool = self._pool
        if not pool.endpoints:
            return None
        if self._ejected:
            self._release_ejected()
        timeout = pool.affinity_timeout
        now = 0.0
        if timeout is not None:
            now = self._clock()
            entry = pool.affinity.get(client_ip)
            if (
                entry is not None
                and not tried
                and now - entry.last_used < timeout
                and entry.endpoint not in self._ejected
            ):
                entry.last_used = now
                return entry.endpoint
        endpoint = self._next(tried)
        if timeout is not None:
            pool.affinity[client_ip] = _Affinity(endpoint, now)
        return endpoint

    def dial_failed(self, endpoint: Endpoint) -> bool:
        """Record a failed dial to `endpoint`; True when this failure ejected it."""
        if endpoint not in self._pool.endpoints:
            return False  # removed meanwhile
        health = self._health.setdefault(endpoint, _Health())
        health.failures += 1
        if endpoint in self._ejected:
            return False  # dialled while every endpoint was ejected
        if not (health.probation or health.failures >= EJECT_AFTER):
            return False
        if len(self._pool.endpoints) - len(self._ejected) <= 1:
            return False  # the last one standing: skipping it would leave nothing
        health.failures = 0
        health.probation = False
        health.ejected_until = self._clock() + health.next_ejection
        health.next_ejection = min(health.next_ejection * 2, EJECT_CAP)
        self._ejected.add(endpoint)
        self.ejections += 1
        return True

    def dial_succeeded(self, endpoint: Endpoint) -> None:
        if self._health and self._health.pop(endpoint, None) is not None:
            self._ejected.discard(endpoint)  # it answers after all

    def _next(self, tried: Collection[Endpoint]) -> Endpoint:
        pool = self._pool
        count = len(pool.endpoints)
        start = pool.next_index
        if self._ejected or tried:
            # Best first: neither tried nor ejected; then untried; then anything.
            for avoid_ejected in (True, False):
                for step in range(count):
                    candidate = pool.endpoints[(start + step) % count]
                    if candidate in tried or (avoid_ejected and candidate in self._ejected):
                        continue
                    pool.next_index = (start + step + 1) % count
                    return candidate
        endpoint = pool.endpoints[start % count]
        pool.next_index = (start + 1) % count
        return endpoint

    def _release_ejected(self) -> None:
        if not self._ejected:
            return
        now = self._clock()
        for endpoint in [e for e in self._ejected if self._health[e].ejected_until <= now]:
            self._ejected.discard(endpoint)
            self._health[endpoint].probation = True

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
