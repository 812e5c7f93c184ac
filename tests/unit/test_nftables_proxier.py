"""The nftables mode against a stateful fake of the kernel's table."""

from __future__ import annotations

import dataclasses
import random

import pytest

from uproxy.endpoints import categorize_endpoints
from uproxy.errors import KernelError
from uproxy.kernel.conntrack import UdpFlow
from uproxy.kernel.fake import FakeConntrack
from uproxy.kernel.fake_nft import FakeNft
from uproxy.kernel.nft import Chain, Element, Map, Rule, Transaction
from uproxy.model import Endpoint, Protocol, ProxyState, ServicePort, ServicePortName
from uproxy.proxier.nftables import NftablesProxier
from uproxy.proxier.nftables_capabilities import check_nftables
from uproxy.proxier.nftables_rules import (
    DROP_VERDICT,
    FIREWALL_IPS,
    NO_ENDPOINT_NODEPORTS,
    NO_ENDPOINT_SERVICES,
    REJECT_VERDICT,
    SERVICE_IPS,
    SERVICE_NODEPORTS,
    NatConfig,
    PortObjects,
    render_port,
)

HERE = "node-a"
WEB = ServicePortName("default", "web", "http")
DNS = ServicePortName("default", "dns", "dns")
EP1 = Endpoint("10.1.0.1", 8080, node_name=HERE)
EP2 = Endpoint("10.1.0.2", 8080, node_name="node-b")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def web(**changes: object) -> ServicePort:
    base = ServicePort(WEB, Protocol.TCP, 80, cluster_ips=("10.96.0.10",), node_port=30080)
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def dns(**changes: object) -> ServicePort:
    base = ServicePort(DNS, Protocol.UDP, 53, cluster_ips=("10.96.0.53",))
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def state(*ports: tuple[ServicePort, tuple[Endpoint, ...]]) -> ProxyState:
    return ProxyState(
        services={s.name: s for s, _ in ports}, endpoints={s.name: e for s, e in ports}
    )


def make(
    config: NatConfig | None = None, conntrack: FakeConntrack | None = None
) -> tuple[NftablesProxier, FakeNft, Clock]:
    nft, clock = FakeNft(), Clock()
    proxier = NftablesProxier(
        nft=nft,
        node_name=HERE,
        config=config or NatConfig(),
        conntrack=conntrack or FakeConntrack(),
        resync_period=30.0,
        clock=clock,
    )
    return proxier, nft, clock


def table(nft: FakeNft) -> tuple[dict[str, list[str]], dict[str, dict[str, str | None]]]:
    assert nft.table is not None
    elements = {name: nft.elements(name) for name in nft.table.elements}
    return nft.chains(), elements


async def full_table(s: ProxyState, config: NatConfig | None = None) -> object:
    proxier, nft, _ = make(config)
    await proxier.sync(s)
    return table(nft)


def chain_for(nft: FakeNft, prefix: str) -> tuple[str, list[str]]:
    # Per service port chains carry the port's name (with slashes); the static ones do not.
    (found,) = [(n, r) for n, r in nft.chains().items() if n.startswith(prefix) and "/" in n]
    return found


async def test_cluster_ip_and_nodeport_dispatch_to_the_service_chain() -> None:
    proxier, nft, _ = make()
    await proxier.sync(state((web(), (EP1, EP2))))
    service_chain, rules = chain_for(nft, "service-")
    assert nft.elements(SERVICE_IPS) == {"10.96.0.10 . tcp . 80": f"goto {service_chain}"}
    external_chain, external_rules = chain_for(nft, "external-")
    assert nft.elements(SERVICE_NODEPORTS) == {"tcp . 30080": f"goto {external_chain}"}
    assert external_rules == ["jump mark-for-masquerade", f"goto {service_chain}"]
    first, last = rules[-2:]
    assert first.startswith("numgen random mod 2 == 0 goto endpoint-")
    assert last.startswith("goto endpoint-")
    endpoint_chains = [n for n in nft.chains() if n.startswith("endpoint-")]
    assert len(endpoint_chains) == 2
    dnat = {nft.chains()[n][-1] for n in endpoint_chains}
    tail = ' comment "default/web:http"'
    assert dnat == {f"meta l4proto tcp dnat to 10.1.0.{i}:8080{tail}" for i in (1, 2)}


async def test_no_endpoints_is_rejected_and_no_local_endpoint_is_dropped() -> None:
    proxier, nft, _ = make()
    await proxier.sync(state((web(), ())))
    assert nft.elements(SERVICE_IPS) == {}
    assert nft.elements(NO_ENDPOINT_SERVICES) == {"10.96.0.10 . tcp . 80": REJECT_VERDICT}
    assert nft.elements(NO_ENDPOINT_NODEPORTS) == {"tcp . 30080": REJECT_VERDICT}
    await proxier.sync(state((web(internal_traffic_local=True), (EP2,))))
    # Endpoints exist, only not on this node: kube-proxy drops rather than rejects.
    assert nft.elements(NO_ENDPOINT_SERVICES) == {"10.96.0.10 . tcp . 80": DROP_VERDICT}
    assert set(nft.elements(SERVICE_NODEPORTS)) == {"tcp . 30080"}  # external is Cluster


async def test_external_traffic_local_keeps_the_client_address() -> None:
    proxier, nft, _ = make()
    await proxier.sync(state((web(external_traffic_local=True), (EP1, EP2))))
    _, rules = chain_for(nft, "external-")
    local_chain, local_rules = chain_for(nft, "local-")
    service_chain, _ = chain_for(nft, "service-")
    assert rules == [
        "fib saddr type local jump mark-for-masquerade",
        f"fib saddr type local goto {service_chain}",
        f"goto {local_chain}",
    ]
    (only,) = local_rules
    assert only.startswith("goto endpoint-") and only.endswith("10.1.0.1/8080")


async def test_affinity_checks_each_endpoint_set_before_the_random_pick() -> None:
    proxier, nft, _ = make()
    await proxier.sync(state((web(affinity_timeout=60), (EP1, EP2))))
    _, rules = chain_for(nft, "service-")
    assert [r.split()[0:2] for r in rules[:2]] == [["ip", "saddr"], ["ip", "saddr"]]
    assert rules[2].startswith("numgen random mod 2 == 0 goto")
    assert nft.table is not None
    assert {s.timeout for s in nft.table.sets.values()} == {60}
    assert all(
        any(r.startswith("update @affinity-") for r in nft.chains()[n])
        for n in nft.chains()
        if n.startswith("endpoint-")
    )


async def test_masquerade_flags() -> None:
    proxier, nft, _ = make(NatConfig(cluster_cidr="10.244.0.0/16"))
    await proxier.sync(state((web(), (EP1,))))
    _, rules = chain_for(nft, "service-")
    assert rules[0] == "ip saddr != 10.244.0.0/16 jump mark-for-masquerade"
    proxier, nft, _ = make(NatConfig(masquerade_all=True))
    await proxier.sync(state((web(), (EP1,))))
    _, rules = chain_for(nft, "service-")
    assert rules[0] == "jump mark-for-masquerade"


async def test_partial_syncs_end_where_a_full_sync_would() -> None:
    rng = random.Random(7)
    names = [ServicePortName("ns", f"s{i}", "") for i in range(12)]
    proxier, nft, clock = make()
    current: dict[ServicePortName, tuple[ServicePort, tuple[Endpoint, ...]]] = {}
    await proxier.sync(state())
    for _ in range(60):
        name = rng.choice(names)
        changed = frozenset({name})
        if name in current and rng.random() < 0.25:
            del current[name]
        else:
            i = names.index(name)
            svc = ServicePort(
                name,
                rng.choice([Protocol.TCP, Protocol.UDP]),
                80,
                cluster_ips=(f"10.96.0.{i + 1}",),
                external_ips=(f"192.0.2.{i + 1}",) if rng.random() < 0.3 else (),
                node_port=30000 + i if rng.random() < 0.3 else None,
                affinity_timeout=rng.choice([None, 30, 60]),
                internal_traffic_local=rng.random() < 0.2,
                external_traffic_local=rng.random() < 0.3,
                load_balancer_ips=(f"198.51.100.{i + 1}",) if rng.random() < 0.4 else (),
                load_balancer_source_ranges=rng.choice([(), ("10.0.0.0/8",), ("2001:db8::/32",)]),
            )
            count = rng.randrange(0, 4)
            eps = tuple(
                Endpoint(f"10.1.{i}.{k}", 8080, node_name=rng.choice([HERE, "node-b"]))
                for k in range(count)
            )
            current[name] = (svc, eps)
        clock.now += 1
        s = state(*current.values())
        await proxier.sync(s, changed)
        assert table(nft) == await full_table(s), nft.dump()
    assert proxier.sync_counters().partial_syncs > 50


async def test_a_full_sync_removes_leftovers_and_restores_hand_deleted_rules() -> None:
    proxier, nft, clock = make()
    s = state((web(), (EP1,)))
    await proxier.sync(s)
    want = table(nft)
    nft.hand_add_chain("service-DEADBEEF-default/gone/tcp/http", ["counter"])
    service_chain, rules = chain_for(nft, "service-PK")
    nft.hand_delete_rule(service_chain, rules[-1])
    clock.now += 31  # the periodic full sync is due
    await proxier.sync(s, frozenset())
    assert table(nft) == want


async def test_a_restart_over_a_killed_runs_table_converges() -> None:
    old, nft, _ = make()
    await old.sync(state((web(), (EP1, EP2)), (dns(), (EP1,))))
    fresh = NftablesProxier(
        nft=nft, node_name=HERE, config=NatConfig(), conntrack=FakeConntrack(), clock=Clock()
    )
    s = state((web(), (EP2,)))
    await fresh.sync(s)
    assert table(nft) == await full_table(s)


async def test_a_partial_sync_that_trips_over_a_hand_edit_falls_back_to_a_full_one() -> None:
    proxier, nft, clock = make()
    await proxier.sync(state((web(), (EP1, EP2))))
    assert nft.table is not None
    nft.table.elements[SERVICE_IPS].clear()  # an admin flushed the map
    clock.now += 1
    s = state()  # removing the service deletes its element, which is no longer there
    await proxier.sync(s, frozenset({WEB}))
    assert proxier.sync_counters().full_syncs == 2
    assert proxier.sync_counters().partial_failures == 1
    assert table(nft) == await full_table(s)


async def test_a_failed_transaction_changes_nothing_and_the_next_sync_converges() -> None:
    proxier, nft, clock = make()
    await proxier.sync(state((web(), (EP1,))))
    before = table(nft)
    nft.fail_next()  # the partial sync
    nft.fail_next()  # and the full sync it falls back to
    with pytest.raises(KernelError):
        await proxier.sync(state((web(), (EP1, EP2))), frozenset({WEB}))
    assert table(nft) == before
    clock.now += 1
    s = state((web(), (EP1, EP2)))
    await proxier.sync(s, frozenset())
    assert table(nft) == await full_table(s)


async def test_udp_flows_of_a_removed_endpoint_and_of_a_first_endpoint_are_deleted() -> None:
    gone = Endpoint("10.1.0.7", 53)
    stays = Endpoint("10.1.0.8", 53)
    to_gone = UdpFlow("10.10.0.2", 5000, "10.96.0.53", 53, "10.1.0.7", 53)
    to_stays = UdpFlow("10.10.0.2", 5001, "10.96.0.53", 53, "10.1.0.8", 53)
    conntrack = FakeConntrack([to_gone, to_stays])
    proxier, _, clock = make(conntrack=conntrack)
    await proxier.sync(state((dns(), (gone, stays))))
    conntrack.flows = [to_gone, to_stays]
    clock.now += 1
    await proxier.sync(state((dns(), (stays,))), frozenset({DNS}))
    assert conntrack.flows == [to_stays]

    clock.now += 1
    await proxier.sync(state((dns(), ())), frozenset({DNS}))
    rejected = UdpFlow("10.10.0.3", 5002, "10.96.0.53", 53, "10.96.0.53", 53)
    conntrack.flows = [rejected]
    clock.now += 1
    await proxier.sync(state((dns(), (stays,))), frozenset({DNS}))
    assert conntrack.flows == []


async def test_other_families_addresses_and_endpoints_are_left_out() -> None:
    proxier, nft, _ = make()
    v6 = Endpoint("fd00::1", 8080, node_name=HERE)
    await proxier.sync(state((web(cluster_ips=("10.96.0.10", "fd00::10")), (EP1, v6))))
    assert set(nft.elements(SERVICE_IPS)) == {"10.96.0.10 . tcp . 80"}
    assert not [n for n in nft.chains() if "fd00::1" in n]


def test_the_fake_refuses_what_nft_refuses() -> None:
    nft = FakeNft()
    tx = Transaction()
    tx.add(Chain("a"))
    tx.add(Chain("b"))
    tx.add(Rule("a", "goto b"))
    tx.add(Map("m", "inet_proto . inet_service : verdict"))
    tx.add(Element("m", "tcp . 80", "goto b"))
    nft.apply(tx)
    before = nft.dump()
    for bad in (
        [("delete", Chain("b"))],  # referenced
        [("delete", Chain("a"))],  # not empty
        [("add", Rule("missing", "accept"))],
        [("add", Rule("a", "goto missing"))],
        [("delete", Element("m", "udp . 53"))],
        [("add", Rule("a", "ip saddr @nope accept"))],
    ):
        tx = Transaction()
        tx.add(Chain("c"))  # atomic: not kept when a later operation fails
        tx.ops += bad  # type: ignore[arg-type]
        with pytest.raises(KernelError):
            nft.apply(tx)
        assert nft.dump() == before


class RefusingNft:
    def check(self, script: str) -> None:
        raise KernelError("nft failed (exit 1): Could not process rule: No such file or directory")


def test_a_host_that_cannot_do_nftables_is_refused_with_the_alternatives_named() -> None:
    with pytest.raises(
        KernelError, match=r"nftables mode needs .*--mode iptables or --mode userspace"
    ):
        check_nftables(RefusingNft())


# -- loadBalancerSourceRanges (kube-proxy's firewall-ips map and firewall-check chain) --------

FW_NAME = ServicePortName("ns1", "svc1", "p80")
FW_SERVICE = ServicePort(
    FW_NAME,
    Protocol.TCP,
    80,
    cluster_ips=("172.30.0.41",),
    external_ips=("192.168.99.11",),
    load_balancer_ips=("5.6.7.8", "2001:db8::5"),
    node_port=3001,
    load_balancer_source_ranges=("203.0.113.0/25", "2001:db8:1::/64"),
)


def test_source_ranges_render_a_firewall_chain_and_an_element_per_lb_ip() -> None:
    endpoints = (Endpoint("10.180.0.1", 80),)
    selection = categorize_endpoints(endpoints, FW_SERVICE, HERE)
    # 203.0.113.7, a node address, is in a range: the LB IP is an allowed source too.
    objects = render_port(FW_SERVICE, selection, NatConfig(node_ips=("203.0.113.7",)))
    sep = "endpoint-X6PRLJMO-ns1/svc1/tcp/p80/10.180.0.1/80"
    svc, ext, fw = (
        f"{kind}-KUEAGMSZ-ns1/svc1/tcp/p80" for kind in ("service", "external", "firewall")
    )
    assert objects == PortObjects(
        chains=(
            (
                sep,
                (
                    "ip saddr 10.180.0.1 jump mark-for-masquerade",
                    'meta l4proto tcp dnat to 10.180.0.1:80 comment "ns1/svc1:p80"',
                ),
            ),
            (svc, (f"goto {sep}",)),
            (ext, ("jump mark-for-masquerade", f"goto {svc}")),
            (fw, ("ip saddr != { 203.0.113.0/25, 5.6.7.8 } drop",)),
        ),
        elements=(
            Element(SERVICE_IPS, "172.30.0.41 . tcp . 80", f"goto {svc}"),
            Element(SERVICE_IPS, "192.168.99.11 . tcp . 80", f"goto {ext}"),
            Element(SERVICE_IPS, "5.6.7.8 . tcp . 80", f"goto {ext}"),
            Element(FIREWALL_IPS, "5.6.7.8 . tcp . 80", f"goto {fw}"),
            Element(SERVICE_NODEPORTS, "tcp . 3001", f"goto {ext}"),
        ),
    )


def test_each_family_firewalls_with_its_own_ranges_only() -> None:
    v6 = dataclasses.replace(FW_SERVICE, cluster_ips=("fd00::41",), external_ips=())
    selection = categorize_endpoints((Endpoint("fd00:1::1", 80),), v6, HERE)
    objects = render_port(v6, selection, NatConfig(family=6, node_ips=("203.0.113.7",)))
    fw = "firewall-KUEAGMSZ-ns1/svc1/tcp/p80"
    assert (fw, ("ip6 saddr != { 2001:db8:1::/64 } drop",)) in objects.chains
    assert [e for e in objects.elements if e.container == FIREWALL_IPS] == [
        Element(FIREWALL_IPS, "2001:db8::5 . tcp . 80", f"goto {fw}")
    ]
    only_v6_ranges = dataclasses.replace(FW_SERVICE, load_balancer_source_ranges=("2001:db8::/32",))
    plain = dataclasses.replace(FW_SERVICE, load_balancer_source_ranges=())
    selection = categorize_endpoints((Endpoint("10.180.0.1", 80),), plain, HERE)
    assert render_port(only_v6_ranges, selection, NatConfig()) == render_port(
        plain, selection, NatConfig()
    )


async def test_firewall_check_runs_before_dnat_and_ranges_come_and_go_by_partial_syncs() -> None:
    proxier, nft, clock = make()
    await proxier.sync(state((FW_SERVICE, (EP1,))))
    chains = nft.chains()
    assert chains["filter-prerouting"] == ["ct state new jump firewall-check"]
    assert chains["filter-output"][0] == "ct state new jump firewall-check"
    assert chains["firewall-check"] == ["ip daddr . meta l4proto . th dport vmap @firewall-ips"]
    assert nft.table is not None
    assert "priority -110" in (nft.table.base["filter-prerouting"] or "")
    plain = dataclasses.replace(FW_SERVICE, load_balancer_source_ranges=())
    for current in (plain, FW_SERVICE, plain):
        clock.now += 1
        s = state((current, (EP1,)))
        await proxier.sync(s, frozenset({FW_NAME}))
        assert table(nft) == await full_table(s), nft.dump()
        has_fw = any(n.startswith("firewall-") and "/" in n for n in nft.chains())
        assert has_fw is bool(current.load_balancer_source_ranges)
        assert bool(nft.elements(FIREWALL_IPS)) is has_fw
    assert proxier.sync_counters().partial_syncs == 3
