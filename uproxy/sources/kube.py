"""The Kubernetes API source: Services and EndpointSlices followed from the API server.

One reflector per resource does what client-go's reflector does for kube-proxy: list, then watch
from the list's resourceVersion with bookmarks, resume from the last version seen when a watch
ends, relist when the server no longer has that version (410 Gone), and back off with jitter
while the server cannot be reached. Nothing is ever removed because the API is unreachable: only
a successful list or a DELETED event removes an object.

Objects are read as raw JSON and handed to the same converter the manifest source uses, so an
object behaves identically from a file or the API (and no model round-trip is paid per object).
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar, cast

import aiohttp
import structlog
from kubernetes_asyncio import client as k8s
from kubernetes_asyncio import config as k8s_config
from kubernetes_asyncio.config.config_exception import ConfigException

from uproxy import __version__
from uproxy.backoff import Backoff
from uproxy.convert import SKIP_LABELS, convert_endpoint_slice, convert_node, convert_service
from uproxy.errors import ConversionError, SettingsError
from uproxy.model import EndpointSlice, NodeInfo, ObjectKey, ServicePort
from uproxy.sources.base import ConfigHandler

log = structlog.get_logger(__name__)

# kube-proxy's informers list both resources with this selector: objects that belong to another
# proxy, or to a headless Service, are never even sent to us.
LABEL_SELECTOR = ",".join(f"!{label}" for label in sorted(SKIP_LABELS))

_BACKOFF_BASE = 0.5
_CONNECT_TIMEOUT = 10.0
_LIST_READ_TIMEOUT = 60.0
# The server closes a watch after timeoutSeconds; silence well past that means a dead connection.
_WATCH_READ_MARGIN = 30.0
# A watch that ends cleanly this fast without any event is a misbehaving server, not a timeout.
_SHORT_WATCH = 1.0

T = TypeVar("T")


# --- configuration ----------------------------------------------------------------------------


def _check_master(master: str) -> None:
    if not master.startswith(("http://", "https://")):
        raise SettingsError(f"--master: {master!r} is not an http:// or https:// URL")


def _check_kubeconfig(path: Path, context: str | None) -> None:
    """Fail at start, with a readable message, on the mistakes a typo in a flag makes."""
    if not path.is_file():
        raise SettingsError(f"--kubeconfig: {path}: no such file")
    try:
        contexts, current = k8s_config.list_kube_config_contexts(config_file=str(path))
    except Exception as e:  # the library raises anything from YAML errors to TypeError
        raise SettingsError(f"--kubeconfig: {path}: not a usable kubeconfig: {e}") from None
    names = [c.get("name") for c in contexts or () if isinstance(c, Mapping)]
    if context is not None and context not in names:
        known = ", ".join(str(n) for n in names) or "none"
        raise SettingsError(f"--context: {context!r} is not in {path} (contexts: {known})")
    if context is None and not current:
        raise SettingsError(f"--kubeconfig: {path} has no current-context; pass --context")


class _ClientConfig:
    """Where the API server is and how to authenticate, in a Configuration of our own.

    Never the library's global default: two sources (or tests) must not share credentials.
    """

    def __init__(
        self, kubeconfig: Path | None, context: str | None, master: str | None, in_cluster: bool
    ) -> None:
        self.kubeconfig = kubeconfig
        self.context = context
        self.master = master
        self.configuration = k8s.Configuration()
        if master is not None:
            _check_master(master)
        if kubeconfig is not None:
            _check_kubeconfig(kubeconfig, context)
        elif in_cluster and master is None:
            self._load_in_cluster()
        self._apply_master()

    def _load_in_cluster(self) -> None:
        try:
            # Sets a hook that re-reads the token file: bound service account tokens rotate.
            k8s_config.load_incluster_config(  # type: ignore[no-untyped-call]
                client_configuration=self.configuration
            )
        except ConfigException as e:
            raise SettingsError(f"in-cluster configuration: {e}") from None

    def _apply_master(self) -> None:
        if self.master is not None:
            self.configuration.host = self.master.rstrip("/")

    async def load(self) -> None:
        """Read the kubeconfig (again): also how rotated tokens and exec credentials are renewed."""
        if self.kubeconfig is None:
            return
        try:
            await k8s_config.load_kube_config(
                config_file=str(self.kubeconfig),
                context=self.context,
                client_configuration=self.configuration,
                persist_config=False,
            )
        except Exception as e:  # missing certificate files, failing exec plugins, ...
            raise SettingsError(f"--kubeconfig: {self.kubeconfig}: {e}") from None
        self._apply_master()

    def tls_files(self) -> str:
        c = self.configuration
        files = {"ca": c.ssl_ca_cert, "cert": c.cert_file, "key": c.key_file}
        return ", ".join(f"{k}={v}" for k, v in files.items() if v) or "(none)"

    @property
    def host(self) -> str:
        return str(self.configuration.host)


# --- errors and backoff -----------------------------------------------------------------------


class _Gone(Exception):
    """The resourceVersion we asked for is older than the server's history (410 Gone)."""


class _ApiError(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status


class _ShortWatch(Exception):
    """A watch that ended cleanly at once without any event: retried with backoff, not in a loop."""


def _status_error(status: object, default_code: int) -> Exception:
    """The exception for a metav1.Status (from an error response or a watch ERROR event)."""
    body = status if isinstance(status, Mapping) else {}
    code = body.get("code")
    code = code if isinstance(code, int) else default_code
    reason = str(body.get("message") or body.get("reason") or "no details")
    if code == 410 or body.get("reason") in ("Expired", "Gone"):
        return _Gone(reason)
    return _ApiError(code, reason)


def _reconnect_backoff(cap: float) -> Backoff:
    """Jittered, so a fleet of nodes does not reconnect in step."""
    return Backoff(_BACKOFF_BASE, max(cap, _BACKOFF_BASE), jitter=True)


# --- one resource -----------------------------------------------------------------------------

ListCall = Callable[[k8s.ApiClient], Callable[..., Awaitable[Any]]]


@dataclass(frozen=True, slots=True)
class _Resource(Generic[T]):
    """What differs between Services and EndpointSlices."""

    kind: str
    list_call: ListCall
    convert: Callable[[Mapping[str, Any]], T | None]
    updated: Callable[[ConfigHandler, ObjectKey, T], None]
    deleted: Callable[[ConfigHandler, ObjectKey], None]
    # The list and watch selector (label_selector or field_selector).
    selector: Mapping[str, str]


def _service_updated(
    handler: ConfigHandler, key: ObjectKey, ports: tuple[ServicePort, ...]
) -> None:
    handler.service_updated(key, ports)


def _slice_updated(handler: ConfigHandler, key: ObjectKey, endpoint_slice: EndpointSlice) -> None:
    handler.slice_updated(endpoint_slice)


SERVICES: _Resource[tuple[ServicePort, ...]] = _Resource(
    kind="Service",
    list_call=lambda api: k8s.CoreV1Api(api).list_service_for_all_namespaces,
    convert=convert_service,
    updated=_service_updated,
    deleted=lambda handler, key: handler.service_deleted(key),
    selector={"label_selector": LABEL_SELECTOR},
)
ENDPOINT_SLICES: _Resource[EndpointSlice] = _Resource(
    kind="EndpointSlice",
    list_call=lambda api: k8s.DiscoveryV1Api(api).list_endpoint_slice_for_all_namespaces,
    convert=convert_endpoint_slice,
    updated=_slice_updated,
    deleted=lambda handler, key: handler.slice_deleted(key),
    selector={"label_selector": LABEL_SELECTOR},
)


def _node_updated(handler: ConfigHandler, key: ObjectKey, node: NodeInfo) -> None:
    handler.node_updated(node)


def node_resource(node_name: str) -> _Resource[NodeInfo]:
    """This node's own Node object (for its topology zone), as kube-proxy watches it."""
    return _Resource(
        kind="Node",
        list_call=lambda api: k8s.CoreV1Api(api).list_node,
        convert=convert_node,
        updated=_node_updated,
        deleted=lambda handler, key: handler.node_deleted(key.name),
        selector={"field_selector": f"metadata.name={node_name}"},
    )


def _metadata(obj: object) -> Mapping[str, Any]:
    meta = obj.get("metadata") if isinstance(obj, Mapping) else None
    return meta if isinstance(meta, Mapping) else {}


def _object_key(obj: object) -> ObjectKey | None:
    meta = _metadata(obj)
    name, namespace = meta.get("name"), meta.get("namespace") or "default"
    if not isinstance(name, str) or not name or not isinstance(namespace, str):
        return None
    return ObjectKey(namespace, name)


def _resource_version(obj: object) -> str | None:
    version = _metadata(obj).get("resourceVersion")
    return version if isinstance(version, str) and version else None


class _Reflector(Generic[T]):
    """Keeps the handler in step with one resource, forever; never raises."""

    def __init__(
        self,
        resource: _Resource[T],
        client: _ClientConfig,
        api: k8s.ApiClient,
        handler: ConfigHandler,
        *,
        backoff_cap: float,
        watch_timeout: int,
    ) -> None:
        self._resource = resource
        self._client = client
        self._api = api
        self._handler = handler
        self._backoff = _reconnect_backoff(backoff_cap)
        self._watch_timeout = max(watch_timeout, 1)
        self.synced = asyncio.Event()
        # Keys the handler currently holds, so a relist can tell it what vanished meanwhile.
        self._delivered: set[ObjectKey] = set()
        self._version: str | None = None
        self._events = 0
        self._gone_in_a_row = 0
        self._step_task: asyncio.Task[None] | None = None

    @property
    def kind(self) -> str:
        return self._resource.kind

    @property
    def count(self) -> int:
        return len(self._delivered)

    def request_relist(self) -> None:
        self._version = None
        if self._step_task is not None:
            self._step_task.cancel()

    async def run(self) -> None:
        while True:
            # Each list-or-watch runs as a task of its own so that a relist request can cut a
            # watch short without cancelling the reflector.
            self._step_task = asyncio.create_task(self._step())
            try:
                await self._step_task
            except asyncio.CancelledError:
                current = asyncio.current_task()
                if current is not None and current.cancelling():
                    raise
                self._version = None
                log.info("kube_relist_requested", kind=self.kind)
            except _Gone as e:
                await self._expired(e)
            except Exception as e:
                await self._failed(e)
            finally:
                self._step_task = None

    async def _expired(self, error: _Gone) -> None:
        log.info("kube_watch_expired", kind=self.kind, version=self._version, error=str(error))
        self._version = None
        # Relist at once, as client-go does, unless the fresh list's version expired as well:
        # a server that does that every time must not be listed in a tight loop.
        self._gone_in_a_row += 1
        if self._gone_in_a_row > 1:
            await asyncio.sleep(self._backoff.next_delay())

    async def _failed(self, error: Exception) -> None:
        if isinstance(error, _ApiError) and error.status == 401:
            await self._reauthenticate()
        delay = self._backoff.next_delay()
        log.warning(
            "kube_list_error" if self._version is None else "kube_watch_error",
            kind=self.kind,
            error=str(error) or type(error).__name__,
            error_type=type(error).__name__,
            attempt=self._backoff.failures,
            retry_in=round(delay, 2),
            version=self._version,
        )
        await asyncio.sleep(delay)

    async def _reauthenticate(self) -> None:
        try:
            await self._client.load()
        except SettingsError as e:
            log.warning("kube_credentials_error", kind=self.kind, error=str(e))

    async def _step(self) -> None:
        if self._version is None:
            await self._list()
            self._backoff.reset()
            self.synced.set()
        await self._watch()

    # --- requests

    async def _request(self, read_timeout: float, **params: Any) -> aiohttp.ClientResponse:
        call = self._resource.list_call(self._api)
        timeout = aiohttp.ClientTimeout(
            connect=_CONNECT_TIMEOUT, sock_connect=_CONNECT_TIMEOUT, sock_read=read_timeout
        )
        response = await call(
            **self._resource.selector,
            _preload_content=False,
            _request_timeout=timeout,
            **params,
        )
        response = cast(aiohttp.ClientResponse, response)
        if response.status != 200:
            try:
                body = await response.read()
            finally:
                response.release()
            raise _status_error(_json_or_none(body), response.status)
        return response

    async def _list(self) -> None:
        started = time.monotonic()
        response = await self._request(_LIST_READ_TIMEOUT)
        try:
            body = json.loads(await response.read())
        finally:
            response.release()
        items, version = _list_items(body)
        seen = {key for item in items if (key := self._upsert(item)) is not None}
        for key in sorted(self._delivered - seen):
            self._remove(key)
        self._version = version
        log.info(
            "kube_list_done",
            kind=self.kind,
            items=len(items),
            delivered=len(self._delivered),
            version=version,
            duration_ms=round((time.monotonic() - started) * 1000, 2),
        )

    async def _watch(self) -> None:
        timeout = int(self._watch_timeout * (1 + random.random()))
        started, events_before = time.monotonic(), self._events
        response = await self._request(
            timeout + _WATCH_READ_MARGIN,
            watch=True,
            allow_watch_bookmarks=True,
            resource_version=self._version,
            timeout_seconds=timeout,
        )
        try:
            while line := await response.content.readline():
                if not line.endswith(b"\n"):
                    raise aiohttp.ClientPayloadError("watch stream ended inside an event")
                if line.strip():
                    self._apply(json.loads(line))
        finally:
            # Never back into the pool: the connection may be in the middle of a stream.
            response.close()
        if self._events == events_before and time.monotonic() - started < _SHORT_WATCH:
            raise _ShortWatch("the server closed the watch at once without any event")
        log.debug("kube_watch_closed", kind=self.kind, version=self._version)

    # --- events

    def _apply(self, event: object) -> None:
        if not isinstance(event, Mapping):
            raise ValueError(f"watch event is not an object: {event!r:.200}")
        kind, obj = event.get("type"), event.get("object")
        if kind == "ERROR":
            raise _status_error(obj, 500)
        self._events += 1
        self._backoff.reset()
        self._gone_in_a_row = 0
        if kind in ("ADDED", "MODIFIED"):
            self._upsert(obj)
        elif kind == "DELETED":
            key = _object_key(obj)
            if key is not None:
                self._remove(key)
        elif kind != "BOOKMARK":
            log.warning("kube_watch_event_unknown", kind=self.kind, type=str(kind))
        # Bookmarks included: resuming from them saves replaying events we filter out anyway.
        self._version = _resource_version(obj) or self._version

    def _upsert(self, obj: object) -> ObjectKey | None:
        """Deliver one object; returns its key unless it has none."""
        key = _object_key(obj)
        if key is None:
            log.error(
                "kube_object_invalid",
                kind=self.kind,
                name="<unknown>",
                field="metadata.name",
                error="is required",
            )
            return None
        try:
            converted = self._resource.convert(cast(Mapping[str, Any], obj))
        except ConversionError as e:
            # The handler keeps the previous good version; the next change may fix it.
            log.error(
                "kube_object_invalid", kind=e.kind, name=e.name, field=e.field, error=e.message
            )
            return key
        if converted is None:  # headless, ExternalName, slice of no Service: not ours
            self._remove(key)
        else:
            self._resource.updated(self._handler, key, converted)
            self._delivered.add(key)
        return key

    def _remove(self, key: ObjectKey) -> None:
        if key in self._delivered:
            self._resource.deleted(self._handler, key)
            self._delivered.discard(key)


def _json_or_none(body: bytes) -> object:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _list_items(body: object) -> tuple[list[object], str]:
    if not isinstance(body, Mapping):
        raise ValueError("list response is not an object")
    items = body.get("items") or []
    version = _resource_version(body)
    if not isinstance(items, list) or version is None:
        raise ValueError("list response without items or metadata.resourceVersion")
    return items, version


# --- the source -------------------------------------------------------------------------------


class KubeSource:
    """Services and EndpointSlices from the Kubernetes API server, as kube-proxy follows them.

    Configuration mistakes raise SettingsError, which the CLI reports as a `fatal` event (exit 1):
    those a flag can make (missing kubeconfig, unknown context, bad --master, no in-cluster
    service account) from the constructor, before anything starts; those only loading can find
    (unreadable certificates, a failing exec plugin) from `run`, before the first request.
    After that nothing is fatal: every API failure is logged and retried.
    """

    name = "kubernetes"

    def __init__(
        self,
        *,
        kubeconfig: Path | None,
        context: str | None,
        master: str | None,
        in_cluster: bool,
        node_name: str = "",
        backoff_cap: float = 30.0,
        watch_timeout: int = 300,
    ) -> None:
        self._client = _ClientConfig(kubeconfig, context, master, in_cluster)
        self._node_name = node_name
        self._backoff_cap = backoff_cap
        self._watch_timeout = watch_timeout
        self._reflectors: list[_Reflector[Any]] = []

    def refresh(self) -> None:
        """Relist both resources now (SIGHUP): a cheap way to rule out a missed event."""
        for reflector in self._reflectors:
            reflector.request_relist()

    async def run(self, handler: ConfigHandler) -> None:
        await self._client.load()
        log.info("kube_source_starting", host=self._client.host, label_selector=LABEL_SELECTOR)
        async with self._api_client() as api:
            api.user_agent = f"uproxy/{__version__}"
            proxied = [
                self._reflector(resource, api, handler) for resource in (SERVICES, ENDPOINT_SLICES)
            ]
            # The Node only refines routing (topology hints): proxying never waits for it, so a
            # role without `get nodes` still proxies, with hints ignored until the Node arrives.
            self._reflectors = [*proxied]
            if self._node_name:
                self._reflectors.append(
                    self._reflector(node_resource(self._node_name), api, handler)
                )
            try:
                async with asyncio.TaskGroup() as tasks:
                    for reflector in self._reflectors:
                        tasks.create_task(reflector.run(), name=f"kube-{reflector.kind}")
                    for reflector in proxied:
                        await reflector.synced.wait()
                    self._synced(handler)
            finally:
                self._reflectors = []

    def _api_client(self) -> k8s.ApiClient:
        try:
            return k8s.ApiClient(self._client.configuration)
        except OSError as e:  # unreadable CA, client certificate or key
            raise SettingsError(f"TLS files {self._client.tls_files()}: {e}") from None

    def _reflector(
        self, resource: _Resource[Any], api: k8s.ApiClient, handler: ConfigHandler
    ) -> _Reflector[Any]:
        return _Reflector(
            resource,
            self._client,
            api,
            handler,
            backoff_cap=self._backoff_cap,
            watch_timeout=self._watch_timeout,
        )

    def _synced(self, handler: ConfigHandler) -> None:
        counts = {r.kind: r.count for r in self._reflectors}
        log.info("kube_synced", services=counts["Service"], endpoint_slices=counts["EndpointSlice"])
        try:
            handler.source_synced(self.name)
        except Exception as e:
            log.exception("kube_source_error", error=str(e))
