"""KubeSource against the in-process API server, through the real kubernetes-asyncio client.

The handler keeps state (as the change tracker does) and the tests assert on that state, never on
the sequence of calls. Waits poll with generous deadlines; nothing asserts on timing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
import yaml
from kubernetes_asyncio.config import incluster_config

from tests.kubeapi import KubeApiServer, make_endpoint_slice, make_service
from tests.kubeconfig import kubeconfig_dict, make_tls, write_kubeconfig
from uproxy.changes import ChangeTracker
from uproxy.endpoints import endpoints_for_port
from uproxy.errors import SettingsError
from uproxy.model import EndpointSlice, NodeInfo, ObjectKey, Protocol, ServicePort, ServicePortName
from uproxy.sources.kube import LABEL_SELECTOR, KubeSource
from uproxy.sources.kube import _reconnect_backoff as _Backoff

WEB = ObjectKey("default", "web")
API = ObjectKey("default", "api")
WEB_1 = ObjectKey("default", "web-1")
WEB_2 = ObjectKey("default", "web-2")
DEADLINE = 20.0


class StateHandler:
    """A ConfigHandler that keeps the state it was given, and feeds a real ChangeTracker."""

    def __init__(self) -> None:
        self.services: dict[ObjectKey, tuple[ServicePort, ...]] = {}
        self.slices: dict[ObjectKey, EndpointSlice] = {}
        self.synced: list[str] = []
        self.zones: dict[str, str] = {}
        self.tracker = ChangeTracker(["kubernetes"], on_change=lambda: None)

    def service_updated(self, key: ObjectKey, ports: tuple[ServicePort, ...]) -> None:
        self.services[key] = ports
        self.tracker.service_updated(key, ports)

    def service_deleted(self, key: ObjectKey) -> None:
        self.services.pop(key, None)
        self.tracker.service_deleted(key)

    def slice_updated(self, endpoint_slice: EndpointSlice) -> None:
        self.slices[endpoint_slice.key] = endpoint_slice
        self.tracker.slice_updated(endpoint_slice)

    def slice_deleted(self, key: ObjectKey) -> None:
        self.slices.pop(key, None)
        self.tracker.slice_deleted(key)

    def node_updated(self, node: NodeInfo) -> None:
        self.zones[node.name] = node.zone
        self.tracker.node_updated(node)

    def node_deleted(self, name: str) -> None:
        self.zones.pop(name, None)
        self.tracker.node_deleted(name)

    def source_synced(self, source: str) -> None:
        self.synced.append(source)
        self.tracker.source_synced(source)

    def ports(self, key: ObjectKey) -> list[int]:
        return [p.port for p in self.services.get(key, ())]

    def endpoints(self, service: ObjectKey, port: str = "http") -> list[str]:
        """The service port's endpoints merged across all its slices, as the proxier gets them."""
        name = ServicePortName(service.namespace, service.name, port)
        slices = [s for s in self.slices.values() if s.service == service]
        return [str(e) for e in endpoints_for_port(slices, name, Protocol.TCP)]


async def wait_until(condition: Callable[[], object], what: str, limit: float = DEADLINE) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.asynccontextmanager
async def running(source: KubeSource, handler: StateHandler) -> AsyncIterator[asyncio.Task[None]]:
    task = asyncio.create_task(source.run(handler))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.fixture(autouse=True)
def uncached_loggers() -> Iterator[None]:
    # capture_logs only sees loggers that are not cached; the CLI configures caching on.
    cached = structlog.get_config()["cache_logger_on_first_use"]
    structlog.configure(cache_logger_on_first_use=False)
    yield
    structlog.configure(cache_logger_on_first_use=cached)


@pytest.fixture
async def api() -> AsyncIterator[KubeApiServer]:
    async with KubeApiServer(bookmark_interval=0.2) as server:
        yield server


@pytest.fixture
def kubeconfig(tmp_path: Path, api: KubeApiServer) -> Path:
    return write_kubeconfig(tmp_path / "kubeconfig", api.url, api.token)


def source(kubeconfig: Path, **kwargs: Any) -> KubeSource:
    options: dict[str, Any] = {"context": None, "master": None, "in_cluster": False}
    options.update(backoff_cap=0.5, **kwargs)
    return KubeSource(kubeconfig=kubeconfig, **options)


def seed_web(api: KubeApiServer) -> None:
    api.apply(make_service("web"))
    api.apply(make_endpoint_slice("web-1", "web", ["10.0.0.1"]))


async def synced(handler: StateHandler) -> None:
    await wait_until(lambda: handler.synced, "source_synced")


def lists(api: KubeApiServer) -> tuple[int, int]:
    return (api.requests["list services"], api.requests["list endpointslices"])


# --- initial state ----------------------------------------------------------------------------


async def test_initial_sync_delivers_exactly_what_kube_proxy_would_proxy(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    seed_web(api)
    api.apply(make_endpoint_slice("web-2", "web", ["10.0.0.2"]))
    api.apply(make_service("other", labels={"service.kubernetes.io/service-proxy-name": "x"}))
    api.apply(make_service("labelled", labels={"service.kubernetes.io/headless": ""}))
    api.apply(make_service("headless", cluster_ip="None"))
    api.apply(make_service("db", cluster_ip="", type="ExternalName", externalName="db.example"))
    api.apply(make_endpoint_slice("orphan", None, ["10.0.0.9"]))
    api.apply(
        make_endpoint_slice("other-1", "other", labels={"service.kubernetes.io/headless": ""})
    )
    handler = StateHandler()
    async with running(source(kubeconfig), handler):
        await synced(handler)
        assert handler.synced == ["kubernetes"]
        assert set(handler.services) == {WEB}
        assert handler.ports(WEB) == [80]
        assert set(handler.slices) == {WEB_1, WEB_2}
        assert handler.endpoints(WEB) == ["10.0.0.1:8080", "10.0.0.2:8080"]
        await wait_until(lambda: api.open_watches == 2, "both watches open")
        selectors = {(verb, plural): q.get("labelSelector") for verb, plural, q in api.queries}
        assert selectors == {
            ("list", "services"): LABEL_SELECTOR,
            ("list", "endpointslices"): LABEL_SELECTOR,
            ("watch", "services"): LABEL_SELECTOR,
            ("watch", "endpointslices"): LABEL_SELECTOR,
        }
        watch = next(q for verb, _, q in api.queries if verb == "watch")
        assert watch["allowWatchBookmarks"].lower() == "true"


async def test_synced_only_once_both_resources_were_listed(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    seed_web(api)
    api.fail("endpointslices", 503)
    handler = StateHandler()
    async with running(source(kubeconfig), handler):
        await wait_until(lambda: api.requests["list endpointslices"] >= 3, "slice list retries")
        assert WEB in handler.services
        assert handler.synced == []
        assert not handler.tracker.synced
        api.heal()
        await synced(handler)
        assert handler.synced == ["kubernetes"]
        assert handler.endpoints(WEB) == ["10.0.0.1:8080"]


async def test_5000_services_initial_list(api: KubeApiServer, kubeconfig: Path) -> None:
    for i in range(5000):
        name = f"svc-{i}"
        api.apply(make_service(name, cluster_ip=f"10.96.{i // 250}.{i % 250 + 1}"))
        api.apply(make_endpoint_slice(f"{name}-1", name, [f"10.1.{i // 250}.{i % 250 + 1}"]))
    handler = StateHandler()
    started = time.monotonic()
    async with running(source(kubeconfig), handler):
        await synced(handler)
        elapsed = time.monotonic() - started
        print(f"\n5000 services + 5000 slices: source_synced after {elapsed:.2f}s")
        assert len(handler.services) == 5000
        assert len(handler.slices) == 5000
        assert len(handler.tracker.snapshot().state.services) == 5000


# --- following changes ------------------------------------------------------------------------


async def test_add_update_delete_follow_the_watch(api: KubeApiServer, kubeconfig: Path) -> None:
    seed_web(api)
    handler = StateHandler()
    async with running(source(kubeconfig), handler):
        await synced(handler)
        api.apply(make_service("api", cluster_ip="10.96.0.20"))
        api.apply(make_endpoint_slice("api-1", "api", ["10.0.1.1"]))
        await wait_until(lambda: handler.endpoints(API) == ["10.0.1.1:8080"], "api added")

        api.apply(make_service("web", [{"name": "http", "port": 8000}]))
        api.apply(make_endpoint_slice("web-1", "web", ["10.0.0.5", "10.0.0.6"]))
        await wait_until(lambda: handler.ports(WEB) == [8000], "web port updated")
        await wait_until(
            lambda: handler.endpoints(WEB) == ["10.0.0.5:8080", "10.0.0.6:8080"], "web endpoints"
        )

        api.delete("EndpointSlice", "default", "api-1")
        await wait_until(lambda: handler.endpoints(API) == [], "api slice deleted")
        api.delete("Service", "default", "api")
        await wait_until(lambda: API not in handler.services, "api deleted")
        assert WEB in handler.services
        assert lists(api) == (1, 1)  # all of it through the watch


async def test_slices_merge_and_a_slice_can_move_to_another_service(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    seed_web(api)
    api.apply(make_endpoint_slice("web-2", "web", ["10.0.0.2"]))
    api.apply(make_service("api", cluster_ip="10.96.0.20"))
    handler = StateHandler()
    async with running(source(kubeconfig), handler):
        await synced(handler)
        assert handler.endpoints(WEB) == ["10.0.0.1:8080", "10.0.0.2:8080"]
        assert handler.endpoints(API) == []
        api.apply(make_endpoint_slice("web-2", "api", ["10.0.0.2"]))
        await wait_until(lambda: handler.endpoints(API) == ["10.0.0.2:8080"], "slice moved")
        assert handler.endpoints(WEB) == ["10.0.0.1:8080"]
        state = handler.tracker.snapshot().state
        assert [str(e) for e in state.endpoints[ServicePortName("default", "api", "http")]] == [
            "10.0.0.2:8080"
        ]
        assert [str(e) for e in state.endpoints[ServicePortName("default", "web", "http")]] == [
            "10.0.0.1:8080"
        ]


async def test_objects_leaving_the_selection_are_removed(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    seed_web(api)
    api.apply(make_service("api", cluster_ip="10.96.0.20"))
    handler = StateHandler()
    async with running(source(kubeconfig), handler):
        await synced(handler)
        label = {"service.kubernetes.io/service-proxy-name": "someone-else"}
        api.apply(make_service("web", labels=label))
        await wait_until(lambda: WEB not in handler.services, "web handed to another proxy")
        api.apply(make_service("web"))
        await wait_until(lambda: WEB in handler.services, "web back")

        api.apply(make_service("api", cluster_ip="", type="ExternalName", externalName="x.y"))
        await wait_until(lambda: API not in handler.services, "api became ExternalName")

        api.apply(make_endpoint_slice("web-1", None, ["10.0.0.1"]))
        await wait_until(lambda: WEB_1 not in handler.slices, "slice lost its service label")


async def test_invalid_object_keeps_the_previous_version(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    seed_web(api)
    handler = StateHandler()
    src = source(kubeconfig)
    async with running(src, handler):
        await synced(handler)
        with structlog.testing.capture_logs() as logs:
            api.apply(make_service("web", [{"name": "http", "port": 81, "protocol": "SCTP"}]))
            api.apply(make_endpoint_slice("web-1", "web", ["not-an-ip"]))
            api.apply(
                make_service("bad", [{"name": "http", "port": 99999}], cluster_ip="10.96.0.3")
            )
            await wait_until(
                lambda: sum(e["event"] == "kube_object_invalid" for e in logs) >= 3, "errors"
            )
            # A relist while the objects are still broken keeps them as well.
            src.refresh()
            await wait_until(lambda: lists(api) == (2, 2), "relist")
            await wait_until(lambda: handler.tracker.synced, "tracker")
        invalid = {
            (e["kind"], e["name"], e["field"]) for e in logs if e["event"] == "kube_object_invalid"
        }
        assert invalid == {
            ("Service", "default/web", "spec.ports[0].protocol"),
            ("EndpointSlice", "default/web-1", "endpoints[0].addresses[0]"),
            ("Service", "default/bad", "spec.ports[0].port"),
        }
        assert handler.ports(WEB) == [80]
        assert handler.endpoints(WEB) == ["10.0.0.1:8080"]
        assert ObjectKey("default", "bad") not in handler.services

        api.apply(make_service("web", [{"name": "http", "port": 81}]))
        await wait_until(lambda: handler.ports(WEB) == [81], "fixed web applied")


# --- interruptions ----------------------------------------------------------------------------


async def test_watch_dropped_mid_stream_resumes_from_the_last_version(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    seed_web(api)
    handler = StateHandler()
    async with running(source(kubeconfig), handler):
        await synced(handler)
        await wait_until(lambda: api.open_watches == 2, "both watches open")
        api.apply(make_service("api", cluster_ip="10.96.0.20"))
        await wait_until(lambda: API in handler.services, "api added")
        assert api.drop_watches(partial=True) == 2
        await wait_until(lambda: api.open_watches == 0, "watches cut")
        # Written while the source is disconnected: only a resumed watch can replay them.
        api.apply(make_endpoint_slice("api-1", "api", ["10.0.1.1"]))
        api.delete("Service", "default", "web")
        await wait_until(lambda: handler.endpoints(API) == ["10.0.1.1:8080"], "slice after drop")
        await wait_until(lambda: WEB not in handler.services, "delete after drop")
        assert lists(api) == (1, 1)
        resumed = [q["resourceVersion"] for verb, _, q in api.queries[4:] if verb == "watch"]
        assert resumed and all(int(v) > 1000 for v in resumed)


async def test_clean_watch_end_resumes_from_bookmarks(api: KubeApiServer, kubeconfig: Path) -> None:
    seed_web(api)
    handler = StateHandler()
    async with running(source(kubeconfig, watch_timeout=1), handler):
        await synced(handler)
        # Only slices change: the service watch learns the new version from bookmarks alone.
        written = api.apply(make_endpoint_slice("web-1", "web", ["10.0.0.7"]))
        version = int(written["metadata"]["resourceVersion"])
        await wait_until(
            lambda: any(
                verb == "watch" and plural == "services" and int(q["resourceVersion"]) >= version
                for verb, plural, q in api.queries
            ),
            "a service watch resumed from a bookmark",
        )
        api.apply(make_service("web", [{"name": "http", "port": 8000}]))
        await wait_until(lambda: handler.ports(WEB) == [8000], "change after resume")
        assert handler.endpoints(WEB) == ["10.0.0.7:8080"]
        assert lists(api) == (1, 1)


@pytest.mark.parametrize("gone_as_http", [False, True], ids=["error-event", "http-410"])
async def test_expired_version_relists_and_drops_what_vanished(
    api: KubeApiServer, kubeconfig: Path, gone_as_http: bool
) -> None:
    api.gone_as_http = gone_as_http
    seed_web(api)
    api.apply(make_service("old", cluster_ip="10.96.0.30"))
    api.apply(make_endpoint_slice("old-1", "old", ["10.0.3.1"]))
    handler = StateHandler()
    async with running(source(kubeconfig), handler):
        await synced(handler)
        await api.stop()
        api.delete("Service", "default", "old")
        api.delete("EndpointSlice", "default", "old-1")
        api.apply(make_service("web", [{"name": "http", "port": 8000}]))
        api.apply(make_service("new", cluster_ip="10.96.0.40"))
        api.compact()
        await api.start()
        await wait_until(lambda: lists(api) == (2, 2), "relist after 410")
        await wait_until(
            lambda: set(handler.services) == {WEB, ObjectKey("default", "new")}, "relist"
        )
        assert handler.ports(WEB) == [8000]
        # The slice relist runs beside the service relist: wait for it too.
        await wait_until(lambda: set(handler.slices) == {WEB_1}, "slice relist")


async def test_relist_of_unchanged_objects_changes_nothing(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    seed_web(api)
    handler = StateHandler()
    src = source(kubeconfig)
    async with running(src, handler):
        await synced(handler)
        before = handler.tracker.snapshot().state
        await wait_until(lambda: api.open_watches == 2, "both watches open")
        api.bookmark_interval = 3600  # no bookmark may carry the watches past the compaction
        # A write nobody watching sees, then compaction: both resumes now get 410 Gone.
        api.apply(make_service("hidden", labels={"service.kubernetes.io/headless": ""}))
        api.compact()
        api.drop_watches(partial=False)
        await wait_until(lambda: lists(api) == (2, 2), "relist after 410")
        src.refresh()
        await wait_until(lambda: lists(api) == (3, 3), "relist on refresh")
        await wait_until(lambda: api.open_watches == 2, "watching again")
        assert not handler.tracker.pending
        after = handler.tracker.snapshot()
        assert after.changed == frozenset()
        assert after.state == before


async def test_api_down_keeps_state_and_recovers(api: KubeApiServer, kubeconfig: Path) -> None:
    seed_web(api)
    handler = StateHandler()
    async with running(source(kubeconfig), handler):
        await synced(handler)
        before = handler.tracker.snapshot().state
        with structlog.testing.capture_logs() as logs:
            await api.stop()
            down = time.monotonic()

            def failures(kind: str) -> int:
                return sum(e["event"] == "kube_watch_error" and e["kind"] == kind for e in logs)

            await wait_until(
                lambda: (
                    failures("Service") >= 3
                    and failures("EndpointSlice") >= 3
                    and time.monotonic() - down > 2
                ),
                "repeated reconnect failures",
            )
            assert not handler.tracker.pending
            assert handler.tracker.snapshot().state == before
            assert all(e["retry_in"] <= 0.5 for e in logs if e["event"] == "kube_watch_error")
            await api.start()
            api.apply(make_endpoint_slice("web-1", "web", ["10.0.0.8"]))
            await wait_until(lambda: handler.endpoints(WEB) == ["10.0.0.8:8080"], "after outage")
        assert WEB in handler.services
        assert lists(api) == (1, 1)  # the history survived: resumed, not relisted


# --- configuration ----------------------------------------------------------------------------


async def test_tls_and_bearer_token(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "pki")
    async with KubeApiServer(tls=tls) as server:
        seed_web(server)
        kubeconfig = write_kubeconfig(tmp_path / "kc", server.url, server.token, ca=tls.ca)
        handler = StateHandler()
        async with running(source(kubeconfig), handler):
            await synced(handler)
            assert handler.endpoints(WEB) == ["10.0.0.1:8080"]


async def test_in_cluster_configuration(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tls = make_tls(tmp_path / "pki")
    async with KubeApiServer(tls=tls, token="sa-token") as server:
        seed_web(server)
        token = tmp_path / "token"
        token.write_text("sa-token")
        monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "127.0.0.1")
        monkeypatch.setenv("KUBERNETES_SERVICE_PORT", str(server.port))
        monkeypatch.setattr(incluster_config, "SERVICE_TOKEN_FILENAME", str(token))
        monkeypatch.setattr(incluster_config, "SERVICE_CERT_FILENAME", str(tls.ca))
        src = KubeSource(kubeconfig=None, context=None, master=None, in_cluster=True)
        handler = StateHandler()
        async with running(src, handler):
            await synced(handler)
            assert WEB in handler.services


async def test_context_and_master_choose_the_server(api: KubeApiServer, tmp_path: Path) -> None:
    seed_web(api)
    dead = "http://127.0.0.1:9"
    config = kubeconfig_dict(dead, api.token, context="broken")
    config["clusters"].append({"name": "good", "cluster": {"server": api.url}})
    config["contexts"].append({"name": "good", "context": {"cluster": "good", "user": "test-user"}})
    path = tmp_path / "kubeconfig"
    path.write_text(yaml.safe_dump(config))
    for src in (
        source(path, context="good"),
        source(path, master=api.url),  # --master overrides the server, the token stays
    ):
        handler = StateHandler()
        async with running(src, handler):
            await synced(handler)
            assert WEB in handler.services


async def test_rejected_token_is_reread_from_the_kubeconfig(
    api: KubeApiServer, tmp_path: Path
) -> None:
    seed_web(api)
    path = write_kubeconfig(tmp_path / "kubeconfig", api.url, "stale-token")
    handler = StateHandler()
    async with running(source(path), handler):
        await wait_until(lambda: api.requests["unauthorized"] >= 4, "rejected lists")
        assert handler.synced == []
        write_kubeconfig(path, api.url, api.token)  # as a token rotation would
        await synced(handler)
        assert WEB in handler.services


def test_configuration_mistakes_are_settings_errors(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SettingsError, match="no such file"):
        source(tmp_path / "missing")
    path = write_kubeconfig(tmp_path / "kc", "http://127.0.0.1:9", "t", extra_contexts=["b"])
    with pytest.raises(SettingsError, match=r"'nope' is not in .* \(contexts: test, b\)"):
        source(path, context="nope")
    (tmp_path / "garbage").write_text("{{{ not yaml")
    with pytest.raises(SettingsError, match="not a usable kubeconfig"):
        source(tmp_path / "garbage")
    with pytest.raises(SettingsError, match="--master"):
        source(path, master="127.0.0.1:6443")
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    with pytest.raises(SettingsError, match="in-cluster"):
        KubeSource(kubeconfig=None, context=None, master=None, in_cluster=True)


@pytest.mark.parametrize("ca_text", [None, "not a certificate"], ids=["missing", "garbage"])
async def test_unusable_certificate_authority_fails_at_start(
    tmp_path: Path, ca_text: str | None
) -> None:
    ca = tmp_path / "ca.crt"
    if ca_text is not None:
        ca.write_text(ca_text)
    path = write_kubeconfig(tmp_path / "kc", "https://127.0.0.1:9", "t", ca=ca)
    with pytest.raises(SettingsError, match=r"ca\.crt"):
        await source(path).run(StateHandler())


def test_backoff_is_capped_exponential_with_jitter() -> None:
    backoff = _Backoff(cap=4.0)
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0]
    delays = [backoff.next_delay() for _ in ceilings]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    backoff.reset()
    assert backoff.next_delay() <= 0.5


# --- this node's Node (topology zone) -----------------------------------------------------------


def node(name: str, zone: str | None) -> dict[str, Any]:
    labels = {"topology.kubernetes.io/zone": zone} if zone is not None else {}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": labels}}


async def test_only_this_nodes_node_is_watched_for_its_zone(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    seed_web(api)
    api.apply(node("node-a", "zone-a"))
    api.apply(node("node-b", "zone-b"))
    handler = StateHandler()
    async with running(source(kubeconfig, node_name="node-a"), handler):
        await synced(handler)
        await wait_until(lambda: handler.zones == {"node-a": "zone-a"}, "node-a's zone")
        api.apply(node("node-a", "zone-c"))
        api.apply(node("node-b", "zone-d"))
        await wait_until(lambda: handler.zones == {"node-a": "zone-c"}, "zone relabelled")
        api.delete("Node", "default", "node-a")
        await wait_until(lambda: handler.zones == {}, "node deleted")
    assert handler.tracker.snapshot().state.node_zone == ""
    (_, _, params) = next(q for q in api.queries if q[1] == "nodes")
    assert params["fieldSelector"] == "metadata.name=node-a"


async def test_proxying_does_not_wait_for_a_node_it_may_not_read(
    api: KubeApiServer, kubeconfig: Path
) -> None:
    seed_web(api)
    api.fail("nodes", 403)  # a role without `get nodes`
    handler = StateHandler()
    async with running(source(kubeconfig, node_name="node-a"), handler):
        await synced(handler)
        assert handler.endpoints(WEB) == ["10.0.0.1:8080"]
        api.heal("nodes")
        api.apply(node("node-a", "zone-a"))
        await wait_until(lambda: handler.zones == {"node-a": "zone-a"}, "zone once allowed")
