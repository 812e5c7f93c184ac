"""`uproxy check`: load manifests without running anything and show what would be proxied."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from uproxy.endpoints import categorize_endpoints, endpoints_for_port
from uproxy.model import EndpointSlice, ServicePort
from uproxy.sources.manifest_loader import load_report, merge_files

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


@dataclass(frozen=True)
class CheckResult:
    # None when the manifests define no service port: a header with no rows says nothing.
    table: str | None
    errors: list[str]
    warnings: list[str]
    other_kinds_refused: bool  # some errors are objects of other kinds (--allow-other-kinds)


def check_paths(paths: Sequence[Path], *, allow_other_kinds: bool = False) -> CheckResult:
    """A table of every service port the manifests under `paths` define, every error, and
    every object that would be ignored: an error, except objects of other kinds when allowed."""
    report = load_report(paths)
    merged, _ = merge_files(report.files.values())  # duplicate errors are already in `errors`
    slices = list(merged.slices.values())
    ports = sorted((p for ps in merged.services.values() for p in ps), key=lambda p: p.name)
    table = format_table([HEADERS, *(_row(p, slices) for p in ports)]) if ports else None
    path_level = [id(e) for e in report.unusable.values()]
    errors = [str(e) for e in report.errors if id(e) not in path_level]
    warnings: list[str] = []
    for ignored in report.ignored:
        (warnings if allow_other_kinds and ignored.other_kind else errors).append(str(ignored))
    errors += [str(e) for e in report.errors if id(e) in path_level]
    refused = not allow_other_kinds and any(i.other_kind for i in report.ignored)
    return CheckResult(table, errors, warnings, refused)
