"""The data-plane run: every contender through every load, several rounds, pair by pair.

Each contender gets its own topology (client, node and backend namespaces, its own backend
servers) and stays up for the whole run, idle while the others are measured. A round then takes
each load in turn and measures it on every contender back to back, so the figures a ratio
compares were taken seconds apart rather than minutes: drift on a shared machine moves both
sides of a pair together. Ratios are taken within a round and summarised across rounds. The
contender order rotates with every load and round, so none is always measured first or right
after the heaviest neighbour.
"""

from __future__ import annotations

import contextlib
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from bench import servers, topology
from bench.contenders import Contender, Target
from bench.loads import LOADS, Load, LoadContext, LoadFailed, LoadSkipped
from bench.procs import UsageMeter
from bench.topology import Topology

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    runs: int
    seconds: float  # per figure
    omit: int  # iperf3 warm-up seconds
    idle_count: int
    quick: bool


@dataclass
class Sample:
    contender: str
    load: str
    run: int
    status: str  # "ok", "skipped" (with the reason in note) or "failed" (with the error)
    figures: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    cpu_s: float | None = None  # the proxy's CPU seconds during the load (None: in the kernel)
    peak_rss_mb: float | None = None
    work: float = 0.0  # units of work the load did (Load.work_unit)
    seconds: float = 0.0
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


Progress = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def rotate(items: Sequence[T], by: int) -> list[T]:
    if not items:
        return []
    k = by % len(items)
    return [*items[k:], *items[:k]]


MAX_RESTARTS = 3


@dataclass
class _Stage:
    """One contender, up and reachable in its own topology."""

    contender: Contender
    topo: Topology
    target: Target
    workdir: Path
    restarts: int = 0

    def restart(self, why: str, progress: Progress) -> str:
        """Start the contender again after it went away ('' when it is back, else the error).

        On a shared machine something else may signal our daemons (a neighbour's cleanup that
        kills by name); one lost process must not cost every remaining figure of the run."""
        c = self.contender
        if self.restarts >= MAX_RESTARTS:
            return f"gone, not restarted again after {MAX_RESTARTS} restarts: {why}"
        self.restarts += 1
        progress(f"   {c.label} is gone; restarting it ({why.splitlines()[-1][:200]})")
        c.stop()
        try:
            self.target = c.start(self.topo, self.workdir / f"{c.key}-restart{self.restarts}")
            servers.http_probe(self.topo.client, self.target.host)
        except Exception as exc:
            return f"gone, and the restart failed: {exc}"
        return ""


def run_dataplane(
    contenders: Sequence[Contender],
    settings: Settings,
    workroot: Path,
    loads: Sequence[Load] = LOADS,
    progress: Progress = _stderr,
) -> list[Sample]:
    samples: list[Sample] = []
    unavailable = {c.key: c.unavailable() for c in contenders}
    for c in contenders:
        if unavailable[c.key]:
            progress(f"skip {c.label}: {unavailable[c.key]}")
            samples += [
                Sample(c.key, load.key, run, "skipped", note=unavailable[c.key])
                for run in range(settings.runs)
                for load in loads
            ]
    with contextlib.ExitStack() as stack:
        stages: list[_Stage] = []
        for index, c in enumerate(x for x in contenders if not unavailable[x.key]):
            stage, note = _stage(stack, c, index, workroot / c.key)
            if stage is None:
                progress(f"{c.label}: {note}")
                samples += [
                    Sample(c.key, load.key, run, "failed", note=note)
                    for run in range(settings.runs)
                    for load in loads
                ]
            else:
                stages.append(stage)
                progress(f"{c.label}: up, reached at {stage.target.host}")
        for run in range(settings.runs):
            for li, load in enumerate(loads):
                progress(f"== round {run + 1}/{settings.runs}: {load.label}")
                for stage in rotate(stages, run * len(loads) + li):
                    sample = _measure(stage, load, run, settings, progress)
                    samples.append(sample)
                    progress(f"   {_describe(stage.contender, sample)}")
    return samples


def _stage(
    stack: contextlib.ExitStack, c: Contender, index: int, workdir: Path
) -> tuple[_Stage | None, str]:
    """Build `c`'s topology and start its backend and itself; `stack` undoes all of it."""
    workdir.mkdir(parents=True, exist_ok=True)
    topo = stack.enter_context(topology.topology(f"x{index}"))
    try:
        backend = servers.start_http_backend(topo, workdir / "backend")
        stack.callback(backend.stop)
        stack.callback(c.stop)
        target = c.start(topo, workdir / c.key)
        servers.http_probe(topo.client, target.host)
    except Exception as exc:
        (workdir / "start-error.txt").write_text(traceback.format_exc())
        return None, f"failed to start: {exc}"
    return _Stage(c, topo, target, workdir), ""


def _measure(
    stage: _Stage, load: Load, run: int, settings: Settings, progress: Progress = _stderr
) -> Sample:
    c = stage.contender
    restarted = ""
    if not c.alive():
        restarted = f"the proxy was gone before this load and was restarted; its log: {c.tail()}"
        error = stage.restart(c.tail(), progress)
        if error:
            return Sample(c.key, load.key, run, "failed", note=error)
    ctx = LoadContext(
        topo=stage.topo,
        host=stage.target.host,
        udp=stage.target.udp,
        udp_note=c.udp_note,
        pid=c.pid,
        workdir=stage.workdir / f"run{run}" / load.key,
        seconds=settings.seconds,
        omit=settings.omit,
        idle_count=settings.idle_count,
    )
    ctx.workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    with UsageMeter(c.pid) as meter:
        try:
            result = load.run(ctx)
        except LoadSkipped as exc:
            return Sample(c.key, load.key, run, "skipped", note=str(exc))
        except (LoadFailed, TimeoutError, EOFError, OSError, ValueError, KeyError) as exc:
            alive = c.alive()
            note = f"{exc}" if alive else f"{exc} (the proxy died: {c.tail()})"
            return Sample(c.key, load.key, run, "failed", note=note)
        usage = meter.read()
    sample = Sample(
        c.key,
        load.key,
        run,
        "ok",
        figures=result.figures,
        extra=result.extra,
        seconds=time.monotonic() - started,
        work=result.work,
    )
    if usage is not None:
        sample.cpu_s = usage.cpu_s
        sample.peak_rss_mb = usage.peak_rss / 1e6
    if restarted:
        sample.extra["restarted"] = restarted
    if not c.alive():
        sample.status = "failed"
        sample.note = f"the proxy died during the load: {c.tail()}"
    return sample


def _describe(c: Contender, s: Sample) -> str:
    head = f"{c.label:<15}"
    if s.status != "ok":
        return f"{head} {s.status}: {s.note}"
    figures = "  ".join(f"{k}={v:,.2f}" for k, v in s.figures.items())
    usage = ""
    if s.cpu_s is not None and s.peak_rss_mb is not None:
        usage = f"  (proxy cpu {s.cpu_s:.2f}s, peak rss {s.peak_rss_mb:.1f} MB)"
    return f"{head} {figures}{usage}"
