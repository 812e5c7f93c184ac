"""The iptables mode per IP family: an IptablesProxier on FakeNetfilter(family=6) beside the IPv4
one, behind PerFamily as app.py builds them; assertions are on the fakes' resulting tables."""

from __future__ import annotations

from typing import Any

import pytest
import structlog

from uproxy.errors import KernelError
from uproxy.kernel.conntrack import UdpFlow
from uproxy.kernel.fake import FakeConntrack, FakeNetfilter
from uproxy.kernel.netfilter import Family, Netfilter, ToolMissing, is_own
from uproxy.model import Endpoint, Protocol, ProxyState, ServicePort, ServicePortName
from uproxy.proxier.families import PerFamily
from uproxy.proxier.iptables import IptablesProxier
from uproxy.proxier.iptables_capabilities import usable_families
from uproxy.proxier.iptables_rules import RuleContext, compute_rules

WEB = ServicePortName("default", "web", "http")
DNS = ServicePortName("kube-system", "dns", "dns")
V4, V6 = Endpoint("10.1.0.1", 8080, node_name="node-a"), Endpoint("fd00:1::1", 8080)
DUAL_IPS = ("10.96.0.10", "fd00:96::10")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def context(family: Family) -> RuleContext:
    cidr = "10.244.0.0/16" if family == 4 else "fd00:244::/56"
    return RuleContext(node_name="node-a", cluster_cidr=cidr, family=family)


def dual_stack(
    conntrack: FakeConntrack | None = None, *, cleanup_on_exit: bool = False
) -> tuple[PerFamily, dict[Family, FakeNetfilter], Clock]:
    fakes: dict[Family, FakeNetfilter] = {4: FakeNetfilter("nft", 4), 6: FakeNetfilter("nft", 6)}
    clock = Clock()
    shared = conntrack or FakeConntrack()
    proxiers = [
        IptablesProxier(
            fakes[f],
            context=context(f),
            conntrack=shared,
            clock=clock,
            cleanup_on_exit=cleanup_on_exit,
        )
        for f in fakes
    ]
    return PerFamily(proxiers), fakes, clock


def web(cluster_ips: tuple[str, ...] = DUAL_IPS, **fields: Any) -> ServicePort:
    return ServicePort(WEB, Protocol.TCP, 80, cluster_ips=cluster_ips, **fields)


def state(*ports: tuple[ServicePort, tuple[Endpoint, ...]]) -> ProxyState:
    return ProxyState({s.name: s for s, _ in ports}, {s.name: e for s, e in ports})


def own_chains(fake: FakeNetfilter, current: ProxyState) -> bool:
    """The fake holds exactly its family's rendered chains (rules compared as sets)."""
    want = compute_rules(current.services, current.endpoints, context(fake.family)).chains
    have = fake.owned()
    return {t: {c: sorted(s) for c, s in have[t].items() if is_own(c)} for t in have} == {
        t: {c: sorted(s) for c, s in chains.items()} for t, chains in want.items()
    }


async def test_each_family_gets_its_own_addresses_and_endpoints_and_one_view_row() -> None:
    proxier, fakes, _ = dual_stack()
    current = state((web(node_port=30080, affinity_timeout=60), (V4, V6)))
    await proxier.sync(current)
    for fake in fakes.values():
        assert own_chains(fake, current), fake.dump()
    assert "fd00" not in fakes[4].dump()
    assert "10.96.0.10" not in fakes[6].dump() and "10.1.0.1" not in fakes[6].dump()
    assert "--to-destination [fd00:1::1]:8080" in fakes[6].dump()
    assert "! -s fd00:244::/56 -d fd00:96::10/128" in fakes[6].dump()
    (view,) = proxier.view()
    assert view.endpoints == (V4, V6) and view.in_use == {V4, V6}


async def test_a_port_joins_and_leaves_the_ipv6_rules_with_its_ipv6_cluster_ip() -> None:
    proxier, fakes, clock = dual_stack()
    v4_only = state((web(("10.96.0.10",), node_port=30080), (V4, V6)))
    await proxier.sync(v4_only)
    assert "default/web" not in fakes[6].dump()  # not even its NodePort (kube-proxy's choice)
    for current in (state((web(node_port=30080), (V4, V6))), v4_only):
        clock.now += 1
        await proxier.sync(current, frozenset({WEB}))
        for fake in fakes.values():
            assert own_chains(fake, current), fake.dump()
    assert proxier.sync_counters().partial_syncs == 4  # two families, two partial syncs each


async def test_ipv6_drift_is_repaired_by_the_next_full_sync() -> None:
    proxier, fakes, clock = dual_stack()
    current = state((web(), (V4, V6)))
    await proxier.sync(current)
    (rule,) = [r for r in fakes[6].rules("nat", "UPROXY-SERVICES") if "fd00:96::10" in r]
    fakes[6].hand_delete_rule("nat", "UPROXY-SERVICES", rule)
    clock.now += 30
    await proxier.sync(current)
    assert own_chains(fakes[6], current), fakes[6].dump()


async def test_a_udp_port_getting_its_first_ipv6_endpoint_leaves_the_ipv4_flows_alone() -> None:
    """Each family's conntrack flush names only its own family's addresses."""
    dns = ServicePort(DNS, Protocol.UDP, 53, cluster_ips=("10.96.0.53", "fd00:96::53"))
    v4_ep, v6_ep = Endpoint("10.1.0.9", 53), Endpoint("fd00:1::9", 53)
    answered = UdpFlow("10.0.0.2", 5000, "10.96.0.53", 53, "10.1.0.9", 53)
    unnated6 = UdpFlow("fd00::2", 5000, "fd00:96::53", 53, "fd00:96::53", 53)
    conntrack = FakeConntrack()
    proxier, _, clock = dual_stack(conntrack)
    await proxier.sync(state((dns, (v4_ep,))))
    conntrack.flows = [answered, unnated6]
    clock.now += 1
    await proxier.sync(state((dns, (v4_ep, v6_ep))), frozenset({DNS}))
    assert conntrack.flows == [answered]


async def test_cleanup_on_exit_empties_both_families() -> None:
    proxier, fakes, _ = dual_stack(cleanup_on_exit=True)
    await proxier.sync(state((web(), (V4, V6))))
    await proxier.shutdown(5.0)
    assert fakes[4].owned() == {} and fakes[6].owned() == {}


def test_a_rule_context_of_the_other_family_is_refused() -> None:
    with pytest.raises(ValueError, match="IPv4 rule context on an IPv6 backend"):
        IptablesProxier(FakeNetfilter("nft", 6), context=context(4), conntrack=FakeConntrack())


def test_a_family_the_host_cannot_serve_is_reported_once_and_skipped() -> None:
    refusing = FakeNetfilter("nft", 6)
    refusing.fail_next("can't initialize ip6tables table `nat'")

    def open_family(family: Family) -> Netfilter:
        return FakeNetfilter("nft", 4) if family == 4 else refusing

    with structlog.testing.capture_logs() as logs:
        usable = usable_families(open_family)
    assert [nf.family for nf in usable] == [4]
    assert usable[0].owned() == {}  # type: ignore[attr-defined]  # the probe left nothing
    (warning,) = [e for e in logs if e["event"] == "iptables_family_unavailable"]
    assert warning["family"] == 6 and "IPv6" in warning["error"]
    assert refusing.owned() == {}


def test_no_usable_family_refuses_to_start_naming_the_first_family() -> None:
    def open_family(family: Family) -> Netfilter:
        raise ToolMissing(f"{'ip6tables' if family == 6 else 'iptables'}-nft-save not found")

    with pytest.raises(KernelError, match="iptables-nft-save not found"):
        usable_families(open_family)
