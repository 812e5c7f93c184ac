"""The app hands its proxier what changed, and falls back to a full sync when that is not safe."""

from __future__ import annotations

import pytest

from uproxy.app import App
from uproxy.model import (
    Endpoint,
    ObjectKey,
    Protocol,
    ProxyState,
    ServicePort,
    ServicePortName,
)
from uproxy.proxier.base import Changed, PortView
from uproxy.proxier.portals import NoPortals
from uproxy.settings import Settings
from uproxy.sources.base import ConfigHandler


class TrustingProxier:
    """Applies only the ports it is told changed, like a proxier doing partial syncs; can be
    made to fail part-way, as a kernel write would."""

    def __init__(self) -> None:
        self.installed: dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]] = {}
        self.fail_after: int | None = None

    async def sync(self, state: ProxyState, changed: Changed = None) -> None:
        names = sorted(
            state.services.keys() | self.installed.keys() if changed is None else changed
        )
        for count, name in enumerate(names):
            if self.fail_after is not None and count >= self.fail_after:
                self.fail_after = None
                raise OSError("injected failure")
            if name in state.services:
                self.installed[name] = (state.services[name], state.endpoints.get(name, ()))
            else:
                self.installed.pop(name, None)

    async def shutdown(self, grace: float) -> None:
        return None

    def view(self) -> list[PortView]:
        return []


class NoSource:
    name = "files"

    async def run(self, handler: ConfigHandler) -> None:
        return None

    def refresh(self) -> None:
        return None


def port(i: int) -> ServicePort:
    name = ServicePortName("default", f"s{i}", "")
    return ServicePort(name, Protocol.TCP, 80, cluster_ips=(f"10.96.0.{i}",))


def make() -> tuple[App, TrustingProxier]:
    settings = Settings(healthz_bind_address=None, metrics_bind_address=None, sync_period=3600)
    proxier = TrustingProxier()
    app = App(settings, [NoSource()], NoPortals(), proxier)
    app.tracker.source_synced("files")
    return app, proxier


def expected(app: App) -> dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]]:
    state = app.tracker.snapshot().state
    return {n: (s, state.endpoints.get(n, ())) for n, s in state.services.items()}


async def test_partial_syncs_converge_the_proxier() -> None:
    app, proxier = make()
    for i in range(1, 6):
        app.tracker.service_updated(ObjectKey("default", f"s{i}"), (port(i),))
    await app._sync()
    app.tracker.service_deleted(ObjectKey("default", "s2"))
    app.tracker.service_updated(ObjectKey("default", "s9"), (port(9),))
    await app._sync()
    assert proxier.installed == expected(app)


async def test_a_failed_sync_is_followed_by_a_full_one() -> None:
    app, proxier = make()
    for i in range(1, 6):
        app.tracker.service_updated(ObjectKey("default", f"s{i}"), (port(i),))
    proxier.fail_after = 2
    with pytest.raises(OSError):
        await app._sync()
    # Nothing changed since: only a full sync can install what the failed one did not.
    await app._sync()
    assert proxier.installed == expected(app)
