from __future__ import annotations

from collections import Counter

from hypothesis import given
from hypothesis import strategies as st

from uproxy.balancer import LoadBalancer
from uproxy.model import Endpoint


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def endpoints(n: int) -> list[Endpoint]:
    return [Endpoint(f"10.0.0.{i + 1}", 8080) for i in range(n)]


endpoint_sets = st.integers(min_value=1, max_value=12).map(endpoints)


@given(eps=endpoint_sets, picks=st.integers(min_value=0, max_value=500))
def test_round_robin_spreads_within_one(eps: list[Endpoint], picks: int) -> None:
    lb = LoadBalancer()
    lb.update(eps, None)
    counts = Counter(lb.pick(f"192.0.2.{i % 250}") for i in range(picks))
    per_endpoint = [counts.get(e, 0) for e in eps]
    assert max(per_endpoint) - min(per_endpoint) <= 1
    assert sum(per_endpoint) == picks


@given(eps=endpoint_sets, timeout=st.integers(min_value=1, max_value=86400), data=st.data())
def test_affinity_sticks_until_timeout(
    eps: list[Endpoint], timeout: int, data: st.DataObject
) -> None:
    clock = FakeClock()
    lb = LoadBalancer(clock=clock)
    lb.update(eps, timeout)
    first = lb.pick("198.51.100.7")
    for _ in range(data.draw(st.integers(min_value=1, max_value=20))):
        # Each use refreshes the window, so gaps shorter than the timeout never break it.
        clock.now += data.draw(st.floats(min_value=0, max_value=timeout * 0.99))
        assert lb.pick("198.51.100.7") == first
    # Idle past the timeout, the entry expires and is swept.
    clock.now += timeout + 1
    assert lb.sweep() == 1
    assert lb.affinity_entries == 0


@given(
    eps=endpoint_sets,
    removed=st.data(),
    affinity=st.one_of(st.none(), st.integers(min_value=1, max_value=100)),
)
def test_removed_endpoint_is_never_returned(
    eps: list[Endpoint], removed: st.DataObject, affinity: int | None
) -> None:
    lb = LoadBalancer(clock=FakeClock())
    lb.update(eps, affinity)
    clients = [f"203.0.113.{i}" for i in range(30)]
    for client in clients:
        lb.pick(client)
    gone = set(removed.draw(st.sets(st.sampled_from(eps))))
    lb.update([e for e in eps if e not in gone], affinity)
    for client in clients * 2:
        picked = lb.pick(client)
        if len(gone) == len(eps):
            assert picked is None
        else:
            assert picked not in gone


def test_unchanged_update_keeps_cursor_and_affinity() -> None:
    lb = LoadBalancer(clock=FakeClock())
    eps = endpoints(3)
    lb.update(eps, 100)
    a = lb.pick("c1")
    b = lb.pick("c2")
    lb.update(list(reversed(eps)), 100)  # the same set in another order is no change
    assert lb.pick("c1") == a
    assert lb.pick("c2") == b
    assert lb.affinity_entries == 2


def test_reset_affinity_moves_to_next_endpoint() -> None:
    lb = LoadBalancer(clock=FakeClock())
    lb.update(endpoints(2), 100)
    first = lb.pick("c1")
    second = lb.pick("c1", reset_affinity=True)
    assert second != first
    assert lb.pick("c1") == second


def test_affinity_change_clears_entries() -> None:
    lb = LoadBalancer(clock=FakeClock())
    lb.update(endpoints(3), 100)
    lb.pick("c1")
    lb.update(endpoints(3), None)
    assert lb.affinity_entries == 0


def test_no_endpoints_picks_none() -> None:
    assert LoadBalancer().pick("c1") is None
