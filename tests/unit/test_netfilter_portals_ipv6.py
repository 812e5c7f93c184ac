"""The portals of each IP family against FakeNetfilter(family=...): one family's tables hold
only that family's addresses, in the text ip6tables-save prints."""

from __future__ import annotations

from typing import Any

import pytest

from uproxy.errors import KernelError, SettingsError
from uproxy.kernel.conntrack import UdpFlow
from uproxy.kernel.fake import FakeConntrack, FakeNetfilter
from uproxy.kernel.netfilter import Family
from uproxy.model import Protocol, ServicePort, ServicePortName
from uproxy.proxier.netfilter_portals import (
    FILTER,
    LB_FIREWALL,
    NAT,
    NODEPORTS,
    PORTALS,
    PORTALS_CONTAINER,
    NetfilterPortals,
    check_usable,
    portal_shard,
)
from uproxy.proxier.portals import PerFamilyPortals, Portal

WEB = ServicePortName("default", "web", "http")
DNS = ServicePortName("kube-system", "dns", "dns")
V4, V6 = "10.96.0.60", "fd00:96::60"


def make(
    family: Family, conntrack: FakeConntrack | None = None, **kwargs: Any
) -> tuple[NetfilterPortals, FakeNetfilter]:
    fake = FakeNetfilter("nft", family)
    portals = NetfilterPortals(
        fake,
        conntrack=conntrack or FakeConntrack(),
        physdev=True,
        other_backends=[],
        **kwargs,
    )
    return portals, fake


def dual(proxy_port: int = 40001, **fields: Any) -> Portal:
    fields.setdefault("cluster_ips", (V4, V6))
    return Portal(ServicePort(WEB, Protocol.TCP, 80, **fields), proxy_port)


def every_rule(fake: FakeNetfilter) -> list[str]:
    return [
        spec
        for table in (NAT, FILTER)
        for chain in fake.chains(table)
        for spec in fake.rules(table, chain)
    ]


def jumps(fake: FakeNetfilter, table: str) -> list[tuple[str, str]]:
    return sorted(fake.read(table).jumps)


async def test_each_family_takes_only_its_own_addresses() -> None:
    six, fake6 = make(6)
    four, fake4 = make(4)
    everything = dual(
        node_port=30080,
        external_ips=("203.0.113.7", "2001:db8::7"),
        load_balancer_ips=("198.51.100.9", "2001:db8::9"),
    )
    for portals in (six, four):
        await portals.sync({WEB: everything})
    comment = '-p tcp -m comment --comment "default/web:http" -m tcp --dport'
    assert fake6.rules(NAT, portal_shard(V6)) == [
        f"-d {V6}/128 {comment} 80 -j REDIRECT --to-ports 40001"
    ]
    assert fake6.rules(NAT, portal_shard("2001:db8::9")) == [
        f"-d 2001:db8::9/128 {comment} 80 -j REDIRECT --to-ports 40001"
    ]
    assert portal_shard(V6) == "UPROXY-PORTALS-32"  # 0x60's low 6 bits
    assert fake6.rules(NAT, PORTALS_CONTAINER) == [
        f"-d 2001:db8::7/128 {comment} 80 -m physdev ! --physdev-is-in -j REDIRECT --to-ports 40001"
    ]
    assert fake6.rules(NAT, NODEPORTS) == [f"{comment} 30080 -j REDIRECT --to-ports 40001"]
    v6_rules, v4_rules = every_rule(fake6), every_rule(fake4)
    assert not [r for r in v6_rules if "10.96." in r or "203.0." in r or "198.51." in r]
    assert not [r for r in v4_rules if "fd00:" in r or "2001:db8" in r]
    assert f"-d {V4}/32 {comment} 80 -j REDIRECT --to-ports 40001" in v4_rules


async def test_ipv6_shards_dispatch_on_the_low_six_bits_as_ip6tables_save_prints() -> None:
    six, fake = make(6)
    await six.sync({})
    dispatch = fake.rules(NAT, PORTALS)
    assert dispatch[0] == "-d ::/::3f -j UPROXY-PORTALS-00"
    assert dispatch[5] == "-d ::5/::3f -j UPROXY-PORTALS-05"
    assert dispatch[63] == "-d ::3f/::3f -j UPROXY-PORTALS-63"
    # The guard and the hooks are the IPv4 ones.
    assert ("INPUT", "-m conntrack --ctstate NEW -m comment --comment "
            '"uproxy proxy ports" -j UPROXY-PROXY-PORTS') in jumps(fake, FILTER)  # fmt: skip


async def test_a_specific_ipv6_bind_address_is_a_bracketed_dnat() -> None:
    six, fake = make(6, bind_address="fd00:10::1")
    await six.sync({WEB: dual()})
    (rule,) = fake.rules(NAT, portal_shard(V6))
    assert rule.endswith("-j DNAT --to-destination [fd00:10::1]:40001")


def test_a_bind_address_of_the_other_family_is_refused() -> None:
    with pytest.raises(SettingsError, match="IPv6 portals cannot DNAT to an IPv4 address"):
        make(6, bind_address="10.10.0.1")
    with pytest.raises(SettingsError, match="IPv4 portals cannot DNAT to an IPv6 address"):
        make(4, bind_address="fd00:10::1")


async def test_nodeport_addresses_of_each_family_go_to_that_familys_jumps() -> None:
    cidrs = ("10.10.0.0/24", "fd00:10::/64")
    six, fake6 = make(6, nodeport_addresses=cidrs)
    four, fake4 = make(4, nodeport_addresses=cidrs)
    only_v4, fake_none = make(6, nodeport_addresses=("10.10.0.0/24",))
    everywhere, fake_all = make(6, nodeport_addresses=("10.10.0.0/24", "::/0"))
    for portals in (six, four, only_v4, everywhere):
        await portals.sync({WEB: dual(node_port=30080)})

    def nodeport_jumps(fake: FakeNetfilter) -> list[str]:
        return [spec for _, spec in jumps(fake, NAT) if NODEPORTS in spec]

    assert {s.split(" -m ")[0] for s in nodeport_jumps(fake6)} == {"-d fd00:10::/64"}
    assert {s.split(" -m ")[0] for s in nodeport_jumps(fake4)} == {"-d 10.10.0.0/24"}
    assert nodeport_jumps(fake_none) == []  # no IPv6 CIDR: no IPv6 NodePorts
    assert [s for s in nodeport_jumps(fake_all) if s.startswith("-d")] == []
    assert len(nodeport_jumps(fake_all)) == 2  # PREROUTING and OUTPUT, any local address


async def test_ipv6_source_ranges_redirect_allowed_sources_and_drop_the_rest() -> None:
    six, fake = make(6, node_ips=("fd00:10::1",))
    ranged = dual(
        load_balancer_ips=("198.51.100.9", "2001:db8::9"),
        load_balancer_source_ranges=("192.0.2.0/24", "fd00:10::/64"),
    )
    await six.sync({WEB: ranged})
    shard = fake.rules(NAT, portal_shard("2001:db8::9"))
    comment = '-p tcp -m comment --comment "default/web:http" -m tcp --dport 80'
    assert shard == [
        f"-s fd00:10::/64 -d 2001:db8::9/128 {comment} -j REDIRECT --to-ports 40001",
        # allowFromNode: a node address is in the range, so the VIP itself is a source.
        f"-s 2001:db8::9/128 -d 2001:db8::9/128 {comment} -j REDIRECT --to-ports 40001",
    ]
    assert fake.rules(FILTER, LB_FIREWALL) == [f"-d 2001:db8::9/128 {comment} -j DROP"]


async def test_udp_flows_of_the_family_are_flushed() -> None:
    def flow(dst: str) -> UdpFlow:
        return UdpFlow("fd00:10::2", 5555, dst, 53, "fd00:10::1", 1)

    stale, other = flow("fd00:96::53"), flow("fd00:96::99")
    conntrack = FakeConntrack([stale, other])
    six, _ = make(6, conntrack)
    dns = ServicePort(DNS, Protocol.UDP, 53, cluster_ips=("10.96.0.53", "fd00:96::53"))
    await six.sync({DNS: Portal(dns, 40053)})
    assert conntrack.flows == [other]


async def test_cleanup_removes_everything_of_the_family() -> None:
    six, fake = make(6)
    await six.sync({WEB: dual(node_port=30080)})
    assert fake.owned()
    await six.cleanup()
    assert fake.owned() == {}


def test_the_usability_probe_leaves_nothing_and_reports_a_refusal() -> None:
    fake = FakeNetfilter("legacy", 6)
    check_usable(fake)
    assert fake.owned() == {}
    fake.fail_next("can't initialize ip6tables table `nat'")
    with pytest.raises(KernelError, match="nat"):
        check_usable(fake)


async def test_one_familys_failure_holds_back_neither_the_other_nor_the_retry() -> None:
    four, fake4 = make(4)
    six, fake6 = make(6)
    both = PerFamilyPortals([four, six])
    fake4.fail_next("IPv4 refused")
    with pytest.raises(KernelError, match="IPv4 refused"):
        await both.sync({WEB: dual()})
    assert any(V6 in rule for rule in every_rule(fake6))  # IPv6 synced all the same
    await both.sync({WEB: dual()})  # the runner's retry
    assert any(V4 in rule for rule in every_rule(fake4))
    await both.cleanup()
    assert fake4.owned() == {} and fake6.owned() == {}
