"""The composition root: the only place that builds real kernel backends, sources and proxiers."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import signal
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from uproxy.changes import ChangeTracker
from uproxy.cleanup import Cleaner
from uproxy.dataplane.sockopt import raise_nofile_limit
from uproxy.errors import KernelError, SettingsError
from uproxy.flow_flusher import Flushers
from uproxy.instance_lock import default_lock_path, instance_lock
from uproxy.kernel.netfilter import BackendChoice, BackendName, find_tool
from uproxy.model import ProxyState
from uproxy.observe.health import Health
from uproxy.observe.http import DEFAULT_MAX_CONNECTIONS, ConnectionCap
from uproxy.observe.metrics import Metrics, no_local_endpoints
from uproxy.observe.reserve import DescriptorReserve
from uproxy.observe.server import ObserveConfig, ObserveServer
from uproxy.observe.service_health import (
    HealthCheckListeners,
    ServiceHealthServer,
    SocketListeners,
    health_check_addresses,
    health_check_ports,
    local_ready_endpoints,
)
from uproxy.preflight import LISTENERS_ONLY, check_bind_address, require_net_admin
from uproxy.proxier.base import CountsSyncs, Proxier, drain
from uproxy.proxier.portals import NoPortals, Portals
from uproxy.proxier.userspace import ListenerFactory, UserspaceProxier
from uproxy.runner import SyncRunner
from uproxy.settings import Settings
from uproxy.sources.base import Source
from uproxy.sources.manifests import ManifestSource, check_start_paths
from uproxy.threads import in_thread

if TYPE_CHECKING:
    from uproxy.kernel.conntrack import UdpFlowCleaner
    from uproxy.kernel.netfilter import Family

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
                node_name=settings.hostname,
            )
        )
    if settings.config_paths or not sources:
        paths = settings.config_paths
        if not paths:
            paths = (bundled_examples(),)
            log.info("bundled_examples", path=str(paths[0]), hint="--config PATH for your own")
        check_start_paths(paths)
        sources.append(
            ManifestSource(
                paths,
                dns_refresh=settings.dns_refresh_period,
                fqdn_families=settings.fqdn_families,
            )
        )
    return sources


def udp_flow_cleaner(flushers: Flushers | None, family: Family) -> UdpFlowCleaner:
    """What deletes a family's stale flows: the app's owned flusher, or (no app: `uproxy check`,
    tests) the conntrack tool straight from the sync."""
    from uproxy.kernel.conntrack import flush_udp_flows

    if flushers is not None:
        return flushers.family(family)
    return functools.partial(flush_udp_flows, family=family)


def build_portals(settings: Settings, flushers: Flushers | None = None) -> Portals:
    """Portals for each family the listeners serve (a wildcard bind address: both; a specific
    one: its own). With both, a family whose netfilter is unusable is reported once and
    skipped."""
    if not settings.portals:
        return NoPortals()
    from uproxy.kernel.detect import (
        build_netfilter,
        open_if_holding_own_rules,
        other_backend,
        physdev_supported,
    )
    from uproxy.kernel.node_ips import node_ips
    from uproxy.proxier.netfilter_portals import NetfilterPortals, check_usable
    from uproxy.proxier.portals import PerFamilyPortals
    from uproxy.proxier.userspace import served_families

    def family_portals(family: Family) -> NetfilterPortals:
        netfilter = build_netfilter(settings.iptables_backend, family)
        check_usable(netfilter)
        return NetfilterPortals(
            netfilter,
            bind_address=settings.bind_address,
            nodeport_addresses=settings.nodeport_addresses,
            resync_period=settings.sync_period,
            conntrack=udp_flow_cleaner(flushers, family),
            physdev=physdev_supported(),
            other_backends=open_if_holding_own_rules(other_backend(netfilter.backend), family),
            node_ips=addresses,
        )

    addresses = node_ips()
    families: tuple[Family, ...] = served_families(settings.bind_address)
    if settings.workers > 1:  # the workers' sockets serve the bind address's family only
        families = (6,) if ":" in settings.bind_address else (4,)
    built: list[Portals] = []
    refused: list[KernelError] = []
    for family in families:
        try:
            built.append(family_portals(family))
        except KernelError as exc:
            if len(families) == 1:
                raise
            refused.append(exc)
            log.warning(
                "portals_family_unavailable",
                family=family,
                error=str(exc),
                action=f"no IPv{family} portals",
            )
    if not built:
        raise refused[0]
    return built[0] if len(built) == 1 else PerFamilyPortals(built)


def build_ipvs_proxier(settings: Settings) -> Proxier:
    """IPVS mode with the real kernel; KernelError at once when the kernel cannot do it. IPv6
    virtual servers need ip6tables for their masquerading: without it IPv6 is left out (logged)
    and IPv4 works alone."""
    from uproxy.kernel.conntrack import flush_udp_flows
    from uproxy.kernel.detect import build_netfilter
    from uproxy.kernel.ipvs import DUMMY_INTERFACE, NetlinkIpvs, Worker
    from uproxy.kernel.netfilter import Netfilter
    from uproxy.proxier.ipvs import IpvsProxier, check_capabilities

    worker = Worker()
    try:
        kernel = NetlinkIpvs(worker)
        check_capabilities(kernel, settings.ipvs_scheduler)
        netfilter = build_netfilter(settings.iptables_backend)
    except BaseException:
        worker.close()
        raise
    families: list[Family] = [4]
    netfilter6: Netfilter | None = None
    try:
        netfilter6 = build_netfilter(settings.iptables_backend, 6)
        families.append(6)
    except KernelError as exc:
        log.warning("ipvs_ipv6_unavailable", error=str(exc), action="IPv4 only")
    log.info(
        "ipvs_mode",
        scheduler=settings.ipvs_scheduler,
        graceful_period=settings.ipvs_graceful_period,
        strict_arp=settings.ipvs_strict_arp,
        interface=DUMMY_INTERFACE,
        families=families,
    )
    return IpvsProxier(
        ipvs=kernel,
        host=kernel,
        netfilter=netfilter,
        netfilter6=netfilter6,
        families=families,
        worker=worker,
        scheduler=settings.ipvs_scheduler,
        graceful_period=settings.ipvs_graceful_period,
        node_name=settings.hostname,
        nodeport_addresses=settings.nodeport_addresses,
        strict_arp=settings.ipvs_strict_arp,
        resync_period=settings.sync_period,
        conntrack=functools.partial(flush_udp_flows, run_blocking=worker.run, family=4),
        conntrack6=functools.partial(flush_udp_flows, run_blocking=worker.run, family=6),
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


def build_nftables_proxier(settings: Settings, flushers: Flushers | None = None) -> Proxier:
    """nftables mode with the real kernel; KernelError at once, naming what is missing, when
    nft or the kernel cannot do what the mode needs."""
    from uproxy.kernel.nft import FAMILIES, NftCommand
    from uproxy.kernel.node_ips import node_ips
    from uproxy.proxier.families import PerFamily
    from uproxy.proxier.nftables import NftablesProxier
    from uproxy.proxier.nftables_capabilities import check_nftables
    from uproxy.proxier.nftables_rules import NatConfig

    check_nftables(NftCommand("nft", "ip"))
    families: list[Family] = [4]
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
    addresses = node_ips()
    proxiers: list[Proxier] = [
        NftablesProxier(
            nft=NftCommand("nft", FAMILIES[family]),
            node_name=settings.hostname,
            config=NatConfig(
                cluster_cidr=settings.cluster_cidr_of(family),
                masquerade_all=settings.masquerade_all,
                nodeport_addresses=settings.nodeport_addresses,
                family=family,
                node_ips=addresses,
            ),
            conntrack=udp_flow_cleaner(flushers, family),
            resync_period=settings.sync_period,
            cleanup_on_exit=settings.cleanup_on_exit,
        )
        for family in families
    ]
    return proxiers[0] if len(proxiers) == 1 else PerFamily(proxiers)


def build_iptables_proxier(settings: Settings, flushers: Flushers | None = None) -> Proxier:
    """iptables mode on the detected (or chosen) backend, one proxier per IP family (iptables
    and ip6tables, as kube-proxy), cleaning what other modes left. A family whose tools or kernel
    support are missing is reported once and skipped; KernelError when neither family can run."""
    from uproxy.kernel.detect import (
        detect_backend,
        open_backend,
        open_if_holding_own_rules,
        other_backend,
        random_fully_supported,
    )
    from uproxy.kernel.node_ips import node_ips
    from uproxy.proxier.families import PerFamily
    from uproxy.proxier.iptables import IptablesProxier
    from uproxy.proxier.iptables_capabilities import usable_families
    from uproxy.proxier.iptables_rules import RuleContext, nodeport_destinations

    backend = detect_backend(settings.iptables_backend)
    log.info(
        "iptables_backend",
        backend=backend,
        chosen_by="flag" if settings.iptables_backend != "auto" else "detected",
    )
    random_fully = random_fully_supported(backend)
    addresses = node_ips()
    proxiers: list[Proxier] = []
    for netfilter in usable_families(lambda family: open_backend(backend, family)):
        family = netfilter.family
        context = RuleContext(
            node_name=settings.hostname,
            cluster_cidr=settings.cluster_cidr_of(family),
            masquerade_all=settings.masquerade_all,
            nodeport_destinations=nodeport_destinations(settings.nodeport_addresses, family),
            random_fully=random_fully,
            node_ips=addresses,
            family=family,
        )
        log.info(
            "iptables_mode",
            backend=backend,
            family=family,
            cluster_cidr=context.cluster_cidr,
            masquerade_all=context.masquerade_all,
            random_fully=context.random_fully,
        )
        proxiers.append(
            IptablesProxier(
                netfilter,
                context=context,
                conntrack=udp_flow_cleaner(flushers, family),
                resync_period=settings.sync_period,
                other_backends=open_if_holding_own_rules(other_backend(backend), family),
                # Outside netfilter, so once: the first family's proxier does it.
                leftovers=[] if proxiers else [ipvs_leftovers],
                cleanup_on_exit=settings.cleanup_on_exit,
            )
        )
    warn_if_not_forwarding()
    return proxiers[0] if len(proxiers) == 1 else PerFamily(proxiers)


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


def build_workers_proxier(settings: Settings, portals: Portals) -> Proxier:
    """The userspace mode with N forwarding processes; the main process holds the sockets."""
    from uproxy.workers.held import HeldSockets
    from uproxy.workers.process import subprocess_spawner
    from uproxy.workers.proxier import WorkersProxier
    from uproxy.workers.supervisor import Supervisor

    held = HeldSockets(settings.workers, settings.bind_address)
    local = build_userspace_proxier(settings, portals, listener_factory=held)
    supervisor = Supervisor(settings.workers, subprocess_spawner(settings), settings, held.all)
    log.info("workers_mode", workers=settings.workers)
    return WorkersProxier(local, held, supervisor)


def build_proxier(
    settings: Settings, portals: Portals, flushers: Flushers | None = None
) -> Proxier:
    if settings.mode == "userspace" and settings.workers > 1:
        return build_workers_proxier(settings, portals)
    if settings.mode == "ipvs":
        return build_ipvs_proxier(settings)
    if settings.mode == "iptables":
        return build_iptables_proxier(settings, flushers)
    if settings.mode == "nftables":
        return build_nftables_proxier(settings, flushers)
    return build_userspace_proxier(settings, portals)


def build_userspace_proxier(
    settings: Settings, portals: Portals, listener_factory: ListenerFactory | None = None
) -> UserspaceProxier:
    return UserspaceProxier(
        bind_address=settings.bind_address,
        port_range=settings.proxy_port_range,
        node_name=settings.hostname,
        udp_timeout=settings.udp_timeout,
        udp_max_sessions=settings.udp_max_sessions,
        portals=portals,
        listener_factory=listener_factory,
        tcp_options=settings.tcp_options(),
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
        health_check_listeners: HealthCheckListeners | None = None,
        health_check_addresses: Sequence[str] = (),
        flushers: Flushers | None = None,
    ) -> None:
        self.settings = settings
        self.flushers = flushers  # conntrack deletion, off the sync (uproxy/flow_flusher.py)
        self.leftovers = leftovers
        self.sources = sources
        self.portals = portals
        self.proxier = proxier
        self.runner = SyncRunner(
            self._sync,
            min_interval=settings.min_sync_period,
            max_interval=settings.sync_period,
        )
        self.tracker = ChangeTracker(
            [s.name for s in sources],
            on_change=self._changed,
            node_name=settings.hostname,
            node_zone=settings.node_zone,
        )
        self.health = Health(settings.sync_period)
        counts = proxier.sync_counters if isinstance(proxier, CountsSyncs) else None
        self.metrics = Metrics(self.proxier.view, counts)
        self.observe = ObserveServer(
            ObserveConfig(
                healthz=settings.healthz_bind_address,
                metrics=settings.metrics_bind_address,
                mode=settings.mode,
                portals=settings.mode != "userspace" or settings.portals,
            ),
            self.health,
            self.metrics,
            self.proxier.view,
            reserve=DescriptorReserve(),  # descriptors kept for /healthz when the process is out
        )
        # kube-proxy's service health checks (healthCheckNodePort), fed after every sync.
        self.service_health: ServiceHealthServer | None = None
        if health_check_listeners is not None:
            self.service_health = ServiceHealthServer(
                health_check_listeners,
                health_check_addresses,
                proxy_healthy=lambda: self.health.report().healthy,
            )
        self._full_sync_due = True
        self._last_full_sync = float("-inf")
        self.stopping = asyncio.Event()
        self.hurry = asyncio.Event()

    def _changed(self) -> None:
        if self.tracker.synced:
            self.health.sources_synced()
        self.health.change_queued()
        self.metrics.last_queued.set(time.time())
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
        self.health.set_node_eligible(self.tracker.node_eligible)
        self._record(snapshot.state, finished - started, snapshot.oldest_change, finished)
        (self.metrics.full_sync_duration if full else self.metrics.partial_sync_duration).observe(
            finished - started
        )
        await self._sync_service_health(snapshot.state)
        log.info(
            "sync_done",
            duration_ms=round((finished - started) * 1000, 2),
            service_ports=len(snapshot.state.services),
            endpoints=sum(len(e) for e in snapshot.state.endpoints.values()),
            changed_services=len(snapshot.changed),
            full=full,
        )

    async def _sync_service_health(self, state: ProxyState) -> None:
        node = self.settings.hostname
        internal, external = no_local_endpoints(state, node)
        self.metrics.no_local_endpoints.labels(traffic_policy="internal").set(internal)
        self.metrics.no_local_endpoints.labels(traffic_policy="external").set(external)
        if self.service_health is None:
            return
        ports = health_check_ports(state)
        try:
            await self.service_health.sync(ports, local_ready_endpoints(state, node, ports.keys()))
        except Exception as exc:  # never fatal: the rules are in force; the next sync retries
            log.error("service_health_check_sync_failed", error=str(exc), exc_info=exc)

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
        if self.flushers is not None:
            tasks.append(loop.create_task(self.flushers.run(), name="conntrack-flushers"))
        tasks += [
            loop.create_task(s.run(self.tracker.handler(s.name)), name=f"source-{s.name}")
            for s in self.sources
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
            if self.service_health is not None:
                await self.service_health.close()
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
        await drain(self.proxier, self.settings.shutdown_grace, self.hurry)

    def _install_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)

    def _remove_signals(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)


async def cleanup(iptables_backend: BackendChoice = "auto", lock_file: Path | None = None) -> None:
    """What `uproxy cleanup` does: remove everything every mode of uproxy installed, in both
    iptables backends (a previous run may have used either; the choice only orders the work)
    and in IPVS. Raises KernelError naming whatever remains, PrivilegeError without the
    privilege to change anything, InstanceLocked while a uproxy runs in this namespace."""
    require_net_admin("uproxy cleanup", "nothing was removed")
    with instance_lock(
        lock_file or default_lock_path(),
        refusal="cleaning up now would remove its live rules; stop it first "
        "(with --cleanup-on-exit it removes them itself)",
    ):
        await _cleanup(iptables_backend)


async def _cleanup(iptables_backend: BackendChoice) -> None:
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
        for family in (4, 6):
            netfilter = open_installed(name, family)
            if netfilter is None:
                log.info(
                    "cleanup_skipped", backend=name, family=family, reason="tools not installed"
                )
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
            backends = [
                nf
                for name in ("nft", "legacy")
                for family in (4, 6)
                for nf in open_if_holding_own_rules(name, family)
            ]
            errors = await cleanup_netfilter(backends)
            if errors:
                raise KernelError("; ".join(errors))

        cleaners.append(iptables_chains)
    if settings.mode in ("userspace", "nftables"):  # the iptables proxier does it itself
        cleaners.append(ipvs_leftovers)
    return cleaners


async def serve(settings: Settings) -> None:
    """Run uproxy until SIGTERM/SIGINT."""
    sources = build_sources(settings)  # first: a mistyped --config fails before any kernel work
    if settings.changes_kernel_state:
        what = (
            "portals (the default)" if settings.mode == "userspace" else f"--mode {settings.mode}"
        )
        require_net_admin(what, LISTENERS_ONLY)
    if settings.mode == "userspace":
        check_bind_address(settings.bind_address)
    lock: contextlib.AbstractContextManager[None] = contextlib.nullcontext()
    if settings.changes_kernel_state or settings.lock_file is not None:
        lock = instance_lock(
            settings.lock_file or default_lock_path(),
            refusal="two instances would rewrite each other's rules; stop that one first",
        )
    with lock:
        from uproxy.kernel.conntrack import flush_udp_flows

        flushers = Flushers(lambda family: functools.partial(flush_udp_flows, family=family))
        portals = build_portals(settings, flushers) if settings.mode == "userspace" else NoPortals()
        proxier = build_proxier(settings, portals, flushers)
        app = App(
            settings,
            sources,
            portals,
            proxier,
            build_leftover_cleaners(settings),
            health_check_listeners=SocketListeners(ConnectionCap(DEFAULT_MAX_CONNECTIONS)),
            health_check_addresses=await service_health_addresses(settings),
            flushers=flushers,
        )
        if settings.workers > 1:
            from uproxy.workers.metrics import WorkerCollector
            from uproxy.workers.proxier import WorkersProxier

            assert isinstance(proxier, WorkersProxier)
            app.metrics.registry.register(WorkerCollector(proxier.supervisor))
            app.observe.workers = proxier.supervisor.statuses
        await app.run()


def node_addresses() -> list[str]:
    """Every address on this node's interfaces (blocking netlink: call it in a thread)."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return [str(m.get_attr("IFA_ADDRESS")) for m in ipr.get_addr() if m.get_attr("IFA_ADDRESS")]


async def service_health_addresses(settings: Settings) -> list[str]:
    """Where healthCheckNodePorts listen: all addresses, or the node's addresses inside
    --nodeport-addresses (found once at start, as kube-proxy does)."""
    if not settings.nodeport_addresses:
        return health_check_addresses((), ())
    try:
        found = await in_thread(node_addresses)
    except Exception as exc:  # kube-proxy's fallback: listen on every address
        log.warning(
            "node_addresses_unavailable", error=str(exc), action="health checks listen everywhere"
        )
        return health_check_addresses((), ())
    addresses = health_check_addresses(settings.nodeport_addresses, found)
    if not addresses:
        log.warning(
            "service_health_check_no_addresses",
            nodeport_addresses=list(settings.nodeport_addresses),
            node_addresses=found,
        )
    return addresses
