"""The live status view: JSON for machines, a table for terminals, a page for people."""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from uproxy.model import Endpoint
from uproxy.proxier.base import PortView


def _endpoint_state(endpoint: Endpoint) -> str:
    if endpoint.ready:
        return "ready"
    if endpoint.serving and endpoint.terminating:
        return "terminating"
    return "not-ready"


@dataclass(frozen=True, slots=True)
class WorkerStatus:
    """One forwarding worker of --workers N."""

    index: int
    pid: int | None  # None while it is being started again
    live: bool
    restarts: int


def status_document(
    views: Sequence[PortView],
    mode: str,
    *,
    synced: bool = True,
    portals: bool = True,
    workers: Sequence[WorkerStatus] = (),
) -> dict[str, Any]:
    """`synced`: a first sync has applied the sources' state (before it, no ports says nothing).
    `portals`: the virtual IPs reach the proxy (not so for userspace mode with --no-portals).
    `workers`: the forwarding workers, with --workers N > 1."""
    ports = []
    for view in sorted(views, key=lambda v: v.service.name):
        service = view.service
        ports.append(
            {
                "name": str(service.name),
                "protocol": service.protocol.value,
                "port": service.port,
                "clusterIPs": list(service.cluster_ips),
                "externalIPs": list(service.external_ips),
                "loadBalancerIPs": list(service.load_balancer_ips),
                "nodePort": service.node_port,
                "proxyPort": view.proxy_port,
                "affinity": (
                    {"type": "ClientIP", "timeoutSeconds": service.affinity_timeout}
                    if service.affinity_timeout is not None
                    else {"type": "None"}
                ),
                "connections": view.connections,
                "ejections": view.ejections,
                "bytesIn": view.stats.bytes_in,
                "bytesOut": view.stats.bytes_out,
                "endpoints": [
                    {
                        "address": str(endpoint),
                        "state": _endpoint_state(endpoint),
                        "inUse": endpoint in view.in_use,
                        "ejected": endpoint in view.ejected,
                        "nodeName": endpoint.node_name,
                        "connections": view.per_endpoint.get(endpoint, 0),
                    }
                    for endpoint in view.endpoints
                ],
            }
        )
    document: dict[str, Any] = {
        "mode": mode,
        "synced": synced,
        "portals": portals,
        "servicePorts": ports,
    }
    if workers:
        document["workers"] = [
            {"worker": w.index, "pid": w.pid, "live": w.live, "restarts": w.restarts}
            for w in workers
        ]
    return document


NOT_SYNCED = "not synced yet: the sources' state has not reached the proxy"
NO_PORTALS = (
    "no portals (--no-portals): the virtual IPs marked [no-portal] are not reachable; "
    "clients connect to the proxy port on the bind address"
)


def _notes(document: Mapping[str, Any]) -> list[str]:
    if not document.get("synced", True):
        return [NOT_SYNCED]
    notes = [] if document["servicePorts"] else ["no service ports"]
    if not document.get("portals", True):
        notes.append(NO_PORTALS)
    if document.get("workers"):
        notes.append("workers: " + ", ".join(_worker(w) for w in document["workers"]))
    return notes


def _worker(worker: Mapping[str, Any]) -> str:
    state = f"pid {worker['pid']}" if worker["live"] else "restarting"
    restarts = f", {worker['restarts']} restarts" if worker["restarts"] else ""
    return f"{worker['worker']} ({state}{restarts})"


_COLUMNS = ("SERVICE PORT", "PROTO", "VIRTUAL IPS", "PROXY PORT", "AFFINITY", "CONNS", "ENDPOINTS")


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def _rows(document: Mapping[str, Any]) -> list[tuple[str, ...]]:
    rows: list[tuple[str, ...]] = []
    for port in document["servicePorts"]:
        vips = [*port["clusterIPs"], *port["externalIPs"], *port["loadBalancerIPs"]]
        mark = "" if document.get("portals", True) else "[no-portal]"
        vip_text = ",".join(f"{_host(ip)}:{port['port']}{mark}" for ip in vips) or "-"
        if port["nodePort"]:
            vip_text += f" node:{port['nodePort']}"
        affinity = port["affinity"]
        eps = [
            f"{e['address']}({e['connections']})"
            + ("" if e["inUse"] else f"[{e['state']}]")
            + ("[ejected]" if e.get("ejected") else "")
            for e in port["endpoints"]
        ]
        rows.append(
            (
                port["name"],
                port["protocol"],
                vip_text,
                str(port["proxyPort"]),
                "None" if affinity["type"] == "None" else f"ClientIP/{affinity['timeoutSeconds']}s",
                str(port["connections"]),
                " ".join(eps) or "<none>",
            )
        )
    return rows


def render_table(document: Mapping[str, Any]) -> str:
    """The table, with notes below it; no table at all before the first sync or without ports."""
    if not document.get("synced", True) or not document["servicePorts"]:
        return "\n".join(_notes(document))
    rows: list[tuple[str, ...]] = [_COLUMNS, *_rows(document)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(_COLUMNS) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  "
        + row[-1]
        for row in rows
    ]
    return "\n".join([*(line.rstrip() for line in lines), *_notes(document)])


def render_page(document: Mapping[str, Any]) -> str:
    """A small self-refreshing page of the same table."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in _COLUMNS)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(cell)}</td>" for cell in row) + "</tr>"
        for row in _rows(document)
    )
    count = len(document["servicePorts"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta http-equiv="refresh" content="2">
<title>uproxy status</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }}
table {{ border-collapse: collapse; }}
th, td {{ border: 1px solid #ccc; padding: .3rem .6rem; text-align: left; }}
th {{ background: #eef; }}
td {{ font-family: ui-monospace, monospace; font-size: .9rem; }}
</style></head>
<body><h1>uproxy — {html.escape(str(document["mode"]))} mode</h1>
<p id="summary">{count} service port(s); refreshes every 2 s.</p>
{"".join(f"<p class='note'>{html.escape(note)}</p>" for note in _notes(document))}
<table id="status"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
</body></html>
"""
