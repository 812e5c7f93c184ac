"""Graceful termination in IPVS mode.

A removed TCP real server goes to weight 0: the kernel sends it no new connection while the
existing ones continue. It is deleted once the kernel tracks no active or inactive connection for
it, or after the graceful period at the latest (kube-proxy waits without a bound, a known
complaint). A removed TCP virtual server drains the same way before it goes. UDP real servers
and virtual servers are deleted at once, and their conntrack entries flushed, since UDP has no end
a client would notice.

Runs on the IPVS worker thread only, one job at a time, like the rest of the kernel bookkeeping.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import structlog

from uproxy.kernel.conntrack import UdpFlowMatch
from uproxy.kernel.ipvs import DestInfo, Ipvs, IpvsError, RealServer, VirtualServer
from uproxy.model import Protocol

log = structlog.get_logger(__name__)

Observed = dict[VirtualServer, dict[RealServer, DestInfo]]


@dataclass
class IpvsChanges:
    """What one round of convergence or housekeeping changed in the kernel."""

    services_added: int = 0
    services_changed: int = 0
    services_removed: int = 0
    dests_added: int = 0
    dests_quiesced: int = 0
    dests_removed: int = 0
    cut_short: int = 0  # connections still open when the graceful period ran out
    addresses_added: int = 0
    addresses_removed: int = 0
    rules: bool = False
    flush: list[UdpFlowMatch] = field(default_factory=list)
    deleted: list[VirtualServer] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return any(
            (
                self.services_added,
                self.services_changed,
                self.services_removed,
                self.dests_added,
                self.dests_quiesced,
                self.dests_removed,
                self.addresses_added,
                self.addresses_removed,
                self.rules,
            )
        )


class Terminations:
    """Real servers at weight 0 waiting to be deleted, and removed virtual servers draining.

    `observed` is the proxier's own record of each virtual server's real servers, kept current
    here as real servers are quiesced and deleted. `delete_service` and `forget` are the
    proxier's: deleting a virtual server also takes it off the ownership record.
    """

    def __init__(
        self,
        ipvs: Ipvs,
        graceful_period: float,
        observed: Observed,
        delete_service: Callable[[VirtualServer, IpvsChanges], None],
        forget: Callable[[VirtualServer], None],
    ) -> None:
        self._ipvs = ipvs
        self._graceful = graceful_period
        self._observed = observed
        self._delete_service = delete_service
        self._forget = forget
        self.terminating: dict[tuple[VirtualServer, RealServer], float] = {}  # -> deadline
        self.draining: set[VirtualServer] = set()  # removed TCP services still draining

    def __bool__(self) -> bool:
        return bool(self.terminating or self.draining)

    def cancel(self, vs: VirtualServer, rs: RealServer) -> None:
        """`rs` is wanted again."""
        self.terminating.pop((vs, rs), None)

    def forget(self, vs: VirtualServer) -> None:
        """`vs` is gone from the kernel."""
        self.draining.discard(vs)
        for key in [k for k in self.terminating if k[0] == vs]:
            del self.terminating[key]

    def clear(self) -> None:
        self.terminating.clear()
        self.draining.clear()

    def has_terminating(self, vs: VirtualServer) -> bool:
        return any(key[0] == vs for key in self.terminating)

    def retire_dest(
        self,
        vs: VirtualServer,
        rs: RealServer,
        info: DestInfo,
        now: float,
        result: IpvsChanges,
        observed: dict[RealServer, DestInfo],
    ) -> None:
        if vs.protocol is Protocol.UDP or self._graceful <= 0:
            self._ipvs.delete_dest(vs, rs)
            observed.pop(rs, None)
            self.terminating.pop((vs, rs), None)
            result.dests_removed += 1
            if vs.protocol is Protocol.UDP:
                result.flush.append(UdpFlowMatch.endpoint(rs.ip, rs.port))
            return
        if info.weight != 0:
            self._ipvs.set_dest(vs, rs, 0)
            observed[rs] = replace(info, weight=0)
            result.dests_quiesced += 1
        # After a restart a weight-0 real server starts its graceful period anew.
        self.terminating.setdefault((vs, rs), now + self._graceful)

    def drain_service(self, vs: VirtualServer, now: float, result: IpvsChanges) -> None:
        """A virtual server uproxy owns that is no longer wanted."""
        if vs.protocol is Protocol.UDP or self._graceful <= 0:
            self._delete_service(vs, result)
            if vs.protocol is Protocol.UDP:
                result.flush.append(UdpFlowMatch.destination(vs.ip, vs.port))
            return
        try:
            have = self._ipvs.dests(vs)
        except IpvsError as exc:
            if exc.code not in (errno.ESRCH, errno.ENOENT):
                raise
            self._forget(vs)
            return
        observed = dict(have)
        for rs, info in sorted(have.items()):
            self.retire_dest(vs, rs, info, now, result, observed)
        self._observed[vs] = observed
        self.draining.add(vs)

    def reap(self, now: float, result: IpvsChanges, fresh: set[VirtualServer]) -> None:
        """Delete terminating real servers with no connections left or no time left, then
        draining virtual servers with no real server left."""
        by_server: dict[VirtualServer, list[RealServer]] = {}
        for vs, rs in self.terminating:
            by_server.setdefault(vs, []).append(rs)
        for vs, real_servers in sorted(by_server.items()):
            if vs in fresh:
                have = dict(self._observed.get(vs, {}))
            else:
                try:
                    have = self._ipvs.dests(vs)
                except IpvsError as exc:
                    if exc.code not in (errno.ESRCH, errno.ENOENT):
                        raise
                    self._forget(vs)  # deleted behind uproxy's back
                    continue
            for rs in sorted(real_servers):
                deadline = self.terminating[(vs, rs)]
                info = have.get(rs)
                if info is None or info.weight > 0:
                    del self.terminating[(vs, rs)]  # gone, or taken back by someone
                    continue
                if info.open and now < deadline:
                    continue
                self._ipvs.delete_dest(vs, rs)
                del self.terminating[(vs, rs)]
                del have[rs]
                result.dests_removed += 1
                if info.open:
                    result.cut_short += info.open
                    log.info(
                        "ipvs_graceful_period_over",
                        virtual_server=str(vs),
                        real_server=str(rs),
                        active=info.active,
                        inactive=info.inactive,
                    )
            self._observed[vs] = have
        for vs in sorted(self.draining):
            if not self.has_terminating(vs):
                self._delete_service(vs, result)
