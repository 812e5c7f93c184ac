"""The iptables mode's renderer for IPv6 (ip6tables rules): whole rendered outputs, and which
service ports, addresses and endpoints each family takes."""

from __future__ import annotations

import pytest

from tests.unit.test_iptables_rules import (
    FORWARD,
    MARK_MASQ,
    POSTROUTING,
    SVC1,
    eps,
    expect,
    render,
    svc,
)
from uproxy.model import Protocol, ServicePortName
from uproxy.proxier.iptables_rules import nodeport_destinations, serves

DUAL = svc(
    cluster_ips=("172.30.0.41", "fd00:172:30::41"),
    external_ips=("192.168.99.11", "2001:db8:99::11"),
    node_port=3001,
    affinity_timeout=10800,
)
NODEPORTS_JUMP6 = (
    '-A UPROXY-SERVICES ! -d ::1/128 -m comment --comment "uproxy service nodeports; '
    'must be last" -m addrtype --dst-type LOCAL -j UPROXY-NODEPORTS'
)
MASK6 = "--mask ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"


def test_the_ipv6_rules_take_the_ipv6_addresses_and_endpoints_of_a_dual_stack_port() -> None:
    endpoints = {SVC1: eps("10.180.0.1", "fd00:180::1", "fd00:180::2")}
    out = render([DUAL], endpoints, cluster_cidr="fd00:10::/56", family=6)
    sep1, sep2 = "UPROXY-SEP-M6GG5TEGPJA3YY4E", "UPROXY-SEP-AE4KH3TZQQBK5XCZ"
    svc_chain, ext = "UPROXY-SVC-XPGD46QRK7WJZT7O", "UPROXY-EXT-XPGD46QRK7WJZT7O"
    assert out == expect(
        f"""
        *nat
        :{ext}
        :UPROXY-MARK-MASQ
        :UPROXY-NODEPORTS
        :UPROXY-POSTROUTING
        :{sep2}
        :{sep1}
        :UPROXY-SERVICES
        :{svc_chain}
        -A {ext} -m comment --comment "masquerade traffic for ns1/svc1:p80 external destinations" -j UPROXY-MARK-MASQ
        -A {ext} -m comment --comment "ns1/svc1:p80" -j {svc_chain}
        {MARK_MASQ}
        -A UPROXY-NODEPORTS -p tcp -m comment --comment "ns1/svc1:p80" -m tcp --dport 3001 -j {ext}
        {POSTROUTING}
        -A {sep2} -s fd00:180::2/128 -m comment --comment "ns1/svc1:p80" -j UPROXY-MARK-MASQ
        -A {sep2} -p tcp -m comment --comment "ns1/svc1:p80" -m recent --set --name {sep2} {MASK6} --rsource -j DNAT --to-destination [fd00:180::2]:80
        -A {sep1} -s fd00:180::1/128 -m comment --comment "ns1/svc1:p80" -j UPROXY-MARK-MASQ
        -A {sep1} -p tcp -m comment --comment "ns1/svc1:p80" -m recent --set --name {sep1} {MASK6} --rsource -j DNAT --to-destination [fd00:180::1]:80
        -A UPROXY-SERVICES -d fd00:172:30::41/128 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j {svc_chain}
        -A UPROXY-SERVICES -d 2001:db8:99::11/128 -p tcp -m comment --comment "ns1/svc1:p80 external IP" -m tcp --dport 80 -j {ext}
        {NODEPORTS_JUMP6}
        -A {svc_chain} ! -s fd00:10::/56 -d fd00:172:30::41/128 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j UPROXY-MARK-MASQ
        -A {svc_chain} -m comment --comment "ns1/svc1:p80 -> [fd00:180::1]:80" -m recent --rcheck --seconds 10800 --reap --name {sep1} {MASK6} --rsource -j {sep1}
        -A {svc_chain} -m comment --comment "ns1/svc1:p80 -> [fd00:180::2]:80" -m recent --rcheck --seconds 10800 --reap --name {sep2} {MASK6} --rsource -j {sep2}
        -A {svc_chain} -m comment --comment "ns1/svc1:p80 -> [fd00:180::1]:80" -m statistic --mode random --probability 0.50000000000 -j {sep1}
        -A {svc_chain} -m comment --comment "ns1/svc1:p80 -> [fd00:180::2]:80" -j {sep2}
        *filter
        :UPROXY-EXTERNAL-SERVICES
        :UPROXY-FORWARD
        :UPROXY-LB-FIREWALL
        :UPROXY-SERVICES
        {FORWARD}
        """  # noqa: E501
    )


def test_the_ipv4_rules_of_the_same_port_keep_to_ipv4() -> None:
    out = render([DUAL], {SVC1: eps("10.180.0.1", "fd00:180::1")}, family=4)
    assert "fd00" not in out and "2001:db8" not in out and "::1/128" not in out
    assert "-d 192.168.99.11/32" in out and "--to-destination 10.180.0.1:80" in out


def test_without_ipv6_endpoints_ipv6_is_rejected_with_icmp6_while_ipv4_is_served() -> None:
    """ip6tables refuses icmp-port-unreachable: IPv6 has its own."""
    udp = ServicePortName("ns1", "dns", "dns")
    services = [
        DUAL,
        svc(udp, protocol=Protocol.UDP, port=53, cluster_ips=("fd00:172:30::53",)),
    ]
    out = render(services, {SVC1: eps("10.180.0.1")}, tables=("filter",), family=6)
    no_endpoints = '-m comment --comment "ns1/svc1:p80 has no endpoints"'
    dns = '-m comment --comment "ns1/dns:dns has no endpoints"'
    reject = "-j REJECT --reject-with icmp6-port-unreachable"
    assert out == expect(
        f"""
        *filter
        :UPROXY-EXTERNAL-SERVICES
        :UPROXY-FORWARD
        :UPROXY-LB-FIREWALL
        :UPROXY-SERVICES
        -A UPROXY-EXTERNAL-SERVICES -d 2001:db8:99::11/128 -p tcp {no_endpoints} -m tcp --dport 80 {reject}
        -A UPROXY-EXTERNAL-SERVICES -p tcp {no_endpoints} -m addrtype --dst-type LOCAL -m tcp --dport 3001 {reject}
        {FORWARD}
        -A UPROXY-SERVICES -d fd00:172:30::53/128 -p udp {dns} -m udp --dport 53 {reject}
        -A UPROXY-SERVICES -d fd00:172:30::41/128 -p tcp {no_endpoints} -m tcp --dport 80 {reject}
        """  # noqa: E501
    )
    assert "REJECT" not in render(services[:1], {SVC1: eps("10.180.0.1")}, family=4)


@pytest.mark.parametrize(
    ("cluster_ips", "families"),
    [
        (("172.30.0.41",), {4}),
        (("fd00:172:30::41",), {6}),
        (("172.30.0.41", "fd00:172:30::41"), {4, 6}),
        ((), {4}),  # no ClusterIP at all: IPv4's, as before there were two families
    ],
)
def test_a_family_takes_the_ports_with_a_cluster_ip_of_its_own(
    cluster_ips: tuple[str, ...], families: set[int]
) -> None:
    port = svc(cluster_ips=cluster_ips, node_port=3001)
    assert {f for f in (4, 6) if serves(port, f)} == families
    # An IPv4-only port's NodePort is not opened on the node's IPv6 addresses (kube-proxy).
    rendered = render([port], {SVC1: eps("10.180.0.1", "fd00:180::1")}, family=6)
    assert ("--dport 3001" in rendered) == (6 in families)


def test_ipv6_source_ranges_firewall_the_ipv6_lb_ip() -> None:
    ranged = svc(
        cluster_ips=("fd00:172:30::41",),
        load_balancer_ips=("5.6.7.8", "2001:db8::5"),
        load_balancer_source_ranges=("203.0.113.0/25", "2001:db8:1::/64"),
    )
    out = render([ranged], {SVC1: eps("fd00:180::1")}, family=6, node_ips=("2001:db8:1::7",))
    fw = "UPROXY-FW-XPGD46QRK7WJZT7O"
    lines = out.splitlines()
    assert [line.split(" -m comment")[0] for line in lines if line.startswith(f"-A {fw}")] == [
        f"-A {fw} -s 2001:db8:1::/64",
        f"-A {fw} -s 2001:db8::5/128",  # a node address is in the range: allowFromNode
        f"-A {fw}",
    ]
    assert (
        f'-A UPROXY-LB-FIREWALL -d 2001:db8::5/128 -p tcp -m comment --comment "ns1/svc1:p80 '
        f'traffic not accepted by {fw}" -m tcp --dport 80 -j DROP'
    ) in lines
    assert "5.6.7.8" not in out


def test_nodeport_addresses_are_taken_per_family() -> None:
    given = ["10.0.0.0/8", "fd00::/64", "fd00:1::5"]
    assert nodeport_destinations(given, 4) == ("10.0.0.0/8",)
    assert nodeport_destinations(given, 6) == ("fd00::/64", "fd00:1::5/128")
    assert nodeport_destinations(["::/0", "10.0.0.0/8"], 6) == (None,)
    assert nodeport_destinations(["10.0.0.0/8"], 6) == ()  # no NodePort on IPv6 at all
    assert nodeport_destinations([], 6) == (None,)
    out = render(
        [svc(cluster_ips=("fd00:172:30::41",), node_port=3001)],
        {SVC1: eps("fd00:180::1")},
        tables=("nat",),
        family=6,
        nodeport_destinations=nodeport_destinations(["10.0.0.0/8"], 6),
    )
    assert "UPROXY-NODEPORTS" in out and "-j UPROXY-NODEPORTS" not in out
