"""Topology-aware routing against the real kernel, in every mode this kernel has.

The topology of test_kernel_modes: a client, the node (node-a, in zone-a) and three backends.
The `zoned` service's slice hints be1 and be3 for zone-a and be2 for zone-b, as the EndpointSlice
controller does for `trafficDistribution: PreferClose`; the node then sends every connection to
be1 or be3. When a hint goes missing, kube-proxy's fallback sends traffic everywhere again.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import require_tools
from tests.integration.netns import Network, cli_cleanup
from tests.integration.test_kernel_modes import (
    BACKEND_IPS,
    KERNEL_MODES,
    NODE_NAME,
    Topology,
    build_topology,
    many,
    require_mode,
    start_backends,
    start_uproxy,
    wait_for_change,
    write_manifests,
)

pytestmark = pytest.mark.root

MODES = [("userspace", "nft"), *KERNEL_MODES]
ZONED_VIP = "10.96.0.50"
HINTS = {BACKEND_IPS[0]: "zone-a", BACKEND_IPS[1]: "zone-b", BACKEND_IPS[2]: "zone-a"}


def zoned(hints: dict[str, str], node_zone: str | None) -> list[dict[str, Any]]:
    endpoints = []
    for ip in BACKEND_IPS:
        endpoint: dict[str, Any] = {"addresses": [ip], "conditions": {"ready": True}}
        if ip in hints:
            endpoint["hints"] = {"forZones": [{"name": hints[ip]}]}
        endpoints.append(endpoint)
    objects: list[dict[str, Any]] = [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "zoned", "namespace": "default"},
            "spec": {
                "clusterIP": ZONED_VIP,
                "ports": [{"name": "http", "port": 80}],
                "trafficDistribution": "PreferClose",
            },
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "zoned-1",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "zoned"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": endpoints,
        },
    ]
    if node_zone is not None:
        labels = {"topology.kubernetes.io/zone": node_zone}
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": NODE_NAME, "labels": labels},
        }
        objects.append(node)
    return objects


@pytest.fixture(params=MODES, ids=[f"{m}-{b}" for m, b in MODES])
def case(request: pytest.FixtureRequest) -> tuple[str, str]:
    mode, backend = request.param
    require_mode(mode, backend)
    return str(mode), str(backend)


@pytest.fixture
def topo(net: Network, tmp_path: Path) -> Iterator[tuple[Topology, Path]]:
    require_tools("curl")
    topology = build_topology(net)
    start_backends(topology)
    config = tmp_path / "manifests"
    config.mkdir()
    try:
        yield topology, config
    finally:
        cli_cleanup(topology.node)


def test_a_hinted_service_reaches_only_this_zones_endpoints(
    topo: tuple[Topology, Path], case: tuple[str, str]
) -> None:
    topology, config = topo
    mode, backend = case
    write_manifests(config, zoned(HINTS, node_zone=None))
    uproxy = start_uproxy(topology, config, mode, backend, "--node-zone", "zone-a")
    seen = many(topology.client, ZONED_VIP, 60)
    assert set(seen) == {"be1", "be3"}, seen

    # An endpoint without a hint: kube-proxy ignores the hints rather than guess.
    mark = len(uproxy.events)
    write_manifests(config, zoned({k: v for k, v in HINTS.items() if k != BACKEND_IPS[2]}, None))
    wait_for_change(uproxy, mark)
    seen = many(topology.client, ZONED_VIP, 60)
    assert set(seen) == {"be1", "be2", "be3"}, seen
    assert uproxy.stop(signal.SIGTERM) == 0


def test_the_zone_follows_this_nodes_node_manifest(topo: tuple[Topology, Path]) -> None:
    # Where the zone comes from is the tracker's business, the same for every mode; the test
    # above shows each mode following a zone, so one mode suffices here.
    topology, config = topo
    mode, backend = "nftables", "nft"
    require_tools("nft")
    write_manifests(config, zoned(HINTS, node_zone="zone-b"))
    uproxy = start_uproxy(topology, config, mode, backend)
    seen = many(topology.client, ZONED_VIP, 30)
    assert set(seen) == {"be2"}, seen

    mark = len(uproxy.events)
    write_manifests(config, zoned(HINTS, node_zone="zone-a"))
    wait_for_change(uproxy, mark)
    seen = many(topology.client, ZONED_VIP, 60)
    assert set(seen) == {"be1", "be3"}, seen

    # No zone any more (the label removed): hints are ignored.
    mark = len(uproxy.events)
    write_manifests(config, zoned(HINTS, node_zone=""))
    wait_for_change(uproxy, mark)
    seen = many(topology.client, ZONED_VIP, 60)
    assert set(seen) == {"be1", "be2", "be3"}, seen
    assert uproxy.stop(signal.SIGTERM) == 0
