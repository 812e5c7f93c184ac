"""Capped exponential backoff: the pause before retrying something that keeps failing.

Delays double from `base` up to `cap` with every failure in a row, and start over from `base`
after `reset()` (call it on success). With `jitter`, each delay is drawn from [d/2, d]: many
nodes that lost the same API server at the same moment then do not come back in step.
"""

from __future__ import annotations

import random
from collections.abc import Callable

# 2**30 doublings outgrow any cap; bounding the exponent keeps the float finite forever.
_MAX_DOUBLINGS = 30


class Backoff:
    def __init__(
        self,
        base: float,
        cap: float,
        *,
        jitter: bool = False,
        uniform: Callable[[float, float], float] = random.uniform,
    ) -> None:
        self._base = base
        self._cap = cap
        self._jitter = jitter
        self._uniform = uniform
        self.failures = 0

    def reset(self) -> None:
        self.failures = 0

    def next_delay(self) -> float:
        """Count one more failure; the pause before the next attempt."""
        self.failures += 1
        doublings = min(self.failures - 1, _MAX_DOUBLINGS)
        ceiling = min(self._cap, self._base * 2**doublings)
        return self._uniform(ceiling / 2, ceiling) if self._jitter else ceiling
