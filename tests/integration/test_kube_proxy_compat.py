"""A real `uproxy run`'s admin endpoints read as kube-proxy's consumers read kube-proxy's: the
/healthz and /livez bodies by a regex of Go's time format, the metrics port's /healthz, and the
metric families a kube-proxy dashboard queries."""

from __future__ import annotations

import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime
from email.message import Message
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.manifests import service, write
from tests.uproxy_process import UproxyProcess, loopback_run_args

# Go's time.Time.String(): layout "2006-01-02 15:04:05.999999999 -0700 MST", and " m=±S.N{9}"
# (the monotonic reading) on a time taken from the clock, as kube-proxy's time.Now() is.
GO_TIME = (
    r"(?P<{0}>\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d(?:\.\d{{1,9}})? [+-]\d{{4}} [A-Z]{{3,4}})"
    r"(?: m=[+-]\d+\.\d{{9}})?"
)
HEALTHZ = re.compile(
    '{"lastUpdated": "' + GO_TIME.format("last") + '","currentTime": "'
    + GO_TIME.format("now") + '", "nodeEligible": (?P<eligible>true|false)}'
)  # fmt: skip
LIVEZ = re.compile(
    '{"lastUpdated": "' + GO_TIME.format("last") + '","currentTime": "'
    + GO_TIME.format("now") + '"}'
)  # fmt: skip


def parse_go_time(text: str) -> datetime:
    """As Go's time.Parse with kube-proxy's String() layout would (fraction optional)."""
    stamp, _, zone = text.rpartition(" ")
    assert zone == "UTC"
    for layout in ("%Y-%m-%d %H:%M:%S.%f %z", "%Y-%m-%d %H:%M:%S %z"):
        try:
            return datetime.strptime(stamp, layout)
        except ValueError:
            continue
    raise AssertionError(f"not Go's time format: {text!r}")


def get(url: str) -> tuple[int, Message, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers, exc.read()


@pytest.fixture
def proc(tmp_path: Path) -> Iterator[UproxyProcess]:
    write(tmp_path / "a.yaml", service("a", [{"name": "p", "port": 80}]))
    process = UproxyProcess(loopback_run_args(tmp_path))
    try:
        process.wait_event("sync_done")
        yield process
    finally:
        process.__exit__()


def test_healthz_and_livez_parse_as_kube_proxys(proc: UproxyProcess) -> None:
    port = proc.wait_event("healthz_listening")["port"]
    status, headers, body = get(f"http://127.0.0.1:{port}/healthz")
    assert status == 200
    assert headers["Content-Type"] == "application/json"
    assert headers["X-Content-Type-Options"] == "nosniff"
    match = HEALTHZ.fullmatch(body.decode())
    assert match is not None, body
    assert match["eligible"] == "true"
    last, now = parse_go_time(match["last"]), parse_go_time(match["now"])
    assert last == now  # healthy: kube-proxy reports lastUpdated as the current time
    assert abs((now - datetime.now(UTC)).total_seconds()) < 600  # a real clock, not epoch 0

    status, headers, body = get(f"http://127.0.0.1:{port}/livez")
    assert status == 200 and headers["X-Content-Type-Options"] == "nosniff"
    assert LIVEZ.fullmatch(body.decode()) is not None, body


def test_metrics_port_has_healthz_and_kube_proxys_metrics(proc: UproxyProcess) -> None:
    port = proc.wait_event("metrics_listening")["port"]
    assert get(f"http://127.0.0.1:{port}/healthz")[::2] == (200, b"ok")
    healthz_port = proc.wait_event("healthz_listening")["port"]
    get(f"http://127.0.0.1:{healthz_port}/healthz")
    status, _, body = get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200
    text = body.decode()
    assert "_created" not in text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in (
        "kubeproxy_sync_proxy_rules_duration_seconds",
        "kubeproxy_sync_full_proxy_rules_duration_seconds",
        "kubeproxy_network_programming_duration_seconds",
        "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
        "kubeproxy_sync_proxy_rules_no_local_endpoints_total",
        "kubeproxy_proxy_healthz",
        "process_resident_memory_bytes",
        "process_open_fds",
        "process_cpu_seconds",
        "process_start_time_seconds",
    ):
        assert name in families, name
    healthz = {s.labels["code"]: s.value for s in families["kubeproxy_proxy_healthz"].samples}
    assert healthz["200"] >= 1
    assert families["process_open_fds"].samples[0].value > 0
    full = families["kubeproxy_sync_full_proxy_rules_duration_seconds"]
    assert any(s.name.endswith("_count") and s.value >= 1 for s in full.samples)
