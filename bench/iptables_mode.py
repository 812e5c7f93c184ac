"""The iptables mode's own figures: control plane and the cost of a linear rule walk.

`python -m bench.iptables_mode [--ports 10000] [--runs 3] [--seconds 5] [--out DIR]`, as root.
Separate from bench/controlplane.py (the portals' and IPVS's figures) so the two evolve apart.

Control plane, per iptables backend, in a fresh namespace, timing `IptablesProxier.sync` with N
service ports of one endpoint each (N SVC and N SEP chains, ~5 rules per port):

* full sync: N ports into an empty kernel (a start);
* resync: a fresh instance over what is there (reads back, finds nothing to fix: a restart or
  the periodic repair);
* one changed service: an endpoint of one service replaced (a partial sync), median of 5;
* one added service: a new service port (a partial sync), median of 5.

Afterwards the kernel is read back with the save tool to check every service is there.

Rule walk: on the benchmark's topology (client -- node -- nginx backend), N services whose
first (in UPROXY-SERVICES order) and last both lead to the backend; new connections/s
(wrk, 32 connections, `Connection: close`) to the last and to the first, and their ratio. A new
connection walks UPROXY-SERVICES linearly until its rule; established ones never do.

Targets (issue 12), reported and never asserted: full sync of 10,000 ports <= 1 s on nft, one
changed service <= 50 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench import servers, topology
from bench.loads import LoadContext, wrk

CHANGES = 5
BACKENDS = ("nft", "legacy")
# The rule walk also measures the nftables mode, whose dispatch is a map lookup: the comparison
# issue 13 asks for.
WALK_BACKENDS = (*BACKENDS, "nftables")


def _vip(i: int) -> str:
    return f"10.96.{i // 250}.{i % 250 + 1}"


def _state(ports: int, real: str | None = None, endpoint_of: dict[int, str] | None = None) -> Any:
    """N TCP service ports `bench/svc-NNNNN:http` (sorted = numbered), one endpoint each; the
    first and last lead to `real` when given, the others nowhere in particular."""
    from uproxy.model import Endpoint, Protocol, ProxyState, ServicePort, ServicePortName

    services, endpoints = {}, {}
    for i in range(ports):
        name = ServicePortName("bench", f"svc-{i:05d}", "http")
        services[name] = ServicePort(name, Protocol.TCP, 80, cluster_ips=(_vip(i),))
        ip = f"10.244.{i // 250}.{i % 250 + 1}"
        port = 8080
        if real is not None and i in (0, ports - 1):
            ip, port = real, servers.PORT_HTTP
        if endpoint_of and i in endpoint_of:
            ip = endpoint_of[i]
        endpoints[name] = (Endpoint(ip, port),)
    return ProxyState(services, endpoints)


async def _noop_conntrack(matches: Sequence[Any]) -> int:
    return 0


def _proxier(backend: str) -> Any:
    from uproxy.kernel.detect import open_backend
    from uproxy.proxier.iptables import IptablesProxier
    from uproxy.proxier.iptables_rules import RuleContext

    return IptablesProxier(
        open_backend(backend),  # type: ignore[arg-type]
        context=RuleContext(node_name="bench"),
        conntrack=_noop_conntrack,
        resync_period=1e9,  # every sync after the first is a partial one
    )


async def _controlplane_child(backend: str, ports: int) -> dict[str, Any]:
    from uproxy.model import ServicePortName

    state = _state(ports)
    first = _proxier(backend)
    t0 = time.perf_counter()
    await first.sync(state)
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    await _proxier(backend).sync(state)
    resync = time.perf_counter() - t0
    changed, added = [], []
    for k in range(CHANGES):
        i = (k * 997) % ports
        name = ServicePortName("bench", f"svc-{i:05d}", "http")
        state = _state(ports, endpoint_of={i: f"10.245.0.{k + 1}"})
        t0 = time.perf_counter()
        await first.sync(state, frozenset({name}))
        changed.append(time.perf_counter() - t0)
    for k in range(CHANGES):
        bigger = _state(ports + k + 1)
        name = ServicePortName("bench", f"svc-{ports + k:05d}", "http")
        t0 = time.perf_counter()
        await first.sync(bigger, frozenset({name}))
        added.append(time.perf_counter() - t0)
    counters = first.sync_counters()
    saved = await asyncio.to_thread(_save_nat, backend)
    dispatch = [
        line for line in saved.splitlines() if "bench/svc-" in line and "cluster IP" in line
    ]
    return {
        "full_sync_s": full,
        "resync_s": resync,
        "change_s": statistics.median(changed),
        "add_s": statistics.median(added),
        "changes_s": changed,
        "adds_s": added,
        "partial_syncs": counters.partial_syncs,
        "rules_checked": len(dispatch) == ports + CHANGES,
        "nat_rules": sum(1 for line in saved.splitlines() if line.startswith("-A UPROXY-")),
    }


def _save_nat(backend: str) -> str:
    argv = [f"iptables-{backend}-save", "-t", "nat"]
    return subprocess.run(argv, capture_output=True, text=True, check=True).stdout


def _nftables_proxier() -> Any:
    from uproxy.kernel.nft import NftCommand
    from uproxy.proxier.nftables import NftablesProxier
    from uproxy.proxier.nftables_rules import NatConfig

    return NftablesProxier(
        nft=NftCommand(), node_name="bench", config=NatConfig(), conntrack=_noop_conntrack
    )


async def _install_child(backend: str, ports: int, real: str) -> dict[str, Any]:
    state = _state(ports, real=real)
    proxier = _nftables_proxier() if backend == "nftables" else _proxier(backend)
    t0 = time.perf_counter()
    await proxier.sync(state)
    return {"full_sync_s": time.perf_counter() - t0}


def child_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.iptables_mode --child")
    parser.add_argument("--child", choices=("controlplane", "install"), required=True)
    parser.add_argument("--backend", choices=WALK_BACKENDS, required=True)
    parser.add_argument("--ports", type=int, required=True)
    parser.add_argument("--real", default=topology.BACKEND_IP)
    args = parser.parse_args(argv)
    import structlog

    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    if args.child == "controlplane":
        result = asyncio.run(_controlplane_child(args.backend, args.ports))
    else:
        result = asyncio.run(_install_child(args.backend, args.ports, args.real))
    print(json.dumps(result))
    return 0


# -- parent ----------------------------------------------------------------------------------


def _child(ns: str, *args: str, timeout: float = 600) -> dict[str, Any]:
    argv = topology.netns_exec(ns, [sys.executable, "-m", "bench.iptables_mode", *args])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def controlplane(ports: int, runs: int) -> list[dict[str, Any]]:
    out = []
    for run in range(runs):
        for backend in BACKENDS:
            with topology.single_namespace(f"ipt{run}{backend}") as ns:
                result = _child(
                    ns, "--child", "controlplane", "--backend", backend, "--ports", str(ports)
                )
            out.append({"backend": backend, "ports": ports, "run": run, **result})
    return out


def rule_walk(
    ports: int, runs: int, seconds: float, workdir: Path, backends: Sequence[str] = WALK_BACKENDS
) -> list[dict[str, Any]]:
    """New connections/s to the first and the last of `ports` services, per backend and run."""
    out = []
    for run in range(runs):
        for backend in backends:
            with topology.topology(f"walk{run}{backend[0]}") as topo:
                work = workdir / f"walk-{backend}-{run}"
                work.mkdir(parents=True, exist_ok=True)
                nginx = servers.start_http_backend(topo, work)
                try:
                    installed = _child(
                        topo.node, "--child", "install", "--backend", backend, "--ports", str(ports)
                    )
                    samples: dict[str, list[float]] = {"first": [], "last": []}
                    # ABBA order, with the node's conntrack TIME_WAIT (5 s) between loads: the
                    # load measured second would otherwise inherit the first one's entries.
                    for which in ("first", "last", "last", "first"):
                        time.sleep(6)
                        vip = _vip(0) if which == "first" else _vip(ports - 1)
                        ctx = LoadContext(topo, vip, False, "", None, work, seconds, 0, 0)
                        samples[which].append(float(wrk(ctx, 32, close=True)["per_s"]))
                    figures = {k: statistics.mean(v) for k, v in samples.items()}
                finally:
                    nginx.stop()
            out.append(
                {
                    "backend": backend,
                    "ports": ports,
                    "run": run,
                    "install_s": installed["full_sync_s"],
                    "first_cps": figures["first"],
                    "last_cps": figures["last"],
                    "ratio": figures["last"] / figures["first"],
                }
            )
    return out


def _med(rows: list[dict[str, Any]], backend: str, key: str) -> float:
    return float(statistics.median(r[key] for r in rows if r["backend"] == backend))


def report(cp: list[dict[str, Any]], walk: list[dict[str, Any]], ports: int) -> str:
    lines = [
        f"iptables mode, {ports:,} service ports (medians of the runs)",
        "",
        "| backend | full sync | resync | one changed service | one added service | rules |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for backend in BACKENDS:
        if not any(r["backend"] == backend for r in cp):
            continue
        lines.append(
            f"| iptables-{backend} | {_med(cp, backend, 'full_sync_s'):.3f} s "
            f"| {_med(cp, backend, 'resync_s'):.3f} s "
            f"| {_med(cp, backend, 'change_s') * 1000:.1f} ms "
            f"| {_med(cp, backend, 'add_s') * 1000:.1f} ms "
            f"| {int(_med(cp, backend, 'nat_rules')):,} nat |"
        )
    if walk:
        lines += [
            "",
            "| backend | new conn/s, first service | last service | last / first |",
            "| --- | --- | --- | --- |",
        ]
        for backend in WALK_BACKENDS:
            if any(r["backend"] == backend for r in walk):
                label = backend if backend == "nftables" else f"iptables-{backend}"
                lines.append(
                    f"| {label} | {_med(walk, backend, 'first_cps'):,.0f} "
                    f"| {_med(walk, backend, 'last_cps'):,.0f} "
                    f"| {_med(walk, backend, 'ratio'):.2f}x |"
                )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.iptables_mode")
    parser.add_argument("--ports", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--no-walk", action="store_true", help="control plane only")
    parser.add_argument("--no-controlplane", action="store_true", help="rule walk only")
    parser.add_argument(
        "--walk-backends", default=",".join(WALK_BACKENDS), help="comma-separated, for the walk"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/results"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    topology.remove_stale_namespaces()
    try:
        cp = [] if args.no_controlplane else controlplane(args.ports, args.runs)
        walk_backends = [b for b in args.walk_backends.split(",") if b]
        walk = (
            []
            if args.no_walk
            else rule_walk(args.ports, args.runs, args.seconds, args.out, walk_backends)
        )
    finally:
        topology.remove_all_own_namespaces()
    (args.out / "iptables-mode.json").write_text(json.dumps({"controlplane": cp, "walk": walk}))
    text = report(cp, walk, args.ports)
    (args.out / "iptables-mode.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    if "--child" in sys.argv:
        sys.exit(child_main(sys.argv[1:]))
    sys.exit(main())
