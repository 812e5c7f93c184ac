"""The loads, each driven from the client namespace against one contender's target.

Generators are standard tools (iperf3, wrk) or small standalone scripts (bench.udpflood,
bench.idleconns), never uproxy's own code. Each load returns its figures plus the raw numbers
the tool printed, which go into the JSON file.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench import servers, topology
from bench.procs import rss_bytes, tree_pids
from bench.servers import PORT_HTTP, PORT_IPERF, PORT_UDP
from bench.topology import Topology

REPO = Path(__file__).resolve().parent.parent
MB = 1e6


@dataclass(frozen=True)
class Figure:
    key: str
    label: str
    unit: str
    higher_is_better: bool
    reference: str = "haproxy"  # the ratio's second column; UDP compares against nginx
    digits: int = 0  # decimals shown in the table


FIGURES: tuple[Figure, ...] = (
    Figure("tcp_1", "TCP bulk, 1 stream", "Gbit/s", True, digits=2),
    Figure("tcp_8", "TCP bulk, 8 streams", "Gbit/s", True, digits=2),
    Figure("http_cps", "New connections/s (1 request each)", "conn/s", True),
    Figure("http_cps_hold", "New connections/s, last of 5 rounds / first", "x", True, digits=2),
    Figure("http_rps", "Keep-alive requests/s (64 connections)", "req/s", True),
    Figure("lat_p50", "Latency p50 (1 connection)", "µs", False),
    Figure("lat_p99", "Latency p99 (1 connection)", "µs", False),
    Figure("udp_pps", "UDP 64-byte datagrams/s (1 flow)", "pkt/s", True, reference="nginx"),
    Figure("idle_rss", "RSS with 1,000 idle connections", "MB", False, digits=1),
)
FIGURE = {f.key: f for f in FIGURES}


class LoadFailed(RuntimeError):
    pass


class LoadSkipped(RuntimeError):
    """Not applicable to this contender; the message says why."""


@dataclass
class LoadContext:
    topo: Topology
    host: str  # the contender's target address
    udp: bool  # whether the contender proxies UDP
    udp_note: str
    pid: int | None  # the proxy's process, None for in-kernel contenders
    workdir: Path
    seconds: float
    omit: int  # iperf3 warm-up seconds left out of the figure
    idle_count: int


@dataclass
class LoadResult:
    figures: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)
    work: float = 0.0  # units of work done (Load.work_unit), for the proxy's CPU per unit


def _client(ctx: LoadContext, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            topology.netns_exec(ctx.topo.client, argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise LoadFailed(f"{argv[0]} did not finish within {timeout:.0f}s") from None


# -- iperf3 ----------------------------------------------------------------------------------


def iperf(ctx: LoadContext, streams: int) -> LoadResult:
    server = servers.start_iperf_server(ctx.topo, ctx.workdir)
    try:
        argv = ["iperf3", "-c", ctx.host, "-p", str(PORT_IPERF), "-P", str(streams)]
        argv += ["-t", str(max(1, round(ctx.seconds))), "-O", str(ctx.omit), "-J"]
        argv += ["--connect-timeout", "3000"]
        proc = _client(ctx, argv, ctx.seconds + ctx.omit + 30)
    finally:
        server.stop()
    try:
        data = json.loads(proc.stdout)
    except ValueError:
        raise LoadFailed(
            f"iperf3: no JSON (exit {proc.returncode}): {proc.stderr[-300:]}"
        ) from None
    if "error" in data:
        raise LoadFailed(f"iperf3: {data['error']}")
    received = data["end"]["sum_received"]
    sent = data["end"].get("sum_sent", {})
    # The proxy's CPU is metered over the warm-up seconds too, which the end sums leave out:
    # its work is every interval's bytes, warm-up included.
    moved = sum(i["sum"]["bytes"] for i in data.get("intervals", [])) or received["bytes"]
    return LoadResult(
        {f"tcp_{streams}": received["bits_per_second"] / 1e9},
        {
            "bytes": received["bytes"],
            "bytes_with_warmup": moved,
            "retransmits": sent.get("retransmits"),
        },
        work=moved / 1e9,
    )


# -- wrk -------------------------------------------------------------------------------------

# wrk's Lua `done` hook prints one machine-readable line instead of the human summary.
WRK_SCRIPT = r"""
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRKJSON {"requests":%d,"duration_us":%d,"bytes":%d,"connect":%d,"read":%d,' ..
    '"write":%d,"status":%d,"timeout":%d,"p50_us":%d,"p99_us":%d,"mean_us":%.1f}\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write,
    e.status, e.timeout, latency:percentile(50), latency:percentile(99), latency.mean))
end
"""


def wrk(ctx: LoadContext, connections: int, close: bool) -> dict[str, Any]:
    script = ctx.workdir / "report.lua"
    script.write_text(WRK_SCRIPT)
    seconds = max(1, round(ctx.seconds))
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "2s"]
    argv += ["-s", str(script)]
    if close:
        argv += ["-H", "Connection: close"]
    argv.append(f"http://{ctx.host}:{PORT_HTTP}/")
    proc = _client(ctx, argv, seconds + 30)
    for line in proc.stdout.splitlines():
        if line.startswith("WRKJSON "):
            data: dict[str, Any] = json.loads(line[len("WRKJSON ") :])
            break
    else:
        raise LoadFailed(f"wrk (exit {proc.returncode}): {(proc.stderr or proc.stdout)[-300:]}")
    if data["requests"] == 0:
        raise LoadFailed(f"wrk completed no request: {data}")
    errors = sum(data[k] for k in ("connect", "read", "write", "status", "timeout"))
    data["errors"] = errors
    data["per_s"] = data["requests"] / (data["duration_us"] / 1e6)
    # A few read errors are normal with Connection: close (the server's FIN races wrk's close);
    # a proxy failing one request in a hundred is not measured fairly, though.
    if errors > 0.01 * data["requests"] + 10:
        raise LoadFailed(f"wrk: {errors} errors in {data['requests']} requests: {data}")
    return data


# New connections are measured in rounds back to back, with no pause for the client's TIME_WAIT
# sockets to expire: a proxy that makes the client close first shows as a falling last round.
CPS_ROUNDS = 5
HOLD = 0.9  # the last round should keep this share of the first


def time_wait(ns: str) -> int:
    out = topology.run(topology.netns_exec(ns, ["ss", "-Htan", "state", "time-wait"]))
    return len(out.splitlines())


def http_cps(ctx: LoadContext) -> LoadResult:
    before = time_wait(ctx.topo.client)
    rounds = [wrk(ctx, 32, close=True) for _ in range(CPS_ROUNDS)]
    grown = time_wait(ctx.topo.client) - before
    requests = sum(r["requests"] for r in rounds)
    per_s = requests / (sum(r["duration_us"] for r in rounds) / 1e6)
    hold = rounds[-1]["per_s"] / rounds[0]["per_s"]
    extra = {
        "rounds_per_s": [r["per_s"] for r in rounds],
        "last_vs_first": hold,
        "held": hold >= HOLD,
        "client_time_wait_grown": grown,
        "client_time_wait_per_connection": grown / requests,
        "errors": sum(r["errors"] for r in rounds),
    }
    return LoadResult({"http_cps": per_s, "http_cps_hold": hold}, extra, work=requests)


def http_rps(ctx: LoadContext) -> LoadResult:
    data = wrk(ctx, 64, close=False)
    return LoadResult({"http_rps": data["per_s"]}, data, work=data["requests"])


def latency(ctx: LoadContext) -> LoadResult:
    data = wrk(ctx, 1, close=False)
    figures = {"lat_p50": float(data["p50_us"]), "lat_p99": float(data["p99_us"])}
    return LoadResult(figures, data, work=data["requests"])


# -- UDP -------------------------------------------------------------------------------------


def udp(ctx: LoadContext) -> LoadResult:
    if not ctx.udp:
        raise LoadSkipped(ctx.udp_note or "does not proxy UDP")
    py = [sys.executable, "-m", "bench.udpflood"]
    recv_argv = [*py, "recv", topology.BACKEND_IP, str(PORT_UDP)]
    receiver = subprocess.Popen(
        topology.netns_exec(ctx.topo.backend, recv_argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        if servers.read_line(receiver, 15) != "ready":
            raise LoadFailed("UDP receiver did not start")
        send_argv = [*py, "send", ctx.host, str(PORT_UDP), "--seconds", str(ctx.seconds)]
        sender = subprocess.run(
            topology.netns_exec(ctx.topo.client, send_argv),
            capture_output=True,
            text=True,
            timeout=ctx.seconds + 30,
            cwd=REPO,
            check=False,
        )
        if sender.returncode != 0:
            raise LoadFailed(f"UDP sender failed: {sender.stderr[-300:]}")
        sent = json.loads(sender.stdout.strip().splitlines()[-1])
        time.sleep(0.3)  # datagrams still queued in the proxy's socket
        receiver.send_signal(signal.SIGTERM)
        got = json.loads(servers.read_line(receiver, 10))
    finally:
        if receiver.poll() is None:
            receiver.kill()
        receiver.wait(timeout=10)
    if got["received"] == 0:
        raise LoadFailed(f"no datagram reached the backend ({sent['sent']} sent)")
    pps = got["received"] / sent["seconds"]
    extra = {**sent, "received": got["received"], "sent_pps": sent["sent"] / sent["seconds"]}
    extra["delivered"] = got["received"] / max(1, sent["sent"])
    return LoadResult({"udp_pps": pps}, extra, work=got["received"])


# -- memory with idle connections ------------------------------------------------------------


def idle(ctx: LoadContext) -> LoadResult:
    if ctx.pid is None:
        raise LoadSkipped("in the kernel: no proxy process whose memory could be measured")
    before = rss_bytes(tree_pids(ctx.pid))
    argv = [sys.executable, "-m", "bench.idleconns", ctx.host, str(PORT_HTTP)]
    argv += ["--count", str(ctx.idle_count), "--hold", "120"]
    holder = subprocess.Popen(
        topology.netns_exec(ctx.topo.client, argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=REPO,
    )
    try:
        report = json.loads(servers.read_line(holder, 90))
        time.sleep(1.0)  # let the proxy settle (buffers released after the one request)
        with_conns = rss_bytes(tree_pids(ctx.pid))
        holder.send_signal(signal.SIGTERM)
    finally:
        if holder.poll() is None:
            try:
                holder.wait(timeout=10)
            except subprocess.TimeoutExpired:
                holder.kill()
        holder.wait(timeout=10)
    if report["open"] < 0.95 * ctx.idle_count:
        raise LoadFailed(f"only {report['open']} of {ctx.idle_count} connections opened")
    extra = {**report, "rss_before_mb": before / MB, "per_connection_kb": 0.0}
    if report["open"]:
        extra["per_connection_kb"] = (with_conns - before) / report["open"] / 1e3
    return LoadResult({"idle_rss": with_conns / MB}, extra)


@dataclass(frozen=True)
class Load:
    key: str
    label: str
    figures: tuple[str, ...]
    run: Callable[[LoadContext], LoadResult]
    # CPU per unit of work compares efficiency even when contenders got different CPU shares.
    work_unit: str = ""
    cpu_scale: float = 1e6  # CPU seconds per unit shown in µs, or in seconds (scale 1)
    cpu_unit: str = "µs"


LOADS: tuple[Load, ...] = (
    Load("tcp_1", "iperf3, 1 stream", ("tcp_1",), lambda ctx: iperf(ctx, 1), "GB", 1.0, "s"),
    Load("tcp_8", "iperf3, 8 streams", ("tcp_8",), lambda ctx: iperf(ctx, 8), "GB", 1.0, "s"),
    Load(
        "http_cps",
        f"wrk, Connection: close, 32 clients, {CPS_ROUNDS} rounds in a row",
        ("http_cps", "http_cps_hold"),
        http_cps,
        "conn",
    ),
    Load("http_rps", "wrk, keep-alive, 64 connections", ("http_rps",), http_rps, "req"),
    Load("latency", "wrk, keep-alive, 1 connection", ("lat_p50", "lat_p99"), latency, "req"),
    Load("udp", "UDP flood, 64-byte datagrams, 1 flow", ("udp_pps",), udp, "datagram"),
    Load("idle", "1,000 idle keep-alive connections", ("idle_rss",), idle),
)
LOAD: Mapping[str, Load] = {load.key: load for load in LOADS}
