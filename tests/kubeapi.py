"""An in-process Kubernetes API server for tests: the real HTTP protocol, on loopback.

It serves Services (v1) and EndpointSlices (discovery.k8s.io/v1) the way kube-apiserver does for
list and watch: typed lists carrying metadata.resourceVersion, one global monotonically
increasing resourceVersion stamped on every write; watches replayed from a resourceVersion, with
bookmarks, ending after timeoutSeconds; an ERROR event with a 410 Expired Status for a version
older than the retained history; labelSelector filtering, where an object that stops matching is
sent as DELETED. Bearer-token authentication, TLS when given certificates.

Three ways to use it:
- `KubeApiServer`, in async tests (`async with KubeApiServer() as api`), driven by its methods;
- `ThreadedKubeApi`, from synchronous tests: the same server on its own loop in a thread;
- `python -m tests.kubeapi --port P --token T [--tls-dir D] [--fixtures F] [--kubeconfig K]`,
  a process (for example inside a network namespace), driven by `KubeApiControl` through the
  token-protected /_control API.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import contextlib
import copy
import json
import signal
import sys
import threading
import urllib.request
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml
from aiohttp import web

from tests.kubeconfig import TlsFiles, make_tls, write_kubeconfig

T = TypeVar("T")
Obj = dict[str, Any]

DEFAULT_TOKEN = "uproxy-test-token"
# kube-apiserver's --min-request-timeout: watches without timeoutSeconds end after about this.
DEFAULT_WATCH_TIMEOUT = 1800


@dataclass(frozen=True, slots=True)
class ResourceType:
    plural: str
    kind: str
    api_version: str
    prefix: str  # "/api/v1" or "/apis/GROUP/VERSION"
    namespaced: bool = True

    @property
    def list_kind(self) -> str:
        return f"{self.kind}List"


SERVICES = ResourceType("services", "Service", "v1", "/api/v1")
ENDPOINT_SLICES = ResourceType(
    "endpointslices", "EndpointSlice", "discovery.k8s.io/v1", "/apis/discovery.k8s.io/v1"
)
NODES = ResourceType("nodes", "Node", "v1", "/api/v1", namespaced=False)
RESOURCES = {r.plural: r for r in (SERVICES, ENDPOINT_SLICES, NODES)}
BY_KIND = {r.kind: r for r in (SERVICES, ENDPOINT_SLICES, NODES)}


# --- object builders (API form, as the apiserver would return them after defaulting) ----------


def make_service(
    name: str,
    ports: Sequence[Mapping[str, Any]] = ({"name": "http", "port": 80},),
    *,
    cluster_ip: str = "10.96.0.10",
    namespace: str = "default",
    labels: Mapping[str, str] | None = None,
    **spec: Any,
) -> Obj:
    body: Obj = {
        "type": "ClusterIP",
        "clusterIP": cluster_ip,
        "clusterIPs": [cluster_ip],
        "ipFamilies": ["IPv6" if ":" in cluster_ip else "IPv4"],
        "ipFamilyPolicy": "SingleStack",
        "sessionAffinity": "None",
        "internalTrafficPolicy": "Cluster",
        "ports": [{"protocol": "TCP", "targetPort": p.get("port"), **p} for p in ports],
        **spec,
    }
    if cluster_ip == "None":
        body["ipFamilies"] = ["IPv4"]
    meta: Obj = {"name": name, "namespace": namespace}
    if labels:
        meta["labels"] = dict(labels)
    return {"apiVersion": "v1", "kind": "Service", "metadata": meta, "spec": body}


def make_endpoint_slice(
    name: str,
    service: str | None,
    addresses: Sequence[str] = ("10.0.0.1",),
    *,
    ports: Sequence[Mapping[str, Any]] = ({"name": "http", "port": 8080},),
    namespace: str = "default",
    address_type: str = "IPv4",
    ready: bool = True,
    node_name: str | None = None,
    labels: Mapping[str, str] | None = None,
) -> Obj:
    all_labels = {"endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}
    if service is not None:
        all_labels["kubernetes.io/service-name"] = service
    all_labels.update(labels or {})
    endpoints: list[Obj] = []
    for address in addresses:
        endpoint: Obj = {
            "addresses": [address],
            "conditions": {"ready": ready, "serving": ready, "terminating": False},
        }
        if node_name is not None:
            endpoint["nodeName"] = node_name
        endpoints.append(endpoint)
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": namespace, "labels": all_labels},
        "addressType": address_type,
        "ports": [{"protocol": "TCP", **p} for p in ports],
        "endpoints": endpoints,
    }


# --- label selectors --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Requirement:
    key: str
    op: str  # "exists", "!exists", "=", "!="
    value: str = ""
    field: bool = False  # a field selector's (metadata.name=...), not a label's

    def matches_object(self, obj: Mapping[str, Any]) -> bool:
        if not self.field:
            return self.matches(obj.get("metadata", {}).get("labels") or {})
        value: Any = obj
        for part in self.key.split("."):
            value = value.get(part) if isinstance(value, Mapping) else None
        return self.matches({self.key: value} if value is not None else {})

    def matches(self, labels: Mapping[str, Any]) -> bool:
        match self.op:
            case "exists":
                return self.key in labels
            case "!exists":
                return self.key not in labels
            case "=":
                return labels.get(self.key) == self.value
            case _:
                return labels.get(self.key) != self.value


def parse_field_selector(text: str) -> tuple[Requirement, ...]:
    """Field selectors (`metadata.name=x`, `a!=b`), as the API server takes them."""
    requirements = parse_selector(text)
    if any(r.op not in ("=", "!=") for r in requirements):
        raise ValueError(f"unsupported field selector {text!r}")
    return tuple(Requirement(r.key, r.op, r.value, field=True) for r in requirements)


def parse_selector(text: str) -> tuple[Requirement, ...]:
    """The equality-based subset of label selectors (`a`, `!a`, `a=b`, `a==b`, `a!=b`)."""
    requirements: list[Requirement] = []
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        if any(token in part for token in ("(", ")", " in ", " notin ")):
            raise ValueError(f"unsupported selector {part!r}")
        if "!=" in part:
            key, value = part.split("!=", 1)
            requirements.append(Requirement(key.strip(), "!=", value.strip()))
        elif "=" in part:
            key, value = part.replace("==", "=").split("=", 1)
            requirements.append(Requirement(key.strip(), "=", value.strip()))
        elif part.startswith("!"):
            requirements.append(Requirement(part[1:].strip(), "!exists"))
        else:
            requirements.append(Requirement(part, "exists"))
    return tuple(requirements)


def selector_matches(requirements: Iterable[Requirement], obj: Mapping[str, Any] | None) -> bool:
    if obj is None:
        return False
    return all(r.matches_object(obj) for r in requirements)


# --- the store --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StoredEvent:
    version: int
    resource: ResourceType
    type: str  # ADDED, MODIFIED, DELETED
    obj: Obj  # the object after the write (for DELETED: its last state, at this version)
    old: Obj | None  # the object before the write, stamped with this version


def _stamp(obj: Obj, version: int) -> Obj:
    stamped = copy.deepcopy(obj)
    stamped["metadata"]["resourceVersion"] = str(version)
    return stamped


def _key(obj: Mapping[str, Any]) -> tuple[str, str]:
    meta = obj["metadata"]
    return (meta.get("namespace") or "default", meta["name"])


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _status(code: int, reason: str, message: str) -> Obj:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


def _truthy(value: str | None) -> bool:
    return value is not None and value.lower() in ("1", "true", "yes")


@dataclass(eq=False)
class _Watcher:
    resource: ResourceType
    namespace: str | None
    selector: tuple[Requirement, ...]
    bookmarks: bool
    request: web.Request
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    dropped: bool = False
    partial: bool = False


class KubeApiServer:
    """The API server. Store methods (`apply`, `delete`, ...) must run on the server's loop."""

    def __init__(
        self,
        *,
        token: str = DEFAULT_TOKEN,
        host: str = "127.0.0.1",
        port: int = 0,
        tls: TlsFiles | None = None,
        history_limit: int = 100_000,
        bookmark_interval: float = 1.0,
    ) -> None:
        self.token = token
        self.host = host
        self.port = port
        self.tls = tls
        self.history_limit = history_limit
        self.bookmark_interval = bookmark_interval
        self.objects: dict[ResourceType, dict[tuple[str, str], Obj]] = {
            r: {} for r in RESOURCES.values()
        }
        self.version = 1000
        # Watches from versions below this cannot be replayed: 410 Gone.
        self.compacted = self.version
        self._history: list[StoredEvent] = []
        self._history_versions: list[int] = []
        self._watchers: set[_Watcher] = set()
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # "list services", "watch endpointslices", ...: what clients asked for.
        self.requests: Counter[str] = Counter()
        # (verb, plural, query parameters) of every list and watch, in order.
        self.queries: list[tuple[str, str, dict[str, str]]] = []
        # plural -> HTTP status every list and watch of that resource answers with.
        self.faults: dict[str, int] = {}
        # Answer a too-old watch with HTTP 410 instead of a 200 and an ERROR event.
        self.gone_as_http = False

    # --- lifecycle

    @property
    def url(self) -> str:
        scheme = "https" if self.tls else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> KubeApiServer:
        app = web.Application()
        self._routes(app)
        # handler_cancellation: a watch whose client went away ends, as in the apiserver.
        runner = web.AppRunner(
            app, access_log=None, shutdown_timeout=1.0, handler_cancellation=True
        )
        await runner.setup()
        ssl_context = self.tls.server_context() if self.tls else None
        site = web.TCPSite(
            runner, self.host, self.port, ssl_context=ssl_context, reuse_address=True
        )
        await site.start()
        self.port = int(runner.addresses[0][1])
        self._runner = runner
        return self

    async def stop(self) -> None:
        """Go away as a crashed apiserver does: open watches are cut, connections refused."""
        for watcher in list(self._watchers):
            watcher.dropped = True
            watcher.wake.set()
            transport = watcher.request.transport
            if transport is not None:
                transport.abort()
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def outage(self, seconds: float, *, compact: bool = False) -> None:
        """Down for `seconds`, then back on the same port (with its history gone if `compact`)."""
        await self.stop()
        await asyncio.sleep(seconds)
        if compact:
            self.compact()
        await self.start()

    def schedule(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` in the background, owned by the server (cancelled by `close`)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.stop()

    async def __aenter__(self) -> KubeApiServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # --- the store

    def apply(self, obj: Mapping[str, Any]) -> Obj:
        """Create or replace an object; returns it as stored (with its new resourceVersion)."""
        resource = BY_KIND[obj["kind"]]
        new = copy.deepcopy(dict(obj))
        new["apiVersion"] = resource.api_version
        meta = new.setdefault("metadata", {})
        if resource.namespaced:
            meta.setdefault("namespace", "default")
        key = _key(new)
        old = self.objects[resource].get(key)
        self.version += 1
        meta["resourceVersion"] = str(self.version)
        if old is None:
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = _now()
            meta["generation"] = 1
        else:
            meta["uid"] = old["metadata"]["uid"]
            meta["creationTimestamp"] = old["metadata"]["creationTimestamp"]
            meta["generation"] = int(old["metadata"].get("generation", 1)) + 1
        self.objects[resource][key] = new
        self._record(resource, "MODIFIED" if old else "ADDED", new, old)
        return copy.deepcopy(new)

    def delete(self, kind: str, namespace: str, name: str) -> Obj | None:
        resource = BY_KIND.get(kind) or RESOURCES[kind]
        old = self.objects[resource].pop((namespace, name), None)
        if old is None:
            return None
        self.version += 1
        self._record(resource, "DELETED", _stamp(old, self.version), old)
        return old

    def compact(self) -> None:
        """Forget all history, as etcd compaction does: older watches get 410 Gone."""
        self._history.clear()
        self._history_versions.clear()
        self.compacted = self.version
        for watcher in self._watchers:
            watcher.wake.set()

    def drop_watches(self, *, partial: bool = True) -> int:
        """Cut every open watch mid-stream (after half an event if `partial`); how many."""
        for watcher in self._watchers:
            watcher.dropped = True
            watcher.partial = partial
            watcher.wake.set()
        return len(self._watchers)

    @property
    def open_watches(self) -> int:
        return len(self._watchers)

    def fail(self, plural: str, status: int) -> None:
        self.faults[plural] = status

    def heal(self, plural: str | None = None) -> None:
        if plural is None:
            self.faults.clear()
        else:
            self.faults.pop(plural, None)

    def _record(self, resource: ResourceType, kind: str, obj: Obj, old: Obj | None) -> None:
        stamped_old = _stamp(old, self.version) if old is not None else None
        self._history.append(StoredEvent(self.version, resource, kind, obj, stamped_old))
        self._history_versions.append(self.version)
        if len(self._history) > self.history_limit:
            drop = len(self._history) - self.history_limit // 2
            self.compacted = self._history_versions[drop - 1]
            del self._history[:drop]
            del self._history_versions[:drop]
        for watcher in self._watchers:
            watcher.wake.set()

    def _events_after(self, version: int) -> list[StoredEvent]:
        return self._history[bisect.bisect_right(self._history_versions, version) :]

    # --- HTTP

    def _routes(self, app: web.Application) -> None:
        for resource in RESOURCES.values():
            handler = self._collection(resource)
            app.router.add_get(f"{resource.prefix}/{resource.plural}", handler)
            app.router.add_get(
                f"{resource.prefix}/namespaces/{{namespace}}/{resource.plural}", handler
            )
        app.router.add_post("/_control/objects", self._control_apply)
        app.router.add_delete("/_control/objects/{plural}/{namespace}/{name}", self._control_delete)
        app.router.add_post("/_control/drop-watches", self._control_drop)
        app.router.add_post("/_control/compact", self._control_compact)
        app.router.add_post("/_control/outage", self._control_outage)
        app.router.add_get("/_control/state", self._control_state)

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.token}"

    def _collection(
        self, resource: ResourceType
    ) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def handle(request: web.Request) -> web.StreamResponse:
            if not self._authorized(request):
                self.requests["unauthorized"] += 1
                return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
            query = request.query
            watch = _truthy(query.get("watch"))
            verb = "watch" if watch else "list"
            self.requests[f"{verb} {resource.plural}"] += 1
            self.queries.append((verb, resource.plural, dict(query)))
            if resource.plural in self.faults:
                code = self.faults[resource.plural]
                return web.json_response(_status(code, "InternalError", "injected"), status=code)
            try:
                selector = parse_selector(query.get("labelSelector", ""))
                selector += parse_field_selector(query.get("fieldSelector", ""))
            except ValueError as e:
                return web.json_response(_status(400, "BadRequest", str(e)), status=400)
            namespace = request.match_info.get("namespace")
            if watch:
                return await self._watch(request, resource, namespace, selector)
            return web.json_response(self._list(resource, namespace, selector))

        return handle

    def _matching(
        self, resource: ResourceType, namespace: str | None, selector: tuple[Requirement, ...]
    ) -> list[Obj]:
        return [
            obj
            for (ns, _), obj in sorted(self.objects[resource].items())
            if (namespace is None or ns == namespace) and selector_matches(selector, obj)
        ]

    def _list(
        self, resource: ResourceType, namespace: str | None, selector: tuple[Requirement, ...]
    ) -> Obj:
        # List items leave out kind and apiVersion, as the real API does.
        items = [
            {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
            for obj in self._matching(resource, namespace, selector)
        ]
        return {
            "kind": resource.list_kind,
            "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": str(self.version)},
            "items": items,
        }

    async def _watch(
        self,
        request: web.Request,
        resource: ResourceType,
        namespace: str | None,
        selector: tuple[Requirement, ...],
    ) -> web.StreamResponse:
        query = request.query
        version = query.get("resourceVersion") or None
        since = None if version in (None, "0") else int(version)
        if since is not None and since < self.compacted and self.gone_as_http:
            status = _status(410, "Expired", f"too old resource version: {since}")
            return web.json_response(status, status=410)
        timeout = int(query.get("timeoutSeconds") or DEFAULT_WATCH_TIMEOUT)
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        watcher = _Watcher(
            resource, namespace, selector, _truthy(query.get("allowWatchBookmarks")), request
        )
        self._watchers.add(watcher)
        try:
            await self._stream(watcher, response, since, timeout)
        except ConnectionError:
            watcher.dropped = True
        finally:
            self._watchers.discard(watcher)
        if not watcher.dropped:
            with contextlib.suppress(ConnectionError):
                await response.write_eof()
        return response

    async def _stream(
        self, watcher: _Watcher, response: web.StreamResponse, since: int | None, duration: int
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + duration
        next_bookmark = loop.time() + self.bookmark_interval
        if since is None:  # "any version": the current state as ADDED events first
            for obj in self._matching(watcher.resource, watcher.namespace, watcher.selector):
                await _send(response, "ADDED", obj)
            since = self.version
        while True:
            watcher.wake.clear()
            if since < self.compacted:
                status = _status(410, "Expired", f"too old resource version: {since}")
                await _send(response, "ERROR", status)
                return
            events, current = self._events_after(since), self.version
            for event in events:
                visible = self._visible(watcher, event)
                if visible is not None:
                    await _send(response, *visible)
            since = current
            if watcher.dropped:
                await self._drop(watcher, response)
                return
            now = loop.time()
            if now >= deadline:
                return
            if watcher.bookmarks and now >= next_bookmark:
                await _send(response, "BOOKMARK", self._bookmark(watcher.resource, since))
                next_bookmark = now + self.bookmark_interval
            wait = deadline - now
            if watcher.bookmarks:
                wait = min(wait, max(next_bookmark - now, 0.0))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await watcher.wake.wait()

    @staticmethod
    async def _drop(watcher: _Watcher, response: web.StreamResponse) -> None:
        if watcher.partial:
            await response.write(b'{"type":"MODIFIED","object":{"metadata":{"na')
        transport = watcher.request.transport
        if transport is not None:
            transport.close()  # close, not abort: the half event must still go out

    @staticmethod
    def _bookmark(resource: ResourceType, version: int) -> Obj:
        return {
            "kind": resource.kind,
            "apiVersion": resource.api_version,
            "metadata": {"resourceVersion": str(version)},
        }

    @staticmethod
    def _visible(watcher: _Watcher, event: StoredEvent) -> tuple[str, Obj] | None:
        """What this watcher sees of `event`, given its namespace and label selector."""
        if event.resource is not watcher.resource:
            return None
        if watcher.namespace is not None and _key(event.obj)[0] != watcher.namespace:
            return None
        old_matches = selector_matches(watcher.selector, event.old)
        if event.type == "DELETED":
            return ("DELETED", event.obj) if old_matches else None
        if selector_matches(watcher.selector, event.obj):
            return ("MODIFIED" if old_matches else "ADDED", event.obj)
        if old_matches and event.old is not None:
            return ("DELETED", event.old)  # it left the selection: gone, as far as this watch is
        return None

    # --- control API (for a server in another process)

    async def _control(
        self, request: web.Request, action: Callable[[Any], Any]
    ) -> web.StreamResponse:
        if not self._authorized(request):
            return web.json_response(_status(401, "Unauthorized", "Unauthorized"), status=401)
        body = await request.json() if request.can_read_body else None
        return web.json_response(action(body))

    async def _control_apply(self, request: web.Request) -> web.StreamResponse:
        def apply(body: Any) -> Any:
            items = body.get("items", [body])
            return {"items": [self.apply(item) for item in items]}

        return await self._control(request, apply)

    async def _control_delete(self, request: web.Request) -> web.StreamResponse:
        info = request.match_info
        return await self._control(
            request, lambda _: self.delete(info["plural"], info["namespace"], info["name"])
        )

    async def _control_drop(self, request: web.Request) -> web.StreamResponse:
        return await self._control(request, lambda body: self.drop_watches(**(body or {})))

    async def _control_compact(self, request: web.Request) -> web.StreamResponse:
        return await self._control(request, lambda _: self.compact())

    async def _control_outage(self, request: web.Request) -> web.StreamResponse:
        def outage(body: Any) -> Any:
            # After the reply: the request that asks for the outage must still get an answer.
            self.schedule(self.outage(float(body["seconds"]), compact=bool(body.get("compact"))))
            return {"scheduled": True}

        return await self._control(request, outage)

    async def _control_state(self, request: web.Request) -> web.StreamResponse:
        return await self._control(
            request,
            lambda _: {
                "version": self.version,
                "requests": dict(self.requests),
                "open_watches": self.open_watches,
            },
        )


async def _send(response: web.StreamResponse, kind: str, obj: Mapping[str, Any]) -> None:
    line = json.dumps({"type": kind, "object": obj}, separators=(",", ":")) + "\n"
    await response.write(line.encode())


# --- from synchronous tests -------------------------------------------------------------------


class ThreadedKubeApi:
    """A KubeApiServer on its own event loop in a thread, with blocking methods."""

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self.server: KubeApiServer

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        async def call() -> T:
            return fn(*args, **kwargs)

        return self._run(call())

    def __enter__(self) -> ThreadedKubeApi:
        self._thread.start()

        async def create() -> KubeApiServer:
            return await KubeApiServer(**self._kwargs).start()

        self.server = self._run(create())
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            self._run(self.server.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def token(self) -> str:
        return self.server.token

    def apply(self, obj: Mapping[str, Any]) -> Obj:
        return self._call(self.server.apply, obj)

    def apply_all(self, objs: Iterable[Mapping[str, Any]]) -> None:
        items = list(objs)
        self._call(lambda: [self.server.apply(o) for o in items])

    def delete(self, kind: str, namespace: str, name: str) -> Obj | None:
        return self._call(self.server.delete, kind, namespace, name)

    def drop_watches(self, *, partial: bool = True) -> int:
        return self._call(self.server.drop_watches, partial=partial)

    def compact(self) -> None:
        self._call(self.server.compact)

    def stop(self) -> None:
        self._run(self.server.stop())

    def start(self) -> None:
        self._run(self.server.start())

    def requests(self) -> Counter[str]:
        return self._call(lambda: Counter(self.server.requests))

    def open_watches(self) -> int:
        return self._call(lambda: self.server.open_watches)


# --- a server in another process --------------------------------------------------------------


class KubeApiControl:
    """Drives `python -m tests.kubeapi` through its /_control API (blocking, stdlib only)."""

    def __init__(self, url: str, token: str, ca: Path | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self._context = None
        if ca is not None:
            import ssl

            self._context = ssl.create_default_context(cafile=str(ca))

    def _request(self, method: str, path: str, body: object = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            self.url + path,
            data=data,
            method=method,
            headers={"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=10, context=self._context) as response:
            return json.loads(response.read())

    def apply(self, *objs: Mapping[str, Any]) -> Any:
        return self._request("POST", "/_control/objects", {"items": list(objs)})

    def delete(self, plural: str, namespace: str, name: str) -> Any:
        return self._request("DELETE", f"/_control/objects/{plural}/{namespace}/{name}")

    def drop_watches(self, *, partial: bool = True) -> Any:
        return self._request("POST", "/_control/drop-watches", {"partial": partial})

    def compact(self) -> Any:
        return self._request("POST", "/_control/compact")

    def outage(self, seconds: float, *, compact: bool = False) -> Any:
        return self._request("POST", "/_control/outage", {"seconds": seconds, "compact": compact})

    def state(self) -> Any:
        return self._request("GET", "/_control/state")


def load_fixtures(paths: Iterable[Path]) -> list[Obj]:
    """Objects from YAML/JSON files (documents, or `items` of List documents)."""
    objects: list[Obj] = []
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict):
                objects.extend(doc.get("items", [doc]))
    return objects


async def _serve(args: argparse.Namespace) -> None:
    hosts = dict.fromkeys([args.host, "127.0.0.1", "localhost"])
    tls = make_tls(args.tls_dir, hosts=list(hosts)) if args.tls_dir else None
    server = KubeApiServer(
        token=args.token,
        host=args.host,
        port=args.port,
        tls=tls,
        bookmark_interval=args.bookmark_interval,
    )
    for obj in load_fixtures(args.fixtures):
        server.apply(obj)
    await server.start()
    if args.kubeconfig:
        write_kubeconfig(args.kubeconfig, server.url, server.token, ca=tls.ca if tls else None)
    ready = {"event": "kubeapi_ready", "url": server.url, "port": server.port}
    print(json.dumps(ready), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await server.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.kubeapi", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", default=DEFAULT_TOKEN)
    parser.add_argument("--tls-dir", type=Path, help="Serve HTTPS with a CA generated here.")
    parser.add_argument("--fixtures", type=Path, nargs="*", default=[])
    parser.add_argument("--kubeconfig", type=Path, help="Write a kubeconfig for this server.")
    parser.add_argument("--bookmark-interval", type=float, default=1.0)
    asyncio.run(_serve(parser.parse_args(argv)))


if __name__ == "__main__":
    main(sys.argv[1:])
