"""IptablesProxier against the stateful fake: assertions are on the resulting tables."""

from __future__ import annotations

from typing import Any

import pytest

from uproxy.errors import KernelError
from uproxy.kernel.conntrack import UdpFlow
from uproxy.kernel.fake import FakeConntrack, FakeNetfilter
from uproxy.kernel.netfilter import TableUpdate
from uproxy.model import Endpoint, Protocol, ProxyState, ServicePort, ServicePortName
from uproxy.observe.metrics import Metrics
from uproxy.proxier.iptables import IptablesProxier
from uproxy.proxier.iptables_rules import (
    FW_PREFIX,
    NODEPORTS_COMMENT,
    SVC_PREFIX,
    RuleContext,
    compute_rules,
    port_chain,
)
from uproxy.proxier.netfilter_portals import NetfilterPortals
from uproxy.proxier.portals import Portal

WEB = ServicePortName("default", "web", "http")
DNS = ServicePortName("kube-system", "dns", "dns")
CTX = RuleContext(node_name="node-a", cluster_cidr="10.244.0.0/16")
FOREIGN = "-s 192.0.2.1/32 -j DROP"


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def web(**fields: Any) -> ServicePort:
    fields.setdefault("cluster_ips", ("10.96.0.10",))
    return ServicePort(WEB, Protocol.TCP, 80, **fields)


def dns(**fields: Any) -> ServicePort:
    fields.setdefault("cluster_ips", ("10.96.0.53",))
    return ServicePort(DNS, Protocol.UDP, 53, **fields)


def ep(ip: str, port: int = 8080, **fields: Any) -> Endpoint:
    return Endpoint(ip, port, **fields)


def state(*ports: tuple[ServicePort, tuple[Endpoint, ...]]) -> ProxyState:
    return ProxyState({s.name: s for s, _ in ports}, {s.name: e for s, e in ports})


def make(
    fake: FakeNetfilter | None = None, **kwargs: Any
) -> tuple[IptablesProxier, FakeNetfilter, Clock]:
    fake = fake or FakeNetfilter()
    clock = Clock()
    kwargs.setdefault("conntrack", FakeConntrack())
    proxier = IptablesProxier(fake, context=CTX, resync_period=30.0, clock=clock, **kwargs)
    return proxier, fake, clock


def expected(current: ProxyState) -> dict[str, dict[str, list[str]]]:
    """What the fake must own for `current`: the whole rendered ruleset and its jumps."""
    rules = compute_rules(current.services, current.endpoints, CTX)
    out: dict[str, dict[str, list[str]]] = {}
    for table, chains in rules.chains.items():
        out[table] = {chain: list(specs) for chain, specs in chains.items()}
        for jump in rules.jumps[table]:
            out[table].setdefault(jump.chain, []).append(jump.spec)
    return out


def owned(fake: FakeNetfilter) -> dict[str, dict[str, list[str]]]:
    """The fake's own chains, with the rules of shared chains in a comparable order."""
    return {t: dict(sorted(c.items())) for t, c in fake.owned().items()}


def same(fake: FakeNetfilter, current: ProxyState) -> bool:
    want = {t: dict(sorted(c.items())) for t, c in expected(current).items()}
    have = owned(fake)
    # Rules in shared chains are a set (plus the NodePort tail, checked separately).
    for tables in (want, have):
        for chains in tables.values():
            for chain in ("UPROXY-NODEPORTS", "UPROXY-EXTERNAL-SERVICES", "UPROXY-LB-FIREWALL"):
                if chain in chains:
                    chains[chain] = sorted(chains[chain])
    for tables in (want, have):
        for table in ("nat", "filter"):
            services = tables[table]["UPROXY-SERVICES"]
            tail = [s for s in services if NODEPORTS_COMMENT in s]
            tables[table]["UPROXY-SERVICES"] = sorted(s for s in services if s not in tail) + tail
    return have == want


def nodeports_last(fake: FakeNetfilter) -> bool:
    return NODEPORTS_COMMENT in fake.rules("nat", "UPROXY-SERVICES")[-1]


THREE = (ep("10.1.0.1"), ep("10.1.0.2"), ep("10.1.0.3"))


async def test_first_sync_installs_everything_beside_foreign_rules() -> None:
    fake = FakeNetfilter()
    fake.hand_add_rule("filter", "INPUT", FOREIGN)
    fake.hand_add_rule("nat", "PREROUTING", "-d 192.0.2.9/32 -j RETURN")
    proxier, fake, _ = make(fake)
    current = state((web(node_port=30080), THREE), (dns(), (ep("10.1.0.9", 53),)))
    await proxier.sync(current)
    assert same(fake, current), fake.dump()
    assert FOREIGN in fake.rules("filter", "INPUT")
    assert "-d 192.0.2.9/32 -j RETURN" in fake.rules("nat", "PREROUTING")
    assert proxier.sync_counters().full_syncs == 1


async def test_an_unchanged_sync_does_not_touch_the_kernel() -> None:
    proxier, fake, clock = make()
    current = state((web(), THREE))
    await proxier.sync(current)
    commits = fake.commits
    clock.now += 1
    await proxier.sync(current)
    await proxier.sync(current, frozenset())
    assert fake.commits == commits
    assert proxier.sync_counters().partial_syncs == 2


async def test_an_endpoint_change_rewrites_only_that_ports_chains() -> None:
    other = ServicePort(ServicePortName("default", "other"), Protocol.TCP, 81, ("10.96.0.11",))
    proxier, fake, clock = make()
    before = state((web(), THREE), (other, (ep("10.1.1.1"),)))
    await proxier.sync(before)
    other_chains = {c: fake.rules("nat", c) for c in fake.chains("nat") if "SVC" in c}
    clock.now += 1
    after = state((web(), (*THREE[:2], ep("10.1.0.4"))), (other, (ep("10.1.1.1"),)))
    await proxier.sync(after, frozenset({WEB}))
    assert same(fake, after), fake.dump()
    svc_other = port_chain(SVC_PREFIX, other.name, Protocol.TCP)
    assert fake.rules("nat", svc_other) == other_chains[svc_other]
    assert not any("10.1.0.3" in spec for c in fake.chains("nat") for spec in fake.rules("nat", c))
    counters = proxier.sync_counters()
    assert (counters.full_syncs, counters.partial_syncs) == (1, 1)


async def test_changed_names_narrow_what_a_partial_sync_looks_at() -> None:
    proxier, fake, clock = make()
    await proxier.sync(state((web(), THREE)))
    clock.now += 1
    moved = state((web(), THREE[:1]))
    await proxier.sync(moved, frozenset({DNS}))  # the change to WEB was not announced
    assert not same(fake, moved)
    clock.now += 30  # the periodic full sync compares every port
    await proxier.sync(moved)
    assert same(fake, moved), fake.dump()


async def test_a_full_sync_looks_at_every_port_whatever_changed_says() -> None:
    proxier, fake, _ = make()
    current = state((web(), THREE), (dns(), (ep("10.1.0.9", 53),)))
    await proxier.sync(current, frozenset({DNS}))  # the first sync: nothing is known yet
    assert same(fake, current), fake.dump()


async def test_added_and_removed_services_keep_the_nodeport_jump_last() -> None:
    proxier, fake, clock = make()
    await proxier.sync(state((web(node_port=30080), THREE)))
    clock.now += 1
    both = state((web(node_port=30080), THREE), (dns(node_port=30053), (ep("10.1.0.9", 53),)))
    await proxier.sync(both)
    assert same(fake, both) and nodeports_last(fake), fake.dump()
    clock.now += 1
    only_dns = state((dns(node_port=30053), (ep("10.1.0.9", 53),)))
    await proxier.sync(only_dns)
    assert same(fake, only_dns) and nodeports_last(fake), fake.dump()
    assert not [c for c in fake.chains("nat") if "EXT" in c and c.endswith(web_hash())]


def web_hash() -> str:
    return port_chain(SVC_PREFIX, WEB, Protocol.TCP).removeprefix(SVC_PREFIX)


async def test_losing_every_endpoint_moves_the_service_to_reject_and_back() -> None:
    proxier, fake, clock = make()
    await proxier.sync(state((web(external_ips=("192.0.2.10",)), THREE)))
    clock.now += 1
    empty = state((web(external_ips=("192.0.2.10",)), ()))
    await proxier.sync(empty)
    assert same(fake, empty), fake.dump()
    assert any("REJECT" in s for s in fake.rules("filter", "UPROXY-SERVICES"))
    assert any("REJECT" in s for s in fake.rules("filter", "UPROXY-EXTERNAL-SERVICES"))
    assert not [c for c in fake.chains("nat") if c.startswith(("UPROXY-SVC", "UPROXY-SEP"))]
    clock.now += 1
    back = state((web(external_ips=("192.0.2.10",)), THREE))
    await proxier.sync(back)
    assert same(fake, back), fake.dump()


async def test_a_hand_deleted_rule_and_a_killed_runs_chain_are_repaired_by_the_full_sync() -> None:
    proxier, fake, clock = make()
    current = state((web(), THREE))
    await proxier.sync(current)
    svc_chain = port_chain(SVC_PREFIX, WEB, Protocol.TCP)
    fake.hand_delete_rule("nat", svc_chain, fake.rules("nat", svc_chain)[-1])
    fake.hand_add_rule("nat", "UPROXY-SVC-STALESTALESTALE", "-j UPROXY-MARK-MASQ")
    spec = "-d 10.96.9.9/32 -p tcp -m tcp --dport 80 -j UPROXY-SVC-STALESTALESTALE"
    fake.hand_add_rule("nat", "UPROXY-SERVICES", spec, first=True)
    clock.now += 1
    await proxier.sync(current)  # partial: nothing changed, nothing looked at
    assert not same(fake, current)
    clock.now += 30
    await proxier.sync(current)
    assert same(fake, current), fake.dump()


async def test_a_partial_sync_that_trips_over_a_hand_edit_falls_back_to_a_full_sync() -> None:
    proxier, fake, clock = make()
    await proxier.sync(state((web(), THREE)))
    rule = next(s for s in fake.rules("nat", "UPROXY-SERVICES") if "cluster IP" in s)
    fake.hand_delete_rule("nat", "UPROXY-SERVICES", rule)
    clock.now += 1
    moved = state((web(cluster_ips=("10.96.0.12",)), THREE))
    await proxier.sync(moved)  # -D of the hand-deleted rule fails: read back and converge
    assert same(fake, moved), fake.dump()
    assert proxier.sync_counters().partial_failures == 1


async def test_a_failed_write_raises_changes_nothing_and_the_next_sync_converges() -> None:
    proxier, fake, clock = make()
    fake.fail_next()
    current = state((web(), THREE))
    with pytest.raises(KernelError):
        await proxier.sync(current)
    assert fake.owned() == {}
    assert proxier.view() == []
    clock.now += 1
    await proxier.sync(current)
    assert same(fake, current)
    assert [v.service.name for v in proxier.view()] == [WEB]


async def test_switching_from_userspace_portals_and_back_leaves_nothing_of_the_other() -> None:
    fake = FakeNetfilter()
    portals = NetfilterPortals(
        fake, conntrack=FakeConntrack(), physdev=True, other_backends=[], clock=Clock()
    )
    await portals.flush_at_start()
    await portals.sync({WEB: Portal(web(node_port=30080), 40000)})
    assert "UPROXY-PORTALS" in fake.chains("nat")
    proxier, _, _ = make(fake)
    current = state((web(node_port=30080), THREE))
    await proxier.sync(current)
    assert same(fake, current), fake.dump()
    assert not [c for c in fake.chains("nat") + fake.chains("filter") if "PORTALS" in c]
    assert not [c for c in fake.chains("filter") if c.startswith("UPROXY-PROXY-")]
    back = NetfilterPortals(
        fake, conntrack=FakeConntrack(), physdev=True, other_backends=[], clock=Clock()
    )
    await back.flush_at_start()
    await back.sync({WEB: Portal(web(node_port=30080), 40001)})
    left = [c for t in ("nat", "filter") for c in fake.chains(t)]
    assert not [c for c in left if c.startswith(("UPROXY-S", "UPROXY-EXT", "UPROXY-MARK"))]
    assert not [c for c in left if c in ("UPROXY-POSTROUTING", "UPROXY-FORWARD")]
    assert "UPROXY-PORTALS" in left


async def test_the_ipvs_modes_chain_and_the_other_backends_rules_go_at_the_first_sync() -> None:
    fake, other = FakeNetfilter(), FakeNetfilter("legacy")
    fake.hand_add_rule("nat", "UPROXY-IPVS-POSTROUTING", "-j MASQUERADE")
    fake.hand_add_rule("nat", "POSTROUTING", "-j UPROXY-IPVS-POSTROUTING")
    other.hand_add_rule("nat", "UPROXY-PORTALS", "-j RETURN")
    other.hand_add_rule("nat", "PREROUTING", "-j UPROXY-PORTALS")
    leftovers: list[str] = []

    async def ipvs_leftovers() -> None:
        leftovers.append("ipvs")

    proxier, _, clock = make(fake, other_backends=[other], leftovers=[ipvs_leftovers])
    current = state((web(), THREE))
    await proxier.sync(current)
    assert same(fake, current), fake.dump()
    assert other.owned() == {}
    clock.now += 31
    await proxier.sync(current)
    assert leftovers == ["ipvs"]


async def test_a_foreign_jump_into_a_stale_chain_keeps_it_and_the_sync_succeeds() -> None:
    fake = FakeNetfilter()
    fake.hand_add_rule("nat", "UPROXY-OLD", "-j RETURN")
    fake.hand_add_rule("nat", "FOREIGN-CHAIN", "-j UPROXY-OLD")
    proxier, _, _ = make(fake)
    current = state((web(), THREE))
    await proxier.sync(current)
    assert "UPROXY-OLD" in fake.chains("nat")
    assert fake.rules("nat", "UPROXY-SERVICES")


async def test_removed_udp_endpoints_lose_their_flows_and_other_flows_stay() -> None:
    kept = UdpFlow("10.0.0.2", 5000, "10.96.0.53", 53, "10.1.0.8", 53)
    stale = UdpFlow("10.0.0.2", 5001, "10.96.0.53", 53, "10.1.0.9", 53)
    conntrack = FakeConntrack()
    proxier, _, clock = make(conntrack=conntrack)
    endpoints = (ep("10.1.0.8", 53), ep("10.1.0.9", 53))
    await proxier.sync(state((dns(), endpoints)))
    conntrack.flows = [kept, stale]
    clock.now += 1
    await proxier.sync(state((dns(), endpoints[:1])))
    assert conntrack.flows == [kept]


async def test_a_udp_port_getting_its_first_endpoint_loses_the_flows_to_its_addresses() -> None:
    unnated = UdpFlow("10.0.0.2", 5000, "10.96.0.53", 53, "10.96.0.53", 53)
    to_nodeport = UdpFlow("10.0.0.2", 5001, "10.10.0.1", 30053, "10.10.0.1", 30053)
    elsewhere = UdpFlow("10.0.0.2", 5002, "10.96.0.99", 53, "10.96.0.99", 53)
    conntrack = FakeConntrack()
    proxier, _, clock = make(conntrack=conntrack)
    await proxier.sync(state((dns(node_port=30053), ())))
    conntrack.flows = [unnated, to_nodeport, elsewhere]
    clock.now += 1
    await proxier.sync(state((dns(node_port=30053), (ep("10.1.0.9", 53),))))
    assert conntrack.flows == [elsewhere]


async def test_tcp_changes_leave_conntrack_alone() -> None:
    flow = UdpFlow("10.0.0.2", 5000, "10.96.0.10", 80, "10.1.0.3", 8080)
    conntrack = FakeConntrack([flow])
    proxier, _, clock = make(conntrack=conntrack)
    await proxier.sync(state((web(), THREE)))
    clock.now += 1
    await proxier.sync(state((web(), THREE[:2])))
    assert conntrack.flows == [flow]


async def test_view_shows_every_port_with_the_endpoints_in_use() -> None:
    proxier, _, _ = make()
    remote = ep("10.1.0.7", node_name="node-b")
    local = ep("10.1.0.1", node_name="node-a")
    await proxier.sync(state((web(internal_traffic_local=True), (local, remote))))
    (view,) = proxier.view()
    assert view.proxy_port == 0
    assert view.endpoints == (local, remote)
    assert view.in_use == frozenset({local})


async def test_cleanup_on_exit_removes_every_chain_and_jump() -> None:
    proxier, fake, _ = make(cleanup_on_exit=True)
    fake.hand_add_rule("filter", "INPUT", FOREIGN)
    await proxier.sync(state((web(), THREE)))
    await proxier.shutdown(5.0)
    assert fake.owned() == {}
    assert fake.rules("filter", "INPUT") == [FOREIGN]


async def test_without_cleanup_on_exit_the_rules_keep_forwarding() -> None:
    proxier, fake, _ = make()
    await proxier.sync(state((web(), THREE)))
    await proxier.shutdown(5.0)
    assert fake.chains("nat")


async def test_metrics_expose_rules_written_and_sync_kinds() -> None:
    proxier, _, clock = make()
    await proxier.sync(state((web(), THREE)))
    clock.now += 1
    await proxier.sync(state((web(), THREE[:2])))
    metrics = Metrics(proxier.view, proxier.sync_counters)
    text = metrics.render(metrics.snapshot()).decode()
    assert 'uproxy_rule_syncs_total{kind="full"} 1.0' in text
    assert 'uproxy_rule_syncs_total{kind="partial"} 1.0' in text
    written = proxier.sync_counters().rules_written
    assert written > 0 and f"uproxy_rules_written_total {float(written)}" in text


def test_fake_refuses_inconsistent_restores() -> None:
    fake = FakeNetfilter()
    with pytest.raises(KernelError, match="missing chain"):
        fake.apply({"nat": TableUpdate(replace={"UPROXY-SERVICES": ["-j UPROXY-SVC-NOPE"]})})
    fake.apply({"nat": TableUpdate(replace={"UPROXY-A": ["-j UPROXY-B"], "UPROXY-B": []})})
    with pytest.raises(KernelError, match="referenced"):
        fake.apply({"nat": TableUpdate(delete_chains=["UPROXY-B"])})
    with pytest.raises(KernelError, match="no such rule"):
        fake.apply({"nat": TableUpdate(delete={"UPROXY-A": ["-j RETURN"]})})
    with pytest.raises(KernelError, match="longer than 28"):
        fake.apply({"nat": TableUpdate(replace={"UPROXY-" + "X" * 30: []})})
    assert fake.rules("nat", "UPROXY-A") == ["-j UPROXY-B"]


async def test_source_ranges_come_and_go_by_partial_syncs_and_cleanup_removes_them() -> None:
    proxier, fake, clock = make(cleanup_on_exit=True)
    plain = web(load_balancer_ips=("192.0.2.80",))
    await proxier.sync(state((plain, THREE)))
    fw = port_chain(FW_PREFIX, WEB, Protocol.TCP)
    ranged = web(load_balancer_ips=("192.0.2.80",), load_balancer_source_ranges=("10.0.0.0/8",))
    for current in (state((ranged, THREE)), state((plain, THREE)), state((ranged, THREE))):
        clock.now += 1
        await proxier.sync(current, frozenset({WEB}))
        assert same(fake, current), fake.dump()
        assert (fw in fake.chains("nat")) is bool(current.services[WEB].load_balancer_source_ranges)
        assert bool(fake.rules("filter", "UPROXY-LB-FIREWALL")) is (fw in fake.chains("nat"))
    counters = proxier.sync_counters()
    assert (counters.full_syncs, counters.partial_syncs) == (1, 3)
    await proxier.shutdown(5.0)
    assert fake.owned() == {}
