"""spec.loadBalancerSourceRanges against the real kernel, in every mode that runs here.

The topology of test_kernel_modes (client 10.10.0.2, node, three backends), plus a second client
namespace, `denied` (10.11.0.2), outside the service's only range, 10.10.0.0/24:

    client 10.10.0.2 --veth-- node --veth-- backends 1..3
    denied 10.11.0.2 --veth--/

Both clients call the LoadBalancer IP over TCP (curl) and UDP (dig against dnsmasq): the client
is served, `denied` is not. The externalIP and the NodePort of the same service are not subject
to the ranges, so `denied` reaches those. After `uproxy cleanup` nothing of uproxy's is left.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import require_tools
from tests.integration.netns import Namespace, Network, Process, cli_cleanup
from tests.integration.test_kernel_modes import (
    BACKEND_IPS,
    EXTERNAL_IP,
    KERNEL_MODES,
    LB_IP,
    NAMES,
    NODE_IP,
    Topology,
    _service,
    _slice,
    build_topology,
    curl,
    dig,
    require_mode,
    start_backends,
    start_uproxy,
    uproxy_lines,
    write_manifests,
)

pytestmark = pytest.mark.root

# The kernel modes, and the userspace mode's portals on both iptables backends.
MODES = [*KERNEL_MODES, ("userspace", "legacy"), ("userspace", "nft")]
DENIED_IP, DENIED_GATEWAY = "10.11.0.2", "10.11.0.1"
ALLOWED_RANGE = "10.10.0.0/24"
WEB_VIP, DNS_VIP = "10.96.0.10", "10.96.0.53"
ANSWERS = {"10.0.0.1", "10.0.0.2", "10.0.0.3"}


def manifests() -> list[dict[str, Any]]:
    lb = {"loadBalancer": {"ingress": [{"ip": LB_IP}]}}
    # An IPv6 range too: it must not open (or close) anything for IPv4 (per-family ranges).
    ranges = [ALLOWED_RANGE, "2001:db8::/32"]
    http = [{"name": "http", "port": 80, "targetPort": 8080, "nodePort": 30080}]
    udp = [{"name": "dns", "port": 53, "protocol": "UDP", "nodePort": 30053}]
    return [
        _service(
            "web",
            http,
            WEB_VIP,
            type="LoadBalancer",
            externalIPs=[EXTERNAL_IP],
            loadBalancerSourceRanges=ranges,
            status=lb,
        ),
        _slice("web", 8080, BACKEND_IPS),
        _service(
            "dns",
            udp,
            DNS_VIP,
            type="LoadBalancer",
            loadBalancerSourceRanges=ranges,
            status=lb,
        ),
        _slice("dns", 53, BACKEND_IPS, protocol="UDP"),
    ]


@pytest.fixture(params=MODES, ids=[f"{m}-{b}" for m, b in MODES])
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    mode, backend = request.param
    require_mode(mode, backend)
    return str(mode), str(backend)


@pytest.fixture
def topo(net: Network, tmp_path: Path) -> Iterator[tuple[Topology, Namespace, Path]]:
    require_tools("curl", "dig", "dnsmasq", "nft")
    topology = build_topology(net)
    denied = net.namespace("denied")
    net.link(denied, f"{DENIED_IP}/24", topology.node, f"{DENIED_GATEWAY}/24")
    denied.route("default", via=DENIED_GATEWAY)
    start_backends(topology)
    config = tmp_path / "manifests"
    config.mkdir()
    write_manifests(config, manifests())
    try:
        yield topology, denied, config
    finally:
        cli_cleanup(topology.node)  # whatever the test did, leave the node clean


def no_drift(uproxy: Process) -> None:
    """Two more periodic full syncs read the rules back and found nothing to repair: the
    firewall rules are spelled as the kernel prints them."""
    first = uproxy.wait_event("sync_done", timeout=15, full=True)
    mark = uproxy.events.index(first) + 1
    second = uproxy.wait_event("sync_done", timeout=15, after=mark, full=True)
    mark = uproxy.events.index(second) + 1
    uproxy.wait_event("sync_done", timeout=15, after=mark, full=True)
    drift = [e for e in uproxy.events if str(e.get("event", "")).endswith("drift_repaired")]
    assert drift == [], drift


def test_lb_ip_serves_only_the_source_ranges_and_cleanup_leaves_nothing(
    topo: tuple[Topology, Namespace, Path], case: tuple[str, str]
) -> None:
    mode, backend = case
    topology, denied, config = topo
    client, node = topology.client, topology.node
    uproxy = start_uproxy(topology, config, mode, backend, "--sync-period", "1s")
    backends = set(NAMES.values())

    assert curl(client, LB_IP).split()[0] in backends
    assert dig(client, LB_IP) in ANSWERS
    refused = curl(denied, LB_IP, max_time=2)
    assert refused.startswith("ERR"), refused
    unanswered = dig(denied, LB_IP)
    assert "10.0.0." not in unanswered and "timed out" in unanswered, unanswered

    # The ranges are the LoadBalancer IP's alone: not the externalIP's, the NodePorts' or the
    # ClusterIP's.
    assert curl(denied, EXTERNAL_IP).split()[0] in backends
    assert curl(denied, DENIED_GATEWAY, 30080).split()[0] in backends
    assert dig(denied, DENIED_GATEWAY, 30053) in ANSWERS
    assert curl(client, NODE_IP, 30080).split()[0] in backends
    assert curl(node, WEB_VIP).split()[0] in backends
    # The allowed client is still served after the denied one tried (no state left behind).
    assert curl(client, LB_IP).split()[0] in backends

    no_drift(uproxy)
    assert uproxy.stop(signal.SIGTERM) == 0
    cli_cleanup(node)
    assert uproxy_lines(node) == []
    tables = node.run("nft", "list", "tables").stdout
    assert "uproxy" not in tables, tables
