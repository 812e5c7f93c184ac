from __future__ import annotations

from uproxy.dataplane.stats import PortStats
from uproxy.model import Endpoint, Protocol, ServicePort, ServicePortName
from uproxy.observe.status import WorkerStatus, render_page, render_table, status_document
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
        ejected=frozenset({READY}),
        ejections=3,
    )


def test_document_lists_endpoints_with_state_and_connections() -> None:
    doc = status_document([view()], "userspace")
    (port,) = doc["servicePorts"]
    assert port["proxyPort"] == 40000
    assert port["affinity"] == {"type": "ClientIP", "timeoutSeconds": 600}
    assert port["endpoints"] == [
        {"address": "10.1.0.1:8080", "state": "ready", "inUse": True, "ejected": True,
         "nodeName": "n1", "connections": 2},
        {"address": "10.1.0.2:8080", "state": "terminating", "inUse": False, "ejected": False,
         "nodeName": None, "connections": 0},
    ]  # fmt: skip
    assert port["ejections"] == 3
    assert "10.1.0.1:8080(2)[ejected]" in render_table(doc)


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


def test_before_the_first_sync_no_table_but_a_note() -> None:
    doc = status_document([], "userspace", synced=False)
    assert doc["synced"] is False
    assert render_table(doc) == "not synced yet: the sources' state has not reached the proxy"
    assert render_table(status_document([], "userspace")) == "no service ports"


def test_no_portals_marks_virtual_ips() -> None:
    doc = status_document([view()], "userspace", portals=False)
    _header, row, note = render_table(doc).splitlines()
    assert "10.96.0.10:80[no-portal] node:30080" in row
    assert note.startswith("no portals (--no-portals)")
    assert "[no-portal]" in render_page(doc)


def test_workers_are_listed_with_their_pids_and_restarts() -> None:
    workers = [WorkerStatus(0, 4242, live=True, restarts=2), WorkerStatus(1, None, False, 1)]
    document = status_document([view()], "userspace", workers=workers)
    assert document["workers"] == [
        {"worker": 0, "pid": 4242, "live": True, "restarts": 2},
        {"worker": 1, "pid": None, "live": False, "restarts": 1},
    ]
    assert render_table(document).splitlines()[-1] == (
        "workers: 0 (pid 4242, 2 restarts), 1 (restarting, 1 restarts)"
    )
    assert "workers" not in status_document([view()], "userspace")
