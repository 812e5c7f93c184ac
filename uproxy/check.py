"""`uproxy check`: load manifests without running anything and show what would be proxied."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path

from uproxy.endpoints import categorize_endpoints, endpoints_for_port
from uproxy.model import EndpointSlice, ServicePort
from uproxy.sources.manifest_loader import load_paths, merge_files

HEADERS = (
    "SERVICE PORT",
    "PROTOCOL",
    "PORT",
    "CLUSTER-IPS",
    "EXTERNAL",
    "NODEPORT",
    "AFFINITY",
    "ENDPOINTS",
)


def _addresses(values: Iterable[str]) -> str:
    return ",".join(values) or "-"


def _affinity(port: ServicePort) -> str:
    return "None" if port.affinity_timeout is None else f"ClientIP/{port.affinity_timeout}s"


def _endpoints(port: ServicePort, slices: Sequence[EndpointSlice]) -> str:
    # FQDN slices are shown by name: resolving them here would make `check` depend on DNS.
    found = endpoints_for_port(slices, port.name, port.protocol, include_fqdn=True)
    # No node here: show what cluster traffic would use.
    chosen = categorize_endpoints(found, replace(port, internal_traffic_local=False), "").cluster
    text = ",".join(str(e) for e in chosen) or "<none>"
    unused = len(found) - len(chosen)
    return f"{text} (+{unused} not ready)" if unused else text


def _row(port: ServicePort, slices: Sequence[EndpointSlice]) -> tuple[str, ...]:
    return (
        str(port.name),
        str(port.protocol),
        str(port.port),
        _addresses(port.cluster_ips),
        _addresses((*port.external_ips, *port.load_balancer_ips)),
        "-" if port.node_port is None else str(port.node_port),
        _affinity(port),
        _endpoints(port, slices),
    )


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows as left-aligned columns separated by two spaces (the first row is the header)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)
    return "\n".join(line.rstrip() for line in lines)


def check_paths(paths: Sequence[Path]) -> tuple[str, list[str]]:
    """A table of every service port the manifests under `paths` define, and every error."""
    files, errors = load_paths(paths)
    merged, _ = merge_files(files.values())  # duplicate errors are already in `errors`
    slices = list(merged.slices.values())
    ports = sorted((p for ps in merged.services.values() for p in ps), key=lambda p: p.name)
    table = format_table([HEADERS, *(_row(p, slices) for p in ports)])
    return table, [str(e) for e in errors]
