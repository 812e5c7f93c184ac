"""The test API server's own protocol, checked with raw HTTP and the kubernetes-asyncio client."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
import yaml
from kubernetes_asyncio import client, config, watch
from kubernetes_asyncio.client.exceptions import ApiException

from tests.kubeapi import (
    KubeApiControl,
    KubeApiServer,
    make_endpoint_slice,
    make_service,
    parse_selector,
)
from tests.kubeconfig import make_tls, write_kubeconfig

REPO = Path(__file__).resolve().parents[2]
SERVICES = "/api/v1/services"
SLICES = "/apis/discovery.k8s.io/v1/endpointslices"
HEADLESS = "service.kubernetes.io/headless"


@pytest.fixture
async def api() -> AsyncIterator[KubeApiServer]:
    async with KubeApiServer(bookmark_interval=0.2) as server:
        yield server


@pytest.fixture
async def http(api: KubeApiServer) -> AsyncIterator[aiohttp.ClientSession]:
    headers = {"Authorization": f"Bearer {api.token}"}
    async with aiohttp.ClientSession(api.url, headers=headers) as session:
        yield session


@pytest.fixture
async def k8s(api: KubeApiServer, tmp_path: Path) -> AsyncIterator[client.ApiClient]:
    path = write_kubeconfig(tmp_path / "kubeconfig", api.url, api.token)
    configuration = client.Configuration()
    await config.load_kube_config(
        config_file=str(path), client_configuration=configuration, persist_config=False
    )
    async with client.ApiClient(configuration) as api_client:
        yield api_client


def deserialize(api_client: client.ApiClient, obj: object, model: str) -> Any:
    # What the library's own Watch does: any object with `.data` will do.
    return api_client.deserialize(SimpleNamespace(data=json.dumps(obj)), model)  # type: ignore[arg-type]


async def get_json(http: aiohttp.ClientSession, path: str, **params: str) -> Any:
    async with http.get(path, params=params) as response:
        assert response.status == 200, await response.text()
        return await response.json()


async def watch_events(
    http: aiohttp.ClientSession, path: str, **params: str
) -> list[dict[str, Any]]:
    """Every event of a watch that ends by itself (timeoutSeconds), in order."""
    params = {"watch": "true", "timeoutSeconds": "1", **params}
    async with asyncio.timeout(15), http.get(path, params=params) as response:
        assert response.status == 200
        return [json.loads(line) async for line in response.content]


def fixtures() -> list[dict[str, Any]]:
    return [
        make_service("web"),
        make_service("dual", cluster_ip="fd00::10", ipFamilyPolicy="PreferDualStack"),
        make_service("np", [{"name": "http", "port": 80, "nodePort": 30080}], type="NodePort"),
        make_service("sticky", sessionAffinity="ClientIP"),
        make_service("headless", cluster_ip="None"),
        make_service("ext", cluster_ip="", type="ExternalName", externalName="db.example.com"),
        make_endpoint_slice("web-1", "web", ["10.0.0.1", "10.0.0.2"], node_name="node-a"),
        make_endpoint_slice("dual-1", "dual", ["fd00::1"], address_type="IPv6", ready=False),
        make_endpoint_slice("orphan", None, ["10.0.0.9"]),
    ]


# --- fixtures and lists -----------------------------------------------------------------------


async def test_fixtures_deserialise_into_client_models(
    api: KubeApiServer, k8s: client.ApiClient
) -> None:
    for obj in fixtures():
        stored = api.apply(obj)
        for form in (obj, stored):
            model = deserialize(k8s, form, f"V1{obj['kind']}")
            assert type(model).__name__ == f"V1{obj['kind']}"
            assert model.metadata.name == obj["metadata"]["name"]
        assert model.metadata.resource_version == str(api.version)
        assert model.metadata.creation_timestamp is not None
    web = deserialize(k8s, make_service("web"), "V1Service")
    assert (web.spec.cluster_ip, web.spec.ports[0].port, web.spec.ports[0].protocol) == (
        "10.96.0.10",
        80,
        "TCP",
    )
    sl = deserialize(k8s, make_endpoint_slice("s", "web", node_name="n"), "V1EndpointSlice")
    assert (sl.address_type, sl.endpoints[0].node_name, sl.endpoints[0].conditions.ready) == (
        "IPv4",
        "n",
        True,
    )
    assert sl.metadata.labels["kubernetes.io/service-name"] == "web"


async def test_typed_lists_cluster_wide_and_namespaced(
    api: KubeApiServer, k8s: client.ApiClient, http: aiohttp.ClientSession
) -> None:
    api.apply(make_service("web"))
    api.apply(make_service("dns", namespace="kube-system", cluster_ip="10.96.0.2"))
    api.apply(make_endpoint_slice("dns-1", "dns", namespace="kube-system"))
    core, discovery = client.CoreV1Api(k8s), client.DiscoveryV1Api(k8s)

    services = await core.list_service_for_all_namespaces()
    assert type(services).__name__ == "V1ServiceList"
    assert services.metadata.resource_version == str(api.version)
    assert [(s.metadata.namespace, s.metadata.name) for s in services.items] == [
        ("default", "web"),
        ("kube-system", "dns"),
    ]
    namespaced = await core.list_namespaced_service("kube-system")
    assert [s.metadata.name for s in namespaced.items] == ["dns"]
    slices = await discovery.list_endpoint_slice_for_all_namespaces()
    assert type(slices).__name__ == "V1EndpointSliceList"
    assert [s.metadata.name for s in slices.items] == ["dns-1"]
    assert (await discovery.list_namespaced_endpoint_slice("default")).items == []

    raw = await get_json(http, SERVICES)
    assert (raw["kind"], raw["apiVersion"]) == ("ServiceList", "v1")
    assert all("kind" not in item for item in raw["items"])  # as the real API lists them
    raw = await get_json(http, SLICES)
    assert (raw["kind"], raw["apiVersion"]) == ("EndpointSliceList", "discovery.k8s.io/v1")


async def test_one_global_increasing_resource_version(
    api: KubeApiServer, http: aiohttp.ClientSession
) -> None:
    versions = [
        api.apply(make_service("web"))["metadata"]["resourceVersion"],
        api.apply(make_endpoint_slice("web-1", "web"))["metadata"]["resourceVersion"],
        api.apply(make_service("web", cluster_ip="10.96.0.99"))["metadata"]["resourceVersion"],
    ]
    api.delete("Service", "default", "web")
    numbers = [int(v) for v in versions]
    assert numbers == sorted(set(numbers))
    services = await get_json(http, SERVICES)
    slices = await get_json(http, SLICES)
    assert services["metadata"]["resourceVersion"] == slices["metadata"]["resourceVersion"]
    assert int(services["metadata"]["resourceVersion"]) == numbers[-1] + 1


async def test_auth_is_required(api: KubeApiServer, k8s: client.ApiClient) -> None:
    async with aiohttp.ClientSession() as anonymous:
        async with anonymous.get(api.url + SERVICES) as response:
            assert response.status == 401
            status = await response.json()
        headers = {"Authorization": "Bearer wrong"}
        async with anonymous.get(api.url + SLICES, headers=headers) as response:
            assert response.status == 401
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 401, "Unauthorized")
    k8s.configuration.api_key["BearerToken"] = "Bearer wrong"
    with pytest.raises(ApiException) as raised:
        await client.CoreV1Api(k8s).list_service_for_all_namespaces()
    assert raised.value.status == 401


# --- watch ------------------------------------------------------------------------------------


async def test_watch_replays_from_a_version_and_ends_after_timeout(
    api: KubeApiServer, http: aiohttp.ClientSession
) -> None:
    api.apply(make_service("before"))
    start = api.version
    api.apply(make_service("web"))
    api.apply(make_endpoint_slice("web-1", "web"))  # another resource: not in this watch
    api.apply(make_service("web", cluster_ip="10.96.0.99"))
    api.delete("Service", "default", "web")
    events = await watch_events(http, SERVICES, resourceVersion=str(start))
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "web"),
        ("MODIFIED", "web"),
        ("DELETED", "web"),
    ]
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and versions[0] > start
    assert all(e["object"]["kind"] == "Service" for e in events)


async def test_watch_without_a_version_starts_with_the_current_state(
    api: KubeApiServer, http: aiohttp.ClientSession
) -> None:
    api.apply(make_service("a"))
    api.apply(make_service("b", namespace="other"))
    events = await watch_events(http, SERVICES)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "a"),
        ("ADDED", "b"),
    ]
    namespaced = await watch_events(http, "/api/v1/namespaces/other/services", resourceVersion="0")
    assert [e["object"]["metadata"]["name"] for e in namespaced] == ["b"]


async def test_bookmarks_only_when_allowed(api: KubeApiServer, http: aiohttp.ClientSession) -> None:
    api.apply(make_service("web"))
    version = str(api.version)
    plain = await watch_events(http, SERVICES, resourceVersion=version)
    assert plain == []
    api.apply(make_endpoint_slice("web-1", "web"))
    marked = await watch_events(http, SERVICES, resourceVersion=version, allowWatchBookmarks="true")
    assert marked and {e["type"] for e in marked} == {"BOOKMARK"}
    bookmark = marked[-1]["object"]
    assert (bookmark["kind"], bookmark["apiVersion"]) == ("Service", "v1")
    # The slice write moved the global version on: the bookmark tells the watcher so.
    assert bookmark["metadata"]["resourceVersion"] == str(api.version)


async def test_expired_version_is_410_gone(
    api: KubeApiServer, http: aiohttp.ClientSession, k8s: client.ApiClient
) -> None:
    api.apply(make_service("web"))
    old = str(api.version - 1)
    api.apply(make_service("web", cluster_ip="10.96.0.99"))
    api.compact()
    (event,) = await watch_events(http, SERVICES, resourceVersion=old)
    assert event["type"] == "ERROR"
    status = event["object"]
    assert (status["kind"], status["code"], status["reason"]) == ("Status", 410, "Expired")
    # The library's own Watch turns it into an ApiException, as against a real apiserver.
    core = client.CoreV1Api(k8s)
    with pytest.raises(ApiException) as raised:
        async with watch.Watch() as w:
            async for _ in w.stream(
                core.list_service_for_all_namespaces, resource_version=old, timeout_seconds=1
            ):
                pass
    assert raised.value.status == 410
    api.gone_as_http = True
    async with http.get(SERVICES, params={"watch": "1", "resourceVersion": old}) as response:
        assert response.status == 410
        assert (await response.json())["reason"] == "Expired"


async def test_history_limit_expires_old_versions(http: aiohttp.ClientSession) -> None:
    async with KubeApiServer(history_limit=10) as small:
        start = small.version
        for i in range(20):
            small.apply(make_service(f"s{i}"))
        assert small.compacted > start
        headers = {"Authorization": f"Bearer {small.token}"}
        async with aiohttp.ClientSession(small.url, headers=headers) as session:
            (gone,) = await watch_events(session, SERVICES, resourceVersion=str(start))
            kept = await watch_events(session, SERVICES, resourceVersion=str(small.compacted))
        assert gone["object"]["code"] == 410
        assert [e["type"] for e in kept] == ["ADDED"] * (small.version - small.compacted)


async def test_library_watch_deserialises_events(api: KubeApiServer, k8s: client.ApiClient) -> None:
    api.apply(make_endpoint_slice("web-1", "web"))
    async with watch.Watch() as w:
        events = [
            e
            async for e in w.stream(
                client.DiscoveryV1Api(k8s).list_endpoint_slice_for_all_namespaces,
                resource_version="0",
                timeout_seconds=1,
            )
        ]
    assert [(e["type"], type(e["object"]).__name__) for e in events] == [
        ("ADDED", "V1EndpointSlice")
    ]


# --- selectors --------------------------------------------------------------------------------


def test_selector_parsing() -> None:
    requirements = parse_selector(f"!{HEADLESS},app=web,tier!=db,env==prod,owner")
    assert [(r.key, r.op) for r in requirements] == [
        (HEADLESS, "!exists"),
        ("app", "="),
        ("tier", "!="),
        ("env", "="),
        ("owner", "exists"),
    ]
    with pytest.raises(ValueError, match="unsupported"):
        parse_selector("app in (a,b)")


async def test_label_selector_filters_lists_and_watches(
    api: KubeApiServer, http: aiohttp.ClientSession
) -> None:
    api.apply(make_service("web", labels={"app": "web"}))
    api.apply(make_service("db", labels={"app": "db"}))
    api.apply(make_service("hidden", labels={HEADLESS: "", "app": "web"}))

    async def names(selector: str) -> list[str]:
        body = await get_json(http, SERVICES, labelSelector=selector)
        return [item["metadata"]["name"] for item in body["items"]]

    assert await names(f"!{HEADLESS}") == ["db", "web"]
    assert await names("app=web") == ["hidden", "web"]
    assert await names(f"app!=web,!{HEADLESS}") == ["db"]
    async with http.get(SERVICES, params={"labelSelector": "app in (a)"}) as response:
        assert response.status == 400

    start = str(api.version)
    api.apply(make_service("web", labels={"app": "web", HEADLESS: ""}))  # leaves the selection
    api.apply(make_service("web", labels={"app": "web"}))  # and comes back
    api.apply(make_service("hidden", labels={HEADLESS: "", "app": "x"}))  # never visible
    events = await watch_events(http, SERVICES, resourceVersion=start, labelSelector=f"!{HEADLESS}")
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("DELETED", "web"),
        ("ADDED", "web"),
    ]


# --- faults -----------------------------------------------------------------------------------


async def test_dropped_watch_ends_inside_an_event(
    api: KubeApiServer, http: aiohttp.ClientSession
) -> None:
    params = {"watch": "1", "resourceVersion": str(api.version)}
    async with asyncio.timeout(15), http.get(SERVICES, params=params) as response:
        api.apply(make_service("web"))
        first = await response.content.readline()
        assert json.loads(first)["type"] == "ADDED"
        assert api.drop_watches() == 1
        with pytest.raises(aiohttp.ClientPayloadError):
            await response.content.read()
    for _ in range(100):
        if api.open_watches == 0:
            break
        await asyncio.sleep(0.01)
    assert api.open_watches == 0


async def test_stop_and_start_on_the_same_port_keep_state(
    api: KubeApiServer, http: aiohttp.ClientSession
) -> None:
    api.apply(make_service("web"))
    version, port = str(api.version), api.port
    await api.stop()
    with pytest.raises(aiohttp.ClientConnectionError):
        await get_json(http, SERVICES)
    api.apply(make_service("web", cluster_ip="10.96.0.99"))  # written while down
    await api.start()
    assert api.port == port
    assert [i["metadata"]["name"] for i in (await get_json(http, SERVICES))["items"]] == ["web"]
    events = await watch_events(http, SERVICES, resourceVersion=version)
    assert [e["type"] for e in events] == ["MODIFIED"]


async def test_injected_faults(api: KubeApiServer, http: aiohttp.ClientSession) -> None:
    api.fail("endpointslices", 503)
    async with http.get(SLICES) as response:
        assert response.status == 503
    await get_json(http, SERVICES)
    api.heal()
    await get_json(http, SLICES)


async def test_tls(tmp_path: Path) -> None:
    tls = make_tls(tmp_path / "pki")
    async with KubeApiServer(tls=tls) as server:
        server.apply(make_service("web"))
        path = write_kubeconfig(tmp_path / "kc", server.url, server.token, ca=tls.ca)
        configuration = client.Configuration()
        await config.load_kube_config(
            config_file=str(path), client_configuration=configuration, persist_config=False
        )
        assert server.url.startswith("https://127.0.0.1:")
        async with client.ApiClient(configuration) as api_client:
            services = await client.CoreV1Api(api_client).list_service_for_all_namespaces()
        assert [s.metadata.name for s in services.items] == ["web"]


# --- as a separate process --------------------------------------------------------------------


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[tuple[KubeApiControl, Path]]:
    fixture_file = tmp_path / "fixtures.yaml"
    fixture_file.write_text(yaml.safe_dump_all(fixtures()))
    kubeconfig = tmp_path / "kubeconfig"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.kubeapi",
            "--token",
            "process-token",
            "--fixtures",
            str(fixture_file),
            "--kubeconfig",
            str(kubeconfig),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        ready = json.loads(proc.stdout.readline())
        assert ready["event"] == "kubeapi_ready"
        yield KubeApiControl(ready["url"], "process-token"), kubeconfig
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        assert proc.stdout is not None
        proc.stdout.close()


async def test_as_a_process_with_the_control_api(
    server_process: tuple[KubeApiControl, Path],
) -> None:
    control, kubeconfig = server_process
    configuration = client.Configuration()
    await config.load_kube_config(
        config_file=str(kubeconfig), client_configuration=configuration, persist_config=False
    )
    async with client.ApiClient(configuration) as api_client:
        core = client.CoreV1Api(api_client)

        async def names() -> list[str]:
            return [s.metadata.name for s in (await core.list_service_for_all_namespaces()).items]

        assert await names() == ["dual", "ext", "headless", "np", "sticky", "web"]
        await asyncio.to_thread(control.apply, make_service("new"))
        await asyncio.to_thread(control.delete, "services", "default", "web")
        assert "new" in await names() and "web" not in await names()
        await asyncio.to_thread(control.outage, 1.0)
        down = time.monotonic()
        with pytest.raises(aiohttp.ClientConnectionError):
            while time.monotonic() - down < 10:
                await names()
                await asyncio.sleep(0.05)
        deadline = time.monotonic() + 15
        while True:
            try:
                assert "new" in await names()
                break
            except aiohttp.ClientConnectionError:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
    state = await asyncio.to_thread(control.state)
    assert state["requests"]["list services"] >= 3
