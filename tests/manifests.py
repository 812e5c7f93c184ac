"""Build Kubernetes manifests for tests."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml


def service(
    name: str,
    ports: Sequence[dict[str, Any]],
    *,
    cluster_ip: str = "",
    namespace: str = "default",
    affinity_timeout: int | None = None,
    **spec: Any,
) -> dict[str, Any]:
    body: dict[str, Any] = {"ports": list(ports), **spec}
    if cluster_ip:
        body["clusterIP"] = cluster_ip
    if affinity_timeout is not None:
        body["sessionAffinity"] = "ClientIP"
        body["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": affinity_timeout}}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace},
        "spec": body,
    }


def endpoint_slice(
    service_name: str,
    ports: Sequence[dict[str, Any]],
    addresses: Sequence[str],
    *,
    name: str | None = None,
    namespace: str = "default",
    address_type: str = "IPv4",
    ready: bool = True,
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name or f"{service_name}-slice",
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": address_type,
        "ports": list(ports),
        "endpoints": [{"addresses": [a], "conditions": {"ready": ready}} for a in addresses],
    }


def write(path: Path, *objects: dict[str, Any]) -> Path:
    """Write atomically (temp file + rename), as editors and ConfigMap updates do."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(yaml.safe_dump_all(objects, sort_keys=False))
    os.replace(tmp, path)
    return path


def backend_slices(
    service_name: str,
    port_name: str,
    backends: Sequence[tuple[str, int]],
    *,
    protocol: str = "TCP",
    ready: bool = True,
) -> list[dict[str, Any]]:
    """One slice per backend, since loopback backends differ by port rather than by address."""
    return [
        endpoint_slice(
            service_name,
            [{"name": port_name, "port": port, "protocol": protocol}],
            [ip],
            name=f"{service_name}-{i}",
            ready=ready,
        )
        for i, (ip, port) in enumerate(backends)
    ]
