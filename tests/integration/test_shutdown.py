"""Shutdown is never held hostage by a DNS lookup that does not come back (FQDN endpoints)."""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.netns import Namespace, Network
from tests.manifests import endpoint_slice, service, write

pytestmark = pytest.mark.root

# A DNS server that reads queries and never answers: getaddrinfo blocks for its full retry time.
BLACKHOLE_DNS = r"""
import socket, time
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind(("127.0.0.1", 53))
print("listening", flush=True)
while True:
    s.recvfrom(4096)
"""


@pytest.fixture
def silent_dns_node(net: Network) -> Iterator[Namespace]:
    node = net.namespace("node")
    # `ip netns exec` bind-mounts /etc/netns/NAME/resolv.conf over /etc/resolv.conf.
    etc = Path("/etc/netns") / node.name
    etc.mkdir(parents=True)
    try:
        (etc / "resolv.conf").write_text("nameserver 127.0.0.1\noptions timeout:5 attempts:3\n")
        node.start_python("-c", BLACKHOLE_DNS).wait_line("listening")
        yield node
    finally:
        shutil.rmtree(etc, ignore_errors=True)


def test_sigterm_does_not_wait_for_hanging_dns(silent_dns_node: Namespace, tmp_path: Path) -> None:
    write(
        tmp_path / "fqdn.yaml",
        service("web", [{"name": "http", "port": 80}], cluster_ip="10.96.0.10"),
        endpoint_slice(
            "web",
            [{"name": "http", "port": 8080}],
            ["backend.never.answers"],
            address_type="FQDN",
        ),
    )
    uproxy = silent_dns_node.start_python(
        "-m", "uproxy", "run", "--config", str(tmp_path), "--no-portals",
        "--log-format", "json", "--healthz-bind-address", "127.0.0.1:0",
        "--metrics-bind-address", "127.0.0.1:0",
    )  # fmt: skip
    uproxy.wait_event("manifests_loaded", timeout=30)
    started = time.monotonic()
    assert uproxy.stop(signal.SIGTERM, timeout=30) == 0
    # The lookup would hold a thread for 15 s (5 s x 3 attempts); exit must not wait for it.
    assert time.monotonic() - started < 5
