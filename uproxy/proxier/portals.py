"""Portals steer a service's virtual addresses to the userspace listener of that service port.

The userspace proxier owns the listeners and hands the complete desired set of portals to a
`Portals` implementation after every sync; the implementation converges the kernel to it.
A portal names one proxy port per traffic kind for every family: a service port's IPv4 and IPv6
listeners share their port numbers, so each family's portals (`PerFamilyPortals`) take the same
portal and render only their own family's addresses.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from uproxy.model import ServicePort, ServicePortName
from uproxy.proxier.base import Changed, each_then_first_failure


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


class PerFamilyPortals:
    """One `Portals` per IP family behind one: every call goes to each family's, in order.

    Each family syncs even when another fails, so one family's trouble never holds back the
    other's changes; the first failure is raised for the runner to retry.
    """

    def __init__(self, families: Sequence[Portals]) -> None:
        self._families = tuple(families)

    async def flush_at_start(self) -> None:
        for portals in self._families:
            await portals.flush_at_start()

    async def sync(
        self, portals: Mapping[ServicePortName, Portal], changed: Changed = None
    ) -> None:
        await each_then_first_failure(
            [functools.partial(family.sync, portals, changed) for family in self._families]
        )

    async def cleanup(self) -> None:
        for portals in self._families:
            await portals.cleanup()
