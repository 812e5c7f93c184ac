"""Markdown table, JSON file with every raw run, and a PNG chart of the ratios."""

from __future__ import annotations

import json
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bench import stats
from bench.contenders import Contender
from bench.controlplane import BACKENDS, CpResult
from bench.loads import FIGURE, FIGURES, LOADS
from bench.machine import Machine
from bench.runner import Sample, Settings
from bench.stats import Spread

DASH = "\u2013"  # between min and max; an escape keeps ruff from flagging the en dash
SUBJECT = "uproxy-uvloop"  # whose targets are checked
CP_LABEL = {
    "nft": "iptables-nft",
    "legacy": "iptables-legacy",
    "ipvs": "IPVS",
    "pipeline": "userspace mode, whole sync (nft)",
    "nftables": "nftables mode",
}


@dataclass
class Report:
    machine: Machine
    settings: Settings
    contenders: Sequence[Contender]
    unavailable: Mapping[str, str]
    samples: Sequence[Sample]
    cp_results: Sequence[CpResult]
    cp_sizes: Sequence[int]
    notes: list[str] = field(default_factory=list)

    # -- derived -------------------------------------------------------------------------

    def __post_init__(self) -> None:
        self.table = stats.per_run(self.samples)
        self.spreads = stats.spreads(self.table)
        self.vs_direct = stats.ratios(self.table, "direct")
        self.vs_reference = stats.ratios(self.table, {f.key: f.reference for f in FIGURES})
        self.latency_added = stats.added_over(self.table, "lat_p50", "direct")
        self.usage = stats.usage(self.samples)
        self.cp_summary = cp_summary(self.cp_results)
        self.targets = [
            *stats.dataplane_targets(self.table, SUBJECT),
            *stats.controlplane_targets(self.cp_summary),
        ]

    def label(self, key: str) -> str:
        return next((c.label for c in self.contenders if c.key == key), key)

    @property
    def measured(self) -> list[Contender]:
        """Contenders with at least one figure: the table's columns."""
        return [c for c in self.contenders if c.key in self.spreads]

    # -- JSON ----------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        def spread_map(m: Mapping[str, Mapping[str, Spread]]) -> dict[str, Any]:
            return {c: {f: s.to_json() for f, s in v.items()} for c, v in m.items()}

        return {
            "machine": self.machine.to_json(),
            "settings": asdict(self.settings),
            "contenders": [
                {"key": c.key, "label": c.label, "skipped": self.unavailable.get(c.key, "")}
                for c in self.contenders
            ],
            "figures": [asdict(f) for f in FIGURES],
            "loads": [{"key": ld.key, "label": ld.label, "figures": ld.figures} for ld in LOADS],
            "samples": [s.to_json() for s in self.samples],
            "summary": spread_map(self.spreads),
            "ratios": {
                "vs_direct": spread_map(self.vs_direct),
                "vs_reference": spread_map(self.vs_reference),
                "reference": {f.key: f.reference for f in FIGURES},
            },
            "latency_p50_added_over_direct_us": {
                c: s.to_json() for c, s in self.latency_added.items()
            },
            "usage": {
                c: {ld: {m: s.to_json() for m, s in v.items()} for ld, v in loads.items()}
                for c, loads in self.usage.items()
            },
            "controlplane": {
                "runs": [asdict(r) for r in self.cp_results],
                "summary": {
                    b: {str(n): {k: s.to_json() for k, s in v.items()} for n, v in sizes.items()}
                    for b, sizes in self.cp_summary.items()
                },
            },
            "targets": [asdict(t) for t in self.targets],
            "notes": self.notes,
        }

    # -- markdown ------------------------------------------------------------------------

    def markdown(self) -> str:
        cols = self.measured
        runs = self.settings.runs
        spread_hint = f"median (min{DASH}max) of" if runs > 1 else "one run of"
        out = [
            "# uproxy benchmark",
            "",
            f"Machine: {self.machine.line()}.",
            "",
            f"Run {self.machine.started}: {spread_hint} {runs} round(s), "
            f"{self.settings.seconds:g} s per figure"
            f"{' (--quick)' if self.settings.quick else ''}. Ratios are taken within each round "
            "(pair by pair), then summarised the same way.",
            "",
            "## Data plane",
            "",
            _row(["figure", "unit", *(c.label for c in cols)]),
            _row(["---"] * (2 + len(cols))),
        ]
        for f in FIGURES:
            cells = [self._value_cell(c.key, f.key) for c in cols]
            out.append(_row([f.label, f.unit, *cells]))
        out += ["", *self._hold_lines(cols)]
        out += ["", "## Ratios against HAProxy (nginx stream for UDP)", ""]
        out += [
            "Above 1 is better for throughput figures, below 1 is better for latency and memory.",
            "",
        ]
        out += self._ratio_table(self.vs_reference, cols, skip_self=True)
        out += ["", "## Ratios against direct (no proxy: the physical limit)", ""]
        out += self._ratio_table(self.vs_direct, cols, skip_self=True, skip={"idle_rss"})
        out += ["", "## p50 latency added over direct", ""]
        out.append(_row([c.label for c in cols if c.key != "direct"]))
        out.append(_row(["---"] * len([c for c in cols if c.key != "direct"])))
        out.append(
            _row(
                [
                    _spread(self.latency_added.get(c.key), "{:+.0f} µs")
                    for c in cols
                    if c.key != "direct"
                ]
            )
        )
        out += self._usage_table(cols)
        out += self._cp_table()
        out += ["", f"## Targets ({self.label(SUBJECT)}; reported, never asserted)", ""]
        out.append(_row(["goal", "target", "measured", "met"]))
        out.append(_row(["---"] * 4))
        for t in self.targets:
            met = "n/a" if t.met is None else ("yes" if t.met else "**no**")
            out.append(_row([t.what, t.goal, t.measured, met]))
        out += ["", "## Notes", ""]
        out += [f"- {note}" for note in self.notes]
        return "\n".join(out) + "\n"

    def _hold_lines(self, cols: Sequence[Contender]) -> list[str]:
        """Whether new connections/s held up over back-to-back rounds (client TIME_WAIT)."""
        held = []
        for c in cols:
            spread = self.spreads.get(c.key, {}).get("http_cps_hold")
            if spread is not None:
                verdict = "held" if spread.low >= 0.9 else "**did not hold**"
                held.append(f"{c.label} {verdict} ({spread.low:.2f}x at worst)")
        if not held:
            return []
        return [
            "New connections/s are measured in 5 rounds in a row, without pauses, from a client "
            "with a pod's default sysctls; the last round against the first, 0.9x to hold: "
            + "; ".join(held)
            + "."
        ]

    def _value_cell(self, contender: str, figure: str) -> str:
        spread = self.spreads.get(contender, {}).get(figure)
        if spread is not None:
            digits = FIGURE[figure].digits
            return _spread(spread, f"{{:,.{digits}f}}")
        return self._why_missing(contender, figure)

    def _why_missing(self, contender: str, figure: str) -> str:
        load = next((ld.key for ld in LOADS if figure in ld.figures), "")
        notes = {
            s.note
            for s in self.samples
            if s.contender == contender and s.load == load and s.status != "ok"
        }
        statuses = {
            s.status
            for s in self.samples
            if s.contender == contender and s.load == load and s.status != "ok"
        }
        if "failed" in statuses:
            return "failed"
        if "in the kernel" in " ".join(notes):
            return "— (kernel)"
        if notes:
            return "— (" + "; ".join(sorted(notes))[:40] + ")"
        return "—"

    def _ratio_table(
        self,
        ratios: Mapping[str, Mapping[str, Spread]],
        cols: Sequence[Contender],
        *,
        skip_self: bool,
        skip: set[str] | None = None,
    ) -> list[str]:
        lines = [_row(["figure", *(c.label for c in cols)]), _row(["---"] * (1 + len(cols)))]
        for f in FIGURES:
            if skip and f.key in skip:
                continue
            cells = []
            for c in cols:
                spread = ratios.get(c.key, {}).get(f.key)
                if spread is not None and spread.median == 1 and spread.low == spread.high:
                    cells.append("1 (reference)" if skip_self else "1")
                else:
                    cells.append(_spread(spread, "{:.2f}x"))
            lines.append(_row([f.label, *cells]))
        return lines

    def _usage_table(self, cols: Sequence[Contender]) -> list[str]:
        procs = [c for c in cols if not c.in_kernel]
        out = ["", "## Proxy CPU seconds and peak RSS under each load", ""]
        out.append(
            f"CPU seconds the proxy's processes used during each load ({self.settings.seconds:g} s "
            "of traffic; a faster proxy does more work in that time), in brackets that CPU per "
            "unit of work (lower is more efficient, whatever CPU share the proxy got), and the "
            "peak RSS."
        )
        out += ["", _row(["load", *(c.label for c in procs)]), _row(["---"] * (1 + len(procs)))]
        for load in LOADS:
            cells = []
            for c in procs:
                u = self.usage.get(c.key, {}).get(load.key)
                if not u:
                    cells.append("—")
                    continue
                cell = f"{u['cpu_s'].median:.2f} s"
                per = u.get("cpu_per_work")
                if per is not None:
                    cell += f" ({per.median * load.cpu_scale:.3g} {load.cpu_unit}/{load.work_unit})"
                cells.append(f"{cell}, {u['peak_rss_mb'].median:.1f} MB")
            out.append(_row([load.label, *cells]))
        return out

    def _cp_table(self) -> list[str]:
        out = ["", "## Control plane", ""]
        out.append(
            "Full sync: N service ports (one ClusterIP each) into an empty kernel. Resync: a "
            "fresh sync over the same state already present (read back and converged). One "
            "change: one service port added with N present, until it is committed. iptables "
            "rows time the userspace mode's portals (NetfilterPortals.sync); the IPVS row "
            "times IPVS mode's virtual servers (IpvsProxier.sync); the whole-sync row times the "
            "userspace mode's tracker snapshot plus UserspaceProxier.sync, one change being one "
            "service's endpoints; the nftables row times NftablesProxier.sync."
        )
        out += [
            "",
            _row(["backend", "service ports", "full sync", "resync", "one change"]),
            _row(["---"] * 5),
        ]
        for backend in BACKENDS:
            for size in self.cp_sizes:
                s = self.cp_summary.get(backend, {}).get(size, {})
                label = CP_LABEL.get(backend, backend)
                if not s:
                    statuses = {
                        r.status
                        for r in self.cp_results
                        if r.backend == backend and r.ports == size
                    }
                    why = "skipped (see the notes)" if statuses == {"skipped"} else "failed"
                    if not statuses:
                        why = "not measured"
                    out.append(_row([label, f"{size:,}", why, "—", "—"]))
                    continue
                out.append(
                    _row(
                        [
                            label,
                            f"{size:,}",
                            _spread(s.get("full_sync_s"), "{:.3f} s"),
                            _spread(s.get("resync_s"), "{:.3f} s"),
                            _spread(_scaled(s.get("change_s"), 1000), "{:.1f} ms"),
                        ]
                    )
                )
        return out

    # -- PNG -----------------------------------------------------------------------------

    def chart(self, path: Path) -> str:
        """Write the ratio chart; '' on success, else why not (matplotlib missing)."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return "no PNG chart: matplotlib is not installed (pip install matplotlib)"
        figures = [f for f in FIGURES if f.key != "lat_p99"]
        bars = [c for c in self.measured if c.key != "direct"]
        fig, axes = plt.subplots(2, 1, figsize=(11, 9), constrained_layout=True)
        panels = (
            (self.vs_reference, "relative to HAProxy (nginx stream for UDP)"),
            (self.vs_direct, "relative to direct (no proxy)"),
        )
        width = 0.8 / max(1, len(bars))
        for ax, (ratios, title) in zip(axes, panels, strict=True):
            if ratios is self.vs_direct:
                figures = [f for f in figures if f.key != "idle_rss"]  # nothing to compare
            for i, c in enumerate(bars):
                xs, ys, lo, hi = [], [], [], []
                for j, f in enumerate(figures):
                    s = ratios.get(c.key, {}).get(f.key)
                    if s is None:
                        continue
                    # Plot "how many times better": invert lower-is-better figures.
                    med, low, high = (
                        (s.median, s.low, s.high)
                        if f.higher_is_better
                        else (1 / s.median, 1 / s.high, 1 / s.low)
                    )
                    xs.append(j + (i - (len(bars) - 1) / 2) * width)
                    ys.append(med)
                    lo.append(med - low)
                    hi.append(high - med)
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=c.label)
            ax.axhline(1.0, color="black", linewidth=0.8)
            ax.set_xticks(range(len(figures)))
            ax.set_xticklabels(
                [
                    textwrap.fill(f.label, 18) + ("\n(inverted)" if not f.higher_is_better else "")
                    for f in figures
                ],
                fontsize=8,
            )
            ax.set_ylabel("times better (>1 is better)")
            ax.set_title(title)
            ax.legend(fontsize=8, ncol=3)
        fig.suptitle(f"uproxy benchmark — {self.machine.cores} cores, Linux {self.machine.kernel}")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return ""

    def write(self, out: Path) -> dict[str, Path]:
        out.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": out / "results.md", "json": out / "results.json"}
        png = out / "ratios.png"
        why = self.chart(png)
        if why:
            self.notes.append(why)
        else:
            paths["png"] = png
        paths["markdown"].write_text(self.markdown())
        paths["json"].write_text(json.dumps(self.to_json(), indent=1, default=str) + "\n")
        return paths


def cp_summary(results: Sequence[CpResult]) -> dict[str, dict[int, dict[str, Spread]]]:
    out: dict[str, dict[int, dict[str, Spread]]] = {}
    for backend in BACKENDS:
        for size in sorted({r.ports for r in results}):
            mine = [r for r in results if r.backend == backend and r.ports == size]
            metrics: dict[str, Spread] = {}
            for key in ("full_sync_s", "resync_s", "change_s"):
                values = [getattr(r, key) for r in mine if getattr(r, key) is not None]
                spread = Spread.of(values)
                if spread is not None:
                    metrics[key] = spread
            if metrics:
                out.setdefault(backend, {})[size] = metrics
    return out


def _scaled(s: Spread | None, k: float) -> Spread | None:
    return None if s is None else Spread(s.median * k, s.low * k, s.high * k, s.n)


def _spread(s: Spread | None, fmt: str) -> str:
    """`fmt` is one format field plus an optional unit: "12 µs (10 to 15)", with a dash."""
    if s is None:
        return "—"
    end = fmt.rindex("}") + 1
    number, unit = fmt[:end], fmt[end:]
    low, high = number.format(s.low), number.format(s.high)
    if s.n == 1 or low == high:
        return fmt.format(s.median)
    return f"{number.format(s.median)}{unit} ({low}{DASH}{high})"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"
