"""The composition root: the only place that builds real kernel backends, sources and proxiers."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import signal
import time
from collections.abc import Sequence
from pathlib import Path

import structlog

from uproxy.changes import ChangeTracker
from uproxy.cleanup import Cleaner
from uproxy.dataplane.sockopt import raise_nofile_limit
from uproxy.errors import KernelError, SettingsError
from uproxy.kernel.conntrack import UdpFlowMatch
from uproxy.kernel.netfilter import BackendChoice, BackendName, find_tool
from uproxy.model import ProxyState
from uproxy.observe.health import Health
from uproxy.observe.metrics import Metrics
from uproxy.observe.server import ObserveConfig, ObserveServer
from uproxy.proxier.base import CountsSyncs, Proxier
from uproxy.proxier.portals import NoPortals, Portals
from uproxy.proxier.userspace import UserspaceProxier
from uproxy.runner import SyncRunner
from uproxy.settings import Settings
from uproxy.sources.base import Source
from uproxy.sources.manifests import ManifestSource
from uproxy.threads import in_thread

log = structlog.get_logger(__name__)


def bundled_examples() -> Path:
    """The example manifests `uproxy run` uses when given no source at all."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "examples", here.parent / "examples"):
        if candidate.is_dir():
            return candidate
    raise SettingsError("no --config given and the bundled examples are not installed")


def build_sources(settings: Settings) -> list[Source]:
    sources: list[Source] = []
    if settings.uses_kubernetes_api:
        from uproxy.sources.kube import KubeSource

        sources.append(
            KubeSource(
                kubeconfig=settings.kubeconfig,
                context=settings.kube_context,
                master=settings.master,
                in_cluster=settings.in_cluster,
            )
        )
    if settings.config_paths or not sources:
        paths = settings.config_paths or (bundled_examples(),)
        sources.append(ManifestSource(paths, dns_refresh=settings.dns_refresh_period))
    return sources


def build_portals(settings: Settings) -> Portals:
    if not settings.portals:
        return NoPortals()
    from uproxy.kernel.conntrack import flush_udp_flows
    from uproxy.kernel.detect import (
        build_netfilter,
        open_if_holding_own_rules,
        other_backend,
        physdev_supported,
    )
    from uproxy.proxier.netfilter_portals import NetfilterPortals

    netfilter = build_netfilter(settings.iptables_backend)
    return NetfilterPortals(
        netfilter,
        bind_address=settings.bind_address,
        nodeport_addresses=settings.nodeport_addresses,
        resync_period=settings.sync_period,
        conntrack=flush_udp_flows,
        physdev=physdev_supported(),
        other_backends=open_if_holding_own_rules(other_backend(netfilter.backend)),
    )


def build_ipvs_proxier(settings: Settings) -> Proxier:
    """IPVS mode with the real kernel; KernelError at once when the kernel cannot do it."""
    from uproxy.kernel.conntrack import flush_udp_flows
    from uproxy.kernel.detect import build_netfilter
    from uproxy.kernel.ipvs import DUMMY_INTERFACE, NetlinkIpvs, Worker
    from uproxy.proxier.ipvs import IpvsProxier, check_capabilities

    worker = Worker()
    try:
        kernel = NetlinkIpvs(worker)
        check_capabilities(kernel, settings.ipvs_scheduler)
        netfilter = build_netfilter(settings.iptables_backend)
    except BaseException:
        worker.close()
        raise
    log.info(
        "ipvs_mode",
        scheduler=settings.ipvs_scheduler,
        graceful_period=settings.ipvs_graceful_period,
        strict_arp=settings.ipvs_strict_arp,
        interface=DUMMY_INTERFACE,
    )
    return IpvsProxier(
        ipvs=kernel,
        host=kernel,
        netfilter=netfilter,
        worker=worker,
        scheduler=settings.ipvs_scheduler,
        graceful_period=settings.ipvs_graceful_period,
        node_name=settings.hostname,
        nodeport_addresses=settings.nodeport_addresses,
        strict_arp=settings.ipvs_strict_arp,
        resync_period=settings.sync_period,
        conntrack=functools.partial(flush_udp_flows, run_blocking=worker.run),
        cleanup_on_exit=settings.cleanup_on_exit,
    )


def warn_if_not_forwarding(sysctl: Path = Path("/proc/sys/net/ipv4/ip_forward")) -> None:
    """The kernel modes DNAT traffic from other hosts and forward it; with forwarding off only
    the node's own clients reach services (kube-proxy leaves the setting to the node, too)."""
    try:
        forwarding = sysctl.read_text().strip() == "1"
    except OSError:
        return
    if not forwarding:
        log.warning(
            "ip_forward_off",
            hint="only this node's own clients reach services; set net.ipv4.ip_forward=1",
        )


def build_nftables_proxier(settings: Settings) -> Proxier:
    """nftables mode with the real kernel; KernelError at once, naming what is missing, when
    nft or the kernel cannot do what the mode needs."""
    from uproxy.kernel.conntrack import flush_udp_flows
    from uproxy.kernel.nft import FAMILIES, NftCommand
    from uproxy.proxier.families import PerFamily
    from uproxy.proxier.nftables import NftablesProxier
    from uproxy.proxier.nftables_capabilities import check_nftables
    from uproxy.proxier.nftables_rules import NatConfig

    check_nftables(NftCommand("nft", "ip"))
    families = [4]
    try:
        check_nftables(NftCommand("nft", "ip6"), family=6)
        families.append(6)
    except KernelError as exc:
        log.warning("nftables_ipv6_unavailable", error=str(exc), action="IPv4 only")
    log.info(
        "nftables_mode",
        tables=[f"{FAMILIES[f]} uproxy" for f in families],
        cluster_cidr=settings.cluster_cidr,
    )
    warn_if_not_forwarding()
    proxiers: list[Proxier] = [
        NftablesProxier(
            nft=NftCommand("nft", FAMILIES[family]),
            node_name=settings.hostname,
            config=NatConfig(
                cluster_cidr=settings.cluster_cidr,
                masquerade_all=settings.masquerade_all,
                nodeport_addresses=settings.nodeport_addresses,
                family=family,
            ),
            # UDP conntrack deletion covers IPv4 flows (see uproxy/kernel/conntrack.py).
            conntrack=flush_udp_flows if family == 4 else _no_flows,
            resync_period=settings.sync_period,
            cleanup_on_exit=settings.cleanup_on_exit,
        )
        for family in families
    ]
    return proxiers[0] if len(proxiers) == 1 else PerFamily(proxiers)


async def _no_flows(matches: Sequence[UdpFlowMatch]) -> int:
    return 0


def build_iptables_proxier(settings: Settings) -> Proxier:
    """iptables mode on the detected (or chosen) backend, cleaning what other modes left."""
    from uproxy.kernel.conntrack import flush_udp_flows
    from uproxy.kernel.detect import (
        build_netfilter,
        open_if_holding_own_rules,
        other_backend,
        random_fully_supported,
    )
    from uproxy.proxier.iptables import IptablesProxier
    from uproxy.proxier.iptables_rules import RuleContext, nodeport_destinations

    netfilter = build_netfilter(settings.iptables_backend)
    context = RuleContext(
        node_name=settings.hostname,
        cluster_cidr=(
            str(ipaddress.ip_network(settings.cluster_cidr, strict=False))
            if settings.cluster_cidr
            else None
        ),
        masquerade_all=settings.masquerade_all,
        nodeport_destinations=nodeport_destinations(settings.nodeport_addresses),
        random_fully=random_fully_supported(netfilter.backend),
    )
    warn_if_not_forwarding()
    log.info(
        "iptables_mode",
        backend=netfilter.backend,
        cluster_cidr=context.cluster_cidr,
        masquerade_all=context.masquerade_all,
        random_fully=context.random_fully,
    )
    return IptablesProxier(
        netfilter,
        context=context,
        conntrack=flush_udp_flows,
        resync_period=settings.sync_period,
        other_backends=open_if_holding_own_rules(other_backend(netfilter.backend)),
        leftovers=[ipvs_leftovers],
        cleanup_on_exit=settings.cleanup_on_exit,
    )


async def ipvs_leftovers() -> None:
    """What the IPVS mode leaves outside netfilter: its virtual servers (only where the kernel
    has IP_VS: opening the family elsewhere would try to load it), uproxy-ipvs0 and its record."""
    from uproxy.kernel.ipvs import PROC_IPVS, NetlinkIpvs, Worker
    from uproxy.proxier.ipvs_cleanup import cleanup_ipvs
    from uproxy.proxier.ipvs_desired import STATE_FILE
    from uproxy.proxier.ipvs_owned import OwnedServers

    worker = Worker("uproxy-ipvs-leftovers")
    try:
        kernel = NetlinkIpvs(worker)
        ipvs = kernel if PROC_IPVS.exists() else None
        await cleanup_ipvs(worker, ipvs, kernel, OwnedServers(STATE_FILE))
    finally:
        await asyncio.to_thread(worker.close)


def build_proxier(settings: Settings, portals: Portals) -> Proxier:
    if settings.mode == "ipvs":
        return build_ipvs_proxier(settings)
    if settings.mode == "iptables":
        return build_iptables_proxier(settings)
    if settings.mode == "nftables":
        return build_nftables_proxier(settings)
    return UserspaceProxier(
        bind_address=settings.bind_address,
        port_range=settings.proxy_port_range,
        node_name=settings.hostname,
        udp_timeout=settings.udp_timeout,
        udp_max_sessions=settings.udp_max_sessions,
        portals=portals,
    )


class App:
    """Wires sources -> change tracker -> runner -> proxier, and owns every task it starts."""

    def __init__(
        self,
        settings: Settings,
        sources: list[Source],
        portals: Portals,
        proxier: Proxier,
        leftovers: Sequence[Cleaner] = (),
    ) -> None:
        self.settings = settings
        self.leftovers = leftovers
        self.sources = sources
        self.portals = portals
        self.proxier = proxier
        self.runner = SyncRunner(
            self._sync,
            min_interval=settings.min_sync_period,
            max_interval=settings.sync_period,
        )
        self.tracker = ChangeTracker([s.name for s in sources], on_change=self._changed)
        self.health = Health(settings.sync_period)
        counts = proxier.sync_counters if isinstance(proxier, CountsSyncs) else None
        self.metrics = Metrics(self.proxier.view, counts)
        self.observe = ObserveServer(
            ObserveConfig(
                healthz=settings.healthz_bind_address,
                metrics=settings.metrics_bind_address,
                mode=settings.mode,
            ),
            self.health,
            self.metrics,
            self.proxier.view,
        )
        self._full_sync_due = True
        self._last_full_sync = float("-inf")
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()

    def _changed(self) -> None:
        if self.tracker.synced:
            self.health.sources_synced()
        self.health.change_queued()
        self.runner.request()

    async def _sync(self) -> None:
        if not self.tracker.synced:
            return  # a partial view would remove services that simply have not arrived yet
        snapshot = self.tracker.snapshot()
        started = time.monotonic()
        # The safety net: after a failure, and once per --sync-period, the proxier looks at
        # everything instead of only what changed.
        full = (
            self._full_sync_due or started - self._last_full_sync >= 0.9 * self.settings.sync_period
        )
        self._full_sync_due = True  # until this sync has succeeded
        try:
            await self.proxier.sync(snapshot.state, None if full else snapshot.changed_ports)
        except Exception:
            self.health.sync_failed()
            self.metrics.sync_failures.set(self.runner.consecutive_failures + 1)
            raise
        self._full_sync_due = False
        if full:
            self._last_full_sync = started
        finished = time.monotonic()
        self.health.sync_succeeded(self.tracker.oldest_change if self.tracker.pending else None)
        self._record(snapshot.state, finished - started, snapshot.oldest_change, finished)
        log.info(
            "sync_done",
            duration_ms=round((finished - started) * 1000, 2),
            service_ports=len(snapshot.state.services),
            endpoints=sum(len(e) for e in snapshot.state.endpoints.values()),
            changed_services=len(snapshot.changed),
            full=full,
        )

    def _record(
        self, state: ProxyState, duration: float, oldest_change: float | None, finished: float
    ) -> None:
        metrics = self.metrics
        metrics.sync_duration.observe(duration)
        metrics.last_sync.set(time.time())
        metrics.sync_failures.set(0)
        metrics.service_ports.set(len(state.services))
        metrics.endpoints.set(sum(len(e) for e in state.endpoints.values()))
        if oldest_change is not None:
            metrics.programming_latency.observe(finished - oldest_change)

    def request_stop(self) -> None:
        if self.stopping.is_set():
            log.warning("second_stop_signal", action="closing connections now")
            self.hurry.set()
        else:
            log.info("stop_signal", grace=self.settings.shutdown_grace)
            self.stopping.set()

    def reload(self) -> None:
        log.info("reload_signal")
        for source in self.sources:
            source.refresh()

    async def run(self) -> None:
        soft_before, soft_now = raise_nofile_limit()
        log.info(
            "starting",
            mode=self.settings.mode,
            bind_address=self.settings.bind_address,
            sources=[s.name for s in self.sources],
            nofile=soft_now,
            nofile_was=soft_before,
        )
        loop = asyncio.get_running_loop()
        await self.observe.start()
        for clean_leftovers in self.leftovers:
            try:
                await clean_leftovers()
            except Exception as exc:  # best effort: another mode's leftovers must not stop this one
                log.warning(
                    "leftovers_cleanup_failed", error=str(exc), error_type=type(exc).__name__
                )
        await self.portals.flush_at_start()
        self._install_signals(loop)
        tasks = [loop.create_task(self.runner.run(), name="sync-runner")]
        tasks += [
            loop.create_task(s.run(self.tracker), name=f"source-{s.name}") for s in self.sources
        ]
        try:
            await self._until_stopped(tasks)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self._drain()
            if self.settings.cleanup_on_exit:
                await self.portals.cleanup()
                log.info("cleanup_done")
            await self.observe.stop()
            self._remove_signals(loop)
        log.info("stopped")

    async def _until_stopped(self, tasks: list[asyncio.Task[None]]) -> None:
        stop = asyncio.ensure_future(self.stopping.wait())
        try:
            done, _ = await asyncio.wait([stop, *tasks], return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        for task in tasks:
            if task in done and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _drain(self) -> None:
        hurry = asyncio.ensure_future(self.hurry.wait())
        drain = asyncio.ensure_future(self.proxier.shutdown(self.settings.shutdown_grace))
        try:
            await asyncio.wait([drain, hurry], return_when=asyncio.FIRST_COMPLETED)
            if not drain.done():
                drain.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await drain
                await self.proxier.shutdown(0)
        finally:
            hurry.cancel()

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def _remove_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def cleanup(iptables_backend: BackendChoice = "auto") -> None:
    """What `uproxy cleanup` does: remove everything every mode of uproxy installed, in both
    iptables backends (a previous run may have used either; the choice only orders the work)
    and in IPVS. Raises KernelError naming whatever remains."""
    from uproxy.cleanup import cleanup_everything
    from uproxy.kernel.detect import open_installed, other_backend
    from uproxy.kernel.ipvs import PROC_IPVS, NetlinkIpvs, Worker
    from uproxy.kernel.nft import NftCommand
    from uproxy.proxier.ipvs_cleanup import cleanup_ipvs
    from uproxy.proxier.ipvs_desired import STATE_FILE
    from uproxy.proxier.ipvs_owned import OwnedServers

    first: BackendName = "legacy" if iptables_backend == "legacy" else "nft"
    backends = []
    for name in (first, other_backend(first)):
        netfilter = open_installed(name)
        if netfilter is None:
            log.info("cleanup_skipped", backend=name, reason="tools not installed")
        else:
            backends.append(netfilter)
    worker = Worker("uproxy-cleanup")
    try:
        kernel = NetlinkIpvs(worker)
        # Without /proc/net/ip_vs there is no IPVS state, and opening the family would load it.
        ipvs = kernel if PROC_IPVS.exists() else None

        async def ipvs_cleaner() -> None:
            await cleanup_ipvs(worker, ipvs, kernel, OwnedServers(STATE_FILE))

        cleaners: list[Cleaner] = [ipvs_cleaner]
        if find_tool("nft") is not None:
            tables = [NftCommand("nft", family) for family in ("ip", "ip6")]

            async def nftables_cleaner() -> None:
                for nft in tables:
                    await in_thread(nft.delete_table)
                    log.info("cleanup_done", backend="nftables", table=f"{nft.family} uproxy")

            cleaners.append(nftables_cleaner)
        await cleanup_everything(backends, cleaners)
    finally:
        await asyncio.to_thread(worker.close)


def build_leftover_cleaners(settings: Settings) -> list[Cleaner]:
    """What removes the state other modes of uproxy left behind, before the first sync: rules
    of theirs would catch the virtual addresses' traffic before this mode's do."""
    from uproxy.kernel.nft import NftCommand

    cleaners: list[Cleaner] = []
    if settings.mode == "userspace" and not settings.portals:
        return cleaners  # a sidecar without privileges: it touches no kernel state at all
    if settings.mode != "nftables" and find_tool("nft") is not None:
        tables = [NftCommand("nft", family) for family in ("ip", "ip6")]

        async def nftables_table() -> None:
            for nft in tables:
                if await in_thread(nft.listing) is not None:
                    await in_thread(nft.delete_table)
                    log.info("leftovers_removed", mode="nftables", table=f"{nft.family} uproxy")

        cleaners.append(nftables_table)
    if settings.mode == "nftables":
        from uproxy.cleanup import cleanup_netfilter
        from uproxy.kernel.detect import open_if_holding_own_rules

        async def iptables_chains() -> None:
            backends = [nf for name in ("nft", "legacy") for nf in open_if_holding_own_rules(name)]
            errors = await cleanup_netfilter(backends)
            if errors:
                raise KernelError("; ".join(errors))

        cleaners.append(iptables_chains)
    if settings.mode in ("userspace", "nftables"):  # the iptables proxier does it itself
        cleaners.append(ipvs_leftovers)
    return cleaners


async def serve(settings: Settings) -> None:
    """Run uproxy until SIGTERM/SIGINT."""
    portals = build_portals(settings) if settings.mode == "userspace" else NoPortals()
    proxier = build_proxier(settings, portals)
    app = App(
        settings, build_sources(settings), portals, proxier, build_leftover_cleaners(settings)
    )
    await app.run()
