from __future__ import annotations

from uproxy.dataplane.stats import PortStats
from uproxy.model import Endpoint, Protocol, ServicePort, ServicePortName
from uproxy.observe.status import render_page, render_table, status_document
from uproxy.proxier.base import PortView

READY = Endpoint("10.1.0.1", 8080, node_name="n1")
GONE = Endpoint("10.1.0.2", 8080, ready=False, serving=True, terminating=True)


def view() -> PortView:
    service = ServicePort(
        ServicePortName("default", "web", "http"),
        Protocol.TCP,
        80,
        cluster_ips=("10.96.0.10",),
        node_port=30080,
        affinity_timeout=600,
    )
    return PortView(
        service=service,
        proxy_port=40000,
        endpoints=(READY, GONE),
        in_use=frozenset({READY}),
        per_endpoint={READY: 2},
        connections=2,
        affinity_entries=1,
        stats=PortStats(active=2, total=5, bytes_in=10, bytes_out=20),
    )


def test_document_lists_endpoints_with_state_and_connections() -> None:
    doc = status_document([view()], "userspace")
    (port,) = doc["servicePorts"]
    assert port["proxyPort"] == 40000
    assert port["affinity"] == {"type": "ClientIP", "timeoutSeconds": 600}
    assert port["endpoints"] == [
        {"address": "10.1.0.1:8080", "state": "ready", "inUse": True, "nodeName": "n1",
         "connections": 2},
        {"address": "10.1.0.2:8080", "state": "terminating", "inUse": False, "nodeName": None,
         "connections": 0},
    ]  # fmt: skip


def test_table_and_page_show_the_same_rows() -> None:
    doc = status_document([view()], "userspace")
    table = render_table(doc)
    header, row = table.splitlines()
    assert header.split()[:2] == ["SERVICE", "PORT"]
    for text in ("default/web:http", "10.96.0.10:80 node:30080", "40000", "ClientIP/600s"):
        assert text in row
    assert "10.1.0.1:8080(2)" in row and "10.1.0.2:8080(0)[terminating]" in row
    page = render_page(doc)
    assert "<td>default/web:http</td>" in page and 'http-equiv="refresh"' in page


def test_page_escapes_names() -> None:
    doc = status_document([view()], "<script>")
    assert "<script>" not in render_page(doc)
