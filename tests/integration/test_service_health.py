"""kube-proxy's service health check (healthCheckNodePort) against real processes and sockets.

Two nodes run a real `uproxy run` each, in every mode, on the same manifests:

    node-a 10.31.0.1 --veth-- 10.31.0.2 client 10.32.0.2 --veth-- 10.32.0.1 node-b

The Service is a LoadBalancer with externalTrafficPolicy Local and healthCheckNodePort 32000;
its one endpoint sits on node-a. A load balancer's probe (curl from the client) gets 200 from
node-a and 503 from node-b, with kube-proxy's body and headers; moving the endpoint to node-b
in the manifest file flips both. node-b runs with --nodeport-addresses, so its health check
listens on its node address only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.integration.conftest import require_tools
from tests.integration.netns import Namespace, Network, Process

pytestmark = pytest.mark.root

MODES = ["userspace", "iptables", "nftables"]
HC_PORT = 32000
NODE_A, NODE_B = "10.31.0.1", "10.32.0.1"


def manifests(endpoint_node: str) -> list[dict[str, Any]]:
    return [
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "web", "namespace": "default"},
            "spec": {
                "type": "LoadBalancer",
                "clusterIP": "10.96.0.50",
                "externalTrafficPolicy": "Local",
                "healthCheckNodePort": HC_PORT,
                "ports": [{"name": "http", "port": 80, "nodePort": 30080}],
            },
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.90"}]}},
        },
        {
            "apiVersion": "discovery.k8s.io/v1",
            "kind": "EndpointSlice",
            "metadata": {
                "name": "web-1",
                "namespace": "default",
                "labels": {"kubernetes.io/service-name": "web"},
            },
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080}],
            "endpoints": [
                {
                    "addresses": ["10.244.1.5"],
                    "conditions": {"ready": True},
                    "nodeName": endpoint_node,
                }
            ],
        },
    ]


def write(path: Path, endpoint_node: str) -> None:
    # Atomic replace, as a ConfigMap update or an editor's save would do.
    staging = path.with_suffix(".tmp")
    staging.write_text(yaml.safe_dump_all(manifests(endpoint_node)))
    staging.replace(path)


@dataclass
class Probe:
    status: int
    headers: dict[str, str]
    body: str


def probe(client: Namespace, host: str, port: int = HC_PORT) -> Probe:
    """What a load balancer's HTTP health check sees."""
    out = client.run("curl", "-sS", "-i", "--max-time", "3", f"http://{host}:{port}/", check=False)
    assert out.returncode == 0, out.stderr
    # (Text mode has turned curl's CRLFs into newlines; kube-proxy's body has no blank line.)
    head, _, body = out.stdout.partition("\n\n")
    lines = head.split("\n")
    headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines[1:])}
    return Probe(int(lines[0].split()[1]), headers, body)


def expect(local_endpoints: int) -> str:
    return (
        '{\n\t"service": {\n\t\t"namespace": "default",\n\t\t"name": "web"\n\t},\n'
        f'\t"localEndpoints": {local_endpoints},\n\t"serviceProxyHealthy": true\n}}'
    )


def wait_for(client: Namespace, host: str, status: int) -> Probe:
    deadline = time.monotonic() + 20
    while True:
        seen = probe(client, host)
        if seen.status == status:
            return seen
        assert time.monotonic() < deadline, f"{host}: still {seen.status}, wanted {status}"
        time.sleep(0.2)


def start(node: Namespace, mode: str, name: str, config: Path, *extra: str) -> Process:
    process = node.start_python(
        "-m",
        "uproxy",
        "run",
        "--mode",
        mode,
        "--config",
        str(config),
        "--iptables-backend",
        "nft",
        "--hostname-override",
        name,
        "--min-sync-period",
        "0",
        "--log-format",
        "json",
        *extra,
    )
    process.wait_event("service_health_check_listening", timeout=30)
    return process


@pytest.fixture
def config(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "web.yaml"
    write(path, "node-a")
    yield path


@pytest.mark.parametrize("mode", MODES)
def test_health_check_node_port_follows_the_local_endpoint(
    net: Network, config: Path, mode: str
) -> None:
    require_tools("curl", "nft", "iptables-nft")
    client, node_a, node_b = net.namespace("client"), net.namespace("node-a"), net.namespace("nb")
    net.link(node_a, f"{NODE_A}/24", client, "10.31.0.2/24")
    net.link(node_b, f"{NODE_B}/24", client, "10.32.0.2/24")
    a = start(node_a, mode, "node-a", config)
    b = start(node_b, mode, "node-b", config, "--nodeport-addresses", "10.32.0.0/24")
    assert b.wait_event("service_health_check_listening")["addresses"] == [NODE_B]

    on_a, on_b = probe(client, NODE_A), probe(client, NODE_B)
    assert (on_a.status, on_a.body) == (200, expect(1))
    assert (on_b.status, on_b.body) == (503, expect(0))
    for seen, weight in ((on_a, "1"), (on_b, "0")):
        assert seen.headers["content-type"] == "application/json"
        assert seen.headers["x-content-type-options"] == "nosniff"
        assert seen.headers["x-load-balancing-endpoint-weight"] == weight
    assert json.loads(on_a.body)["service"] == {"namespace": "default", "name": "web"}
    # Any path, as kube-proxy's handler answers them all.
    assert probe(client, NODE_A).status == probe_path(client, NODE_A, "/anything") == 200
    # node-b's check listens on its --nodeport-addresses address only.
    assert node_b.run("curl", "-s", f"http://127.0.0.1:{HC_PORT}/", check=False).returncode == 7

    # The endpoint moves to node-b: both nodes' answers flip after the reload.
    write(config, "node-b")
    assert wait_for(client, NODE_A, 503).body == expect(0)
    assert wait_for(client, NODE_B, 200).body == expect(1)

    # The service goes: its health check closes (connection refused).
    config.write_text(yaml.safe_dump_all(manifests("node-b")[1:]))
    a.wait_event("service_health_check_closed", timeout=20)
    b.wait_event("service_health_check_closed", timeout=20)
    refused = client.run("curl", "-s", f"http://{NODE_A}:{HC_PORT}/", check=False)
    assert refused.returncode == 7  # couldn't connect


def probe_path(client: Namespace, host: str, path: str) -> int:
    out = client.run(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{host}:{HC_PORT}{path}"
    )
    return int(out.stdout)


SQUATTER = f"""
import socket, time
s = socket.socket()
s.bind(("0.0.0.0", {HC_PORT}))
s.listen()
print("held", flush=True)
time.sleep(600)
"""


def test_a_port_held_by_another_process_is_retried_never_fatal(net: Network, config: Path) -> None:
    require_tools("curl")
    client, node = net.namespace("client"), net.namespace("node")
    net.link(node, f"{NODE_A}/24", client, "10.31.0.2/24")
    squatter = node.start_python("-c", SQUATTER)
    squatter.wait_line("held", timeout=10)
    process = node.start_python(
        "-m",
        "uproxy",
        "run",
        "--no-portals",
        "--config",
        str(config),
        "--hostname-override",
        "node-a",
        "--min-sync-period",
        "0",
        "--sync-period",
        "1s",
        "--log-format",
        "json",
    )
    failed = process.wait_event("service_health_check_failed", timeout=30)
    assert failed["port"] == HC_PORT and "in use" in failed["error"]
    # Several more syncs retry it, and it is logged once; the proxy is healthy meanwhile.
    deadline = time.monotonic() + 20
    while sum(1 for e in process.events if e.get("event") == "sync_done") < 3:
        assert time.monotonic() < deadline, process.tail()
        time.sleep(0.2)
    assert sum(1 for e in process.events if e.get("event") == "service_health_check_failed") == 1
    healthz = client.run(
        "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", f"http://{NODE_A}:10256/healthz"
    )
    assert healthz.stdout == "200"
    # The other process lets go: the next sync opens the health check.
    squatter.stop()
    process.wait_event("service_health_check_listening", timeout=30)
    assert probe(client, NODE_A).status == 200
