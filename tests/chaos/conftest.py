"""The chaos suite shares the integration harness: its namespaces, root handling and sweep, and
the kernel-modes topology (a client, the node, three backends) serving its web services."""

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import (  # noqa: F401 (fixtures and hooks, found by name)
    _sweep_namespaces,
    net,
    pytest_collection_modifyitems,
    require_tools,
)
from tests.integration.netns import Network, cli_cleanup
from tests.integration.test_kernel_modes import (
    Topology,
    build_topology,
    manifests,
    start_backends,
    write_manifests,
)


@pytest.fixture
def topo(net: Network, tmp_path: Path) -> Iterator[tuple[Topology, Path]]:  # noqa: F811
    """The topology with its backends up and the web services' manifests written (no DNS);
    whatever the test did, the node is cleaned afterwards."""
    require_tools("dnsmasq", "nft", "curl")
    topology = build_topology(net)
    start_backends(topology)
    config = tmp_path / "manifests"
    config.mkdir()
    write_manifests(config, manifests(with_dns=False))
    try:
        yield topology, config
    finally:
        cli_cleanup(topology.node)
