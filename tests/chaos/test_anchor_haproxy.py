"""The README's HAProxy anchor for a dead endpoint, measured on the same topology and load as
test_dead_endpoint (issue 18). A measurement of another proxy, not a test of uproxy, so it is
not part of the default run: `bash tests/run.sh -m anchor -s tests/chaos` prints its figures.

HAProxy is configured as a careful operator would for this fault: round robin, a 250 ms connect
timeout (uproxy's first dial timeout), `retries 3` with `option redispatch 1` (every retry goes
to another server), and passive health (`observe layer4`, `error-limit 3`, `on-error mark-down`)
beside active checks every second (1 s check timeout, so a busy machine does not mark
healthy servers down).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.chaos.test_dead_endpoint import kill, load
from tests.integration.conftest import require_tools
from tests.integration.test_kernel_modes import BACKEND_IPS, WEB_VIP, Topology

pytestmark = [pytest.mark.root, pytest.mark.anchor]

SERVERS = "\n".join(
    f"  server be{n} {ip}:8080 check inter 1s fall 3 rise 2 observe layer4 error-limit 3 "
    "on-error mark-down"
    for n, ip in enumerate(BACKEND_IPS, start=1)
)
CONFIG = f"""global
  maxconn 4096
defaults
  mode tcp
  timeout connect 250ms
  timeout check 1s
  timeout client 30s
  timeout server 30s
  retries 3
  option redispatch 1
listen web
  bind {WEB_VIP}:80
  balance roundrobin
{SERVERS}
"""


@pytest.mark.parametrize("death", ["killed", "vanished"])
def test_haproxy_under_a_dead_endpoint(
    topo: tuple[Topology, Path], tmp_path: Path, death: str
) -> None:
    require_tools("haproxy")
    topology, _ = topo
    topology.node.add_address(f"{WEB_VIP}/32")  # HAProxy listens on the VIP itself
    config = tmp_path / "haproxy.cfg"
    config.write_text(CONFIG)
    haproxy = topology.node.start("haproxy", "-db", "-f", str(config))
    topology.client.sh(
        f"for i in $(seq 100); do curl -s -o /dev/null --max-time 1 http://{WEB_VIP}/ && exit 0;"
        " sleep 0.1; done; exit 1"
    )
    warm = load(topology, each=2)
    assert not [k for k in warm if k.startswith("failed")], (warm, haproxy.tail())
    kill(topology.backends[1], death)
    seen = load(topology)
    failed = sum(v for k, v in seen.items() if k.startswith("failed"))
    print(f"haproxy {death}: {failed} of {sum(seen.values())} failed: {dict(seen)}")
    assert sum(seen.values()) == 600
