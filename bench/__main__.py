"""`python -m bench [--quick] [--out DIR]`: the whole benchmark, as root.

Builds its own network namespaces, runs every contender through every load, measures the
control plane, writes results.md, results.json and ratios.png to --out, prints the markdown, and
removes every namespace it created, also on failure, Ctrl-C or SIGTERM.

Exit status: 0 when every contender produced every figure it can (skips carry a reason),
1 when a measurement failed, 2 for bad usage or a missing tool, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from bench import controlplane, machine, report, runner, topology
from bench.contenders import Contender, all_contenders
from bench.loads import LOAD, LOADS

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results"
# The tools the benchmark itself needs (contenders check their own: haproxy, nginx).
REQUIRED = {
    "ip": "iproute2",
    "ss": "iproute2",
    "curl": "curl",
    "iperf3": "iperf3",
    "wrk": "wrk",
    "iptables-nft-restore": "iptables",
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark uproxy against direct routing, kernel DNAT, HAProxy and nginx "
        "inside network namespaces it creates and removes (root required).",
    )
    parser.add_argument("--quick", action="store_true", help="a smoke test: 1 short round")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="where results go")
    parser.add_argument("--runs", type=int, help="rounds (default 5; --quick: 1)")
    parser.add_argument("--seconds", type=float, help="seconds per figure (default 5; quick: 1)")
    parser.add_argument(
        "--contenders", help="comma-separated subset, e.g. direct,haproxy,uproxy-uvloop"
    )
    parser.add_argument("--loads", help=f"comma-separated subset of {','.join(LOAD)}")
    parser.add_argument(
        "--workers",
        default="2",
        help="comma-separated --workers counts (above 1) of extra uproxy uvloop contenders "
        "uproxy-uvloop-wN; uproxy-uvloop itself runs one process",
    )
    parser.add_argument(
        "--pin-proxy",
        metavar="CPUS",
        help="also run uproxy uvloop with 1 and --workers N under `taskset -c CPUS` "
        "(contenders uproxy-uvloop-wN-pinCPUS); start the bench itself under `taskset -c` "
        "other CPUs to keep the load generator and backend off them",
    )
    parser.add_argument(
        "--no-controlplane", action="store_true", help="skip the control-plane figures"
    )
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error("--runs must be at least 1")
    if args.seconds is not None and not 1 <= args.seconds <= 120:
        parser.error("--seconds must be between 1 and 120")
    return args


def _interrupt(signum: int, frame: FrameType | None) -> None:
    # Every signal unwinds like Ctrl-C, so every `finally` removes what it created.
    raise KeyboardInterrupt(f"signal {signum}")


def _missing_tools() -> list[str]:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return sorted({pkg for tool, pkg in REQUIRED.items() if shutil.which(tool, path=path) is None})


def _select(contenders: list[Contender], wanted: str | None) -> list[Contender]:
    if not wanted:
        return contenders
    keys = [k.strip() for k in wanted.split(",") if k.strip()]
    unknown = set(keys) - {c.key for c in contenders}
    if unknown:
        raise SystemExit(
            f"unknown contenders {sorted(unknown)}; known: {[c.key for c in contenders]}"
        )
    return [c for c in contenders if c.key in keys]


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench needs root (network namespaces, netfilter)", file=sys.stderr)
        return 2
    missing = _missing_tools()
    if missing:
        print(f"missing tools: apt-get install {' '.join(missing)}", file=sys.stderr)
        return 2
    quick = args.quick
    settings = runner.Settings(
        # Five short rounds rather than three long ones: on a shared machine the median of more
        # pairs resists a neighbour's burst better than longer measurements do.
        runs=args.runs or (1 if quick else 5),
        seconds=args.seconds or (1.0 if quick else 5.0),
        omit=0 if quick else 1,
        idle_count=1000,
        quick=quick,
    )
    workers = [int(n) for n in args.workers.split(",") if n.strip() and int(n) > 1]
    contenders = _select(all_contenders(workers, args.pin_proxy), args.contenders)
    loads = [LOAD[k.strip()] for k in args.loads.split(",")] if args.loads else list(LOADS)
    cp_sizes = (1000, 10000)
    # Absolute: nginx and HAProxy resolve their paths against their own prefix, not our cwd.
    out: Path = args.out.resolve()
    logs = out / "logs"  # configs and daemon output of the last run, for when something fails
    # SIGINT too: a shell starts background jobs with SIGINT ignored, and Python then keeps
    # ignoring it, so a Ctrl-C (or `kill -INT`) would not stop a benchmark started that way.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _interrupt)
    started = time.monotonic()
    samples: list[runner.Sample] = []
    cp_results: list[controlplane.CpResult] = []
    try:
        stale = topology.remove_stale_namespaces()
        _fresh_logs(logs)
        host = machine.describe()
        print(f"machine: {host.line()}", file=sys.stderr)
        unavailable = {c.key: c.unavailable() for c in contenders}
        samples = runner.run_dataplane(contenders, settings, logs, loads)
        if not args.no_controlplane:
            print("== control plane", file=sys.stderr)
            cp_results = controlplane.measure(
                cp_sizes, settings.runs, changes=2 if quick else 5, log_dir=logs
            )
            for r in cp_results:
                print(f"   {_describe_cp(r)}", file=sys.stderr)
        machine.finish(host)
        rep = report.Report(
            machine=host,
            settings=settings,
            contenders=contenders,
            unavailable=unavailable,
            samples=samples,
            cp_results=cp_results,
            cp_sizes=cp_sizes if not args.no_controlplane else (),
            notes=[],
        )
        rep.notes += _notes(rep, stale, time.monotonic() - started)
        paths = rep.write(out)
        print(paths["markdown"].read_text())
        print("wrote " + ", ".join(str(p) for p in paths.values()), file=sys.stderr)
    except KeyboardInterrupt:
        print("interrupted: removing the benchmark's namespaces", file=sys.stderr)
        return 130
    finally:
        topology.remove_all_own_namespaces()
    failed = [s for s in samples if s.status == "failed"]
    failed_cp = [r for r in cp_results if r.status == "failed"]
    return 1 if failed or failed_cp else 0


LOGS_MARK = ".uproxy-bench-logs"


def _fresh_logs(logs: Path) -> None:
    """Empty the logs directory of an earlier run; never a directory the benchmark did not make
    (--out may point anywhere)."""
    if logs.exists():
        if not (logs / LOGS_MARK).exists() and any(logs.iterdir()):
            raise SystemExit(
                f"{logs} exists and was not made by the benchmark; choose another --out"
            )
        shutil.rmtree(logs)
    logs.mkdir(parents=True)
    (logs / LOGS_MARK).write_text("made by python -m bench; emptied by the next run\n")


def _describe_cp(r: controlplane.CpResult) -> str:
    head = f"{r.backend:<8} {r.ports:>6,} ports, round {r.run + 1}:"
    if r.full_sync_s is None:
        return f"{head} {r.status}: {r.note}"
    resync = "-" if r.resync_s is None else f"{r.resync_s:.3f} s"
    change = "-" if r.change_s is None else f"{r.change_s * 1000:.1f} ms"
    return f"{head} full sync {r.full_sync_s:.3f} s, resync {resync}, one change {change}"


def _notes(rep: report.Report, stale: list[str], elapsed: float) -> list[str]:
    notes = machine.limit_notes(rep.machine, rep.settings.quick)
    for c in rep.contenders:
        why = rep.unavailable.get(c.key)
        if why:
            notes.append(f"{c.label} skipped: {why}.")
        elif c.udp_note:
            notes.append(
                f"{c.label}: UDP not measured ({c.udp_note}); UDP ratios use nginx stream."
            )
    kernel = [c.label for c in rep.contenders if c.in_kernel and not rep.unavailable.get(c.key)]
    if kernel:
        notes.append(
            f"{' and '.join(kernel)} work in the kernel: no process of their own, so no CPU, "
            "RSS or idle-connection memory figure (their cost is softirq time, charged to "
            "whichever process runs)."
        )
    notes.append(
        "UDP: one flow of 64-byte datagrams from a Python sender (bench/udpflood.py) as fast as "
        "it goes, counted at the backend; datagrams the proxy cannot keep up with are dropped "
        "at its socket and not counted."
    )
    for c in rep.contenders:
        delivered = [
            s.extra.get("delivered", 0.0)
            for s in rep.samples
            if s.contender == c.key and s.load == "udp" and s.status == "ok"
        ]
        if delivered and c.key != "direct" and min(delivered) >= 0.95:
            notes.append(
                f"UDP: {c.label} delivered {min(delivered):.0%} or more of what the sender "
                "offered, so "
                "the sender, not the proxy, set its figure: it may be faster than shown."
            )
        before = [
            s.extra.get("rss_before_mb", 0.0)
            for s in rep.samples
            if s.contender == c.key and s.load == "idle" and s.status == "ok"
        ]
        if before:
            notes.append(
                f"{c.label}: RSS before opening the idle connections {min(before):.1f} MB."
            )
    for s in rep.samples:
        if "restarted" in s.extra:
            notes.append(
                f"{rep.label(s.contender)} was found stopped before {s.load} in round "
                f"{s.run + 1} and restarted: something outside the benchmark signalled it "
                "(a shared machine); the last lines of its log are in results.json."
            )
    for s in rep.samples:
        if s.status == "failed":
            notes.append(f"FAILED: {rep.label(s.contender)}, {s.load}, round {s.run + 1}: {s.note}")
    skipped_cp = sorted({(r.backend, r.note) for r in rep.cp_results if r.status == "skipped"})
    for backend, why in skipped_cp:
        notes.append(f"Control plane, {backend}: skipped ({why}).")
    for r in rep.cp_results:
        if r.status == "failed":
            notes.append(
                f"FAILED: control plane {r.backend}, {r.ports:,} ports, round {r.run + 1}: {r.note}"
            )
    notes.append(
        "Control-plane figures time uproxy's own sync (NetfilterPortals.sync, IpvsProxier.sync) "
        "in a fresh namespace; they leave out what comes before it in `uproxy run` (the "
        "manifest watcher, which notices a change within a second, and --min-sync-period)."
    )
    if stale:
        notes.append(f"Removed namespaces left by an earlier, killed run: {', '.join(stale)}.")
    notes.append(f"The whole run took {elapsed / 60:.1f} minutes.")
    return notes


if __name__ == "__main__":
    sys.exit(main())
