from __future__ import annotations

import random

from uproxy.backoff import Backoff


def test_delays_double_up_to_the_cap() -> None:
    backoff = Backoff(0.05, 1.0)
    delays = [backoff.next_delay() for _ in range(8)]
    assert delays == [0.05, 0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0]
    assert backoff.failures == 8


def test_reset_starts_over() -> None:
    backoff = Backoff(0.5, 30.0)
    for _ in range(5):
        backoff.next_delay()
    backoff.reset()
    assert backoff.failures == 0
    assert backoff.next_delay() == 0.5


def test_a_cap_below_base_is_the_delay() -> None:
    assert Backoff(0.5, 0.2).next_delay() == 0.2


def test_jitter_draws_from_the_upper_half() -> None:
    draws: list[tuple[float, float]] = []

    def uniform(low: float, high: float) -> float:
        draws.append((low, high))
        return low

    backoff = Backoff(0.5, 4.0, jitter=True, uniform=uniform)
    delays = [backoff.next_delay() for _ in range(5)]
    assert draws == [(0.25, 0.5), (0.5, 1.0), (1.0, 2.0), (2.0, 4.0), (2.0, 4.0)]
    assert delays == [0.25, 0.5, 1.0, 2.0, 2.0]


def test_jitter_with_a_real_random_source_stays_in_bounds() -> None:
    backoff = Backoff(0.5, 4.0, jitter=True, uniform=random.Random(7).uniform)
    for ceiling in (0.5, 1.0, 2.0, 4.0, 4.0):
        assert ceiling / 2 <= backoff.next_delay() <= ceiling


def test_endless_failures_stay_finite() -> None:
    backoff = Backoff(0.5, 10.0)
    for _ in range(5000):
        delay = backoff.next_delay()
    assert delay == 10.0
