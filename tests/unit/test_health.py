from __future__ import annotations

from uproxy.observe.health import Health


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def health(sync_period: float = 30.0) -> tuple[Health, Clock]:
    clock = Clock()
    return Health(sync_period, monotonic=clock, wall=lambda: 1_700_000_000 + clock.now), clock


def test_unhealthy_until_sources_synced_and_first_sync() -> None:
    h, _ = health()
    assert not h.report().healthy
    h.sources_synced()
    assert h.report().reason == "no successful sync yet"
    h.sync_succeeded(None)
    report = h.report()
    assert report.healthy and report.last_updated is not None


def test_change_waiting_longer_than_twice_the_sync_period_is_unhealthy() -> None:
    h, clock = health(sync_period=30)
    h.sources_synced()
    h.sync_succeeded(None)
    h.change_queued()
    clock.now += 59
    assert h.report().healthy
    clock.now += 2
    assert not h.report().healthy
    h.sync_succeeded(None)
    assert h.report().healthy


def test_failing_syncs_turn_unhealthy_even_without_changes() -> None:
    h, clock = health(sync_period=1)
    h.sources_synced()
    h.sync_succeeded(None)
    h.sync_failed()
    clock.now += 1.5
    h.sync_failed()  # a later failure does not restart the clock
    clock.now += 1
    assert not h.report().healthy


def test_change_arriving_during_a_sync_keeps_its_age() -> None:
    h, clock = health(sync_period=1)
    h.sources_synced()
    h.sync_succeeded(None)
    arrived = clock.now
    clock.now += 3
    h.sync_succeeded(still_pending_since=arrived)
    assert not h.report().healthy


def test_go_time_string_format() -> None:
    from uproxy.observe.gotime import go_time

    assert go_time(1_764_612_000.0) == "2025-12-01 18:00:00 +0000 UTC"
    assert go_time(1_764_612_000.5) == "2025-12-01 18:00:00.5 +0000 UTC"
    assert go_time(1_764_612_000.123456) == "2025-12-01 18:00:00.123456 +0000 UTC"
    assert go_time(1_764_612_000.0, 202.63179766) == (
        "2025-12-01 18:00:00 +0000 UTC m=+202.631797660"
    )


def test_node_eligibility_defaults_to_true_and_leaves_the_proxy_health_alone() -> None:
    h, _ = health()
    h.sources_synced()
    h.sync_succeeded(None)
    assert h.node_eligible
    h.set_node_eligible(False)
    assert not h.node_eligible and h.report().healthy
