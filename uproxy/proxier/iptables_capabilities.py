"""What the iptables mode needs from one family's backend and the kernel, checked before it starts.

The probe is one write: a chain of uproxy's in nat and in filter holding the matches and targets
the mode uses (of that family's spelling), deleted again in the same commit, so nothing is left
whether it succeeds or not. It fails where the family's tools are missing, where the kernel has no
NAT table for the family (no ip6table_nat, or IPv6 disabled) or refuses a match.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import structlog

from uproxy.errors import KernelError
from uproxy.kernel.netfilter import Family, Netfilter, TableUpdate
from uproxy.proxier.iptables_rules import FILTER, NAT, reject

log = structlog.get_logger(__name__)

PROBE_CHAIN = "UPROXY-PROBE"

_TARGET = {4: "10.0.0.1:80", 6: "[fd00::1]:80"}
_MASK = {4: "255.255.255.255", 6: "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"}


def probe(family: Family) -> dict[str, TableUpdate]:
    nat = [
        "-m addrtype --dst-type LOCAL -j RETURN",
        "-m statistic --mode random --probability 0.50000000000 -j RETURN",
        f"-p tcp -m recent --set --name {PROBE_CHAIN} --mask {_MASK[family]} --rsource "
        f"-j DNAT --to-destination {_TARGET[family]}",
    ]
    filter_ = ["-m conntrack --ctstate INVALID -j DROP", f"-p tcp -j {reject(family)}"]
    return {
        table: TableUpdate(replace={PROBE_CHAIN: specs}, delete_chains=[PROBE_CHAIN])
        for table, specs in ((NAT, nat), (FILTER, filter_))
    }


def check_iptables(netfilter: Netfilter) -> None:
    """Raise KernelError naming the family and the backend when this mode cannot work on it.
    Blocks (it runs the backend's tools)."""
    family = netfilter.family
    try:
        netfilter.apply(probe(family))
    except KernelError as exc:
        tools = f"{'ip6tables' if family == 6 else 'iptables'}-{netfilter.backend}"
        raise KernelError(
            f"IPv{family}: the iptables mode needs {tools} and a kernel with IPv{family} NAT "
            f"(nat and filter tables, DNAT, recent, statistic, addrtype, conntrack, REJECT); "
            f"this host refused: {exc}"
        ) from None


def usable_families(
    open_family: Callable[[Family], Netfilter], families: Sequence[Family] = (4, 6)
) -> list[Netfilter]:
    """The backends of the families this mode can run on, opened and checked. A family that
    cannot (its tools missing, its kernel support absent) is reported once and skipped, so the
    other keeps working; KernelError, the first family's refusal, when none can. Blocks."""
    usable: list[Netfilter] = []
    refusals: list[KernelError] = []
    for family in families:
        try:
            netfilter = open_family(family)
            check_iptables(netfilter)
        except KernelError as exc:
            log.warning(
                "iptables_family_unavailable",
                family=family,
                error=str(exc),
                action="skipped: served by the other family only",
            )
            refusals.append(exc)
            continue
        usable.append(netfilter)
    if not usable:
        raise refusals[0]
    return usable
