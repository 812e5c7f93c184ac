"""Control-plane figures: how long uproxy takes to program the kernel.

For each backend and size (1,000 and 10,000 service ports), in a fresh namespace:

* full sync: N service ports into an empty kernel (what a start costs);
* resync: a second, fresh instance syncing the same N over what is already there (reads the
  kernel back and converges: the periodic repair, or a restart);
* one change: with N in place, one service port added; from the call to `sync` until it
  returns, when the change is committed (checked afterwards by reading the kernel back).

Backends: `nft` and `legacy` time `NetfilterPortals.sync` (the userspace mode's portals: one
ClusterIP rule and one proxy-port rule per service port); `ipvs` times `IpvsProxier.sync` (one
virtual server with one real server per service port, its address on the dummy interface, and
the masquerade rules), measured only when the kernel has IPVS. `pipeline` times the userspace
mode's whole sync path on iptables-nft: the change tracker's snapshot plus
`UserspaceProxier.sync` (N listeners, their portals), where one change is one service's endpoints
changing and the proxier is told which service port changed, as `uproxy run` tells it.
`nftables` times `NftablesProxier.sync` (the nftables mode: one ClusterIP map element, a service
chain and an endpoint chain per service port), one change being one service port added.

The parent runs one child per (backend, size, run) as `ip netns exec NS python -m
bench.controlplane ...`, because python-iptables, the restore tools and netlink act on the
calling process's namespace. The figures stop at that layer: the manifest watcher and the
runner's --min-sync-period, which come before it in `uproxy run`, are not included.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import topology

BACKENDS = ("nft", "legacy", "ipvs", "pipeline", "nftables")


@dataclass(frozen=True)
class CpResult:
    backend: str
    ports: int
    run: int
    status: str = "ok"  # "ok", "skipped" (note says why) or "failed" (note has the error)
    full_sync_s: float | None = None
    resync_s: float | None = None
    change_s: float | None = None  # median of the single changes in this run
    changes_s: tuple[float, ...] = ()
    rules_checked: bool = False
    note: str = ""


# -- child: runs inside the namespace --------------------------------------------------------


def _vip(i: int) -> str:
    return f"10.96.{i // 250}.{i % 250 + 1}"


async def _noop_conntrack(matches: Sequence[Any]) -> int:
    return 0  # TCP-only services: no UDP flows to flush; keep conntrack out of the figure


async def _child(backend: str, ports: int, changes: int) -> dict[str, Any]:
    from uproxy.kernel.detect import open_backend, physdev_supported
    from uproxy.model import Protocol, ServicePort, ServicePortName
    from uproxy.proxier.netfilter_portals import NetfilterPortals
    from uproxy.proxier.portals import Portal

    def portal(i: int) -> tuple[ServicePortName, Portal]:
        name = ServicePortName("bench", f"svc-{i}", "http")
        svc = ServicePort(name, Protocol.TCP, 80, cluster_ips=(_vip(i),))
        return name, Portal(svc, 20000 + i % 40000)

    def new_portals() -> NetfilterPortals:
        # A resync period far away: every sync after the first is the incremental path.
        return NetfilterPortals(
            open_backend(backend),  # type: ignore[arg-type]
            resync_period=1e9,
            conntrack=_noop_conntrack,
            physdev=physdev_supported(),
            other_backends=[],
        )

    state: dict[Any, Any] = dict(portal(i) for i in range(ports))
    first = new_portals()
    t0 = time.perf_counter()
    await first.sync(state)
    full = time.perf_counter() - t0

    t0 = time.perf_counter()
    await new_portals().sync(state)
    resync = time.perf_counter() - t0

    times = []
    added = []
    for k in range(changes):
        name, p = portal(ports + k)
        state = {**state, name: p}
        t0 = time.perf_counter()
        await first.sync(state)
        times.append(time.perf_counter() - t0)
        added.append((name, p))

    return {
        "full_sync_s": full,
        "resync_s": resync,
        "changes_s": times,
        "added": [(p.service.name.name, p.service.cluster_ips[0], p.proxy_port) for _, p in added],
    }


async def _child_ipvs(ports: int, changes: int, fake: bool) -> dict[str, Any]:
    from uproxy.kernel.detect import open_backend
    from uproxy.kernel.ipvs import NetlinkIpvs, Worker
    from uproxy.model import Endpoint, Protocol, ProxyState, ServicePort, ServicePortName
    from uproxy.proxier.ipvs import IpvsProxier, check_capabilities

    shared_fake: Any = None
    if fake:  # a development check of this code on kernels without IPVS
        from uproxy.kernel.ipvs_fake import FakeIpvs

        shared_fake = FakeIpvs()

    def new_proxier() -> IpvsProxier:
        worker = Worker()
        kernel: Any = shared_fake if fake else NetlinkIpvs(worker)
        if not fake:
            check_capabilities(kernel, "rr")
        return IpvsProxier(
            ipvs=kernel,
            host=kernel,
            netfilter=None if fake else open_backend("nft"),
            worker=worker,
            resync_period=1e9,
            state_file=None,  # never the host's /run/uproxy: this is a throwaway namespace
            conntrack=_noop_conntrack,
            housekeeping_interval=None,
        )

    def service(i: int) -> tuple[ServicePortName, ServicePort, tuple[Endpoint, ...]]:
        name = ServicePortName("bench", f"svc-{i}", "http")
        backend = f"10.244.{i // 250}.{i % 250 + 1}"
        return (
            name,
            ServicePort(name, Protocol.TCP, 80, cluster_ips=(_vip(i),)),
            (Endpoint(backend, 8080),),
        )

    def state_of(indices: range) -> ProxyState:
        entries = [service(i) for i in indices]
        return ProxyState(
            services={n: s for n, s, _ in entries}, endpoints={n: e for n, _, e in entries}
        )

    first = new_proxier()
    t0 = time.perf_counter()
    await first.sync(state_of(range(ports)))
    full = time.perf_counter() - t0

    second = new_proxier()
    t0 = time.perf_counter()
    await second.sync(state_of(range(ports)))
    resync = time.perf_counter() - t0
    await second.shutdown(0)

    times = []
    for k in range(changes):
        state = state_of(range(ports + k + 1))
        t0 = time.perf_counter()
        await first.sync(state)
        times.append(time.perf_counter() - t0)
    kernel: Any = shared_fake if fake else None
    if kernel is None:
        worker = Worker()
        kernel = NetlinkIpvs(worker)
        found = await asyncio.to_thread(lambda: set(kernel.services()))
        worker.close()
    else:
        found = set(kernel.services())
    await first.shutdown(0)
    wanted = {(_vip(i), 80) for i in range(ports + changes)}
    have = {(vs.ip, vs.port) for vs in found}
    return {
        "full_sync_s": full,
        "resync_s": resync,
        "changes_s": times,
        "rules_checked": wanted <= have,
        "rules_in_kernel": len(wanted & have),
    }


async def _child_pipeline(ports: int, changes: int) -> dict[str, Any]:
    from uproxy.changes import ChangeTracker
    from uproxy.dataplane.sockopt import raise_nofile_limit
    from uproxy.kernel.detect import open_backend, physdev_supported
    from uproxy.model import (
        AddressType,
        EndpointSlice,
        ObjectKey,
        Protocol,
        ServicePort,
        ServicePortName,
        SliceEndpoint,
        SlicePort,
    )
    from uproxy.proxier.netfilter_portals import NetfilterPortals
    from uproxy.proxier.userspace import UserspaceProxier

    raise_nofile_limit()  # one listener per service port

    def endpoint_slice(i: int, generation: int) -> EndpointSlice:
        backend = f"10.244.{i // 250}.{i % 250 + 1}"
        return EndpointSlice(
            key=ObjectKey("bench", f"svc-{i}-abc"),
            service=ObjectKey("bench", f"svc-{i}"),
            address_type=AddressType.IPV4,
            ports=(SlicePort("http", 8080 + generation, Protocol.TCP),),
            endpoints=(SliceEndpoint((backend,)),),
        )

    tracker = ChangeTracker(["bench"], on_change=lambda: None)
    for i in range(ports):
        name = ServicePortName("bench", f"svc-{i}", "http")
        port = ServicePort(name, Protocol.TCP, 80, cluster_ips=(_vip(i),))
        tracker.service_updated(name.service, (port,))
        tracker.slice_updated(endpoint_slice(i, 0))
    tracker.source_synced("bench")
    portals = NetfilterPortals(
        open_backend("nft"),
        resync_period=1e9,
        conntrack=_noop_conntrack,
        physdev=physdev_supported(),
        other_backends=[],
    )
    proxier = UserspaceProxier(
        bind_address="0.0.0.0",
        port_range=None,
        node_name="bench",
        udp_timeout=0.25,
        udp_max_sessions=10,
        portals=portals,
    )
    try:
        await portals.flush_at_start()
        t0 = time.perf_counter()
        await proxier.sync(tracker.snapshot().state, None)
        full = time.perf_counter() - t0
        times = []
        for k in range(changes):
            tracker.slice_updated(endpoint_slice(k * 97 % ports, k + 1))
            t0 = time.perf_counter()
            snapshot = tracker.snapshot()
            await proxier.sync(snapshot.state, snapshot.changed_ports)
            times.append(time.perf_counter() - t0)
        checked = len(proxier.view()) == ports
    finally:
        await proxier.shutdown(0)
    return {"full_sync_s": full, "resync_s": None, "changes_s": times, "rules_checked": checked}


async def _child_nftables(ports: int, changes: int) -> dict[str, Any]:
    from uproxy.kernel.nft import NftCommand
    from uproxy.model import Endpoint, Protocol, ProxyState, ServicePort, ServicePortName
    from uproxy.proxier.nftables import NftablesProxier
    from uproxy.proxier.nftables_rules import NatConfig

    def service(i: int) -> tuple[ServicePortName, ServicePort, tuple[Endpoint, ...]]:
        name = ServicePortName("bench", f"svc-{i}", "http")
        backend = f"10.244.{i // 250}.{i % 250 + 1}"
        svc = ServicePort(name, Protocol.TCP, 80, cluster_ips=(_vip(i),))
        return name, svc, (Endpoint(backend, 8080),)

    def state_of(count: int) -> ProxyState:
        entries = [service(i) for i in range(count)]
        return ProxyState({n: s for n, s, _ in entries}, {n: e for n, _, e in entries})

    def new_proxier() -> NftablesProxier:
        return NftablesProxier(
            nft=NftCommand(), node_name="bench", config=NatConfig(), conntrack=_noop_conntrack,
            resync_period=1e9,
        )  # fmt: skip

    first = new_proxier()
    t0 = time.perf_counter()
    await first.sync(state_of(ports))
    full = time.perf_counter() - t0
    t0 = time.perf_counter()
    await new_proxier().sync(state_of(ports))
    resync = time.perf_counter() - t0
    times = []
    for k in range(changes):
        name, _, _ = service(ports + k)
        t0 = time.perf_counter()
        await first.sync(state_of(ports + k + 1), frozenset({name}))
        times.append(time.perf_counter() - t0)
    listing = await asyncio.to_thread(
        subprocess.run,
        ["nft", "list", "map", "ip", "uproxy", "service-ips"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    found = sum(listing.stdout.count(f"{_vip(i)} . tcp . 80 :") for i in range(ports + changes))
    return {
        "full_sync_s": full,
        "resync_s": resync,
        "changes_s": times,
        "rules_checked": found == ports + changes,
        "rules_in_kernel": found,
    }


def _verify(backend: str, ports: int, added: Sequence[tuple[str, str, int]]) -> tuple[bool, int]:
    """Outside the timings: the kernel really has the rules, all N and each change. Read with
    the save tool, as an admin would, rather than through uproxy's own reading code."""
    tool = "iptables-nft-save" if backend == "nft" else "iptables-legacy-save"
    dump = subprocess.run([tool, "-t", "nat"], capture_output=True, text=True, check=False)
    # Service rules carry their service's name as a comment; uproxy's chain layout (dispatch
    # chains, shards) is its own business and may change.
    rules = [
        line
        for line in dump.stdout.splitlines()
        if line.startswith("-A UPROXY-") and "bench/svc-" in line
    ]
    found = all(
        any(f"-d {vip}/32 " in line and line.endswith(f" {proxy_port}") for line in rules)
        for _, vip, proxy_port in added
    )
    return found and len(rules) == ports + len(added), len(rules)


def child_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.controlplane")
    parser.add_argument("--backend", choices=BACKENDS, required=True)
    parser.add_argument("--ports", type=int, required=True)
    parser.add_argument("--changes", type=int, default=5)
    parser.add_argument("--fake-ipvs", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    import structlog

    # uproxy's loggers would print to stdout, which carries our JSON answer.
    structlog.configure(logger_factory=structlog.PrintLoggerFactory(sys.stderr))
    if args.backend == "ipvs":
        result = asyncio.run(_child_ipvs(args.ports, args.changes, args.fake_ipvs))
    elif args.backend == "nftables":
        result = asyncio.run(_child_nftables(args.ports, args.changes))
    elif args.backend == "pipeline":
        result = asyncio.run(_child_pipeline(args.ports, args.changes))
    else:
        result = asyncio.run(_child(args.backend, args.ports, args.changes))
        added = result.pop("added")
        checked, count = _verify(args.backend, args.ports, added)
        result["rules_checked"], result["rules_in_kernel"] = checked, count
    print(json.dumps(result))
    return 0


# -- parent ----------------------------------------------------------------------------------


def backend_note(backend: str) -> str:
    """Why this backend cannot be measured here, or ''."""
    from uproxy.kernel.netfilter import find_tool

    if backend == "ipvs":
        if not Path("/proc/net/ip_vs").exists():
            return "the kernel has no IPVS (/proc/net/ip_vs absent, CONFIG_IP_VS unset)"
        backend = "nft"  # IPVS mode's masquerade rules go through iptables-nft
    if backend == "pipeline":
        backend = "nft"
    if backend == "nftables":
        return "" if find_tool("nft") else "nft not installed (Debian's nftables package)"
    prefix = "iptables-nft" if backend == "nft" else "iptables-legacy"
    for tool in (f"{prefix}-save", f"{prefix}-restore"):
        if find_tool(tool) is None:
            return f"{tool} not installed"
    return ""


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def measure(
    sizes: Sequence[int], runs: int, changes: int, log_dir: Path, timeout: float = 300.0
) -> list[CpResult]:
    results: list[CpResult] = []
    for run in range(runs):
        for backend in BACKENDS:
            note = backend_note(backend)
            for size in sizes:
                if note:
                    results.append(CpResult(backend, size, run, status="skipped", note=note))
                    continue
                results.append(_one(backend, size, run, changes, log_dir, timeout))
    return results


def _one(
    backend: str, size: int, run: int, changes: int, log_dir: Path, timeout: float
) -> CpResult:
    with topology.single_namespace(f"cp{run}{backend}{size}") as ns:
        argv = topology.netns_exec(
            ns,
            [sys.executable, "-m", "bench.controlplane", "--backend", backend,
             "--ports", str(size), "--changes", str(changes)],
        )  # fmt: skip
        try:
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            why = f"timed out after {timeout:.0f}s"
            return CpResult(backend, size, run, status="failed", note=why)
        log_path = log_dir / f"controlplane-{backend}-{size}-run{run}.log"
        log_path.write_text(proc.stderr)
        if proc.returncode != 0:
            tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
            why = f"failed (exit {proc.returncode}): {tail}"
            return CpResult(backend, size, run, status="failed", note=why)
        data: Mapping[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    changes_s = tuple(float(x) for x in data["changes_s"])
    return CpResult(
        backend,
        size,
        run,
        full_sync_s=float(data["full_sync_s"]),
        resync_s=None if data["resync_s"] is None else float(data["resync_s"]),
        change_s=_median(changes_s) if changes_s else None,
        changes_s=changes_s,
        rules_checked=bool(data["rules_checked"]),
        status="ok" if data["rules_checked"] else "failed",
        note="" if data["rules_checked"] else "rules missing from the kernel after the sync",
    )


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
