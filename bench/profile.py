"""`python -m bench.profile [--load http_cps|http_rps|udp] [--loop uvloop|asyncio]`: where the
userspace mode's CPU goes, per connection, request or datagram (as root).

One contender (uproxy's userspace mode, one process) in the benchmark's own topology, driven by
the benchmark's load generator with the client's default sysctls. Two passes:

1. unprofiled: the proxy's user and system CPU per unit of work, from /proc/PID/stat;
2. sampled, with the load again: `perf record` (the kernel and every native library: the
   interpreter, uvloop, libc) and `py-spy` (the Python functions) attached to the proxy.

Sampling costs the proxy CPU of its own, so the split comes from pass 2 and the totals from
pass 1. Writes profile-LOAD.md (and the raw perf and py-spy output) to --out and prints the
markdown. Needs perf (Debian's linux-perf) and py-spy (`pip install -e '.[bench]'`).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import servers, topology
from bench.contenders import Contender, HAProxy, NginxStream, Uproxy
from bench.loads import LoadContext, LoadResult, http_rps, udp, wrk
from bench.procs import CLOCK_TICKS, tree_pids

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "bench" / "results"
UNITS = {"http_cps": "connection", "http_rps": "request", "udp": "datagram"}
LABELS = {
    "http_cps": "new connections (wrk, `Connection: close`, 32 clients)",
    "http_rps": "keep-alive requests (wrk, 64 connections)",
    "udp": "64-byte UDP datagrams (one flow)",
}
TOP = 25


@dataclass(frozen=True)
class Cpu:
    user: float
    system: float


def proc_cpu(pid: int) -> Cpu:
    """User and system CPU of `pid` and its children (nginx's workers, uproxy's)."""
    user = system = 0
    for one in tree_pids(pid):
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{one}/stat").read_text().rsplit(")", 1)[1].split()
            user, system = user + int(fields[11]), system + int(fields[12])
    return Cpu(user / CLOCK_TICKS, system / CLOCK_TICKS)


def cps_once(ctx: LoadContext) -> LoadResult:
    """One round of short connections (the benchmark's http_cps runs five back to back)."""
    data = wrk(ctx, 32, close=True)
    return LoadResult({"http_cps": data["per_s"]}, data, work=data["requests"])


RUNS: dict[str, Callable[[LoadContext], LoadResult]] = {
    "http_cps": cps_once,
    "http_rps": http_rps,
    "udp": udp,
}


def measure(
    ctx: LoadContext, pid: int, run: Callable[[LoadContext], LoadResult]
) -> tuple[LoadResult, Cpu]:
    before = proc_cpu(pid)
    result = run(ctx)
    after = proc_cpu(pid)
    return result, Cpu(after.user - before.user, after.system - before.system)


@contextlib.contextmanager
def sampled(pid: int, workdir: Path, *, python: bool) -> Iterator[None]:
    """perf (and py-spy, for a Python proxy) attached to `pid` for the duration of the block."""
    pids = ",".join(map(str, tree_pids(pid)))
    perf = subprocess.Popen(
        ["perf", "record", "-F", "499", "-g", "-p", pids, "-o", str(workdir / "perf.data")],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    pyspy_argv = [_pyspy(), "record", "--pid", str(pid), "--rate", "250", "--nonblocking"]
    pyspy_argv += ["--format", "raw", "--output", str(workdir / "py-spy.txt")]
    samplers = [perf]
    if python:
        samplers.append(
            subprocess.Popen(pyspy_argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
    time.sleep(1.0)  # attached before the load starts
    try:
        yield
    finally:
        for sampler in samplers:
            sampler.send_signal(2)  # SIGINT: each writes its output and exits
        for sampler in samplers:
            try:
                sampler.wait(timeout=60)
            except subprocess.TimeoutExpired:
                sampler.kill()


def _pyspy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found


def perf_by_object(workdir: Path) -> tuple[list[tuple[float, str]], list[tuple[float, str, str]]]:
    """(share per kind of shared object, top symbols by self share) from perf.data."""
    data = str(workdir / "perf.data")
    base = ["perf", "report", "-i", data, "--stdio", "--no-children", "-g", "none"]
    by_dso = _perf([*base, "--sort", "dso"])
    objects: dict[str, float] = collections.defaultdict(float)
    for line in by_dso.splitlines():
        match = re.match(r"^\s+([\d.]+)%\s+(\S+)\s*$", line)
        if match:
            objects[_object_kind(match.group(2))] += float(match.group(1))
    by_symbol = _perf([*base, "--sort", "dso,sym", "--percent-limit", "0.3"])
    symbols: list[tuple[float, str, str]] = []
    pattern = re.compile(r"^\s+([\d.]+)%\s+(\S+)\s+\[[.k]\]\s+(.+?)\s*$")
    for line in by_symbol.splitlines():
        match = pattern.match(line)
        if match:
            symbols.append((float(match.group(1)), match.group(2), match.group(3)))
    return sorted(((v, k) for k, v in objects.items()), reverse=True), symbols[:TOP]


def _perf(argv: list[str]) -> str:
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def _object_kind(dso: str) -> str:
    if dso.startswith("[kernel"):
        return "kernel (system calls, TCP/IP, netfilter)"
    if dso.startswith("[unknown]"):
        return "unknown (JIT or unmapped)"
    if dso == "haproxy" or dso.startswith("nginx"):
        return dso
    if dso.startswith("loop.cpython"):  # before the interpreter: its name has "python" too
        return "uvloop (libuv and its Cython)"
    if dso.startswith("libpython") or dso.startswith("python"):
        return "CPython interpreter (running Python code)"
    if ".cpython-" in dso:
        return "other C extensions"
    if dso.startswith("libc") or dso.startswith("ld-"):
        return "libc"
    return dso


def pyspy_functions(workdir: Path) -> tuple[int, list[tuple[int, str]], list[tuple[int, str]]]:
    """(samples, top functions by self samples, top by inclusive samples) from py-spy's raw
    output (one `frame;frame;... count` line per distinct stack)."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    path = workdir / "py-spy.txt"
    for line in path.read_text().splitlines() if path.exists() else []:
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_short(f) for f in stack.split(";")]
        total += count
        own[frames[-1]] += count
        for frame in set(frames):
            inclusive[frame] += count
    top_own = [(n, f) for f, n in own.most_common(TOP)]
    top_inclusive = [(n, f) for f, n in inclusive.most_common(TOP)]
    return total, top_own, top_inclusive


def _short(frame: str) -> str:
    """`data_received (uproxy/dataplane/tcp.py:123)` without the line number or site-packages."""
    frame = re.sub(r":\d+\)$", ")", frame)
    return re.sub(r"\(.*?/(site-packages|lib/python3\.\d+)/", "(", frame)


@dataclass
class Profiled:
    label: str
    result: LoadResult
    cpu: Cpu
    objects: list[tuple[float, str]]
    symbols: list[tuple[float, str, str]]
    python: tuple[int, list[tuple[int, str]], list[tuple[int, str]]] | None = None

    def per_unit(self, seconds: float) -> float:
        return seconds * 1e6 / max(self.result.work, 1)


def profile_one(
    contender: Contender, load: str, seconds: float, workdir: Path, python: bool
) -> Profiled:
    workdir.mkdir(parents=True)
    with topology.topology("p") as topo:
        backend = servers.start_http_backend(topo, workdir / "backend")
        try:
            target = contender.start(topo, workdir / "proxy")
            servers.http_probe(topo.client, target.host)
            pid = contender.pid
            assert pid is not None
            ctx = LoadContext(
                topo=topo,
                host=target.host,
                udp=True,
                udp_note="",
                pid=pid,
                workdir=workdir / "load",
                seconds=seconds,
                omit=0,
                idle_count=0,
            )
            ctx.workdir.mkdir()
            run = RUNS[load]
            result, cpu = measure(ctx, pid, run)
            with sampled(pid, workdir, python=python):
                run(ctx)
        finally:
            contender.stop()
            backend.stop()
    objects, symbols = perf_by_object(workdir)
    return Profiled(
        contender.label,
        result,
        cpu,
        objects,
        symbols,
        pyspy_functions(workdir) if python else None,
    )


def report(load: str, loop: str, runs: Sequence[Profiled]) -> str:
    unit = UNITS[load]
    lines = [
        f"# Where the CPU goes: {LABELS[load]}",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores; "
        f"`python -m bench.profile --load {load} --loop {loop}`. The benchmark's topology, the "
        "client with a pod's default sysctls; each proxy one process (HAProxy `nbthread 1`).",
        "",
        f"Unprofiled pass, the proxy's own CPU per {unit} (from /proc/PID/stat):",
        "",
        f"| proxy | {unit}s | per second | user µs | system µs | total µs |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for p in runs:
        per_s = next(iter(p.result.figures.values()))
        user, system = p.per_unit(p.cpu.user), p.per_unit(p.cpu.system)
        lines.append(
            f"| {p.label} | {p.result.work:,.0f} | {per_s:,.0f} | {user:.1f} | {system:.1f} | "
            f"{user + system:.1f} |"
        )
    for p in runs:
        lines += [
            "",
            f"## {p.label}: by object (perf samples of the proxy)",
            "",
            "| share | where |",
            "| --- | --- |",
            *(f"| {share:.1f} % | {kind} |" for share, kind in p.objects),
            "",
            f"## {p.label}: top native symbols (perf, self)",
            "",
            "| share | object | symbol |",
            "| --- | --- | --- |",
            *(f"| {share:.1f} % | {dso} | `{symbol}` |" for share, dso, symbol in p.symbols),
        ]
        if p.python is None or not p.python[0]:
            continue
        total, own, inclusive = p.python
        lines += [
            "",
            f"## {p.label}: Python functions (py-spy, {total:,} samples of the loop's stack)",
            "",
            "Self: the function itself was running; the time inside a C function it calls (a",
            "socket method, the loop's run_forever) counts to it too. Inclusive: on the stack.",
            "",
            "| self | function |",
            "| --- | --- |",
            *(f"| {n * 100 / total:.1f} % | `{f}` |" for n, f in own),
            "",
            "| inclusive | function |",
            "| --- | --- |",
            *(f"| {n * 100 / total:.1f} % | `{f}` |" for n, f in inclusive),
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--load", choices=sorted(RUNS), default="http_cps")
    parser.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("python -m bench.profile needs root (network namespaces)", file=sys.stderr)
        return 2
    missing = [t for t in ("perf", "wrk") if shutil.which(t) is None]
    if not Path(_pyspy()).exists():
        missing.append("py-spy (pip install -e '.[bench]')")
    if missing:
        print(f"missing: {', '.join(missing)} (perf: apt-get install linux-perf)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    # The reference the speed targets name: HAProxy for TCP, nginx stream for UDP.
    reference: Contender = NginxStream() if args.load == "udp" else HAProxy()
    runs = []
    with tempfile.TemporaryDirectory(prefix="uproxy-profile-") as tmp:
        for index, (contender, python) in enumerate(
            ((Uproxy(args.loop), True), (reference, False))
        ):
            if contender.unavailable():
                print(f"skip {contender.label}: {contender.unavailable()}", file=sys.stderr)
                continue
            workdir = Path(tmp) / str(index)
            runs.append(profile_one(contender, args.load, args.seconds, workdir, python))
            if python and (workdir / "py-spy.txt").exists():
                shutil.copy(workdir / "py-spy.txt", args.out / f"profile-{args.load}-py-spy.txt")
    text = report(args.load, args.loop, runs)
    (args.out / f"profile-{args.load}.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
