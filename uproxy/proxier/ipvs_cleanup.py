"""Removing what IPVS mode installed: uproxy's virtual servers, uproxy-ipvs0, the ownership
record and the UPROXY-IPVS-* chains. Every other virtual server survives."""

from __future__ import annotations

from collections.abc import Collection, Iterable

import structlog

from uproxy.kernel.ipvs import DUMMY_INTERFACE, Ipvs, IpvsHost, VirtualServer, Worker
from uproxy.kernel.netfilter import Netfilter, TableUpdate, jump_target
from uproxy.proxier.ipvs_desired import CHAIN_PREFIX, FILTER, NAT
from uproxy.proxier.ipvs_owned import OwnedServers

log = structlog.get_logger(__name__)


def _is_ipvs_chain(chain: str | None) -> bool:
    return chain is not None and chain.startswith(CHAIN_PREFIX)


def _delete_own_chains(nf: Netfilter) -> None:
    """Remove UPROXY-IPVS-* chains and the jumps into them; leave every other chain alone."""
    for table in (NAT, FILTER):
        state = nf.read(table)
        mine = [c for c in state.chains if _is_ipvs_chain(c)]
        jumps = [spec for _, spec in state.jumps if _is_ipvs_chain(jump_target(spec))]
        if not mine and not jumps:
            continue
        if len(jumps) < len(state.jumps):
            # Jumps into another mode's chains too: the Netfilter interface can only make the
            # set of jumps exact, so leave ours in place but empty; `uproxy cleanup`'s sweep of
            # every UPROXY-* chain removes them all.
            log.warning("ipvs_cleanup_jumps_left", table=table)
            nf.apply({table: TableUpdate(replace={c: [] for c in mine})})
            continue
        nf.ensure_jumps(table, ())
        if mine:
            nf.apply({table: TableUpdate(delete_chains=mine)})


def cleanup_blocking(
    ipvs: Ipvs | None,
    host: IpvsHost,
    journal: OwnedServers,
    netfilters: Iterable[Netfilter] = (),
    foreign: Collection[VirtualServer] = (),
) -> None:
    """Delete uproxy's virtual servers, the dummy interface (with its addresses), the record
    and the UPROXY-IPVS-* chains in each of `netfilters` (iptables, ip6tables). Blocks;
    idempotent. `ipvs` None: the kernel has no IPVS.
    `foreign`: virtual servers known to be someone else's, even on uproxy-ipvs0's addresses."""
    if ipvs is not None:
        bound = host.dummy_addresses(DUMMY_INTERFACE)
        recorded = journal.load()
        for vs in sorted(ipvs.services()):
            if (vs.ip in bound or vs in recorded) and vs not in foreign:
                ipvs.delete_service(vs)
    if host.delete_dummy(DUMMY_INTERFACE):
        log.info("ipvs_interface_deleted", interface=DUMMY_INTERFACE)
    journal.clear()
    for nf in netfilters:
        _delete_own_chains(nf)


async def cleanup_ipvs(
    worker: Worker, ipvs: Ipvs | None, host: IpvsHost, journal: OwnedServers
) -> None:
    """What `uproxy cleanup` does for IPVS mode: remove uproxy's virtual servers (those on
    uproxy-ipvs0's addresses or on record), uproxy-ipvs0 and the record; every other virtual
    server survives. `ipvs` None: the kernel has no IPVS, so there is nothing of it to remove.
    The UPROXY-IPVS-* chains go with the sweep of every UPROXY-* chain. Idempotent; raises
    KernelError if something remains."""
    await worker.run(cleanup_blocking, ipvs, host, journal)
    log.info("ipvs_cleanup_done")
