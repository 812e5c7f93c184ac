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


def test_a_retry_leaves_its_affinity_for_an_untried_endpoint() -> None:
    lb = LoadBalancer(clock=FakeClock())
    lb.update(endpoints(2), 100)
    first = lb.pick("c1")
    assert first is not None
    second = lb.pick("c1", tried=[first])
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


# --- retries that learn: never the same endpoint twice, passive ejection ---------------------


@given(n=st.integers(min_value=2, max_value=8), data=st.data())
def test_retries_never_repeat_an_endpoint_while_an_untried_one_exists(
    n: int, data: st.DataObject
) -> None:
    eps = endpoints(n)
    lb = LoadBalancer()
    lb.update(eps, data.draw(st.one_of(st.none(), st.just(100))))
    for _ in range(data.draw(st.integers(min_value=0, max_value=10))):
        lb.pick("c0")  # move the shared round-robin position anywhere
    tried: list[Endpoint] = []
    for _ in range(n):
        endpoint = lb.pick("c1", tried=tried)
        assert endpoint is not None and endpoint not in tried
        tried.append(endpoint)
    assert set(tried) == set(eps)
    assert lb.pick("c1", tried=tried) in eps  # all tried: go round again


def fail(lb: LoadBalancer, endpoint: Endpoint, times: int) -> list[bool]:
    return [lb.dial_failed(endpoint) for _ in range(times)]


def test_three_failures_in_a_row_eject_for_a_doubling_while_then_probation() -> None:
    clock = FakeClock()
    lb = LoadBalancer(clock=clock)
    eps = endpoints(3)
    lb.update(eps, None)
    dead = eps[0]
    assert fail(lb, dead, 3) == [False, False, True]
    assert lb.ejected == {dead} and lb.ejections == 1
    assert dead not in {lb.pick(f"c{i}") for i in range(30)}

    clock.now += 1.0  # the first ejection lasts a second
    assert lb.ejected == frozenset()
    assert dead in {lb.pick(f"c{i}") for i in range(3)}
    # On probation: one more failure ejects it again, for twice as long.
    assert fail(lb, dead, 1) == [True]
    clock.now += 1.5
    assert lb.ejected == {dead}
    clock.now += 0.5
    assert lb.ejected == frozenset()

    # A success clears the record: three failures are needed again, and the base period.
    lb.dial_succeeded(dead)
    assert fail(lb, dead, 3) == [False, False, True]
    clock.now += 1.0
    assert lb.ejected == frozenset()


def test_ejection_is_capped_at_thirty_seconds() -> None:
    clock = FakeClock()
    lb = LoadBalancer(clock=clock)
    eps = endpoints(2)
    lb.update(eps, None)
    fail(lb, eps[0], 3)
    periods = []
    for _ in range(8):
        start = clock.now
        while lb.ejected:
            clock.now += 0.5
        periods.append(clock.now - start)
        assert fail(lb, eps[0], 1) == [True]
    assert periods[:6] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert periods[6:] == [30.0, 30.0]


def test_the_last_endpoint_standing_is_never_ejected() -> None:
    lb = LoadBalancer(clock=FakeClock())
    eps = endpoints(2)
    lb.update(eps, None)
    assert fail(lb, eps[0], 3)[-1] is True
    assert not any(fail(lb, eps[1], 10))
    assert lb.ejected == {eps[0]}
    only = LoadBalancer(clock=FakeClock())
    only.update(eps[:1], None)
    assert not any(fail(only, eps[0], 10))
    assert only.pick("c1") == eps[0]


def test_affinity_to_an_ejected_endpoint_moves_and_a_removed_endpoint_forgets_its_record() -> None:
    clock = FakeClock()
    lb = LoadBalancer(clock=clock)
    eps = endpoints(3)
    lb.update(eps, 100)
    sticky = lb.pick("c1")
    assert sticky is not None
    fail(lb, sticky, 3)
    moved = lb.pick("c1")
    assert moved != sticky
    lb.update([e for e in eps if e != sticky], 100)
    assert lb.ejected == frozenset()
    lb.update(eps, 100)
    assert fail(lb, sticky, 2) == [False, False]  # a fresh record
