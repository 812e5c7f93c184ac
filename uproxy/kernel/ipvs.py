"""The kernel's IP Virtual Server as uproxy uses it: one small interface, one real backend.

Two interfaces, both blocking (callers run them in the netlink worker thread, see `Worker`):

* `Ipvs`: virtual servers (TCP/UDP, addressed by IP and port) and their real servers, with the
  connection counts the kernel keeps for each real server.
* `IpvsHost`: the dummy interface that holds the virtual addresses, the node's own addresses
  (for NodePorts) and the sysctls IPVS forwarding needs.

`NetlinkIpvs` implements both with pyroute2 (IPVS generic netlink, rtnetlink through IPRoute).
Facts about pyroute2 this module is built around, each measured:

* pyroute2's netlink sockets cannot be opened on a uvloop loop ("invalid family 16"), and a
  socket remembers the thread that created it and refuses use from another. So every socket
  lives in ONE dedicated worker thread, is created there on first use and closed there; every
  public method of `NetlinkIpvs` hops into that thread (or runs directly when already on it).
* `IPVSDest` defaults to direct routing (fwd_method 3); uproxy needs masquerading (0).
  `IPVSService` defaults to the wlc scheduler. Both are always given explicitly here.
* The verb for changes is "set" ("update" is mapped to the delete command in pyroute2 0.9).
* `IPVSService.from_message` mangles flags and timeout, so dumps are parsed from the raw
  attributes here.
* For an IPv6 service the kernel wants the netmask attribute to be the prefix length as a host
  order u32 (what ipvsadm sends), which pyroute2's ip4addr encoding spells "128.0.0.0".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import ipaddress
import os
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec, Protocol, TypeVar

import structlog

from uproxy import model
from uproxy.errors import KernelError
from uproxy.kernel.netfilter import Family

log = structlog.get_logger(__name__)

DUMMY_INTERFACE = "uproxy-ipvs0"
PROC_IPVS = Path("/proc/net/ip_vs")
SCHEDULERS = ("rr", "lc", "wlc", "sh", "dh", "sed", "nq", "mh")

_FWD_MASQ = 0  # IP_VS_CONN_F_MASQ
_IFA_F_NODAD = 0x02
_SVC_F_PERSISTENT = 0x1
_ALL_FLAGS = 0xFFFFFFFF
_PROTO_NUMBERS = {model.Protocol.TCP: socket.IPPROTO_TCP, model.Protocol.UDP: socket.IPPROTO_UDP}
_PROTOCOLS = {number: proto for proto, number in _PROTO_NUMBERS.items()}
# A firewall-mark virtual server with this mark is created and deleted at start to ask the kernel
# whether it has a scheduler; a mark keeps the probe clear of every address-based server.
_PROBE_MARK = 0x75707876  # "upxv"

P = ParamSpec("P")
T = TypeVar("T")


class IpvsError(KernelError):
    """The kernel refused an IPVS or link operation; `code` is the errno."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


# -- the data the interfaces speak -------------------------------------------------------------


def _host(ip: str) -> str:
    return f"[{ip}]" if ":" in ip else ip


def ip_family(ip: str) -> Family:
    return 4 if ipaddress.ip_address(ip).version == 4 else 6


@dataclass(frozen=True, slots=True, order=True)
class VirtualServer:
    """A virtual service as IPVS keys it: protocol, virtual address, port."""

    protocol: model.Protocol
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.protocol.value} {_host(self.ip)}:{self.port}"


@dataclass(frozen=True, slots=True, order=True)
class RealServer:
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{_host(self.ip)}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServiceConfig:
    """What uproxy sets on a virtual server besides its key."""

    scheduler: str
    persistence: int | None = None  # ClientIP persistence timeout in seconds; None: none


@dataclass(frozen=True, slots=True)
class ServiceInfo:
    """A virtual server as the kernel reports it."""

    config: ServiceConfig
    connections: int = 0  # connections scheduled since it was created
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True, slots=True)
class DestInfo:
    """A real server as the kernel reports it."""

    weight: int
    masquerade: bool = True  # forwarding method; uproxy only ever uses masquerading
    active: int = 0  # ESTABLISHED (TCP) connections
    inactive: int = 0  # every other state, UDP entries and TIME_WAIT included
    persistent: int = 0  # persistence templates pointing here (ClientIP affinity)
    connections: int = 0  # connections scheduled to it since it was added
    bytes_in: int = 0
    bytes_out: int = 0

    @property
    def open(self) -> int:
        """Connections the kernel still tracks for it (what graceful termination waits for)."""
        return self.active + self.inactive


class Ipvs(Protocol):
    """Virtual servers and real servers. Every method blocks; KernelError when refused."""

    def services(self) -> dict[VirtualServer, ServiceInfo]:
        """Every IP-addressed TCP/UDP virtual server in this network namespace, uproxy's or not."""

    def dests(self, vs: VirtualServer) -> dict[RealServer, DestInfo]:
        """The real servers of `vs` with their connection counts; IpvsError ESRCH if no `vs`."""

    def add_service(self, vs: VirtualServer, config: ServiceConfig) -> None:
        """Create `vs`; IpvsError EEXIST if it exists, ENOENT if the scheduler is unknown."""

    def set_service(self, vs: VirtualServer, config: ServiceConfig) -> None:
        """Change the scheduler/persistence of `vs` in place; its real servers stay."""

    def delete_service(self, vs: VirtualServer) -> None:
        """Delete `vs` and its real servers; a missing `vs` is not an error."""

    def add_dest(self, vs: VirtualServer, rs: RealServer, weight: int) -> None:
        """Add masqueraded real server `rs` to `vs`; IpvsError EEXIST if there, ESRCH if no
        `vs`."""

    def set_dest(self, vs: VirtualServer, rs: RealServer, weight: int) -> None:
        """Set the weight of `rs` (and masquerading); IpvsError ENOENT if it is not there."""

    def delete_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        """Delete `rs` from `vs`; missing is not an error."""


class IpvsHost(Protocol):
    """The addresses and settings around IPVS. Every method blocks; KernelError when refused."""

    def ensure_dummy(self, name: str) -> None:
        """Create the dummy interface `name` unless it exists, and set it up."""

    def delete_dummy(self, name: str) -> bool:
        """Delete interface `name` (its addresses go with it); whether it existed."""

    def dummy_addresses(self, name: str) -> set[str]:
        """The addresses on interface `name` (link-local ones aside); empty when it does not
        exist."""

    def add_address(self, name: str, ip: str) -> None:
        """Put `ip` (/32 or /128) on interface `name`; already there is not an error."""

    def delete_address(self, name: str, ip: str) -> None:
        """Remove `ip` from interface `name`; not there is not an error."""

    def node_addresses(self, exclude: str) -> list[str]:
        """Every unicast address on the node's interfaces except `exclude`, loopback and
        IPv6 link-local ones."""

    def read_sysctl(self, key: str) -> str | None:
        """The value of sysctl `key` (net.ipv4.vs.conntrack), None when it does not exist."""

    def write_sysctl(self, key: str, value: str) -> None:
        """Set sysctl `key`."""


# -- the worker thread -------------------------------------------------------------------------


class Worker:
    """The one thread that owns every pyroute2 socket (they are tied to the thread that opened
    them and cannot be opened on a uvloop loop). Blocking kernel work is queued to it in order,
    so two syncs, or a sync and the graceful-termination reaper, never interleave."""

    def __init__(self, name: str = "uproxy-netlink") -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name, initializer=self._started
        )
        self._ident: int | None = None
        self._closers: list[Callable[[], None]] = []

    def _started(self) -> None:
        self._ident = threading.get_ident()

    @property
    def on_worker(self) -> bool:
        return self._ident == threading.get_ident()

    def call(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `func` on the worker and wait for it (directly when already on the worker)."""
        if self.on_worker:
            return func(*args, **kwargs)
        return self._executor.submit(func, *args, **kwargs).result()

    async def run(self, func: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `func` on the worker without blocking the event loop. A cancelled caller still
        waits for it to finish, so whatever runs next never races a write still in flight."""
        future = asyncio.wrap_future(self._executor.submit(func, *args, **kwargs))
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await future
            raise

    def on_close(self, closer: Callable[[], None]) -> None:
        """Run `closer` on the worker when it is closed (to close the sockets opened there)."""
        self._closers.append(closer)

    def close(self) -> None:
        """Close what was opened on the worker, there, and stop the thread. Idempotent."""
        closers, self._closers = self._closers, []
        for closer in closers:
            with contextlib.suppress(Exception):
                self.call(closer)
        self._executor.shutdown(wait=True)


# -- pyroute2 ----------------------------------------------------------------------------------


def _netlink_error(exc: Exception, what: str) -> IpvsError:
    code = getattr(exc, "code", None)
    if not isinstance(code, int):
        code = getattr(exc, "errno", None) or errno.EIO
    return IpvsError(f"{what}: {os.strerror(code)} (errno {code})", code)


def _attr(nla: Any, name: str, default: Any = None) -> Any:
    value = nla.get(name)
    return default if value is None else value


def _stats(nla: Any, prefix: str) -> tuple[int, int, int]:
    stats = nla.get(f"{prefix}STATS64") or nla.get(f"{prefix}STATS")
    if stats is None:
        return (0, 0, 0)
    return (
        int(_attr(stats, "IPVS_STATS_ATTR_CONNS", 0)),
        int(_attr(stats, "IPVS_STATS_ATTR_INBYTES", 0)),
        int(_attr(stats, "IPVS_STATS_ATTR_OUTBYTES", 0)),
    )


def _sysctl_path(key: str) -> Path:
    return Path("/proc/sys", *key.split("."))


class NetlinkIpvs:
    """`Ipvs` and `IpvsHost` through pyroute2, every call on the `Worker` thread."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self._ipvs_socket: Any = None
        self._ipr_socket: Any = None
        worker.on_close(self._close_sockets)

    # The sockets: created on first use, on the worker, and only ever used there.

    def _ipvs(self) -> Any:
        if self._ipvs_socket is None:
            from pyroute2 import IPVS

            try:
                self._ipvs_socket = IPVS()
            except Exception as exc:  # no IPVS family: NetlinkError, OSError, ValueError ...
                raise IpvsError(
                    f"cannot open the IPVS netlink family: {exc}", errno.EAFNOSUPPORT
                ) from None
        return self._ipvs_socket

    def _ipr(self) -> Any:
        if self._ipr_socket is None:
            from pyroute2 import IPRoute

            self._ipr_socket = IPRoute()
        return self._ipr_socket

    def _close_sockets(self) -> None:
        for sock in (self._ipvs_socket, self._ipr_socket):
            if sock is not None:
                with contextlib.suppress(Exception):
                    sock.close()
        self._ipvs_socket = self._ipr_socket = None

    def _do(self, what: str, func: Callable[[], T], ok: tuple[int, ...] = ()) -> T | None:
        """Run one netlink request; errno in `ok` counts as success (None)."""
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            return func()
        except NetlinkError as exc:
            if exc.code in ok:
                return None
            raise _netlink_error(exc, what) from None
        except OSError as exc:
            raise _netlink_error(exc, what) from None

    # -- requests ---------------------------------------------------------------------------

    @staticmethod
    def _service(vs: VirtualServer, config: ServiceConfig | None = None) -> Any:
        from pyroute2 import IPVSService

        fields: dict[str, Any] = {
            "addr": vs.ip,
            "port": vs.port,
            "protocol": _PROTO_NUMBERS[vs.protocol],
        }
        if config is not None:
            fields |= _config_fields(config, ip_family(vs.ip))
        return IPVSService(**fields)

    @staticmethod
    def _dest(rs: RealServer, weight: int) -> Any:
        from pyroute2 import IPVSDest

        return IPVSDest(addr=rs.ip, port=rs.port, fwd_method=_FWD_MASQ, weight=weight)

    # -- Ipvs -------------------------------------------------------------------------------

    def services(self) -> dict[VirtualServer, ServiceInfo]:
        return self._worker.call(self._services)

    def _services(self) -> dict[VirtualServer, ServiceInfo]:
        messages = self._do("dump virtual servers", lambda: list(self._ipvs().service("dump")))
        out: dict[VirtualServer, ServiceInfo] = {}
        for message in messages or ():
            nla = message.get("IPVS_CMD_ATTR_SERVICE")
            if nla is None:
                continue
            proto = _PROTOCOLS.get(_attr(nla, "IPVS_SVC_ATTR_PROTOCOL", 0))
            addr = nla.get("IPVS_SVC_ATTR_ADDR")
            if proto is None or addr is None:
                continue  # firewall-mark and SCTP services: never uproxy's
            flags = _attr(nla, "IPVS_SVC_ATTR_FLAGS", {}).get("flags", 0)
            persistent = bool(flags & _SVC_F_PERSISTENT)
            config = ServiceConfig(
                scheduler=_attr(nla, "IPVS_SVC_ATTR_SCHED_NAME", ""),
                persistence=int(_attr(nla, "IPVS_SVC_ATTR_TIMEOUT", 0)) if persistent else None,
            )
            conns, bytes_in, bytes_out = _stats(nla, "IPVS_SVC_ATTR_")
            vs = VirtualServer(
                proto, str(ipaddress.ip_address(addr)), int(nla.get("IPVS_SVC_ATTR_PORT"))
            )
            out[vs] = ServiceInfo(config, conns, bytes_in, bytes_out)
        return out

    def dests(self, vs: VirtualServer) -> dict[RealServer, DestInfo]:
        return self._worker.call(self._dests, vs)

    def _dests(self, vs: VirtualServer) -> dict[RealServer, DestInfo]:
        service = self._service(vs)
        messages = self._do(
            f"dump real servers of {vs}", lambda: list(self._ipvs().dest("dump", service=service))
        )
        out: dict[RealServer, DestInfo] = {}
        for message in messages or ():
            nla = message.get("IPVS_CMD_ATTR_DEST")
            if nla is None:
                continue
            conns, bytes_in, bytes_out = _stats(nla, "IPVS_DEST_ATTR_")
            rs = RealServer(
                str(ipaddress.ip_address(nla.get("IPVS_DEST_ATTR_ADDR"))),
                int(nla.get("IPVS_DEST_ATTR_PORT")),
            )
            out[rs] = DestInfo(
                weight=int(_attr(nla, "IPVS_DEST_ATTR_WEIGHT", 0)),
                masquerade=_attr(nla, "IPVS_DEST_ATTR_FWD_METHOD", 0) & 0x7 == _FWD_MASQ,
                active=int(_attr(nla, "IPVS_DEST_ATTR_ACTIVE_CONNS", 0)),
                inactive=int(_attr(nla, "IPVS_DEST_ATTR_INACT_CONNS", 0)),
                persistent=int(_attr(nla, "IPVS_DEST_ATTR_PERSIST_CONNS", 0)),
                connections=conns,
                bytes_in=bytes_in,
                bytes_out=bytes_out,
            )
        return out

    def add_service(self, vs: VirtualServer, config: ServiceConfig) -> None:
        service = self._service(vs, config)
        self._worker.call(
            self._do,
            f"add virtual server {vs}",
            lambda: self._ipvs().service("add", service=service),
        )

    def set_service(self, vs: VirtualServer, config: ServiceConfig) -> None:
        service = self._service(vs, config)
        self._worker.call(
            self._do,
            f"set virtual server {vs}",
            lambda: self._ipvs().service("set", service=service),
        )

    def delete_service(self, vs: VirtualServer) -> None:
        service = self._service(vs)
        self._worker.call(
            self._do,
            f"delete virtual server {vs}",
            lambda: self._ipvs().service("del", service=service),
            (errno.ESRCH, errno.ENOENT),
        )

    def add_dest(self, vs: VirtualServer, rs: RealServer, weight: int) -> None:
        service, dest = self._service(vs), self._dest(rs, weight)
        self._worker.call(
            self._do,
            f"add real server {rs} to {vs}",
            lambda: self._ipvs().dest("add", service=service, dest=dest),
        )

    def set_dest(self, vs: VirtualServer, rs: RealServer, weight: int) -> None:
        service, dest = self._service(vs), self._dest(rs, weight)
        self._worker.call(
            self._do,
            f"set real server {rs} of {vs}",
            lambda: self._ipvs().dest("set", service=service, dest=dest),
        )

    def delete_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        service, dest = self._service(vs), self._dest(rs, 0)
        self._worker.call(
            self._do,
            f"delete real server {rs} of {vs}",
            lambda: self._ipvs().dest("del", service=service, dest=dest),
            (errno.ESRCH, errno.ENOENT),
        )

    # -- capability checks ------------------------------------------------------------------

    def available(self) -> str | None:
        """None when the kernel has IPVS, else why not. Opening the IPVS netlink family makes
        the kernel load ip_vs on demand where it can (its module carries the family alias)."""
        if PROC_IPVS.exists():
            return None
        try:
            self._worker.call(self._ipvs)
        except KernelError as exc:
            log.debug("ipvs_unavailable", error=str(exc))
            return f"no {PROC_IPVS} and no IPVS netlink family"
        return None if PROC_IPVS.exists() else f"no {PROC_IPVS}"

    def scheduler_available(self, scheduler: str) -> bool:
        """Ask the kernel itself: create and delete a firewall-mark virtual server with the
        scheduler. The kernel loads ip_vs_<scheduler> on demand when it can."""
        return self._worker.call(self._probe_scheduler, scheduler)

    def _probe_scheduler(self, scheduler: str) -> bool:
        from pyroute2 import IPVSService
        from pyroute2.netlink.exceptions import NetlinkError

        for mark in (_PROBE_MARK, _PROBE_MARK + 1, _PROBE_MARK + 2):
            probe = IPVSService(
                af=socket.AF_INET,
                fwmark=mark,
                sched_name=scheduler,
                netmask="255.255.255.255",
                flags={"flags": 0, "mask": _ALL_FLAGS},
                timeout=0,
            )
            try:
                self._ipvs().service("add", service=probe)
            except NetlinkError as exc:
                if exc.code == errno.EEXIST:
                    continue  # someone else's mark: try the next one
                if exc.code == errno.ENOENT:
                    return False
                raise _netlink_error(exc, f"probe scheduler {scheduler}") from None
            try:
                self._ipvs().service("del", service=probe)
            except NetlinkError as exc:
                raise _netlink_error(exc, "delete the scheduler probe") from None
            return True
        raise IpvsError("cannot probe IPVS schedulers: firewall marks in use", errno.EEXIST)

    # -- IpvsHost ---------------------------------------------------------------------------

    def _index(self, name: str) -> int | None:
        found = self._do(f"look up {name}", lambda: self._ipr().link_lookup(ifname=name))
        return int(found[0]) if found else None

    def ensure_dummy(self, name: str) -> None:
        self._worker.call(self._ensure_dummy, name)

    def _ensure_dummy(self, name: str) -> None:
        index = self._index(name)
        if index is None:
            self._do(
                f"create {name}",
                lambda: self._ipr().link("add", ifname=name, kind="dummy"),
                (errno.EEXIST,),
            )
            index = self._index(name)
            if index is None:
                raise IpvsError(f"{name} vanished right after it was created", errno.ENODEV)
        link = self._do(f"read {name}", lambda: self._ipr().link("get", index=index))
        if link and not link[0]["flags"] & 1:  # IFF_UP: IPv6 addresses need it
            self._do(f"set {name} up", lambda: self._ipr().link("set", index=index, state="up"))

    def delete_dummy(self, name: str) -> bool:
        return self._worker.call(self._delete_dummy, name)

    def _delete_dummy(self, name: str) -> bool:
        index = self._index(name)
        if index is None:
            return False
        self._do(f"delete {name}", lambda: self._ipr().link("del", index=index), (errno.ENODEV,))
        return True

    def _addresses(self) -> list[tuple[int, str, int]]:
        """(interface index, address, prefix length) for every address on the node."""
        messages = self._do("dump addresses", lambda: list(self._ipr().get_addr()))
        out = []
        for message in messages or ():
            address = message.get("IFA_ADDRESS")
            if address is not None:
                out.append((int(message["index"]), str(address), int(message["prefixlen"])))
        return out

    def dummy_addresses(self, name: str) -> set[str]:
        return self._worker.call(self._dummy_addresses, name)

    def _dummy_addresses(self, name: str) -> set[str]:
        index = self._index(name)
        if index is None:
            return set()
        found = (ipaddress.ip_address(a) for i, a, _ in self._addresses() if i == index)
        # The kernel gives the interface an IPv6 link-local address once it is up: not uproxy's.
        return {str(ip) for ip in found if not ip.is_link_local}

    def add_address(self, name: str, ip: str) -> None:
        self._worker.call(self._change_address, "add", name, ip)

    def delete_address(self, name: str, ip: str) -> None:
        self._worker.call(self._change_address, "del", name, ip)

    def _change_address(self, verb: str, name: str, ip: str) -> None:
        index = self._index(name)
        if index is None:
            if verb == "del":
                return
            raise IpvsError(f"add {ip} to {name}: no such interface", errno.ENODEV)
        prefix = 32 if ip_family(ip) == 4 else 128
        # No duplicate address detection: a virtual address is no neighbour's, and a tentative
        # one would refuse its first packets.
        flags = {"flags": _IFA_F_NODAD} if verb == "add" and prefix == 128 else {}
        self._do(
            f"{verb} {ip} on {name}",
            lambda: self._ipr().addr(verb, index=index, address=ip, prefixlen=prefix, **flags),
            (errno.EEXIST,) if verb == "add" else (errno.EADDRNOTAVAIL, errno.ENOENT),
        )

    def node_addresses(self, exclude: str) -> list[str]:
        return self._worker.call(self._node_addresses, exclude)

    def _node_addresses(self, exclude: str) -> list[str]:
        skip = self._index(exclude)
        out: list[str] = []
        for index, address, _ in self._addresses():
            ip = ipaddress.ip_address(address)
            if index == skip or ip.is_loopback or ip.is_link_local or ip.is_multicast:
                continue
            if str(ip) not in out:
                out.append(str(ip))
        return out

    def read_sysctl(self, key: str) -> str | None:
        try:
            return _sysctl_path(key).read_text().strip()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KernelError(f"cannot read sysctl {key}: {exc}") from None

    def write_sysctl(self, key: str, value: str) -> None:
        try:
            _sysctl_path(key).write_text(f"{value}\n")
        except OSError as exc:
            raise KernelError(f"cannot set sysctl {key}={value}: {exc}") from None


def _config_fields(config: ServiceConfig, family: int) -> dict[str, Any]:
    persistent = config.persistence is not None
    return {
        "sched_name": config.scheduler,
        "flags": {"flags": _SVC_F_PERSISTENT if persistent else 0, "mask": _ALL_FLAGS},
        "timeout": config.persistence or 0,
        # Persistence granularity: one client address (see the module docstring for IPv6).
        "netmask": "255.255.255.255" if family == 4 else "128.0.0.0",
    }
