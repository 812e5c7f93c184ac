from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import structlog
import structlog.testing
import yaml

from uproxy.errors import ManifestError
from uproxy.model import AddressType, EndpointSlice, NodeInfo, ObjectKey, Protocol, ServicePort
from uproxy.sources.fqdn_resolver import resolve_host
from uproxy.sources.manifest_loader import (
    ManifestItemError,
    is_manifest_name,
    load_file,
    load_file_collecting,
    load_paths,
    merge_files,
)
from uproxy.sources.manifests import ManifestSource

WEB = ObjectKey("default", "web")
DNS = ObjectKey("default", "dns")
WEB_SLICE = ObjectKey("default", "web-1")


def service_doc(name: str = "web", port: int = 80, protocol: str = "TCP", **spec: Any) -> str:
    obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name},
        "spec": {
            "clusterIP": "10.96.0.10",
            "ports": [{"port": port, "protocol": protocol}],
            **spec,
        },
    }
    return yaml.safe_dump(obj)


def slice_doc(
    name: str = "web-1",
    service: str = "web",
    addresses: tuple[str, ...] = ("10.0.0.1",),
    port: int = 8080,
    address_type: str = "IPv4",
) -> str:
    obj = {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "labels": {"kubernetes.io/service-name": service}},
        "addressType": address_type,
        "ports": [{"name": "", "port": port}],
        "endpoints": [{"addresses": [a]} for a in addresses],
    }
    return yaml.safe_dump(obj)


def docs(*parts: str) -> str:
    return "---\n".join(parts)


_bump = 0


def write(path: Path, text: str) -> None:
    """Write in place, moving mtime forward so that no filesystem timestamp granularity hides it."""
    global _bump
    _bump += 1
    path.write_text(text)
    stamp = 1_700_000_000_000_000_000 + _bump * 1_000_000_000
    os.utime(path, ns=(stamp, stamp))


def replace_atomically(path: Path, text: str) -> None:
    temp = path.with_name(f".{path.name}.tmp")
    temp.write_text(text)
    os.replace(temp, path)


# --- loading ----------------------------------------------------------------------------------


def test_multi_document_yaml(tmp_path: Path) -> None:
    path = tmp_path / "all.yaml"
    configmap = "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"
    path.write_text(docs(service_doc(), "", slice_doc(), configmap) + "---\n")
    loaded = load_file(path)
    assert list(loaded.services) == [WEB]
    assert loaded.services[WEB][0].port == 80
    assert list(loaded.slices) == [WEB_SLICE]
    assert loaded.slices[WEB_SLICE].service == WEB
    assert [(i.document, i.object, i.other_kind) for i in loaded.ignored] == [
        (4, "ConfigMap x", True)
    ]


def test_json_file(tmp_path: Path) -> None:
    path = tmp_path / "web.json"
    path.write_text(json.dumps(yaml.safe_load(service_doc())))
    assert list(load_file(path).services) == [WEB]


def test_list_kinds_are_expanded(tmp_path: Path) -> None:
    svc = yaml.safe_load(service_doc())
    sl = yaml.safe_load(slice_doc())
    raw_svc = {k: v for k, v in yaml.safe_load(service_doc("dns")).items() if k != "kind"}
    path = tmp_path / "lists.yaml"
    path.write_text(
        docs(
            yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [svc, sl]}),
            # The raw API leaves kind off the items of a typed list.
            yaml.safe_dump({"apiVersion": "v1", "kind": "ServiceList", "items": [raw_svc]}),
            yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": []}),
        )
    )
    loaded = load_file(path)
    assert sorted(loaded.services) == [DNS, WEB]
    assert list(loaded.slices) == [WEB_SLICE]


def test_skipped_objects_are_recorded(tmp_path: Path) -> None:
    path = tmp_path / "skip.yaml"
    path.write_text(docs(service_doc(clusterIP="None"), slice_doc(service="")))
    loaded = load_file(path)
    assert loaded.services == {} and loaded.slices == {}
    assert [(s.kind, s.key) for s in loaded.skipped] == [("Service", WEB)]
    # A slice of no Service is not a deliberate skip but a mistake: it is reported as ignored.
    assert [(i.document, i.object, i.other_kind) for i in loaded.ignored] == [
        (2, f"EndpointSlice {WEB_SLICE}", False)
    ]


def test_conversion_error_names_file_document_object_and_field(tmp_path: Path) -> None:
    path = tmp_path / "web.yaml"
    path.write_text(docs(slice_doc(), service_doc(protocol="SCTP")))
    with pytest.raises(ManifestError) as info:
        load_file(path)
    assert str(info.value) == (
        f"{path} (document 2): Service default/web: spec.ports[0].protocol: "
        "SCTP is not supported by uproxy (only TCP and UDP)"
    )
    assert info.value.document == 2


def test_list_item_error_names_item(tmp_path: Path) -> None:
    good = yaml.safe_load(service_doc("dns"))
    bad = yaml.safe_load(service_doc(port=0))
    path = tmp_path / "list.yaml"
    path.write_text(
        docs(
            service_doc("a"),
            yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [good, bad]}),
        )
    )
    with pytest.raises(ManifestItemError) as info:
        load_file(path)
    assert str(info.value).startswith(
        f"{path} (document 2, item 2): Service default/web: spec.ports[0].port:"
    )
    assert (info.value.document, info.value.item) == (2, 2)


def test_yaml_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("apiVersion: v1\nkind: Service\nmetadata:\n  name: [unclosed\n")
    with pytest.raises(ManifestError) as info:
        load_file(path)
    assert str(info.value).startswith(f"{path}: invalid YAML at line ")
    assert info.value.document is None


def test_json_syntax_error_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "kind": "Service",\n  oops\n}')
    with pytest.raises(ManifestError, match=r"invalid JSON at line 3, column 3"):
        load_file(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- just\n- a list\n", "(document 1): expected a Kubernetes object (a mapping), got list"),
        ("plain scalar\n", "expected a Kubernetes object"),
        ("metadata: {name: x}\n", "not a Kubernetes object: missing kind"),
        ("kind: Service\nmetadata: {name: x}\n", "Service: missing apiVersion"),
        ("apiVersion: v1\nkind: List\nitems: {a: 1}\n", "List: items must be a list"),
    ],
)
def test_malformed_documents(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "odd.yaml"
    path.write_text(text)
    with pytest.raises(ManifestError) as info:
        load_file(path)
    assert message in str(info.value)


def test_nested_list_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "nested.yaml"
    inner = {"apiVersion": "v1", "kind": "List", "items": []}
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [inner]}))
    with pytest.raises(ManifestError, match=r"document 1, item 1\): List inside a List"):
        load_file(path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(b"kind: \xe9\n")
    with pytest.raises(ManifestError, match="not UTF-8"):
        load_file(path)


def test_duplicate_within_a_file(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(docs(service_doc(), slice_doc(), service_doc(port=81)))
    with pytest.raises(ManifestError) as info:
        load_file(path)
    assert str(info.value) == (
        f"{path} (document 3): Service default/web is defined twice (also document 1)"
    )


def test_every_error_is_listed(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(
        docs(service_doc(protocol="SCTP"), service_doc("dns", port=-1))
    )
    (tmp_path / "b.yaml").write_text("key: [\n")
    (tmp_path / "c.yaml").write_text(service_doc("ok"))
    loaded, errors = load_paths([tmp_path, tmp_path / "missing"])
    messages = [str(e) for e in errors]
    assert len(messages) == 4, messages
    assert any(
        "a.yaml (document 1): Service default/web: spec.ports[0].protocol" in m for m in messages
    )
    assert any(
        "a.yaml (document 2): Service default/dns: spec.ports[0].port" in m for m in messages
    )
    assert any("b.yaml: invalid YAML" in m for m in messages)
    assert any("missing: no such file or directory" in m for m in messages)
    # Only clean files are usable.
    assert list(loaded) == [tmp_path / "c.yaml"]


def test_duplicates_across_files_name_both(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(service_doc())
    (tmp_path / "b.yaml").write_text(docs(slice_doc(), service_doc(port=81)))
    loaded, errors = load_paths([tmp_path])
    assert [str(e) for e in errors] == [
        f"{tmp_path / 'b.yaml'} (document 2): Service default/web is already defined in "
        f"{tmp_path / 'a.yaml'} (document 1)"
    ]
    merged, _ = merge_files(loaded.values())
    assert merged.services[WEB][0].port == 80  # the first definition wins
    assert WEB_SLICE in merged.slices


def test_directory_listing_skips_hidden_and_temp_files(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(service_doc())
    (tmp_path / "dns.yml").write_text(service_doc("dns"))
    (tmp_path / "slice.json").write_text(json.dumps(yaml.safe_load(slice_doc())))
    for junk in (".web.yaml.swp", ".hidden.yaml", "web.yaml~", "#web.yaml#", "notes.txt"):
        (tmp_path / junk).write_text("garbage: [")
    (tmp_path / "sub.yaml").mkdir()
    (tmp_path / "sub.yaml" / "inner.yaml").write_text(service_doc("inner"))
    loaded, errors = load_paths([tmp_path])
    assert errors == []
    assert sorted(p.name for p in loaded) == ["dns.yml", "slice.json", "web.yaml"]


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("a.yaml", True),
        ("a.yml", True),
        ("a.json", True),
        (".a.yaml", False),
        ("a.yaml~", False),
        ("a.yaml.swp", False),
        ("a.txt", False),
        ("..data", False),
    ],
)
def test_is_manifest_name(name: str, ok: bool) -> None:
    assert is_manifest_name(name) is ok


def test_explicit_file_with_any_suffix(tmp_path: Path) -> None:
    path = tmp_path / "services.txt"
    path.write_text(service_doc())
    loaded, errors = load_paths([path])
    assert errors == [] and list(loaded) == [path]


def test_empty_directory_is_fine(tmp_path: Path) -> None:
    assert load_paths([tmp_path]) == ({}, [])


def test_same_file_twice_is_not_a_duplicate(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(service_doc())
    loaded, errors = load_paths([tmp_path, tmp_path / "web.yaml"])
    assert errors == [] and len(loaded) == 1


def test_collecting_returns_all_errors_of_a_file(tmp_path: Path) -> None:
    path = tmp_path / "x.yaml"
    path.write_text(docs(service_doc(port=0), service_doc("dns", protocol="ICMP"), slice_doc()))
    loaded, errors = load_file_collecting(path)
    assert [e.document for e in errors] == [1, 2]
    assert WEB_SLICE in loaded.slices


def test_bundled_examples_are_valid() -> None:
    examples = Path(__file__).resolve().parents[2] / "examples"
    loaded, errors = load_paths([examples])
    assert errors == []
    merged, _ = merge_files(loaded.values())
    assert sorted(str(k) for k in merged.services) == [
        "default/dns",
        "default/sticky",
        "default/web",
    ]
    assert merged.services[ObjectKey("default", "sticky")][0].affinity_timeout == 600
    assert merged.services[ObjectKey("default", "web")][0].affinity_timeout is None
    assert merged.services[ObjectKey("default", "dns")][0].protocol is Protocol.UDP


# --- the watcher ------------------------------------------------------------------------------


class StateHandler:
    """Applies handler calls to a model of the current state, the way a change tracker would."""

    def __init__(self) -> None:
        self.services: dict[ObjectKey, tuple[ServicePort, ...]] = {}
        self.slices: dict[ObjectKey, EndpointSlice] = {}
        self.nodes: dict[str, NodeInfo] = {}
        self.synced: list[str] = []
        self.updates: Counter[ObjectKey] = Counter()
        self.fail_next = 0

    def _maybe_fail(self) -> None:
        if self.fail_next:
            self.fail_next -= 1
            raise RuntimeError("handler hiccup")

    def service_updated(self, key: ObjectKey, ports: tuple[ServicePort, ...]) -> None:
        self._maybe_fail()
        self.services[key] = ports
        self.updates[key] += 1

    def service_deleted(self, key: ObjectKey) -> None:
        self.services.pop(key, None)

    def slice_updated(self, endpoint_slice: EndpointSlice) -> None:
        self._maybe_fail()
        self.slices[endpoint_slice.key] = endpoint_slice
        self.updates[endpoint_slice.key] += 1

    def slice_deleted(self, key: ObjectKey) -> None:
        self.slices.pop(key, None)

    def node_updated(self, node: NodeInfo) -> None:
        self.nodes[node.name] = node

    def node_deleted(self, name: str) -> None:
        self.nodes.pop(name, None)

    def source_synced(self, source: str) -> None:
        self.synced.append(source)

    def port(self, key: ObjectKey = WEB) -> int | None:
        ports = self.services.get(key)
        return ports[0].port if ports else None

    def ips(self, key: ObjectKey = WEB_SLICE) -> list[str]:
        found = self.slices.get(key)
        return [e.addresses[0] for e in found.endpoints] if found else []


async def eventually(condition: Callable[[], bool], within: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not reached before the deadline")
        await asyncio.sleep(0.01)


@asynccontextmanager
async def running(source: ManifestSource, handler: StateHandler) -> AsyncIterator[None]:
    task = asyncio.create_task(source.run(handler))
    try:
        await eventually(lambda: bool(handler.synced) or task.done())
        if task.done():
            task.result()
        yield
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


def source_for(*paths: Path, **kwargs: Any) -> ManifestSource:
    kwargs.setdefault("poll_interval", 0.02)
    kwargs.setdefault("dns_refresh", 3600)
    return ManifestSource(list(paths), **kwargs)


async def test_initial_load_and_synced_once(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(docs(service_doc(), slice_doc()))
    handler = StateHandler()
    async with running(source_for(tmp_path), handler):
        assert handler.port() == 80
        assert handler.ips() == ["10.0.0.1"]
        await asyncio.sleep(0.1)
        assert handler.synced == ["manifests"]


async def test_synced_with_bad_empty_and_missing_paths(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(service_doc(protocol="SCTP"))
    empty = tmp_path / "empty"
    empty.mkdir()
    handler = StateHandler()
    async with running(source_for(bad, empty, tmp_path / "nope"), handler):
        assert handler.synced == ["manifests"]
        assert handler.services == {}


async def test_edit_in_place(tmp_path: Path) -> None:
    path = tmp_path / "web.yaml"
    write(path, docs(service_doc(), service_doc("dns", port=53, protocol="UDP")))
    handler = StateHandler()
    async with running(source_for(tmp_path), handler):
        write(path, docs(service_doc(port=8080), service_doc("dns", port=53, protocol="UDP")))
        await eventually(lambda: handler.port() == 8080)
        # The untouched Service was not delivered again.
        assert handler.updates[DNS] == 1
        # Nor is anything redelivered when the file is rewritten with identical contents.
        write(path, path.read_text())
        await asyncio.sleep(0.1)
        assert handler.updates == Counter({WEB: 2, DNS: 1})


async def test_atomic_replace(tmp_path: Path) -> None:
    path = tmp_path / "web.yaml"
    path.write_text(docs(service_doc(), slice_doc()))
    handler = StateHandler()
    async with running(source_for(path), handler):
        replace_atomically(path, docs(service_doc(), slice_doc(addresses=("10.0.0.2", "10.0.0.3"))))
        await eventually(lambda: handler.ips() == ["10.0.0.2", "10.0.0.3"])
        assert handler.port() == 80


async def test_new_file_and_deletion(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(service_doc())
    handler = StateHandler()
    async with running(source_for(tmp_path), handler):
        (tmp_path / "dns.yaml").write_text(service_doc("dns", port=53))
        await eventually(lambda: handler.port(DNS) == 53)
        (tmp_path / "web.yaml").unlink()
        await eventually(lambda: WEB not in handler.services)
        assert handler.port(DNS) == 53


async def test_bad_edit_keeps_last_good_state(tmp_path: Path) -> None:
    path = tmp_path / "web.yaml"
    write(path, docs(service_doc(), slice_doc()))
    handler = StateHandler()
    async with running(source_for(tmp_path), handler):
        write(path, docs(service_doc(port=81, protocol="SCTP"), slice_doc(addresses=("10.0.0.9",))))
        (tmp_path / "other.yaml").write_text(service_doc("dns", port=53))
        await eventually(lambda: handler.port(DNS) == 53)  # the bad file was read by now
        assert handler.port() == 80
        assert handler.ips() == ["10.0.0.1"]
        write(path, "not: [valid")
        (tmp_path / "other.yaml").unlink()
        await eventually(lambda: DNS not in handler.services)
        assert handler.port() == 80
        write(path, docs(service_doc(port=82), slice_doc(addresses=("10.0.0.9",))))
        await eventually(lambda: handler.port() == 82 and handler.ips() == ["10.0.0.9"])


async def test_file_never_good_contributes_nothing_until_fixed(tmp_path: Path) -> None:
    path = tmp_path / "web.yaml"
    write(path, service_doc(port=0))
    handler = StateHandler()
    async with running(source_for(tmp_path), handler):
        assert handler.services == {}
        write(path, service_doc(port=80))
        await eventually(lambda: handler.port() == 80)


async def test_missing_path_appears_later(tmp_path: Path) -> None:
    later = tmp_path / "later"
    handler = StateHandler()
    async with running(source_for(later), handler):
        later.mkdir()
        (later / "web.yaml").write_text(service_doc())
        await eventually(lambda: handler.port() == 80)


async def test_configmap_style_symlink_swap(tmp_path: Path) -> None:
    mount = tmp_path / "mount"
    mount.mkdir()
    first, second = mount / "..2024_01_01", mount / "..2024_01_02"
    first.mkdir()
    second.mkdir()
    (first / "web.yaml").write_text(service_doc(port=80))
    (second / "web.yaml").write_text(service_doc(port=90))
    (mount / "..data").symlink_to(first.name)
    (mount / "web.yaml").symlink_to("..data/web.yaml")
    handler = StateHandler()
    async with running(source_for(mount), handler):
        assert handler.port() == 80
        (mount / "..data_tmp").symlink_to(second.name)
        os.replace(mount / "..data_tmp", mount / "..data")
        await eventually(lambda: handler.port() == 90)


async def test_refresh_forces_a_reread(tmp_path: Path) -> None:
    path = tmp_path / "web.yaml"
    write(path, service_doc())
    handler = StateHandler()
    source = source_for(tmp_path, poll_interval=3600)
    async with running(source, handler):
        write(path, service_doc(port=81))
        await asyncio.sleep(0.05)
        assert handler.port() == 80  # not polled yet
        source.refresh()
        await eventually(lambda: handler.port() == 81)


async def test_duplicate_across_files_keeps_first(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text(service_doc(port=80))
    handler = StateHandler()
    async with running(source_for(tmp_path), handler):
        (tmp_path / "b.yaml").write_text(docs(service_doc(port=81), service_doc("dns")))
        await eventually(lambda: DNS in handler.services)
        assert handler.port() == 80
        (tmp_path / "a.yaml").unlink()
        await eventually(lambda: handler.port() == 81)


async def test_failing_handler_is_retried(tmp_path: Path) -> None:
    path = tmp_path / "web.yaml"
    write(path, service_doc())
    handler = StateHandler()
    async with running(source_for(tmp_path), handler):
        handler.fail_next = 2
        write(path, service_doc(port=81))
        await eventually(lambda: handler.port() == 81)


async def test_handler_failing_at_start_does_not_stop_the_source(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(service_doc())
    handler = StateHandler()
    handler.fail_next = 1
    async with running(source_for(tmp_path), handler):
        await eventually(lambda: handler.port() == 80)
        assert handler.synced == ["manifests"]


# --- FQDN slices ------------------------------------------------------------------------------


class FakeDns:
    def __init__(self, answers: dict[str, list[str]]) -> None:
        self.answers = answers
        self.queries: Counter[str] = Counter()

    async def __call__(self, host: str) -> list[str]:
        self.queries[host] += 1
        await asyncio.sleep(0)
        answer = self.answers.get(host)
        if answer is None:
            raise OSError(f"cannot resolve {host}")
        return list(answer)


def fqdn_slice(*names: str) -> str:
    return slice_doc(addresses=names, address_type="FQDN")


async def test_fqdn_slice_is_resolved(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(docs(service_doc(), fqdn_slice("web-a", "web-b", "ghost")))
    dns = FakeDns({"web-a": ["10.0.0.2", "10.0.0.1", "10.0.0.2"], "web-b": ["10.0.0.3"]})
    handler = StateHandler()
    async with running(source_for(tmp_path, resolver=dns), handler):
        delivered = handler.slices[WEB_SLICE]
        assert delivered.address_type is AddressType.IPV4
        assert handler.ips() == ["10.0.0.1", "10.0.0.2", "10.0.0.3"]


async def test_fqdn_address_types(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(fqdn_slice("six"))
    dns = FakeDns({"six": ["fd00::2", "fd00::1"]})
    handler = StateHandler()
    async with running(source_for(tmp_path, resolver=dns, dns_refresh=0.05), handler):
        assert handler.slices[WEB_SLICE].address_type is AddressType.IPV6
        assert handler.ips() == ["fd00::1", "fd00::2"]
        dns.answers["six"] = ["fd00::1", "10.0.0.1"]
        await eventually(lambda: handler.ips() == ["10.0.0.1", "fd00::1"])
        assert handler.slices[WEB_SLICE].address_type is AddressType.IPV4


@pytest.mark.parametrize(
    ("spec", "choice", "expected"),
    [
        ({}, "service", ["10.0.0.1"]),  # an IPv4 Service: its FQDN endpoints resolve to IPv4
        (
            {"clusterIP": "fd00:96::10"},
            "service",
            ["fd00::1"],
        ),
        (
            {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"]},
            "service",
            ["10.0.0.1", "fd00::1"],
        ),
        ({"clusterIP": "None"}, "service", ["10.0.0.1", "fd00::1"]),  # headless: both
        ({}, "IPv6", ["fd00::1"]),
        ({}, "both", ["10.0.0.1", "fd00::1"]),
    ],
)
async def test_fqdn_endpoints_resolve_to_the_families_asked_for(
    tmp_path: Path, spec: dict[str, Any], choice: str, expected: list[str]
) -> None:
    (tmp_path / "web.yaml").write_text(docs(service_doc(**spec), fqdn_slice("dual")))
    dns = FakeDns({"dual": ["fd00::1", "10.0.0.1"]})
    handler = StateHandler()
    async with running(source_for(tmp_path, resolver=dns, fqdn_families=choice), handler):
        await eventually(lambda: handler.ips() == expected)


async def test_fqdn_changes_redelivered_and_failures_keep_last(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(fqdn_slice("web-a", "web-b"))
    dns = FakeDns({"web-a": ["10.0.0.1"]})
    handler = StateHandler()
    async with running(source_for(tmp_path, resolver=dns, dns_refresh=0.05), handler):
        assert handler.ips() == ["10.0.0.1"]  # web-b contributes nothing yet
        dns.answers["web-a"] = ["10.0.0.5"]
        dns.answers["web-b"] = ["10.0.0.6"]
        await eventually(lambda: handler.ips() == ["10.0.0.5", "10.0.0.6"])
        updates = handler.updates[WEB_SLICE]
        # Failures keep the last answer: nothing changes however many refreshes pass.
        del dns.answers["web-a"]
        dns.answers["web-b"] = []
        queried = dns.queries["web-a"]
        await eventually(lambda: dns.queries["web-a"] >= queried + 3)
        assert handler.ips() == ["10.0.0.5", "10.0.0.6"]
        assert handler.updates[WEB_SLICE] == updates


async def test_fqdn_names_of_a_new_file_are_resolved_at_once(tmp_path: Path) -> None:
    dns = FakeDns({"web-a": ["10.0.0.1"], "web-b": ["10.0.0.2"]})
    handler = StateHandler()
    async with running(source_for(tmp_path, resolver=dns), handler):
        (tmp_path / "web.yaml").write_text(fqdn_slice("web-a"))
        await eventually(lambda: handler.ips() == ["10.0.0.1"])
        replace_atomically(tmp_path / "web.yaml", fqdn_slice("web-b"))
        await eventually(lambda: handler.ips() == ["10.0.0.2"])


async def test_default_resolver_handles_literals_and_localhost() -> None:
    assert await resolve_host("127.0.0.1") == ["127.0.0.1"]
    assert "127.0.0.1" in await resolve_host("localhost")
    with pytest.raises(OSError):
        await resolve_host("does-not-exist.invalid")


async def test_run_is_cancellable_during_slow_dns(tmp_path: Path) -> None:
    (tmp_path / "web.yaml").write_text(fqdn_slice("slow"))

    async def slow(host: str) -> list[str]:
        await asyncio.sleep(3600)
        return []

    task = asyncio.create_task(source_for(tmp_path, resolver=slow).run(StateHandler()))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


async def test_a_file_deleted_between_listing_and_reading_is_gone_not_invalid(
    tmp_path: Path,
) -> None:
    (tmp_path / "web.yaml").write_text(service_doc())
    source = source_for(tmp_path)
    listed = [tmp_path / "web.yaml"]
    assert await source._reload_changed(listed, force=True)
    (tmp_path / "web.yaml").unlink()  # a directory listing that still names it
    with structlog.testing.capture_logs() as logs:
        assert await source._reload_changed(listed, force=False)
        assert not await source._reload_changed(listed, force=True)
    assert [e for e in logs if e["log_level"] == "error"] == []
    assert source._merged().services == {}
