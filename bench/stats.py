"""From raw samples to medians, per-round ratios and the targets. Pure: no I/O, unit-tested."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

from bench.loads import FIGURE


class SampleLike(Protocol):
    contender: str
    load: str
    run: int
    status: str
    figures: dict[str, float]
    cpu_s: float | None
    peak_rss_mb: float | None
    work: float


@dataclass(frozen=True)
class Spread:
    """The median of several runs with the extremes shown beside it."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread | None:
        if not values:
            return None
        return cls(median(values), min(values), max(values), len(values))

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


# contender -> figure -> run -> value
PerRun = dict[str, dict[str, dict[int, float]]]


def per_run(samples: Iterable[SampleLike]) -> PerRun:
    out: PerRun = defaultdict(lambda: defaultdict(dict))
    for s in samples:
        if s.status == "ok":
            for figure, value in s.figures.items():
                out[s.contender][figure][s.run] = value
    return out


def spreads(table: PerRun) -> dict[str, dict[str, Spread]]:
    out: dict[str, dict[str, Spread]] = {}
    for contender, figures in table.items():
        for figure, runs in figures.items():
            spread = Spread.of(list(runs.values()))
            if spread is not None:
                out.setdefault(contender, {})[figure] = spread
    return out


def ratios(table: PerRun, reference: str | Mapping[str, str]) -> dict[str, dict[str, Spread]]:
    """contender / reference, taken within each run, then summarised across runs.

    `reference` is a contender key, or a mapping figure -> contender key (UDP is compared with
    nginx, everything else with HAProxy). Runs where either side has no figure are left out.
    """
    out: dict[str, dict[str, Spread]] = {}
    for contender, figures in table.items():
        for figure, runs in figures.items():
            ref = reference if isinstance(reference, str) else reference.get(figure)
            if ref is None:
                continue
            ref_runs = table.get(ref, {}).get(figure, {})
            values = [v / ref_runs[r] for r, v in runs.items() if ref_runs.get(r)]
            spread = Spread.of(values)
            if spread is not None:
                out.setdefault(contender, {})[figure] = spread
    return out


def added_over(table: PerRun, figure: str, base: str) -> dict[str, Spread]:
    """contender - base for `figure`, within each run (latency a proxy adds over direct)."""
    out: dict[str, Spread] = {}
    base_runs = table.get(base, {}).get(figure, {})
    for contender, figures in table.items():
        runs = figures.get(figure, {})
        spread = Spread.of([v - base_runs[r] for r, v in runs.items() if r in base_runs])
        if spread is not None:
            out[contender] = spread
    return out


def usage(samples: Iterable[SampleLike]) -> dict[str, dict[str, dict[str, Spread]]]:
    """contender -> load -> {"cpu_s", "peak_rss_mb", "cpu_per_work"} for measured processes."""
    raw: dict[str, dict[str, dict[str, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for s in samples:
        if s.status == "ok" and s.cpu_s is not None and s.peak_rss_mb is not None:
            raw[s.contender][s.load]["cpu_s"].append(s.cpu_s)
            raw[s.contender][s.load]["peak_rss_mb"].append(s.peak_rss_mb)
            if s.work > 0:
                raw[s.contender][s.load]["cpu_per_work"].append(s.cpu_s / s.work)
    out: dict[str, dict[str, dict[str, Spread]]] = {}
    for contender, loads in raw.items():
        for load, metrics in loads.items():
            for metric, values in metrics.items():
                spread = Spread.of(values)
                if spread is not None:
                    out.setdefault(contender, {}).setdefault(load, {})[metric] = spread
    return out


def reference_for(figure: str) -> str:
    return FIGURE[figure].reference if figure in FIGURE else "haproxy"


CP_NAMES = {
    "nft": "iptables-nft",
    "legacy": "iptables-legacy",
    "ipvs": "IPVS",
    "pipeline": "userspace mode, whole sync",
    "nftables": "nftables mode",
}


@dataclass(frozen=True)
class Target:
    what: str
    goal: str
    measured: str
    met: bool | None  # None: could not be measured in this run


def _fmt_ratio(s: Spread | None) -> str:
    # Three decimals: 0.998x must not read as a met 1.00x.
    return "n/a" if s is None else f"{s.median:.3f}x"


def dataplane_targets(
    table: PerRun, subject: str = "uproxy-uvloop", reference: str = "haproxy"
) -> list[Target]:
    """The issue's data-plane goals for `subject`. Reported, never asserted."""
    vs_ref = ratios(table, {f: reference_for(f) for f in FIGURE})
    mine = vs_ref.get(subject, {})
    targets: list[Target] = []
    for figure, what, goal in (
        ("tcp_1", "bulk TCP, 1 stream vs HAProxy", 1.0),
        ("tcp_8", "bulk TCP, 8 streams vs HAProxy", 1.0),
        ("http_cps", "new connections/s vs HAProxy", 1.0),
        ("http_rps", "keep-alive requests/s vs HAProxy", 1.0),
        ("udp_pps", "UDP packets/s vs nginx stream", 2.0),
    ):
        spread = mine.get(figure)
        met = None if spread is None else spread.median >= goal
        targets.append(Target(what, f">= {goal:.1f}x", _fmt_ratio(spread), met))
    added = added_over(table, "lat_p50", "direct")
    own, ref = added.get(subject), added.get(reference)
    if own is not None and ref is not None:
        measured = f"{own.median:+.0f} µs (HAProxy {ref.median:+.0f} µs)"
        targets.append(
            Target(
                "p50 latency added over direct", "<= HAProxy's", measured, own.median <= ref.median
            )
        )
    else:
        targets.append(Target("p50 latency added over direct", "<= HAProxy's", "n/a", None))
    hold = spreads(table).get(subject, {}).get("http_cps_hold")
    targets.append(
        Target(
            "new connections/s, last of 5 rounds in a row vs the first (worst round)",
            ">= 0.9x",
            "n/a" if hold is None else f"{hold.low:.2f}x",
            None if hold is None else hold.low >= 0.9,
        )
    )
    rss = spreads(table).get(subject, {}).get("idle_rss")
    targets.append(
        Target(
            "RSS with 1,000 idle connections",
            "<= 50 MB",
            "n/a" if rss is None else f"{rss.median:.1f} MB",
            None if rss is None else rss.median <= 50.0,
        )
    )
    return targets


def controlplane_targets(summary: Mapping[str, Mapping[int, Mapping[str, Spread]]]) -> list[Target]:
    """summary: backend -> ports -> {"full_sync_s", "change_s"} spreads."""
    targets: list[Target] = []
    for backend, sizes in summary.items():
        full = sizes.get(10000, {}).get("full_sync_s")
        targets.append(
            Target(
                f"full sync of 10,000 service ports ({CP_NAMES.get(backend, backend)})",
                "<= 1 s",
                "n/a" if full is None else f"{full.median:.3f} s",
                None if full is None else full.median <= 1.0,
            )
        )
        worst = max(sizes) if sizes else None
        change = sizes.get(worst, {}).get("change_s") if worst is not None else None
        targets.append(
            Target(
                f"one change in the kernel ({CP_NAMES.get(backend, backend)}, "
                f"{worst or 0:,} ports present)",
                "<= 50 ms",
                "n/a" if change is None else f"{change.median * 1000:.1f} ms",
                None if change is None else change.median <= 0.050,
            )
        )
    return targets
