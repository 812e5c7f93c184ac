"""The manifest source: Services and EndpointSlices from YAML/JSON files, followed as they change.

Two layers: a pure, synchronous loader (`load_file`, `load_paths`, `merge_files`) that
`uproxy check` uses as is, and `ManifestSource`, which polls the files and turns differences
into handler calls. A file is all or nothing: one bad object keeps the file's last good contents
in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import structlog
import yaml

from uproxy.convert import (
    ServiceResult,
    SkippedObject,
    SliceResult,
    convert_object,
)
from uproxy.errors import ConversionError, ManifestError
from uproxy.model import (
    AddressType,
    EndpointSlice,
    ObjectKey,
    ServicePort,
    SliceEndpoint,
)
from uproxy.sources.base import ConfigHandler

try:
    from yaml import CSafeLoader as _YamlLoader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader as _YamlLoader  # type: ignore[assignment]

log = structlog.get_logger(__name__)

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
# Lists from the raw API (`kubectl get --raw`) leave kind/apiVersion off their items.
_LIST_ITEM_DEFAULTS = {
    ("v1", "ServiceList"): ("v1", "Service"),
    ("discovery.k8s.io/v1", "EndpointSliceList"): ("discovery.k8s.io/v1", "EndpointSlice"),
}

# A name that does not answer in time must not hold up the delivery of everything else for long.
_DNS_TIMEOUT = 5.0
_MIN_PERIOD = 0.01

Resolver = Callable[[str], Awaitable[list[str]]]
Signature = tuple[int, int, int, int]


class ManifestItemError(ManifestError):
    """A ManifestError about one item of a `kind: List` document."""

    def __init__(self, path: str, document: int, item: int, message: str) -> None:
        super().__init__(path, document, message)
        self.item = item
        self.args = (f"{path} (document {document}, item {item}): {message}",)


@dataclass(frozen=True, slots=True)
class _Location:
    document: int
    item: int | None = None

    def __str__(self) -> str:
        base = f"document {self.document}"
        return base if self.item is None else f"{base}, item {self.item}"

    def error(self, path: str, message: str) -> ManifestError:
        if self.item is None:
            return ManifestError(path, self.document, message)
        return ManifestItemError(path, self.document, self.item, message)


@dataclass(frozen=True)
class LoadedFile:
    """Everything one manifest file contributes."""

    path: Path
    services: dict[ObjectKey, tuple[ServicePort, ...]] = field(default_factory=dict)
    slices: dict[ObjectKey, EndpointSlice] = field(default_factory=dict)
    skipped: tuple[SkippedObject, ...] = ()
    ignored_kinds: tuple[str, ...] = ()
    # (kind, key) -> (document, List item or None), so duplicate errors can point at both copies.
    origins: dict[tuple[str, ObjectKey], tuple[int, int | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifests:
    """The union of several files: what the source delivers."""

    services: dict[ObjectKey, tuple[ServicePort, ...]] = field(default_factory=dict)
    slices: dict[ObjectKey, EndpointSlice] = field(default_factory=dict)


# --- parsing ----------------------------------------------------------------------------------


def _parse_json(path: Path, text: str) -> list[object]:
    try:
        return [json.loads(text)]
    except json.JSONDecodeError as e:
        raise ManifestError(
            str(path), None, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None


def _parse_yaml(path: Path, text: str) -> list[object]:
    try:
        return list(yaml.load_all(text, Loader=_YamlLoader))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = e.problem or e.context or "syntax error"
        raise ManifestError(str(path), None, f"invalid YAML{where}: {problem}") from None
    except yaml.YAMLError as e:
        raise ManifestError(str(path), None, f"invalid YAML: {e}") from None


def _read_documents(path: Path) -> list[object]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(str(path), None, "no such file") from None
    except OSError as e:
        raise ManifestError(str(path), None, f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ManifestError(str(path), None, f"not UTF-8 text: {e.reason}") from None
    if path.suffix == ".json":
        return _parse_json(path, text)
    return _parse_yaml(path, text)


def _kind_of(obj: Mapping[str, Any]) -> tuple[str, str] | str:
    """(apiVersion, kind), or a message saying what is missing."""
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not isinstance(kind, str) or not kind:
        return "not a Kubernetes object: missing kind"
    if not isinstance(api_version, str) or not api_version:
        return f"{kind}: missing apiVersion"
    return (api_version, kind)


class _FileBuilder:
    """Accumulates one file's objects and every error found in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.services: dict[ObjectKey, tuple[ServicePort, ...]] = {}
        self.slices: dict[ObjectKey, EndpointSlice] = {}
        self.skipped: list[SkippedObject] = []
        self.ignored: dict[str, None] = {}
        self.origins: dict[tuple[str, ObjectKey], tuple[int, int | None]] = {}
        self.errors: list[ManifestError] = []

    def add_document(self, number: int, doc: object) -> None:
        if doc is None:  # empty documents, e.g. a trailing `---`
            return
        kind = _kind_of(doc) if isinstance(doc, Mapping) else None
        if isinstance(doc, Mapping) and isinstance(kind, tuple) and kind[1].endswith("List"):
            self._add_list(number, doc, kind)
        else:
            self.add(_Location(number), doc)

    def _add_list(self, number: int, doc: Mapping[str, Any], kind: tuple[str, str]) -> None:
        items = doc.get("items")
        if not isinstance(items, list):
            self._error(_Location(number), f"{kind[1]}: items must be a list")
            return
        defaults = _LIST_ITEM_DEFAULTS.get(kind)
        for i, item in enumerate(items, start=1):
            if defaults is not None and isinstance(item, Mapping):
                item = {"apiVersion": defaults[0], "kind": defaults[1], **item}
            self.add(_Location(number, i), item)

    def add(self, where: _Location, obj: object) -> None:
        if not isinstance(obj, Mapping):
            self._error(
                where, f"expected a Kubernetes object (a mapping), got {type(obj).__name__}"
            )
            return
        kind = _kind_of(obj)
        if isinstance(kind, str):
            self._error(where, kind)
            return
        if kind[1].endswith("List") and where.item is not None:
            self._error(where, f"{kind[1]} inside a List is not supported")
            return
        try:
            result = convert_object(obj)
        except ConversionError as e:
            self._error(where, str(e))
            return
        if result is None:
            self.ignored.setdefault(f"{kind[0]}/{kind[1]}", None)
        else:
            self._record(where, result)

    def _record(
        self, where: _Location, result: ServiceResult | SliceResult | SkippedObject
    ) -> None:
        kind = "Service" if isinstance(result, ServiceResult) else "EndpointSlice"
        if isinstance(result, SkippedObject):
            kind = result.kind
        origin = (kind, result.key)
        if origin in self.origins:
            first = _Location(*self.origins[origin])
            self._error(where, f"{kind} {result.key} is defined twice (also {first})")
            return
        self.origins[origin] = (where.document, where.item)
        if isinstance(result, ServiceResult):
            self.services[result.key] = result.ports
        elif isinstance(result, SliceResult):
            self.slices[result.key] = result.endpoint_slice
        else:
            self.skipped.append(result)

    def _error(self, where: _Location, message: str) -> None:
        self.errors.append(where.error(str(self.path), message))

    def build(self) -> LoadedFile:
        return LoadedFile(
            path=self.path,
            services=self.services,
            slices=self.slices,
            skipped=tuple(self.skipped),
            ignored_kinds=tuple(self.ignored),
            origins=self.origins,
        )


def load_file_collecting(path: Path) -> tuple[LoadedFile, list[ManifestError]]:
    """Load one file, returning every error in it; the file is usable only when there are none."""
    builder = _FileBuilder(path)
    try:
        documents = _read_documents(path)
    except ManifestError as e:
        return builder.build(), [e]
    for number, doc in enumerate(documents, start=1):
        builder.add_document(number, doc)
    return builder.build(), builder.errors


def load_file(path: Path) -> LoadedFile:
    """Load one manifest file; raises the first ManifestError in it."""
    loaded, errors = load_file_collecting(path)
    if errors:
        raise errors[0]
    return loaded


def is_manifest_name(name: str) -> bool:
    """Whether a directory entry is a manifest (editor droppings and hidden files are not)."""
    if name.startswith((".", "#")) or name.endswith("~"):
        return False
    return name.endswith(MANIFEST_SUFFIXES)


def list_directory(directory: Path) -> list[Path]:
    """The manifest files directly in `directory`, sorted by name (symlinks followed)."""
    with os.scandir(directory) as entries:
        names = [e.name for e in entries if is_manifest_name(e.name) and e.is_file()]
    return [directory / name for name in sorted(names)]


def expand_paths(paths: Sequence[Path]) -> tuple[list[Path], list[ManifestError]]:
    """The files `paths` stand for, in order and without repeats, and errors for bad paths."""
    files: dict[Path, None] = {}
    errors: list[ManifestError] = []
    for path in paths:
        try:
            found = list_directory(path) if path.is_dir() else [path] if path.is_file() else None
        except OSError as e:
            errors.append(ManifestError(str(path), None, f"cannot list: {e.strerror or e}"))
            continue
        if found is None:
            errors.append(ManifestError(str(path), None, "no such file or directory"))
            continue
        for file in found:
            files.setdefault(file, None)
    return list(files), errors


def merge_files(files: Iterable[LoadedFile]) -> tuple[Manifests, list[ManifestError]]:
    """The union of several files; an object defined in two files keeps the first definition."""
    merged = Manifests()
    seen: dict[tuple[str, ObjectKey], str] = {}
    errors: list[ManifestError] = []
    for loaded in files:
        duplicates: set[tuple[str, ObjectKey]] = set()
        for origin, location in loaded.origins.items():
            where = _Location(*location)
            if origin in seen:
                duplicates.add(origin)
                message = f"{origin[0]} {origin[1]} is already defined in {seen[origin]}"
                errors.append(where.error(str(loaded.path), message))
            else:
                seen[origin] = f"{loaded.path} ({where})"
        for key, ports in loaded.services.items():
            if ("Service", key) not in duplicates:
                merged.services[key] = ports
        for key, slice_ in loaded.slices.items():
            if ("EndpointSlice", key) not in duplicates:
                merged.slices[key] = slice_
    return merged, errors


def load_paths(paths: Sequence[Path]) -> tuple[dict[Path, LoadedFile], list[ManifestError]]:
    """Load every file under `paths`; returns the good files and every error found anywhere."""
    files, errors = expand_paths(paths)
    loaded: dict[Path, LoadedFile] = {}
    for path in files:
        result, file_errors = load_file_collecting(path)
        errors.extend(file_errors)
        if not file_errors:
            loaded[path] = result
    errors.extend(merge_files(loaded.values())[1])
    return loaded, errors


# --- DNS for FQDN slices ----------------------------------------------------------------------


def _address_key(ip: str) -> tuple[int, int]:
    address = ipaddress.ip_address(ip)
    return (address.version, int(address))


def _valid_ips(ips: Iterable[str]) -> tuple[str, ...]:
    unique: dict[str, None] = {}
    for ip in ips:
        with contextlib.suppress(ValueError):
            unique.setdefault(str(ipaddress.ip_address(ip)), None)
    return tuple(sorted(unique, key=_address_key))


async def resolve_host(host: str) -> list[str]:
    """Every IPv4 and IPv6 address of `host`.

    getaddrinfo blocks and cannot be interrupted. The loop's executor would make shutdown wait
    for a lookup whose DNS server never answers, so each lookup runs in a daemon thread whose
    result is simply dropped if nobody waits for it any more.
    """
    loop = asyncio.get_running_loop()
    future: asyncio.Future[list[str]] = loop.create_future()

    def deliver(result: list[str] | BaseException) -> None:
        if future.done():
            return
        if isinstance(result, BaseException):
            future.set_exception(result)
        else:
            future.set_result(result)

    def lookup() -> None:
        result: list[str] | BaseException
        try:
            infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
            result = list(_valid_ips(str(info[4][0]) for info in infos))
        except BaseException as exc:
            result = exc
        try:
            loop.call_soon_threadsafe(deliver, result)
        except RuntimeError:
            pass  # the loop is closed: uproxy is exiting and nobody needs the answer

    threading.Thread(target=lookup, name=f"resolve-{host}", daemon=True).start()
    return await future


def _resolved_family(endpoints: Iterable[SliceEndpoint]) -> AddressType:
    versions = {ipaddress.ip_address(e.addresses[0]).version for e in endpoints}
    return AddressType.IPV6 if versions == {6} else AddressType.IPV4


def resolve_slice(slice_: EndpointSlice, addresses: Mapping[str, tuple[str, ...]]) -> EndpointSlice:
    """An FQDN slice with each endpoint's name replaced by one endpoint per resolved IP.

    Only an endpoint's first address is used, as everywhere else; names not in `addresses`
    contribute nothing.
    """
    endpoints = tuple(
        replace(ep, addresses=(ip,))
        for ep in slice_.endpoints
        for ip in addresses.get(ep.addresses[0], ())
    )
    return replace(slice_, address_type=_resolved_family(endpoints), endpoints=endpoints)


def _fqdn_hosts(slices: Iterable[EndpointSlice]) -> dict[str, ObjectKey]:
    """Every name FQDN slices need, with one slice that uses it (for log messages)."""
    hosts: dict[str, ObjectKey] = {}
    for slice_ in slices:
        if slice_.address_type is AddressType.FQDN:
            for ep in slice_.endpoints:
                hosts.setdefault(ep.addresses[0], slice_.key)
    return hosts


class _DnsCache:
    """Last good resolution of every name; failures keep what was known before."""

    def __init__(self, resolver: Resolver, timeout: float) -> None:
        self._resolver = resolver
        self._timeout = timeout
        self.addresses: dict[str, tuple[str, ...]] = {}
        self._attempted: set[str] = set()
        self._failing: set[str] = set()

    async def _resolve_one(self, host: str, slice_key: ObjectKey) -> bool:
        try:
            async with asyncio.timeout(self._timeout):
                ips = _valid_ips(await self._resolver(host))
            if not ips:
                raise LookupError("no addresses")
        except Exception as e:  # any resolver failure is a lookup failure
            # Once per failure streak: a dead name would otherwise warn every refresh forever.
            report = log.debug if host in self._failing else log.warning
            report(
                "endpoint_resolve_failed", host=host, slice=str(slice_key), error=str(e) or repr(e)
            )
            self._failing.add(host)
            return False
        self._failing.discard(host)
        changed = self.addresses.get(host) != ips
        self.addresses[host] = ips
        return changed

    async def resolve(self, hosts: Mapping[str, ObjectKey], *, only_new: bool) -> bool:
        """Resolve `hosts` concurrently (only never-tried ones if `only_new`); True if changed."""
        for gone in set(self.addresses) - set(hosts):
            del self.addresses[gone]
        self._attempted &= set(hosts)
        self._failing &= set(hosts)
        todo = {h: k for h, k in hosts.items() if not (only_new and h in self._attempted)}
        self._attempted |= set(todo)
        results = await asyncio.gather(*(self._resolve_one(h, k) for h, k in todo.items()))
        return any(results)


# --- the source -------------------------------------------------------------------------------


def _log_invalid(error: ManifestError) -> None:
    item = {"item": error.item} if isinstance(error, ManifestItemError) else {}
    log.error(
        "manifest_invalid", path=error.path, document=error.document, error=error.message, **item
    )


def _signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)  # follows symlinks: ConfigMap mounts swap a `..data` symlink
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


class ManifestSource:
    """Services and EndpointSlices from manifest files and directories, polled for changes."""

    name = "manifests"

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        poll_interval: float = 0.25,
        dns_refresh: float = 10.0,
        resolver: Resolver | None = None,
    ) -> None:
        self._paths = [Path(p) for p in paths]
        # A zero or negative period from a flag would otherwise turn the loops into busy-waits.
        self._poll_interval = max(poll_interval, _MIN_PERIOD)
        self._dns_refresh = max(dns_refresh, _MIN_PERIOD)
        self._dns = _DnsCache(resolver or resolve_host, timeout=_DNS_TIMEOUT)
        self._wake = asyncio.Event()
        self._force = False
        self._dirty = True
        self._good: dict[Path, LoadedFile] = {}
        self._signatures: dict[Path, Signature | None] = {}
        self._listing: dict[Path, list[Path]] = {}
        self._missing: set[Path] = set()
        self._warned_kinds: set[str] = set()
        self._duplicate_errors: list[str] = []
        self._files: list[Path] = []
        self._delivered = Manifests()

    def refresh(self) -> None:
        self._force = True
        self._wake.set()

    async def run(self, handler: ConfigHandler) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._dns_loop())
            await self._watch(handler)

    async def _watch(self, handler: ConfigHandler) -> None:
        await self._step(handler, force=True)
        try:
            handler.source_synced(self.name)
        except Exception as e:
            log.exception("manifest_source_error", error=str(e))
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._wake.wait()
            self._wake.clear()
            force, self._force = self._force, False
            await self._step(handler, force=force)

    async def _step(self, handler: ConfigHandler, *, force: bool) -> None:
        try:
            await self._scan(handler, force=force)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("manifest_source_error", error=str(e))

    async def _dns_loop(self) -> None:
        while True:
            await asyncio.sleep(self._dns_refresh)
            try:
                if await self._dns.resolve(self._wanted_hosts(), only_new=False):
                    self._dirty = True
                    self._wake.set()
            except Exception as e:
                log.exception("manifest_source_error", error=str(e))

    # --- files

    def _list_files(self) -> list[Path]:
        files: dict[Path, None] = {}
        for path in self._paths:
            for file in self._expand(path):
                files.setdefault(file, None)
        return list(files)

    def _expand(self, path: Path) -> list[Path]:
        try:
            if path.is_dir():
                self._listing[path] = list_directory(path)
            elif path.is_file():
                self._listing[path] = [path]
            else:
                self._note_missing(path)
                return []
        except OSError as e:
            # A transient listing failure must not look like every file was deleted.
            log.error("manifest_invalid", path=str(path), document=None, error=f"cannot list: {e}")
            return self._listing.get(path, [])
        self._missing.discard(path)
        return self._listing[path]

    def _note_missing(self, path: Path) -> None:
        self._listing.pop(path, None)
        if path not in self._missing:
            self._missing.add(path)
            log.error(
                "manifest_invalid", path=str(path), document=None, error="no such file or directory"
            )

    async def _reload(self, path: Path) -> None:
        loaded, errors = await asyncio.to_thread(load_file_collecting, path)
        for error in errors:
            _log_invalid(error)
        if errors:
            return
        self._good[path] = loaded
        for kind in loaded.ignored_kinds:
            if kind not in self._warned_kinds:
                self._warned_kinds.add(kind)
                log.warning("manifest_kind_ignored", path=str(path), kind=kind)
        for skipped in loaded.skipped:
            log.info(
                "manifest_object_skipped",
                path=str(path),
                kind=skipped.kind,
                name=str(skipped.key),
                reason=skipped.reason,
            )

    async def _reload_changed(self, files: list[Path], force: bool) -> bool:
        changed = False
        for path in files:
            signature = _signature(path)
            if not force and path in self._signatures and self._signatures[path] == signature:
                continue
            self._signatures[path] = signature
            changed = True
            await self._reload(path)
        for gone in set(self._signatures) - set(files):
            del self._signatures[gone]
            self._good.pop(gone, None)
            changed = True
        return changed

    # --- state

    def _wanted_hosts(self) -> dict[str, ObjectKey]:
        return _fqdn_hosts(self._merged().slices.values())

    def _merged(self) -> Manifests:
        merged, errors = merge_files(self._good[p] for p in self._files if p in self._good)
        messages = [str(e) for e in errors]
        if messages != self._duplicate_errors:
            self._duplicate_errors = messages
            for error in errors:
                _log_invalid(error)
        return merged

    async def _scan(self, handler: ConfigHandler, *, force: bool) -> None:
        self._files = self._list_files()
        if await self._reload_changed(self._files, force):
            self._dirty = True
        if not self._dirty:
            return
        self._dirty = False
        merged = self._merged()
        hosts = _fqdn_hosts(merged.slices.values())
        await self._dns.resolve(hosts, only_new=not force)
        for key, slice_ in merged.slices.items():
            if slice_.address_type is AddressType.FQDN:
                merged.slices[key] = resolve_slice(slice_, self._dns.addresses)
        self._deliver(handler, merged)

    def _deliver(self, handler: ConfigHandler, target: Manifests) -> None:
        current = self._delivered
        if current == target:
            return
        # Record progress call by call so a failing handler is retried, not forgotten.
        self._dirty = True
        for key in sorted(current.slices.keys() - target.slices.keys()):
            handler.slice_deleted(key)
            del current.slices[key]
        for key in sorted(current.services.keys() - target.services.keys()):
            handler.service_deleted(key)
            del current.services[key]
        for key, ports in sorted(target.services.items()):
            if current.services.get(key) != ports:
                handler.service_updated(key, ports)
                current.services[key] = ports
        for key, slice_ in sorted(target.slices.items()):
            if current.slices.get(key) != slice_:
                handler.slice_updated(slice_)
                current.slices[key] = slice_
        self._dirty = False
        log.info(
            "manifests_loaded",
            files=len([p for p in self._files if p in self._good]),
            services=len(current.services),
            slices=len(current.slices),
        )
