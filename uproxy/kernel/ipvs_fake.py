"""A stateful in-memory IPVS (and the interfaces and sysctls around it) for unit tests.

It enforces what the kernel enforces, with the kernel's errno: no duplicate virtual server or
real server, a real server needs its virtual server, a real server's family must be its virtual
server's, an unknown scheduler is ENOENT, changing what is not there is ESRCH/ENOENT, an address
needs its interface. Tests assert on the resulting state (`servers`, `table`, `addresses`), never
on which calls were made; `writes` counts the calls that changed something, so "a second sync
is a no-op" is `writes` staying put.

Connections are simulated just enough for graceful termination: `connect` schedules a new
connection round-robin over the real servers with a positive weight (as rr would), `close`
ends one, `set_connections` sets a real server's counts outright.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace

from uproxy.kernel.ipvs import (
    SCHEDULERS,
    DestInfo,
    IpvsError,
    RealServer,
    ServiceConfig,
    ServiceInfo,
    VirtualServer,
    ip_family,
)


def _error(code: int, what: str) -> IpvsError:
    return IpvsError(f"{what}: {os.strerror(code)} (errno {code})", code)


@dataclass
class FakeService:
    config: ServiceConfig
    dests: dict[RealServer, DestInfo] = field(default_factory=dict)
    connections: int = 0
    _turn: int = 0  # round-robin position


class FakeIpvs:
    """`Ipvs` and `IpvsHost` in memory."""

    def __init__(
        self,
        *,
        schedulers: Iterable[str] = SCHEDULERS,
        node_ips: Iterable[str] = ("192.0.2.10",),
        available: bool = True,
    ) -> None:
        self.schedulers = set(schedulers)
        self.is_available = available
        self.servers: dict[VirtualServer, FakeService] = {}
        self.links: dict[str, set[str]] = {}  # interface -> addresses
        self.links_up: set[str] = set()
        self.node_ips = list(node_ips)
        self.sysctls: dict[str, str] = {
            "net.ipv4.vs.conntrack": "0",
            "net.ipv4.vs.expire_nodest_conn": "0",
            "net.ipv4.vs.expire_quiescent_template": "0",
            "net.ipv4.ip_forward": "0",
            "net.ipv4.conf.all.arp_ignore": "0",
            "net.ipv4.conf.all.arp_announce": "0",
            "net.ipv6.conf.all.forwarding": "0",
        }
        self.writes = 0
        self._failures: list[IpvsError] = []

    # -- Ipvs ------------------------------------------------------------------------------

    def services(self) -> dict[VirtualServer, ServiceInfo]:
        self._maybe_fail()
        return {
            vs: ServiceInfo(s.config, s.connections, 0, 0) for vs, s in sorted(self.servers.items())
        }

    def dests(self, vs: VirtualServer) -> dict[RealServer, DestInfo]:
        self._maybe_fail()
        return dict(self._service(vs, f"dump real servers of {vs}").dests)

    def add_service(self, vs: VirtualServer, config: ServiceConfig) -> None:
        self._maybe_fail()
        if vs in self.servers:
            raise _error(errno.EEXIST, f"add virtual server {vs}")
        self._check_config(vs, config)
        self.servers[vs] = FakeService(config)
        self.writes += 1

    def set_service(self, vs: VirtualServer, config: ServiceConfig) -> None:
        self._maybe_fail()
        service = self._service(vs, f"set virtual server {vs}")
        self._check_config(vs, config)
        if service.config != config:
            service.config = config
            self.writes += 1

    def delete_service(self, vs: VirtualServer) -> None:
        self._maybe_fail()
        if self.servers.pop(vs, None) is not None:
            self.writes += 1

    def add_dest(self, vs: VirtualServer, rs: RealServer, weight: int) -> None:
        self._maybe_fail()
        service = self._service(vs, f"add real server {rs} to {vs}")
        if rs in service.dests:
            raise _error(errno.EEXIST, f"add real server {rs} to {vs}")
        if ip_family(rs.ip) != ip_family(vs.ip):
            raise _error(errno.EINVAL, f"add real server {rs} to {vs}: address family")
        self._check_weight(weight)
        service.dests[rs] = DestInfo(weight=weight)
        self.writes += 1

    def set_dest(self, vs: VirtualServer, rs: RealServer, weight: int) -> None:
        self._maybe_fail()
        service = self._service(vs, f"set real server {rs} of {vs}")
        current = service.dests.get(rs)
        if current is None:
            raise _error(errno.ENOENT, f"set real server {rs} of {vs}")
        self._check_weight(weight)
        if current.weight != weight or not current.masquerade:
            service.dests[rs] = replace(current, weight=weight, masquerade=True)
            self.writes += 1

    def delete_dest(self, vs: VirtualServer, rs: RealServer) -> None:
        self._maybe_fail()
        service = self.servers.get(vs)
        if service is not None and service.dests.pop(rs, None) is not None:
            self.writes += 1

    # -- IpvsHost ---------------------------------------------------------------------------

    def ensure_dummy(self, name: str) -> None:
        self._maybe_fail(ipvs=False)
        if name not in self.links:
            self.links[name] = set()
            self.writes += 1
        self.links_up.add(name)

    def delete_dummy(self, name: str) -> bool:
        self._maybe_fail(ipvs=False)
        self.links_up.discard(name)
        if self.links.pop(name, None) is None:
            return False
        self.writes += 1
        return True

    def dummy_addresses(self, name: str) -> set[str]:
        self._maybe_fail(ipvs=False)
        return set(self.links.get(name, ()))

    def add_address(self, name: str, ip: str) -> None:
        self._maybe_fail(ipvs=False)
        if name not in self.links:
            raise _error(errno.ENODEV, f"add {ip} to {name}")
        if ip not in self.links[name]:
            self.links[name].add(ip)
            self.writes += 1

    def delete_address(self, name: str, ip: str) -> None:
        self._maybe_fail(ipvs=False)
        if ip in self.links.get(name, set()):
            self.links[name].discard(ip)
            self.writes += 1

    def node_addresses(self, exclude: str) -> list[str]:
        self._maybe_fail(ipvs=False)
        return list(self.node_ips)

    def read_sysctl(self, key: str) -> str | None:
        if key.startswith("net.ipv4.vs.") and not self.is_available:
            return None
        return self.sysctls.get(key)

    def write_sysctl(self, key: str, value: str) -> None:
        if self.read_sysctl(key) is None:
            raise IpvsError(f"cannot set sysctl {key}={value}: no such sysctl", errno.ENOENT)
        self.sysctls[key] = value

    # -- capability checks (the extra methods NetlinkIpvs has) ----------------------------

    def available(self) -> str | None:
        return None if self.is_available else "no /proc/net/ip_vs and no IPVS netlink family"

    def scheduler_available(self, scheduler: str) -> bool:
        return scheduler in self.schedulers

    # -- for tests: traffic and inspection ---------------------------------------------------

    def fail_next(self, error: str = "injected failure", times: int = 1) -> None:
        """Make the next `times` calls raise IpvsError (EIO)."""
        self._failures += [IpvsError(error, errno.EIO)] * times

    def connect(self, vs: VirtualServer) -> RealServer | None:
        """A new connection to `vs`: round-robin over positive-weight real servers, counted as
        active; None when there is nowhere to send it (the kernel would reset it)."""
        service = self._service(vs, f"connect to {vs}")
        usable = [rs for rs, d in sorted(service.dests.items()) if d.weight > 0]
        if not usable:
            return None
        rs = usable[service._turn % len(usable)]
        service._turn += 1
        service.connections += 1
        current = service.dests[rs]
        service.dests[rs] = replace(
            current, active=current.active + 1, connections=current.connections + 1
        )
        return rs

    def close(self, vs: VirtualServer, rs: RealServer) -> None:
        """One active connection of `rs` ends (and leaves no TIME_WAIT entry behind)."""
        service = self._service(vs, f"close on {vs}")
        current = service.dests[rs]
        service.dests[rs] = replace(current, active=max(0, current.active - 1))

    def set_connections(
        self, vs: VirtualServer, rs: RealServer, active: int = 0, inactive: int = 0
    ) -> None:
        service = self._service(vs, f"connections of {vs}")
        service.dests[rs] = replace(service.dests[rs], active=active, inactive=inactive)

    def table(self) -> dict[VirtualServer, dict[RealServer, int]]:
        """Every virtual server with its real servers' weights, like `ipvsadm -Ln`."""
        return {
            vs: {rs: d.weight for rs, d in sorted(s.dests.items())}
            for vs, s in sorted(self.servers.items())
        }

    def dump(self) -> str:
        """ipvsadm -Ln-like text, for failure messages."""
        lines = []
        for vs, service in sorted(self.servers.items()):
            persist = service.config.persistence
            extra = f" persistent {persist}" if persist is not None else ""
            lines.append(f"{vs} {service.config.scheduler}{extra}")
            for rs, dest in sorted(service.dests.items()):
                lines.append(f"  -> {rs} Masq {dest.weight} {dest.active} {dest.inactive}")
        for link, addresses in sorted(self.links.items()):
            lines.append(f"{link}: {' '.join(sorted(addresses))}")
        return "\n".join(lines)

    # -- invariants ----------------------------------------------------------------------------

    def _maybe_fail(self, *, ipvs: bool = True) -> None:
        if ipvs and not self.is_available:
            raise IpvsError("cannot open the IPVS netlink family", errno.EAFNOSUPPORT)
        if self._failures:
            raise self._failures.pop(0)

    def _service(self, vs: VirtualServer, what: str) -> FakeService:
        service = self.servers.get(vs)
        if service is None:
            raise _error(errno.ESRCH, what)
        return service

    def _check_config(self, vs: VirtualServer, config: ServiceConfig) -> None:
        if config.scheduler not in self.schedulers:
            raise _error(errno.ENOENT, f"virtual server {vs}: scheduler {config.scheduler}")
        if config.persistence is not None and not 0 < config.persistence <= 0x7FFFFFFF:
            raise _error(errno.EINVAL, f"virtual server {vs}: persistence {config.persistence}")

    @staticmethod
    def _check_weight(weight: int) -> None:
        if not 0 <= weight <= 0x7FFFFFFF:
            raise _error(errno.EINVAL, f"weight {weight}")
