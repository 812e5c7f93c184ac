"""NetfilterPortals against the stateful fake: assertions are on the resulting tables."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import pytest

from uproxy.cleanup import cleanup_everything
from uproxy.errors import KernelError, SettingsError
from uproxy.kernel import detect, netfilter
from uproxy.kernel.conntrack import UdpFlow, UdpFlowMatch
from uproxy.kernel.fake import FakeConntrack, FakeNetfilter
from uproxy.kernel.netfilter import Jump, TableUpdate, parse_save, plan_jumps, save_quote
from uproxy.model import Protocol, ServicePort, ServicePortName
from uproxy.proxier import netfilter_portals as np
from uproxy.proxier.netfilter_portals import (
    FILTER,
    GUARD_RULES,
    NAT,
    NODEPORTS,
    PORTALS,
    PORTALS_CONTAINER,
    PROXY_GUARD,
    PROXY_PORTS,
    NetfilterPortals,
    RuleContext,
    compute_rules,
    portal_rules,
    portal_shard,
    proxy_port_shard,
    tcp_redirects,
)
from uproxy.proxier.portals import Portal

WEB = ServicePortName("default", "web", "http")
DNS = ServicePortName("kube-system", "dns", "dns")


def portal(
    name: ServicePortName,
    proxy_port: int,
    *,
    protocol: Protocol = Protocol.TCP,
    port: int = 80,
    **fields: Any,
) -> Portal:
    fields.setdefault("cluster_ips", ("10.96.0.10",))
    return Portal(ServicePort(name, protocol, port, **fields), proxy_port)


def dns_portal(proxy_port: int = 40053, **fields: Any) -> Portal:
    fields.setdefault("cluster_ips", ("10.96.0.53",))
    return portal(DNS, proxy_port, protocol=Protocol.UDP, port=53, **fields)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make(
    fake: FakeNetfilter | None = None,
    *,
    conntrack: FakeConntrack | None = None,
    others: list[FakeNetfilter] | None = None,
    clock: Clock | None = None,
    **kwargs: Any,
) -> tuple[NetfilterPortals, FakeNetfilter, Clock]:
    fake = fake or FakeNetfilter()
    clock = clock or Clock()
    portals = NetfilterPortals(
        fake,
        resync_period=30.0,
        conntrack=conntrack or FakeConntrack(),
        physdev=True,
        other_backends=others or [],
        clock=clock,
        **kwargs,
    )
    return portals, fake, clock


def expected(portals: Mapping[ServicePortName, Portal], **kwargs: Any) -> dict[str, Any]:
    """What the fake should hold after syncing `portals`: compute_rules plus the jumps."""
    ruleset = compute_rules(portals, physdev=True, **kwargs)
    return {table: dict(chains) for table, chains in ruleset.chains.items()}


def service_rules(chains: Mapping[str, list[str]], kind: str) -> list[str]:
    """The service rules of every shard of `kind` (UPROXY-PORTALS, UPROXY-PROXY-PORTS)."""
    shard = re.compile(rf"{kind}-[TU]?\d\d")
    return [spec for chain, specs in chains.items() if shard.fullmatch(chain) for spec in specs]


def own_chains(fake: FakeNetfilter, table: str) -> dict[str, list[str]]:
    return {chain: fake.rules(table, chain) for chain in fake.chains(table)}


def assert_converged(fake: FakeNetfilter, portals: Mapping[ServicePortName, Portal]) -> None:
    want = expected(portals)
    for table in (NAT, FILTER):
        have = own_chains(fake, table)
        assert set(have) == set(want[table]), fake.dump()
        for chain, specs in want[table].items():
            if chain == PROXY_GUARD:
                assert have[chain] == specs
            else:
                assert sorted(have[chain]) == sorted(specs), f"{chain}\n{fake.dump()}"


# -- rules ---------------------------------------------------------------------------------


def test_cluster_ip_redirects_to_the_proxy_port_with_a_comment() -> None:
    rules = compute_rules({WEB: portal(WEB, 40001)})
    assert portal_shard("10.96.0.10") == "UPROXY-PORTALS-10"  # its low 6 bits
    assert rules.chains[NAT]["UPROXY-PORTALS-10"] == [
        '-d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http" -m tcp --dport 80 '
        "-j REDIRECT --to-ports 40001"
    ]
    assert proxy_port_shard("tcp", 40001) == "UPROXY-PROXY-PORTS-T39"  # 40001 // 1024
    assert rules.chains[FILTER]["UPROXY-PROXY-PORTS-T39"] == [
        '-p tcp -m comment --comment "default/web:http" -m tcp --dport 40001 -j UPROXY-PROXY-GUARD'
    ]
    assert service_rules(rules.chains[NAT], PORTALS) == rules.chains[NAT]["UPROXY-PORTALS-10"]
    assert rules.chains[FILTER][PROXY_GUARD] == list(GUARD_RULES)
    assert rules.chains[NAT][NODEPORTS] == [] and rules.chains[NAT][PORTALS_CONTAINER] == []


def test_shard_dispatch_covers_every_address_and_port_once() -> None:
    chains = compute_rules({}).chains
    dispatch = chains[NAT][PORTALS]
    assert len(dispatch) == 64
    assert "-d 0.0.0.10/0.0.0.63 -j UPROXY-PORTALS-10" in dispatch
    ports = chains[FILTER][PROXY_PORTS]
    assert len(ports) == 128
    assert ports[0] == "-p tcp -m tcp --dport 0:1023 -j UPROXY-PROXY-PORTS-T00"
    assert ports[-1] == "-p udp -m udp --dport 64512:65535 -j UPROXY-PROXY-PORTS-U63"
    assert all(f"-j {chain}" in " ".join(ports) for chain in chains[FILTER] if "-T" in chain)


def test_specific_bind_address_uses_dnat() -> None:
    rules = compute_rules({DNS: dns_portal(40053)}, bind_address="192.168.1.5")
    assert service_rules(rules.chains[NAT], PORTALS) == [
        '-d 10.96.0.53/32 -p udp -m comment --comment "kube-system/dns:dns" -m udp --dport 53 '
        "-j DNAT --to-destination 192.168.1.5:40053"
    ]


@pytest.mark.parametrize("address", ["127.0.0.1", "::1", "fd00::1"])
def test_bind_addresses_portals_cannot_serve_are_refused(address: str) -> None:
    with pytest.raises(SettingsError, match="--bind-address"):
        compute_rules({}, bind_address=address)


def test_load_balancer_ips_are_like_cluster_ips_and_ipv6_is_skipped() -> None:
    p = portal(WEB, 40001, cluster_ips=("10.96.0.10", "fd00::10"), load_balancer_ips=("1.2.3.4",))
    specs = service_rules(compute_rules({WEB: p}).chains[NAT], PORTALS)
    assert sorted(s.split()[1] for s in specs) == ["1.2.3.4/32", "10.96.0.10/32"]


def test_external_ips_follow_kube_proxy_semantics() -> None:
    p = portal(WEB, 40001, cluster_ips=(), external_ips=("203.0.113.7",))
    rules = compute_rules({WEB: p})
    assert service_rules(rules.chains[NAT], PORTALS) == [
        '-d 203.0.113.7/32 -p tcp -m comment --comment "default/web:http" -m tcp --dport 80 '
        "-m addrtype --dst-type LOCAL -j REDIRECT --to-ports 40001"
    ]
    assert rules.chains[NAT][PORTALS_CONTAINER] == [
        '-d 203.0.113.7/32 -p tcp -m comment --comment "default/web:http" -m tcp --dport 80 '
        "-m physdev ! --physdev-is-in -j REDIRECT --to-ports 40001"
    ]
    without = compute_rules({WEB: p}, physdev=False).chains[NAT][PORTALS_CONTAINER]
    assert "physdev" not in without[0]


def test_node_ports_and_nodeport_addresses() -> None:
    p = portal(WEB, 40001, node_port=30080)
    rules = compute_rules({WEB: p}, nodeport_addresses=("10.1.0.7/16", "fd00::/64"))
    assert rules.chains[NAT][NODEPORTS] == [
        '-p tcp -m comment --comment "default/web:http" -m tcp --dport 30080 '
        "-j REDIRECT --to-ports 40001"
    ]
    nodeport_jumps = [j for j in rules.jumps[NAT] if j.target == NODEPORTS]
    assert [(j.chain, j.destination, j.first) for j in nodeport_jumps] == [
        ("PREROUTING", "10.1.0.0/16", False),
        ("OUTPUT", "10.1.0.0/16", False),
    ]
    assert nodeport_jumps[0].spec == (
        '-d 10.1.0.0/16 -m addrtype --dst-type LOCAL -m comment --comment "uproxy service '
        'NodePorts; must be last" -j UPROXY-NODEPORTS'
    )
    everywhere = compute_rules({}, nodeport_addresses=("0.0.0.0/0",)).jumps[NAT]
    assert [j.destination for j in everywhere if j.target == NODEPORTS] == [None, None]


def test_external_traffic_goes_to_the_external_listener_when_it_has_one() -> None:
    svc = ServicePort(
        WEB,
        Protocol.TCP,
        80,
        cluster_ips=("10.96.0.10",),
        load_balancer_ips=("1.2.3.4",),
        external_ips=("203.0.113.7",),
        node_port=30080,
        external_traffic_local=True,
    )
    rules = compute_rules({WEB: Portal(svc, 40001, external_proxy_port=40002)})
    nat = rules.chains[NAT]
    by_address = {s.split()[1]: s.rsplit(" ", 1)[1] for s in service_rules(nat, PORTALS)}
    assert by_address == {
        "10.96.0.10/32": "40001",
        "1.2.3.4/32": "40002",
        "203.0.113.7/32": "40002",
    }
    assert nat[PORTALS_CONTAINER][0].endswith("--to-ports 40002")
    assert nat[NODEPORTS][0].endswith("--to-ports 40002")
    guarded = service_rules(rules.chains[FILTER], PROXY_PORTS)
    assert sorted(s.split("--dport ")[1].split()[0] for s in guarded) == ["40001", "40002"]


def test_source_ranges_redirect_only_allowed_sources_and_drop_the_rest() -> None:
    p = portal(
        WEB,
        40001,
        load_balancer_ips=("1.2.3.4",),
        external_ips=("203.0.113.7",),
        node_port=30080,
        load_balancer_source_ranges=("10.0.0.0/8", "192.0.2.0/24", "2001:db8::/32"),
    )
    # 192.0.2.5, a node address, is in a range: the LB IP is an allowed source too.
    rules = compute_rules({WEB: p}, node_ips=("192.0.2.5",))
    match = '-p tcp -m comment --comment "default/web:http" -m tcp --dport 80'
    assert rules.chains[NAT][portal_shard("1.2.3.4")] == [
        f"-s 10.0.0.0/8 -d 1.2.3.4/32 {match} -j REDIRECT --to-ports 40001",
        f"-s 192.0.2.0/24 -d 1.2.3.4/32 {match} -j REDIRECT --to-ports 40001",
        f"-s 1.2.3.4/32 -d 1.2.3.4/32 {match} -j REDIRECT --to-ports 40001",
    ]
    assert rules.chains[FILTER]["UPROXY-PORTAL-FIREWALL"] == [f"-d 1.2.3.4/32 {match} -j DROP"]
    # externalIPs, ClusterIPs and NodePorts are not subject to the ranges.
    plain = portal(WEB, 40001, load_balancer_ips=("1.2.3.4",), external_ips=("203.0.113.7",))
    plain_rules = compute_rules({WEB: Portal(plain.service, 40001)})
    for chain in (portal_shard("203.0.113.7"), portal_shard("10.96.0.10"), PORTALS_CONTAINER):
        assert rules.chains[NAT][chain] == plain_rules.chains[NAT][chain]
    assert rules.chains[NAT][NODEPORTS] == [
        '-p tcp -m comment --comment "default/web:http" -m tcp --dport 30080 '
        "-j REDIRECT --to-ports 40001"
    ]


@pytest.mark.parametrize("ranges", [(), ("2001:db8::/32",)])
def test_no_ranges_of_ipv4_means_no_firewall(ranges: tuple[str, ...]) -> None:
    ranged = portal(WEB, 40001, load_balancer_ips=("1.2.3.4",), load_balancer_source_ranges=ranges)
    plain = portal(WEB, 40001, load_balancer_ips=("1.2.3.4",))
    assert compute_rules({WEB: ranged}).chains == compute_rules({WEB: plain}).chains
    assert compute_rules({WEB: ranged}).chains[FILTER]["UPROXY-PORTAL-FIREWALL"] == []


async def test_source_ranges_come_and_go_by_incremental_syncs() -> None:
    portals, fake, clock = make()
    plain = {WEB: portal(WEB, 40001, load_balancer_ips=("1.2.3.4",))}
    ranged = {
        WEB: portal(
            WEB, 40001, load_balancer_ips=("1.2.3.4",), load_balancer_source_ranges=("10.0.0.0/8",)
        )
    }
    await portals.sync(plain)
    for wanted in (ranged, plain, ranged):
        clock.now += 1
        await portals.sync(wanted, frozenset({WEB}))
        assert_converged(fake, wanted)
    assert fake.rules(FILTER, "UPROXY-PORTAL-FIREWALL") == [
        '-d 1.2.3.4/32 -p tcp -m comment --comment "default/web:http" -m tcp --dport 80 -j DROP'
    ]
    await portals.cleanup()
    assert fake.owned() == {}


def test_comments_keep_only_safe_characters() -> None:
    odd = ServicePortName("ns", 'we"b x', "p'1")
    assert np.rule_comment(odd) == "ns/webx:p1"


# -- converging the fake -------------------------------------------------------------------


async def test_first_sync_installs_chains_jumps_and_rules_beside_foreign_ones() -> None:
    portals, fake, _ = make()
    fake.hand_add_rule(NAT, "KUBE-SERVICES-ish", "-d 10.0.0.1/32 -j RETURN")  # foreign chains
    fake.hand_add_rule(NAT, "DOCKER-ish", "-j RETURN")
    fake.hand_add_rule(NAT, "PREROUTING", "-j KUBE-SERVICES-ish")
    fake.hand_add_rule(NAT, "PREROUTING", "-m addrtype --dst-type LOCAL -j DOCKER-ish")
    wanted = {WEB: portal(WEB, 40001, node_port=30080), DNS: dns_portal()}
    await portals.sync(wanted)

    assert_converged(fake, wanted)
    prerouting = fake.rules(NAT, "PREROUTING")
    assert prerouting[:2] == [
        '-m comment --comment "uproxy service portals" -j UPROXY-PORTALS',
        '-m comment --comment "uproxy externalIPs, traffic from outside" '
        "-j UPROXY-PORTALS-CONTAINER",
    ]
    assert prerouting[2:4] == [
        "-j KUBE-SERVICES-ish",
        "-m addrtype --dst-type LOCAL -j DOCKER-ish",
    ]  # foreign rules untouched, in order
    assert prerouting[4].endswith("-j UPROXY-NODEPORTS")  # NodePorts last
    assert fake.rules(NAT, "OUTPUT")[0].endswith("-j UPROXY-PORTALS")
    firewall = '-m conntrack --ctstate NEW -m comment --comment "uproxy portals load balancer '
    assert fake.rules(FILTER, "INPUT") == [
        f'{firewall}firewall" -j UPROXY-PORTAL-FIREWALL',
        '-m conntrack --ctstate NEW -m comment --comment "uproxy proxy ports" -j UPROXY-PROXY-PORTS',  # noqa: E501
    ]
    for hook in ("FORWARD", "OUTPUT"):
        assert fake.rules(FILTER, hook) == [f'{firewall}firewall" -j UPROXY-PORTAL-FIREWALL']
    assert fake.rules(NAT, "KUBE-SERVICES-ish") == ["-d 10.0.0.1/32 -j RETURN"]


async def test_removed_and_changed_portals_leave_no_stale_rules() -> None:
    portals, fake, _ = make()
    await portals.sync({WEB: portal(WEB, 40001), DNS: dns_portal(40053)})
    moved = {WEB: portal(WEB, 40002, cluster_ips=("10.96.0.11",))}
    await portals.sync(moved)
    assert_converged(fake, moved)
    assert not any("40001" in s or "dns" in s for s in fake.dump().splitlines())
    await portals.sync({})
    assert_converged(fake, {})


async def test_an_unchanged_sync_does_not_touch_the_kernel() -> None:
    portals, fake, clock = make()
    wanted = {WEB: portal(WEB, 40001)}
    await portals.sync(wanted)
    commits = fake.commits
    clock.now += 5
    await portals.sync(dict(wanted))
    assert fake.commits == commits


async def test_one_changed_service_is_applied_without_rewriting_the_others() -> None:
    portals, fake, clock = make()
    many = {
        ServicePortName("ns", f"s{i}", ""): portal(
            ServicePortName("ns", f"s{i}", ""), 41000 + i, cluster_ips=(f"10.96.1.{i}",)
        )
        for i in range(1, 200)
    }
    await portals.sync(many)
    order_before = service_rules(own_chains(fake, NAT), PORTALS)
    clock.now += 1
    changed = dict(many)
    name = ServicePortName("ns", "s7", "")
    changed[name] = portal(name, 49999, cluster_ips=("10.96.1.7",))
    await portals.sync(changed)
    assert_converged(fake, changed)
    after = service_rules(own_chains(fake, NAT), PORTALS)
    # Everything but s7's rule kept its place: nothing was rewritten.
    assert [s for s in after if "ns/s7" not in s] == [s for s in order_before if "ns/s7" not in s]


async def test_a_rule_deleted_by_hand_returns_at_the_next_resync() -> None:
    portals, fake, clock = make()
    wanted = {WEB: portal(WEB, 40001), DNS: dns_portal()}
    await portals.sync(wanted)
    shard = portal_shard("10.96.0.10")
    victim = fake.rules(NAT, shard)[0]
    fake.hand_delete_rule(NAT, shard, victim)
    fake.hand_delete_rule(NAT, PORTALS, fake.rules(NAT, PORTALS)[0])  # a dispatch rule
    fake.hand_delete_rule(NAT, "PREROUTING", fake.rules(NAT, "PREROUTING")[0])
    clock.now += 5
    await portals.sync(wanted)  # not due: uproxy trusts what it wrote
    assert victim not in fake.rules(NAT, shard)
    clock.now += 30
    await portals.sync(wanted)
    assert_converged(fake, wanted)
    assert fake.rules(NAT, "PREROUTING")[0].endswith("-j UPROXY-PORTALS")


async def test_rules_added_by_hand_inside_uproxy_chains_are_removed() -> None:
    portals, fake, clock = make()
    wanted = {WEB: portal(WEB, 40001)}
    await portals.sync(wanted)
    fake.hand_add_rule(NAT, PORTALS, "-d 10.9.9.9/32 -j RETURN")
    fake.hand_add_rule(FILTER, PROXY_GUARD, "-j ACCEPT", first=True)  # breaks the guard's order
    fake.hand_add_rule(NAT, "OUTPUT", "-p tcp -j UPROXY-PORTALS")  # a stray jump into our chain
    clock.now += 31
    await portals.sync(wanted)
    assert_converged(fake, wanted)
    assert "-p tcp -j UPROXY-PORTALS" not in fake.rules(NAT, "OUTPUT")


async def test_an_incremental_sync_that_trips_over_a_hand_edit_falls_back_to_a_full_sync() -> None:
    portals, fake, clock = make()
    await portals.sync({WEB: portal(WEB, 40001)})
    shard = portal_shard("10.96.0.10")
    fake.hand_delete_rule(NAT, shard, fake.rules(NAT, shard)[0])
    clock.now += 1
    moved = {WEB: portal(WEB, 40002)}  # deleting the old rule now fails: it is gone
    await portals.sync(moved)
    assert_converged(fake, moved)


async def test_restart_after_a_crash_reconciles_leftovers() -> None:
    fake = FakeNetfilter()
    old, _, _ = make(fake)
    await old.sync({WEB: portal(WEB, 40001), DNS: dns_portal(40053)})
    # An older version's chain with a jump to it, and a leftover rule in a current chain.
    fake.apply({NAT: TableUpdate(replace={"UPROXY-OLD": ["-j RETURN"]})})
    fake.hand_add_rule(NAT, "PREROUTING", "-j UPROXY-OLD")
    fake.hand_add_rule(NAT, "OUTPUT", "-m comment --comment x -j UPROXY-PORTALS")  # duplicate-ish

    new, _, _ = make(fake)  # SIGKILL: a fresh process, nothing in memory
    wanted = {WEB: portal(WEB, 41001)}
    await new.sync(wanted)
    assert_converged(fake, wanted)
    assert "UPROXY-OLD" not in fake.chains(NAT)
    assert all("UPROXY-OLD" not in s for s in fake.rules(NAT, "PREROUTING"))
    assert [s for s in fake.rules(NAT, "OUTPUT") if "UPROXY-PORTALS" in s] == [
        '-m comment --comment "uproxy service portals" -j UPROXY-PORTALS'
    ]


async def test_a_failed_write_changes_nothing_and_the_next_sync_converges() -> None:
    portals, fake, clock = make()
    await portals.sync({WEB: portal(WEB, 40001)})
    before = fake.dump()
    # Both the incremental write and the full sync it falls back to fail.
    fake.fail_next("iptables-nft-restore: line 3 failed", times=2)
    clock.now += 1
    with pytest.raises(KernelError):
        await portals.sync({WEB: portal(WEB, 40002)})
    assert fake.dump() == before
    clock.now += 1
    await portals.sync({WEB: portal(WEB, 40002)})
    assert_converged(fake, {WEB: portal(WEB, 40002)})


async def test_many_stale_rules_are_replaced_in_one_rewrite() -> None:
    fake = FakeNetfilter()
    names = [ServicePortName("ns", f"s{i}", "") for i in range(300)]
    old, _, _ = make(fake)
    await old.sync({n: portal(n, 40000 + i) for i, n in enumerate(names)})
    new, _, _ = make(fake)
    wanted = {n: portal(n, 50000 + i) for i, n in enumerate(names)}
    await new.sync(wanted)
    assert_converged(fake, wanted)


async def test_flush_at_start_empties_own_chains_and_cleans_the_other_backend() -> None:
    legacy = FakeNetfilter("legacy")
    legacy_portals, _, _ = make(legacy)
    await legacy_portals.sync({WEB: portal(WEB, 40001)})
    legacy.hand_add_rule(NAT, "KUBE-SERVICES-ish", "-j RETURN")
    legacy.hand_add_rule(NAT, "PREROUTING", "-j KUBE-SERVICES-ish")

    nft = FakeNetfilter("nft")
    stale, _, _ = make(nft)
    await stale.sync({WEB: portal(WEB, 40009)})
    portals, _, _ = make(nft, others=[legacy])
    await portals.flush_at_start()
    assert all(nft.rules(NAT, c) == [] for c in nft.chains(NAT))
    assert legacy.owned() == {}
    assert legacy.rules(NAT, "PREROUTING") == ["-j KUBE-SERVICES-ish"]
    await portals.sync({WEB: portal(WEB, 40001)})
    assert_converged(nft, {WEB: portal(WEB, 40001)})


async def test_cleanup_removes_everything_owned_and_is_idempotent() -> None:
    portals, fake, _ = make()
    fake.hand_add_rule(FILTER, "INPUT", "-i lo -j ACCEPT")
    await portals.sync({WEB: portal(WEB, 40001, node_port=30080)})
    await portals.cleanup()
    assert fake.owned() == {}
    assert fake.rules(FILTER, "INPUT") == ["-i lo -j ACCEPT"]
    await portals.cleanup()
    await portals.sync({WEB: portal(WEB, 40001)})  # usable again afterwards
    assert_converged(fake, {WEB: portal(WEB, 40001)})


async def test_a_sync_told_what_changed_converges_exactly_like_a_full_one() -> None:
    portals, fake, clock = make()
    names = [ServicePortName("ns", f"s{i}", "") for i in range(1, 50)]
    many = {n: portal(n, 41000 + i, cluster_ips=(f"10.96.1.{i}",)) for i, n in enumerate(names)}
    await portals.sync(many, None)
    clock.now += 1
    changed = dict(many)
    changed[names[3]] = portal(names[3], 49999, cluster_ips=("10.96.1.200",))
    del changed[names[4]]
    added = ServicePortName("ns", "new", "")
    changed[added] = portal(added, 48888, cluster_ips=("10.96.2.1",))
    await portals.sync(changed, frozenset({names[3], names[4], added}))
    assert_converged(fake, changed)


async def test_udp_flows_of_a_changed_portal_go_when_told_what_changed() -> None:
    conntrack = FakeConntrack()
    portals, _, clock = make(conntrack=conntrack)
    both = {WEB: portal(WEB, 40001), DNS: dns_portal(40053)}
    await portals.sync(both, None)
    kept = flow("10.96.0.10", 80)
    conntrack.flows = [flow("10.96.0.53", 53, reply_sport=40053), kept]
    clock.now += 1
    await portals.sync({WEB: portal(WEB, 40001), DNS: dns_portal(40054)}, frozenset({DNS}))
    assert conntrack.flows == [kept]


# -- conntrack -----------------------------------------------------------------------------


def flow(dst: str, dport: int, reply_src: str = "10.10.0.1", reply_sport: int = 1) -> UdpFlow:
    return UdpFlow("10.10.0.2", 5555, dst, dport, reply_src, reply_sport)


async def test_udp_flows_of_changed_portals_are_deleted_and_others_kept() -> None:
    unrelated = flow("10.96.0.99", 53)
    web_like = flow("10.96.0.10", 80)
    conntrack = FakeConntrack([flow("10.96.0.53", 53), unrelated, web_like])
    portals, _, clock = make(conntrack=conntrack)
    await portals.sync({WEB: portal(WEB, 40001), DNS: dns_portal(40053, node_port=30053)})
    # First sync: flows to the portal's addresses predate it (or a dead run's ports).
    assert conntrack.flows == [unrelated, web_like]

    conntrack.flows += [flow("10.96.0.53", 53, reply_sport=40053), flow("10.1.0.1", 30053)]
    clock.now += 1
    await portals.sync({WEB: portal(WEB, 40001), DNS: dns_portal(40053, node_port=30053)})
    assert len(conntrack.flows) == 4  # nothing changed, nothing deleted

    clock.now += 1
    await portals.sync({WEB: portal(WEB, 40002)})  # DNS gone; a TCP change flushes nothing
    assert conntrack.flows == [unrelated, web_like]


async def test_a_udp_portal_moving_to_a_new_proxy_port_drops_its_flows() -> None:
    conntrack = FakeConntrack()
    portals, _, clock = make(conntrack=conntrack)
    await portals.sync({DNS: dns_portal(40053)})
    conntrack.flows = [flow("10.96.0.53", 53, reply_sport=40053)]
    clock.now += 1
    await portals.sync({DNS: dns_portal(40054)})
    assert conntrack.flows == []


async def test_the_first_sync_deletes_tcp_entries_to_virtual_addresses_made_without_nat() -> None:
    def tcp(dst: str, sport: int, reply_src: str, reply_sport: int) -> UdpFlow:
        return UdpFlow("10.10.0.2", sport, dst, 80, reply_src, reply_sport, protocol="tcp")

    unnated = tcp("10.96.0.10", 4000, "10.96.0.10", 80)  # made before the portal was in
    redirected = tcp("10.96.0.10", 4001, "10.10.0.1", 40001)
    to_a_real_host = tcp("192.0.2.7", 4002, "192.0.2.7", 80)
    conntrack = FakeConntrack([unnated, redirected, to_a_real_host])
    portals, _, clock = make(conntrack=conntrack)
    await portals.sync({WEB: portal(WEB, 40001)})
    assert conntrack.flows == [redirected, to_a_real_host]
    conntrack.flows.append(unnated)
    clock.now += 1
    await portals.sync({WEB: portal(WEB, 40001)})
    assert conntrack.flows == [redirected, to_a_real_host, unnated]  # only after a start


async def test_a_restart_deletes_tcp_entries_a_dead_run_steered_to_its_proxy_ports() -> None:
    def tcp(dst: str, dport: int, sport: int, reply_sport: int) -> UdpFlow:
        return UdpFlow("10.10.0.2", sport, dst, dport, "10.10.0.1", reply_sport, protocol="tcp")

    # The dead run's portals, as the kernel still has them when the new run starts.
    old, fake, _ = make()
    await old.sync({WEB: portal(WEB, 39167, node_port=30080)})
    refused_there = tcp("10.96.0.10", 80, 4000, 39167)  # in CLOSE: the next SYN keeps its NAT
    nodeport_there = tcp("10.10.0.1", 30080, 4001, 39167)
    this_run = tcp("10.96.0.10", 80, 4002, 40001)
    elsewhere = tcp("192.0.2.7", 80, 4003, 39167)  # not a portal's address
    conntrack = FakeConntrack([refused_there, nodeport_there, this_run, elsewhere])
    portals, _, _ = make(fake, conntrack=conntrack)
    await portals.flush_at_start()
    await portals.sync({WEB: portal(WEB, 40001, node_port=30080)})
    assert conntrack.flows == [this_run, elsewhere]


def test_tcp_redirects_reads_a_runs_tcp_portals_from_its_rules() -> None:
    rules = portal_rules(WEB, portal(WEB, 39167, node_port=30080), RuleContext())
    chains: dict[str, list[str]] = {}
    for table, chain, spec in rules:
        if table == "nat":
            chains.setdefault(chain, []).append(spec)
    assert tcp_redirects(chains) == {("10.96.0.10", 80, 39167), (None, 30080, 39167)}


def test_flow_matches() -> None:
    f = flow("10.96.0.53", 53, reply_src="10.20.0.11", reply_sport=5353)
    assert UdpFlowMatch.destination("10.96.0.53", 53).matches(f)
    assert UdpFlowMatch.destination(None, 53).matches(f)
    assert not UdpFlowMatch.destination("10.96.0.54", 53).matches(f)
    assert UdpFlowMatch.endpoint("10.20.0.11", 5353).matches(f)
    assert not UdpFlowMatch.endpoint("10.20.0.11", 53).matches(f)


# -- netfilter helpers and the fake's invariants -------------------------------------------


def test_save_quote_matches_iptables_save() -> None:
    assert save_quote("abc-1_2") == "abc-1_2"
    assert save_quote("a/b:c") == '"a/b:c"'
    assert save_quote("a.b") == '"a.b"'
    assert save_quote("") == '""'


def test_parse_save_keeps_order_and_empty_chains() -> None:
    text = """# Generated by iptables-save
*nat
:PREROUTING ACCEPT [0:0]
:UPROXY-PORTALS - [0:0]
:UPROXY-NODEPORTS - [0:0]
-A PREROUTING -m comment --comment x -j UPROXY-PORTALS
-A UPROXY-PORTALS -d 10.0.0.1/32 -j RETURN
-A UPROXY-PORTALS -d 10.0.0.2/32 -j RETURN
COMMIT
"""
    tables = parse_save(text)
    assert tables["nat"] == {
        "PREROUTING": ["-m comment --comment x -j UPROXY-PORTALS"],
        "UPROXY-PORTALS": ["-d 10.0.0.1/32 -j RETURN", "-d 10.0.0.2/32 -j RETURN"],
        "UPROXY-NODEPORTS": [],
    }
    state = netfilter.TableState.from_chains(tables["nat"])
    assert state.jumps == [("PREROUTING", "-m comment --comment x -j UPROXY-PORTALS")]


def test_plan_jumps_deletes_stale_and_duplicates_and_ignores_foreign_rules() -> None:
    want = Jump("PREROUTING", "UPROXY-A", "a")
    current = {"PREROUTING": [want.spec, "-j KUBE-X", want.spec, "-j UPROXY-B"], "OUTPUT": []}
    stale, missing = plan_jumps(current, [want, Jump("OUTPUT", "UPROXY-A", "a")])
    assert stale == [("PREROUTING", want.spec), ("PREROUTING", "-j UPROXY-B")]
    assert [j.chain for j in missing] == ["OUTPUT"]


def test_fake_refuses_what_the_kernel_refuses() -> None:
    fake = FakeNetfilter()
    with pytest.raises(KernelError, match="missing chain"):
        fake.apply({NAT: TableUpdate(replace={"UPROXY-A": ["-j UPROXY-B"]})})
    fake.apply({NAT: TableUpdate(replace={"UPROXY-A": [], "UPROXY-B": ["-j UPROXY-A"]})})
    with pytest.raises(KernelError, match="referenced"):
        fake.apply({NAT: TableUpdate(delete_chains=["UPROXY-A"])})
    with pytest.raises(KernelError, match="Bad rule"):
        fake.apply({NAT: TableUpdate(delete={"UPROXY-A": ["-j RETURN"]})})
    with pytest.raises(ValueError, match="not one of uproxy's chains"):
        fake.apply({NAT: TableUpdate(append={"PREROUTING": ["-j ACCEPT"]})})
    before = fake.dump()
    with pytest.raises(KernelError):  # atomic: the append before the bad delete is not kept
        fake.apply(
            {NAT: TableUpdate(append={"UPROXY-A": ["-j RETURN"]}, delete={"UPROXY-B": ["-j DROP"]})}
        )
    assert fake.dump() == before


# -- choosing a backend --------------------------------------------------------------------


def fake_tools(monkeypatch: pytest.MonkeyPatch, outputs: dict[str, str]) -> None:
    def quiet(argv: list[str]) -> str:
        return outputs.get(" ".join(argv), "")

    monkeypatch.setattr(detect, "run_tool_quietly", quiet)


def test_detect_prefers_kubelet_hints(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tools(
        monkeypatch,
        {
            "iptables-legacy-save": "*mangle\n:KUBE-IPTABLES-HINT - [0:0]\n" + "-A X\n" * 50,
            "iptables --version": "iptables v1.8.9 (nf_tables)",
        },
    )
    assert detect.detect_backend() == "legacy"
    fake_tools(monkeypatch, {"iptables-nft-save -t mangle": ":KUBE-KUBELET-CANARY - [0:0]\n"})
    assert detect.detect_backend() == "nft"


def test_detect_counts_rules_then_asks_iptables(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_tools(
        monkeypatch,
        {
            "iptables-legacy-save": "-A INPUT -j ACCEPT\n",
            "iptables --version": "v1.8.9 (nf_tables)",
        },
    )
    assert detect.detect_backend() == "legacy"
    fake_tools(monkeypatch, {"iptables --version": "iptables v1.8.9 (legacy)"})
    assert detect.detect_backend() == "legacy"
    fake_tools(monkeypatch, {"iptables --version": "iptables v1.8.9 (nf_tables)"})
    assert detect.detect_backend() == "nft"
    assert detect.detect_backend("legacy") == "legacy"


async def test_cleanup_everything_is_fine_without_any_tools(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(detect, "find_tool", lambda name: None)
    assert detect.open_installed("nft") is None
    assert detect.open_installed("legacy") is None
    await cleanup_everything([])
