"""Endpoints named by hostname (FQDN EndpointSlices), resolved to one endpoint per address.

A name that stops resolving keeps its last good addresses: a DNS hiccup must not empty a
Service.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import socket
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import replace

import structlog

from uproxy.model import AddressType, EndpointSlice, ObjectKey, ServicePort, SliceEndpoint

log = structlog.get_logger(__name__)

Resolver = Callable[[str], Awaitable[list[str]]]


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


BOTH_FAMILIES = frozenset({4, 6})


def resolve_slice(
    slice_: EndpointSlice,
    addresses: Mapping[str, tuple[str, ...]],
    families: frozenset[int] = BOTH_FAMILIES,
) -> EndpointSlice:
    """An FQDN slice with each endpoint's name replaced by one endpoint per resolved IP of
    `families` (4, 6).

    Only an endpoint's first address is used, as everywhere else; names not in `addresses`
    contribute nothing.
    """
    endpoints = tuple(
        replace(ep, addresses=(ip,))
        for ep in slice_.endpoints
        for ip in addresses.get(ep.addresses[0], ())
        if ipaddress.ip_address(ip).version in families
    )
    return replace(slice_, address_type=_resolved_family(endpoints), endpoints=endpoints)


def service_families(ports: Iterable[ServicePort]) -> frozenset[int]:
    """The families of a Service's virtual IPs; both when it has none (headless)."""
    found = frozenset(
        ipaddress.ip_address(ip).version
        for port in ports
        for ip in (*port.cluster_ips, *port.external_ips, *port.load_balancer_ips)
    )
    return found or BOTH_FAMILIES


def fqdn_families(choice: str, ports: Iterable[ServicePort]) -> frozenset[int]:
    """What `--fqdn-families` means for one Service's FQDN slices."""
    if choice == "IPv4":
        return frozenset({4})
    if choice == "IPv6":
        return frozenset({6})
    if choice == "both":
        return BOTH_FAMILIES
    return service_families(ports)


def fqdn_hosts(slices: Iterable[EndpointSlice]) -> dict[str, ObjectKey]:
    """Every name FQDN slices need, with one slice that uses it (for log messages)."""
    hosts: dict[str, ObjectKey] = {}
    for slice_ in slices:
        if slice_.address_type is AddressType.FQDN:
            for ep in slice_.endpoints:
                hosts.setdefault(ep.addresses[0], slice_.key)
    return hosts


class DnsCache:
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
