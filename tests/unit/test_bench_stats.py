"""The benchmark's arithmetic: medians, pair-by-pair ratios, targets and table cells."""

from __future__ import annotations

import pytest

from bench import stats
from bench.report import _spread
from bench.runner import Sample, rotate
from bench.stats import Spread


def ok(contender: str, run: int, **figures: float) -> Sample:
    return Sample(contender, "load", run, "ok", figures=dict(figures))


def test_spread_is_median_min_max() -> None:
    assert Spread.of([3.0, 1.0, 2.0]) == Spread(2.0, 1.0, 3.0, 3)
    assert Spread.of([1.0, 4.0]) == Spread(2.5, 1.0, 4.0, 2)
    assert Spread.of([]) is None


def test_ratios_pair_runs_before_taking_the_median() -> None:
    # Round 1 is twice as fast for both: the per-round ratio stays 0.5 throughout, while a
    # ratio of medians would see the drift.
    samples = [
        ok("a", 0, x=10),
        ok("ref", 0, x=20),
        ok("a", 1, x=20),
        ok("ref", 1, x=40),
        ok("a", 2, x=11),
        ok("ref", 2, x=22),
    ]
    r = stats.ratios(stats.per_run(samples), "ref")
    assert r["a"]["x"] == Spread(0.5, 0.5, 0.5, 3)
    assert r["ref"]["x"].median == 1


def test_ratios_skip_rounds_missing_either_side() -> None:
    samples = [ok("a", 0, x=10), ok("ref", 0, x=20), ok("a", 1, x=30)]
    samples.append(Sample("ref", "load", 1, "failed", note="boom"))
    assert stats.ratios(stats.per_run(samples), "ref")["a"]["x"].n == 1


def test_reference_per_figure() -> None:
    samples = [
        ok("a", 0, udp_pps=30, tcp_1=3),
        ok("haproxy", 0, tcp_1=1),
        ok("nginx", 0, udp_pps=10),
    ]
    r = stats.ratios(stats.per_run(samples), {"udp_pps": "nginx", "tcp_1": "haproxy"})
    assert r["a"]["udp_pps"].median == 3
    assert r["a"]["tcp_1"].median == 3


def test_latency_added_over_direct() -> None:
    samples = [ok("direct", 0, lat_p50=20), ok("p", 0, lat_p50=50), ok("p", 1, lat_p50=60)]
    added = stats.added_over(stats.per_run(samples), "lat_p50", "direct")
    assert added["p"] == Spread(30, 30, 30, 1)  # round 1 has no direct figure to subtract


def test_targets_report_met_and_unmeasured() -> None:
    samples = [
        ok("uproxy-uvloop", 0, tcp_1=12, http_cps=9, lat_p50=40, idle_rss=30),
        ok("haproxy", 0, tcp_1=10, http_cps=10, lat_p50=50),
        ok("direct", 0, lat_p50=20),
    ]
    targets = {t.what: t for t in stats.dataplane_targets(stats.per_run(samples))}
    assert targets["bulk TCP, 1 stream vs HAProxy"].met is True
    assert targets["new connections/s vs HAProxy"].met is False
    assert targets["UDP packets/s vs nginx stream"].met is None
    assert targets["p50 latency added over direct"].met is True
    assert targets["RSS with 1,000 idle connections"].met is True


def test_controlplane_targets() -> None:
    summary = {
        "nft": {
            1000: {"full_sync_s": Spread.of([0.1]), "change_s": Spread.of([0.004])},
            10000: {"full_sync_s": Spread.of([1.2]), "change_s": Spread.of([0.02])},
        }
    }
    targets = stats.controlplane_targets(summary)  # type: ignore[arg-type]
    assert [t.met for t in targets] == [False, True]
    assert "10,000 ports present" in targets[1].what


@pytest.mark.parametrize(
    ("spread", "fmt", "cell"),
    [
        (None, "{:.2f}x", "—"),
        (Spread(1.0, 1.0, 1.0, 1), "{:.2f}x", "1.00x"),
        (Spread(1.05, 0.98, 1.1, 3), "{:.2f}x", "1.05x (0.98\u20131.10)"),
        (Spread(30, 25, 40, 3), "{:+.0f} µs", "+30 µs (+25\u2013+40)"),
        (Spread(1234.4, 1234.2, 1234.3, 3), "{:,.0f}", "1,234"),
    ],
)
def test_table_cells(spread: Spread | None, fmt: str, cell: str) -> None:
    assert _spread(spread, fmt) == cell


def test_rotation_changes_who_goes_first() -> None:
    assert rotate([1, 2, 3], 0) == [1, 2, 3]
    assert rotate([1, 2, 3], 4) == [2, 3, 1]
    assert rotate([], 2) == []
