"""Portals steer a service's virtual addresses to the userspace listener of that service port.

The userspace proxier owns the listeners and hands the complete desired set of portals to a
`Portals` implementation after every sync; the implementation converges the kernel to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from uproxy.model import ServicePort, ServicePortName
from uproxy.proxier.base import Changed


@dataclass(frozen=True, slots=True)
class Portal:
    """Traffic for every virtual address of `service` goes to the listener on `proxy_port`.

    With externalTrafficPolicy: Local, external traffic (externalIPs, LoadBalancer IPs,
    NodePorts) must reach only this node's endpoints while cluster traffic reaches all: it then
    gets a listener of its own, `external_proxy_port`.
    """

    service: ServicePort
    proxy_port: int
    external_proxy_port: int | None = None

    @property
    def external_port(self) -> int:
        """Where external traffic goes."""
        return self.proxy_port if self.external_proxy_port is None else self.external_proxy_port


class Portals(Protocol):
    async def flush_at_start(self) -> None:
        """Start clean: empty this implementation's own rules (proxy ports of an earlier run are
        dead). Idempotent."""

    async def sync(
        self, portals: Mapping[ServicePortName, Portal], changed: Changed = None
    ) -> None:
        """Converge the kernel to exactly these portals: add what is missing, remove what is stale,
        leave foreign rules alone. Idempotent. Raises KernelError when the kernel refuses; the
        runner retries the whole sync. `changed`: only these portals can differ from the previous
        call's (None: any of them)."""

    async def cleanup(self) -> None:
        """Remove everything this implementation ever installed. Idempotent."""


class NoPortals:
    """For sidecars and tests that reach the listeners directly."""

    async def flush_at_start(self) -> None:
        return None

    async def sync(
        self, portals: Mapping[ServicePortName, Portal], changed: Changed = None
    ) -> None:
        return None

    async def cleanup(self) -> None:
        return None
