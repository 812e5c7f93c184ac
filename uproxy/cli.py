"""Command line: flags -> one frozen Settings -> the app. The only place that exits.

Flag names follow kube-proxy where kube-proxy has the flag.
Exit codes: 0 success, 1 runtime or validation error, 2 bad usage.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import sys
from pathlib import Path
from typing import Any

import click
import structlog

from uproxy import __version__
from uproxy.demo.services import (
    DNS_ANSWER,
    DNS_BACKEND_PORT,
    DNS_PORT,
    DNS_VIP,
    HTTP_BACKEND_PORT,
    SERVICE_CIDR,
    STICKY_PORT,
    STICKY_VIP,
    WEB_BACKENDS,
    WEB_PORT,
    WEB_VIP,
)
from uproxy.errors import SettingsError, UproxyError
from uproxy.logs import configure_logging
from uproxy.settings import (
    Settings,
    parse_bind_address,
    parse_duration,
    parse_port_range,
    parse_workers,
)

log = structlog.get_logger(__name__)


class Duration(click.ParamType):  # type: ignore[type-arg]
    name = "duration"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        if isinstance(value, float | int):
            return float(value)
        try:
            return parse_duration(str(value))
        except SettingsError as exc:
            self.fail(str(exc), param, ctx)


DURATION = Duration()

_log_options = [
    click.option(
        "--log-level",
        type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False),
        default="info",
        show_default=True,
        help="The least severe log events shown.",
    ),
    click.option(
        "--log-format",
        type=click.Choice(["auto", "console", "json"]),
        default="auto",
        show_default=True,
        help="auto: a console renderer on a terminal, JSON otherwise.",
    ),
]


def log_options(func: Any) -> Any:
    for option in reversed(_log_options):
        func = option(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="uproxy")
def cli() -> None:
    """uproxy: a Kubernetes-style service proxy (userspace, IPVS and iptables modes)."""


@cli.command()
@click.option(
    "--config",
    "config_paths",
    multiple=True,
    type=click.Path(path_type=Path),
    help="Manifest file or directory (Service, EndpointSlice; YAML or JSON). Repeatable. "
    "Default: the bundled examples.",
)
@click.option(
    "--kubeconfig",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="Follow Services and EndpointSlices from the API server in this kubeconfig.",
)
@click.option("--context", "kube_context", default=None, help="The kubeconfig context to use.")
@click.option("--master", default=None, help="The API server's address (overrides kubeconfig).")
@click.option(
    "--mode",
    "--proxy-mode",
    "mode",
    type=click.Choice(["userspace", "ipvs", "iptables", "nftables"]),
    default="userspace",
    show_default=True,
    help="userspace: listeners + portals; ipvs: the kernel's IP Virtual Server forwards; "
    "iptables: netfilter NAT rules forward (kube-proxy's default mode); nftables: the same in "
    "uproxy's own nftables table.",
)
@click.option(
    "--cluster-cidr",
    default=None,
    help="The pods' CIDR (kernel modes), or one per IP family, comma-separated "
    "(10.244.0.0/16,fd00:10:244::/56): ClusterIP traffic from outside it is masqueraded.",
)
@click.option(
    "--masquerade-all",
    is_flag=True,
    help="Kernel modes: masquerade all service traffic (endpoints see the node's address).",
)
@click.option(
    "--ipvs-scheduler",
    type=click.Choice(["rr", "lc", "wlc", "sh", "dh", "sed", "nq", "mh"]),
    default="rr",
    show_default=True,
    help="The IPVS scheduler when the proxy mode is ipvs (the kernel must have it).",
)
@click.option(
    "--ipvs-graceful-period",
    type=DURATION,
    default="15s",
    show_default=True,
    help="Longest wait before a removed TCP real server with connections is deleted.",
)
@click.option("--ipvs-strict-arp", is_flag=True, help="Set arp_ignore/arp_announce for IPVS.")
@click.option("--bind-address", default="0.0.0.0", show_default=True, help="Where listeners bind.")
@click.option(
    "--proxy-port-range",
    default="",
    help="Proxy ports, LOW-HIGH or BASE+SIZE. Empty: chosen by the kernel.",
)
@click.option(
    "--hostname-override",
    default=None,
    help="This node's name, for Local traffic policies. Default: $NODE_NAME, else the hostname.",
)
@click.option(
    "--node-zone",
    default=None,
    help="This node's topology zone, for topology-aware routing (hints.forZones). "
    "Default: the topology.kubernetes.io/zone label of this node's Node object "
    "(from the API, or a Node manifest under --config).",
)
@click.option(
    "--min-sync-period",
    type=DURATION,
    default="1s",
    show_default=True,
    help="The minimum interval of how often the rules and listeners can be refreshed as "
    "endpoints and services change (e.g. '5s', '1m', '2h22m'); 0 applies every change at once.",
)
@click.option(
    "--sync-period",
    type=DURATION,
    default="30s",
    show_default=True,
    help="The maximum interval of how often the rules are fully refreshed, repairing drift "
    "(e.g. '5s', '1m', '2h22m'). Must be greater than 0.",
)
@click.option(
    "--udp-timeout",
    type=DURATION,
    default="250ms",
    show_default=True,
    help="How long an idle UDP session lives.",
)
@click.option(
    "--udp-max-sessions",
    type=click.IntRange(min=1),
    default=10000,
    show_default=True,
    help="UDP sessions per service port.",
)
@click.option(
    "--tcp-keepalive/--no-tcp-keepalive",
    default=True,
    show_default=True,
    help="TCP keepalive on both legs of every proxied connection.",
)
@click.option(
    "--tcp-keepalive-idle",
    type=DURATION,
    default="15s",
    show_default=True,
    help="How long a connection is idle before the first keepalive probe.",
)
@click.option(
    "--tcp-keepalive-interval",
    type=DURATION,
    default="15s",
    show_default=True,
    help="Time between keepalive probes.",
)
@click.option(
    "--tcp-keepalive-count",
    type=click.IntRange(1, 127),
    default=9,
    show_default=True,
    help="Unanswered probes before a peer is given up as dead.",
)
@click.option(
    "--tcp-idle-timeout",
    type=DURATION,
    default="0",
    show_default=True,
    help="Close a TCP connection idle in both directions this long; 0: never.",
)
@click.option(
    "--tcp-linger-timeout",
    type=DURATION,
    default="30s",
    show_default=True,
    help="How long a closed connection may take to deliver its last data before a reset.",
)
@click.option(
    "--shutdown-grace",
    type=DURATION,
    default="5s",
    show_default=True,
    help="How long SIGTERM waits for open connections.",
)
@click.option(
    "--event-loop",
    type=click.Choice(["uvloop", "asyncio"]),
    default="uvloop",
    show_default=True,
    help="The event loop the listeners run on: uvloop (faster) or the standard library's asyncio.",
)
@click.option(
    "--portals/--no-portals",
    default=True,
    show_default=True,
    help="Install netfilter rules that steer virtual IPs to the listeners.",
)
@click.option(
    "--iptables-backend",
    type=click.Choice(["auto", "legacy", "nft"]),
    default="auto",
    show_default=True,
    help="The iptables backend for portals and the iptables mode: legacy (x_tables), nft "
    "(iptables-nft), or auto: the one already holding rules, else the one `iptables` is.",
)
@click.option(
    "--nodeport-addresses",
    default="",
    help="Comma-separated CIDRs NodePorts answer on. Default: every local address.",
)
@click.option("--cleanup-on-exit", is_flag=True, help="Remove rules when stopping.")
@click.option(
    "--healthz-bind-address",
    default="0.0.0.0:10256",
    show_default=True,
    help="IP:PORT for /healthz and /livez; empty disables.",
)
@click.option(
    "--metrics-bind-address",
    default="127.0.0.1:10249",
    show_default=True,
    help="IP:PORT for /metrics, /proxyMode, /status and the status page; empty disables.",
)
@click.option(
    "--dns-refresh-period",
    type=DURATION,
    default="10s",
    show_default=True,
    help="How often FQDN endpoints are resolved again.",
)
@click.option(
    "--fqdn-families",
    type=click.Choice(["service", "IPv4", "IPv6", "both"]),
    default="service",
    show_default=True,
    help="Which address families FQDN endpoints resolve to: the Service's own (those of its "
    "virtual IPs; both when it has none), or IPv4, IPv6 or both regardless.",
)
@click.option(
    "--lock-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The lock that keeps one uproxy per network namespace. "
    "Default: /run/uproxy/netns-<inode>.lock, taken unless --no-portals in userspace mode.",
)
@click.option(
    "--workers",
    default="1",
    show_default=True,
    help="Userspace mode: forwarding processes sharing every proxy port; 'auto': usable CPUs.",
)
@log_options
def run(
    config_paths: tuple[Path, ...],
    kubeconfig: Path | None,
    kube_context: str | None,
    master: str | None,
    mode: str,
    cluster_cidr: str | None,
    masquerade_all: bool,
    ipvs_scheduler: str,
    ipvs_graceful_period: float,
    ipvs_strict_arp: bool,
    bind_address: str,
    proxy_port_range: str,
    hostname_override: str | None,
    node_zone: str | None,
    min_sync_period: float,
    sync_period: float,
    udp_timeout: float,
    udp_max_sessions: int,
    tcp_keepalive: bool,
    tcp_keepalive_idle: float,
    tcp_keepalive_interval: float,
    tcp_keepalive_count: int,
    tcp_idle_timeout: float,
    tcp_linger_timeout: float,
    shutdown_grace: float,
    event_loop: str,
    portals: bool,
    iptables_backend: str,
    nodeport_addresses: str,
    cleanup_on_exit: bool,
    healthz_bind_address: str,
    metrics_bind_address: str,
    dns_refresh_period: float,
    fqdn_families: str,
    lock_file: Path | None,
    workers: str,
    log_level: str,
    log_format: str,
) -> None:
    """Run the proxy until SIGTERM or SIGINT."""
    configure_logging(log_level, log_format)  # type: ignore[arg-type]
    try:
        settings = Settings(
            config_paths=config_paths,
            kubeconfig=kubeconfig,
            kube_context=kube_context,
            master=master,
            # In a pod with no kubeconfig given, use the service account (as kube-proxy does).
            in_cluster=kubeconfig is None
            and master is None
            and not config_paths
            and "KUBERNETES_SERVICE_HOST" in os.environ,
            mode=mode,  # type: ignore[arg-type]
            cluster_cidr=cluster_cidr or None,
            masquerade_all=masquerade_all,
            ipvs_scheduler=ipvs_scheduler,
            ipvs_graceful_period=ipvs_graceful_period,
            ipvs_strict_arp=ipvs_strict_arp,
            bind_address=bind_address,
            proxy_port_range=parse_port_range(proxy_port_range),
            hostname=hostname_override or os.environ.get("NODE_NAME") or socket.gethostname(),
            node_zone=node_zone,
            min_sync_period=min_sync_period,
            sync_period=sync_period,
            udp_timeout=udp_timeout,
            udp_max_sessions=udp_max_sessions,
            tcp_keepalive=tcp_keepalive,
            tcp_keepalive_idle=tcp_keepalive_idle,
            tcp_keepalive_interval=tcp_keepalive_interval,
            tcp_keepalive_count=tcp_keepalive_count,
            tcp_idle_timeout=tcp_idle_timeout or None,
            tcp_linger_timeout=tcp_linger_timeout,
            shutdown_grace=shutdown_grace,
            event_loop=event_loop,  # type: ignore[arg-type]
            log_level=log_level,
            log_format=log_format,  # type: ignore[arg-type]
            portals=portals,
            iptables_backend=iptables_backend,  # type: ignore[arg-type]
            nodeport_addresses=tuple(c.strip() for c in nodeport_addresses.split(",") if c.strip()),
            cleanup_on_exit=cleanup_on_exit,
            dns_refresh_period=dns_refresh_period,
            fqdn_families=fqdn_families,  # type: ignore[arg-type]
            healthz_bind_address=parse_bind_address(healthz_bind_address, "--healthz-bind-address"),
            metrics_bind_address=parse_bind_address(metrics_bind_address, "--metrics-bind-address"),
            lock_file=lock_file,
            workers=parse_workers(workers, len(os.sched_getaffinity(0))),
        )
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    from uproxy.app import serve
    from uproxy.loops import loop_factory

    try:
        with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
            runner.run(serve(settings))
    except UproxyError as exc:
        log.error("fatal", error=str(exc), error_type=type(exc).__name__)
        sys.exit(1)
    except PermissionError as exc:
        log.error(
            "fatal",
            error=str(exc),
            hint="portals need root or CAP_NET_ADMIN; use --no-portals to run listeners only",
        )
        sys.exit(1)


@cli.command()
@click.option(
    "--config",
    "config_paths",
    multiple=True,
    required=True,
    type=click.Path(path_type=Path),
    help="Manifest file or directory. Repeatable.",
)
@click.option(
    "--allow-other-kinds",
    is_flag=True,
    help="Objects of kinds uproxy does not read (Deployments beside the Services, say) are "
    "warnings, not errors.",
)
def check(config_paths: tuple[Path, ...], allow_other_kinds: bool) -> None:
    """Validate manifests and print the services they define. Exit 1 on any error and on
    anything `uproxy run` would ignore."""
    from uproxy.check import check_paths

    result = check_paths(config_paths, allow_other_kinds=allow_other_kinds)
    if result.table is not None:
        click.echo(result.table)
    elif not result.errors:
        click.echo("no service ports")
    for warning in result.warnings:
        click.echo(f"warning: {warning}", err=True)
    for error in result.errors:
        click.echo(f"error: {error}", err=True)
    if result.errors:
        hint = " (--allow-other-kinds accepts objects of other kinds)"
        click.echo(
            f"{len(result.errors)} error(s){hint if result.other_kinds_refused else ''}", err=True
        )
        sys.exit(1)


@cli.command()
@click.option(
    "--iptables-backend",
    type=click.Choice(["auto", "legacy", "nft"]),
    default="auto",
    show_default=True,
    help="auto cleans both backends.",
)
@click.option(
    "--lock-file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="The running uproxy's --lock-file, if it was given one.",
)
@log_options
def cleanup(iptables_backend: str, lock_file: Path | None, log_level: str, log_format: str) -> None:
    """Remove every chain, rule, IPVS virtual server, address and interface uproxy owns."""
    configure_logging(log_level, log_format)  # type: ignore[arg-type]
    from uproxy.app import cleanup as cleanup_all

    try:
        asyncio.run(cleanup_all(iptables_backend, lock_file))  # type: ignore[arg-type]
    except UproxyError as exc:
        log.error("cleanup_failed", error=str(exc))
        sys.exit(1)


@cli.command()
@click.option(
    "--address",
    default="127.0.0.1:10249",
    show_default=True,
    help="The running uproxy's --metrics-bind-address.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the raw JSON document.")
def status(address: str, as_json: bool) -> None:
    """Show the live state of a running uproxy: services, endpoints, connections."""
    import json
    import urllib.error
    import urllib.request

    from uproxy.observe.status import render_table

    try:
        host, port = parse_bind_address(address, "--address") or ("", 0)
    except SettingsError as exc:
        raise click.UsageError(str(exc)) from None
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            document = json.load(response)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        click.echo(f"error: cannot read {url}: {exc}", err=True)
        sys.exit(1)
    click.echo(json.dumps(document, indent=2) if as_json else render_table(document))


@cli.command()
@click.option(
    "--requests",
    type=click.IntRange(min=1),
    default=6,
    show_default=True,
    help="Requests per TCP service.",
)
@click.option(
    "--iptables-backend",
    type=click.Choice(["auto", "legacy", "nft"]),
    default="auto",
    show_default=True,
    help="The iptables backend of the demo's uproxy (see `uproxy run --help`).",
)
@click.option("--keep-running", is_flag=True, help="Keep everything up until Ctrl-C.")
@click.option("--verbose", "-v", is_flag=True, help="Show uproxy's log.")
def demo(requests: int, iptables_backend: str, keep_running: bool, verbose: bool) -> None:
    """Run a client, uproxy and backends in network namespaces; show what the client sees (root)."""
    from uproxy.demo.main import run_demo

    sys.exit(
        run_demo(
            requests=requests,
            iptables_backend=iptables_backend,
            keep_running=keep_running,
            verbose=verbose,
        )
    )


def _host_port(ctx: click.Context, param: click.Parameter, value: str) -> tuple[str, int]:
    host, _, port = value.rpartition(":")
    try:
        ipaddress.ip_address(host)
        return host, int(port)
    except ValueError:
        raise click.BadParameter(f"{value!r} is not IP:PORT") from None


@cli.group("demo-role", hidden=True)
def demo_role() -> None:
    """The pieces `uproxy demo` and docker-compose.yml run, one per namespace or container."""


@demo_role.command("http")
@click.option("--name", required=True)
@click.option("--port", type=click.IntRange(1, 65535), default=HTTP_BACKEND_PORT)
def demo_role_http(name: str, port: int) -> None:
    """An HTTP backend that answers every GET with its name."""
    from uproxy.demo.roles import serve_http

    sys.exit(serve_http(name, port))


@demo_role.command("dns")
@click.option("--name", required=True)
@click.option("--port", type=click.IntRange(1, 65535), default=DNS_BACKEND_PORT)
@click.option("--answer", default=DNS_ANSWER)
def demo_role_dns(name: str, port: int, answer: str) -> None:
    """A DNS server answering every A question with --answer."""
    from uproxy.demo.roles import serve_dns

    sys.exit(serve_dns(name, port, answer))


@demo_role.command("client")
@click.option("--web", callback=_host_port, default=f"{WEB_VIP}:{WEB_PORT}")
@click.option("--sticky", callback=_host_port, default=f"{STICKY_VIP}:{STICKY_PORT}")
@click.option("--dns", callback=_host_port, default=f"{DNS_VIP}:{DNS_PORT}")
@click.option("--requests", type=int, default=6)
@click.option("--backends", type=int, default=len(WEB_BACKENDS))
@click.option("--wait", type=float, default=60.0, help="Seconds.")
@click.option("--route-via", default=None, help="Add a route for --service-cidr via this host.")
@click.option("--service-cidr", default=SERVICE_CIDR)
def demo_role_client(**options: Any) -> None:
    """Call the services and print who answered."""
    from uproxy.demo.roles import ClientArgs, run_client

    sys.exit(run_client(ClientArgs(**options)))


@cli.command(hidden=True)
@click.option("--fd", type=int, required=True, help="The channel to the main process.")
@click.option("--event-loop", type=click.Choice(["uvloop", "asyncio"]), default="uvloop")
@log_options
def worker(fd: int, event_loop: str, log_level: str, log_format: str) -> None:
    """A forwarding worker of `uproxy run --workers N` (started by it, not by hand)."""
    configure_logging(log_level, log_format)  # type: ignore[arg-type]
    from uproxy.loops import loop_factory
    from uproxy.workers.child import serve_worker

    try:
        with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:  # type: ignore[arg-type]
            runner.run(serve_worker(fd))
    except UproxyError as exc:
        log.error("fatal", error=str(exc), error_type=type(exc).__name__)
        sys.exit(1)


def main() -> None:
    cli(prog_name="uproxy")
