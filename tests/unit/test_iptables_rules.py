"""The iptables mode's renderer: whole rendered outputs, as kube-proxy's assertIPTablesRulesEqual.

Chain hashes are kube-proxy's own (KUBE-SVC-XPGD46QRK7WJZT7O is ns1/svc1:p80 in kube-proxy's
tests too), so the names are written out in full here.
"""

from __future__ import annotations

from typing import Any

import pytest

from uproxy.model import Endpoint, Protocol, ServicePort, ServicePortName
from uproxy.proxier.iptables_rules import (
    SEP_PREFIX,
    SVC_PREFIX,
    RuleContext,
    Ruleset,
    compute_rules,
    endpoint_chain,
    nodeport_destinations,
    port_chain,
    probability,
)

SVC1 = ServicePortName("ns1", "svc1", "p80")


def svc(name: ServicePortName = SVC1, **fields: Any) -> ServicePort:
    fields.setdefault("cluster_ips", ("172.30.0.41",))
    protocol = fields.pop("protocol", Protocol.TCP)
    return ServicePort(name, protocol, fields.pop("port", 80), **fields)


def eps(*ips: str, port: int = 80, **fields: Any) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(ip, port, **fields) for ip in ips)


def dump(ruleset: Ruleset, tables: tuple[str, ...] = ("nat", "filter")) -> str:
    """iptables-save-like text: chains sorted by name, rules in order, then the jumps."""
    lines = []
    for table in tables:
        lines.append(f"*{table}")
        chains = ruleset.chains[table]
        lines += [f":{chain}" for chain in sorted(chains)]
        for chain in sorted(chains):
            lines += [f"-A {chain} {spec}" for spec in chains[chain]]
    return "\n".join(lines)


def render(
    services: list[ServicePort],
    endpoints: dict[ServicePortName, tuple[Endpoint, ...]],
    tables: tuple[str, ...] = ("nat", "filter"),
    **ctx: Any,
) -> str:
    ctx.setdefault("node_name", "node-a")
    rules = compute_rules({s.name: s for s in services}, endpoints, RuleContext(**ctx))
    return dump(rules, tables)


def expect(text: str) -> str:
    """The expected dump, written indented in the test."""
    return "\n".join(line.strip() for line in text.strip().splitlines())


MARK_MASQ = "-A UPROXY-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000"
POSTROUTING = """\
-A UPROXY-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN
-A UPROXY-POSTROUTING -j MARK --set-xmark 0x4000/0x0
-A UPROXY-POSTROUTING -m comment --comment "uproxy service traffic requiring SNAT" -j MASQUERADE --random-fully"""  # noqa: E501

FORWARD = """\
-A UPROXY-FORWARD -m conntrack --ctstate INVALID -j DROP
-A UPROXY-FORWARD -m comment --comment "uproxy forwarding rules" -m mark --mark 0x4000/0x4000 -j ACCEPT
-A UPROXY-FORWARD -m comment --comment "uproxy forwarding conntrack rule" -m conntrack --ctstate RELATED,ESTABLISHED -j ACCEPT"""  # noqa: E501

NODEPORTS_JUMP = (
    '-A UPROXY-SERVICES ! -d 127.0.0.0/8 -m comment --comment "uproxy service nodeports; '
    'must be last" -m addrtype --dst-type LOCAL -j UPROXY-NODEPORTS'
)


def test_cluster_ip_spreads_over_three_endpoints_with_kube_proxys_probabilities() -> None:
    out = render([svc()], {SVC1: eps("10.180.0.1", "10.180.0.2", "10.180.0.3")})
    assert out == expect(
        f"""
        *nat
        :UPROXY-MARK-MASQ
        :UPROXY-NODEPORTS
        :UPROXY-POSTROUTING
        :UPROXY-SEP-ICDUIKC33SFI6ZPR
        :UPROXY-SEP-LXVODXWDISEETFEF
        :UPROXY-SEP-SXIVWICOYRO3J4NJ
        :UPROXY-SERVICES
        :UPROXY-SVC-XPGD46QRK7WJZT7O
        {MARK_MASQ}
        {POSTROUTING}
        -A UPROXY-SEP-ICDUIKC33SFI6ZPR -s 10.180.0.3/32 -m comment --comment "ns1/svc1:p80" -j UPROXY-MARK-MASQ
        -A UPROXY-SEP-ICDUIKC33SFI6ZPR -p tcp -m comment --comment "ns1/svc1:p80" -j DNAT --to-destination 10.180.0.3:80
        -A UPROXY-SEP-LXVODXWDISEETFEF -s 10.180.0.2/32 -m comment --comment "ns1/svc1:p80" -j UPROXY-MARK-MASQ
        -A UPROXY-SEP-LXVODXWDISEETFEF -p tcp -m comment --comment "ns1/svc1:p80" -j DNAT --to-destination 10.180.0.2:80
        -A UPROXY-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" -j UPROXY-MARK-MASQ
        -A UPROXY-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment "ns1/svc1:p80" -j DNAT --to-destination 10.180.0.1:80
        -A UPROXY-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j UPROXY-SVC-XPGD46QRK7WJZT7O
        {NODEPORTS_JUMP}
        -A UPROXY-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.33333333349 -j UPROXY-SEP-SXIVWICOYRO3J4NJ
        -A UPROXY-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.2:80" -m statistic --mode random --probability 0.50000000000 -j UPROXY-SEP-LXVODXWDISEETFEF
        -A UPROXY-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.3:80" -j UPROXY-SEP-ICDUIKC33SFI6ZPR
        *filter
        :UPROXY-EXTERNAL-SERVICES
        :UPROXY-FORWARD
        :UPROXY-LB-FIREWALL
        :UPROXY-SERVICES
        {FORWARD}
        """  # noqa: E501
    )


def test_affinity_cluster_cidr_and_every_external_address_under_cluster_policy() -> None:
    service = svc(
        external_ips=("192.168.99.11",),
        load_balancer_ips=("1.2.3.4",),
        node_port=3001,
        affinity_timeout=10800,
    )
    out = render([service], {SVC1: eps("10.180.0.1")}, tables=("nat",), cluster_cidr="10.0.0.0/8")
    assert out == expect(
        f"""
        *nat
        :UPROXY-EXT-XPGD46QRK7WJZT7O
        :UPROXY-MARK-MASQ
        :UPROXY-NODEPORTS
        :UPROXY-POSTROUTING
        :UPROXY-SEP-SXIVWICOYRO3J4NJ
        :UPROXY-SERVICES
        :UPROXY-SVC-XPGD46QRK7WJZT7O
        -A UPROXY-EXT-XPGD46QRK7WJZT7O -m comment --comment "masquerade traffic for ns1/svc1:p80 external destinations" -j UPROXY-MARK-MASQ
        -A UPROXY-EXT-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80" -j UPROXY-SVC-XPGD46QRK7WJZT7O
        {MARK_MASQ}
        -A UPROXY-NODEPORTS -p tcp -m comment --comment "ns1/svc1:p80" -m tcp --dport 3001 -j UPROXY-EXT-XPGD46QRK7WJZT7O
        {POSTROUTING}
        -A UPROXY-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" -j UPROXY-MARK-MASQ
        -A UPROXY-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment "ns1/svc1:p80" -m recent --set --name UPROXY-SEP-SXIVWICOYRO3J4NJ --mask 255.255.255.255 --rsource -j DNAT --to-destination 10.180.0.1:80
        -A UPROXY-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j UPROXY-SVC-XPGD46QRK7WJZT7O
        -A UPROXY-SERVICES -d 192.168.99.11/32 -p tcp -m comment --comment "ns1/svc1:p80 external IP" -m tcp --dport 80 -j UPROXY-EXT-XPGD46QRK7WJZT7O
        -A UPROXY-SERVICES -d 1.2.3.4/32 -p tcp -m comment --comment "ns1/svc1:p80 loadbalancer IP" -m tcp --dport 80 -j UPROXY-EXT-XPGD46QRK7WJZT7O
        {NODEPORTS_JUMP}
        -A UPROXY-SVC-XPGD46QRK7WJZT7O ! -s 10.0.0.0/8 -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j UPROXY-MARK-MASQ
        -A UPROXY-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m recent --rcheck --seconds 10800 --reap --name UPROXY-SEP-SXIVWICOYRO3J4NJ --mask 255.255.255.255 --rsource -j UPROXY-SEP-SXIVWICOYRO3J4NJ
        -A UPROXY-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j UPROXY-SEP-SXIVWICOYRO3J4NJ
        """  # noqa: E501
    )


def test_external_policy_local_keeps_the_client_address_and_uses_local_endpoints() -> None:
    service = svc(node_port=3001, external_traffic_local=True)
    endpoints = eps("10.180.0.1", node_name="node-a") + eps("10.180.2.1", node_name="node-b")
    out = render([service], {SVC1: endpoints}, tables=("nat",), cluster_cidr="10.0.0.0/8")
    svl = "UPROXY-SVL-XPGD46QRK7WJZT7O"
    assert out == expect(
        f"""
        *nat
        :UPROXY-EXT-XPGD46QRK7WJZT7O
        :UPROXY-MARK-MASQ
        :UPROXY-NODEPORTS
        :UPROXY-POSTROUTING
        :UPROXY-SEP-SXIVWICOYRO3J4NJ
        :UPROXY-SEP-ZX7GRIZKSNUQ3LAJ
        :UPROXY-SERVICES
        :UPROXY-SVC-XPGD46QRK7WJZT7O
        :{svl}
        -A UPROXY-EXT-XPGD46QRK7WJZT7O -s 10.0.0.0/8 -m comment --comment "pod traffic for ns1/svc1:p80 external destinations" -j UPROXY-SVC-XPGD46QRK7WJZT7O
        -A UPROXY-EXT-XPGD46QRK7WJZT7O -m comment --comment "masquerade LOCAL traffic for ns1/svc1:p80 external destinations" -m addrtype --src-type LOCAL -j UPROXY-MARK-MASQ
        -A UPROXY-EXT-XPGD46QRK7WJZT7O -m comment --comment "route LOCAL traffic for ns1/svc1:p80 external destinations" -m addrtype --src-type LOCAL -j UPROXY-SVC-XPGD46QRK7WJZT7O
        -A UPROXY-EXT-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80" -j {svl}
        {MARK_MASQ}
        -A UPROXY-NODEPORTS -p tcp -m comment --comment "ns1/svc1:p80" -m tcp --dport 3001 -j UPROXY-EXT-XPGD46QRK7WJZT7O
        {POSTROUTING}
        -A UPROXY-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" -j UPROXY-MARK-MASQ
        -A UPROXY-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment "ns1/svc1:p80" -j DNAT --to-destination 10.180.0.1:80
        -A UPROXY-SEP-ZX7GRIZKSNUQ3LAJ -s 10.180.2.1/32 -m comment --comment "ns1/svc1:p80" -j UPROXY-MARK-MASQ
        -A UPROXY-SEP-ZX7GRIZKSNUQ3LAJ -p tcp -m comment --comment "ns1/svc1:p80" -j DNAT --to-destination 10.180.2.1:80
        -A UPROXY-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j UPROXY-SVC-XPGD46QRK7WJZT7O
        {NODEPORTS_JUMP}
        -A UPROXY-SVC-XPGD46QRK7WJZT7O ! -s 10.0.0.0/8 -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j UPROXY-MARK-MASQ
        -A UPROXY-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -m statistic --mode random --probability 0.50000000000 -j UPROXY-SEP-SXIVWICOYRO3J4NJ
        -A UPROXY-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.2.1:80" -j UPROXY-SEP-ZX7GRIZKSNUQ3LAJ
        -A {svl} -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j UPROXY-SEP-SXIVWICOYRO3J4NJ
        """  # noqa: E501
    )


def test_no_endpoints_rejects_every_address_at_once_and_writes_no_nat_chain() -> None:
    udp = ServicePortName("ns1", "dns", "dns")
    services = [
        svc(external_ips=("192.168.99.11",), node_port=3001),
        svc(udp, protocol=Protocol.UDP, port=53, cluster_ips=("172.30.0.53",)),
    ]
    out = render(services, {})
    assert out == expect(
        f"""
        *nat
        :UPROXY-MARK-MASQ
        :UPROXY-NODEPORTS
        :UPROXY-POSTROUTING
        :UPROXY-SERVICES
        {MARK_MASQ}
        {POSTROUTING}
        {NODEPORTS_JUMP}
        *filter
        :UPROXY-EXTERNAL-SERVICES
        :UPROXY-FORWARD
        :UPROXY-LB-FIREWALL
        :UPROXY-SERVICES
        -A UPROXY-EXTERNAL-SERVICES -d 192.168.99.11/32 -p tcp -m comment --comment "ns1/svc1:p80 has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
        -A UPROXY-EXTERNAL-SERVICES -p tcp -m comment --comment "ns1/svc1:p80 has no endpoints" -m addrtype --dst-type LOCAL -m tcp --dport 3001 -j REJECT --reject-with icmp-port-unreachable
        {FORWARD}
        -A UPROXY-SERVICES -d 172.30.0.53/32 -p udp -m comment --comment "ns1/dns:dns has no endpoints" -m udp --dport 53 -j REJECT --reject-with icmp-port-unreachable
        -A UPROXY-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 has no endpoints" -m tcp --dport 80 -j REJECT --reject-with icmp-port-unreachable
        """  # noqa: E501
    )


def test_local_policies_with_endpoints_only_elsewhere_drop_instead_of_rejecting() -> None:
    service = svc(node_port=3001, internal_traffic_local=True, external_traffic_local=True)
    out = render([service], {SVC1: eps("10.180.2.1", node_name="node-b")})
    assert out == expect(
        f"""
        *nat
        :UPROXY-EXT-XPGD46QRK7WJZT7O
        :UPROXY-MARK-MASQ
        :UPROXY-NODEPORTS
        :UPROXY-POSTROUTING
        :UPROXY-SERVICES
        {MARK_MASQ}
        -A UPROXY-NODEPORTS -p tcp -m comment --comment "ns1/svc1:p80" -m tcp --dport 3001 -j UPROXY-EXT-XPGD46QRK7WJZT7O
        {POSTROUTING}
        {NODEPORTS_JUMP}
        *filter
        :UPROXY-EXTERNAL-SERVICES
        :UPROXY-FORWARD
        :UPROXY-LB-FIREWALL
        :UPROXY-SERVICES
        -A UPROXY-EXTERNAL-SERVICES -p tcp -m comment --comment "ns1/svc1:p80 has no local endpoints" -m addrtype --dst-type LOCAL -m tcp --dport 3001 -j DROP
        {FORWARD}
        -A UPROXY-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 has no local endpoints" -m tcp --dport 80 -j DROP
        """  # noqa: E501
    )


def test_internal_policy_local_uses_only_this_nodes_endpoints() -> None:
    service = svc(internal_traffic_local=True)
    endpoints = eps("10.180.0.1", node_name="node-a") + eps("10.180.2.1", node_name="node-b")
    out = render([service], {SVC1: endpoints}, tables=("nat",), masquerade_all=True)
    svl = "UPROXY-SVL-XPGD46QRK7WJZT7O"
    assert f"-j {svl}" in out
    assert "UPROXY-SVC-" not in out
    assert "10.180.2.1" not in out
    assert (
        f'-A {svl} -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" '
        "-m tcp --dport 80 -j UPROXY-MARK-MASQ"
    ) in out.splitlines()


def test_terminating_endpoints_serve_only_when_no_endpoint_is_ready() -> None:
    terminating = eps("10.180.0.9", ready=False, serving=True, terminating=True)
    only_terminating = render([svc()], {SVC1: terminating}, tables=("nat",))
    assert "--to-destination 10.180.0.9:80" in only_terminating
    mixed = render([svc()], {SVC1: terminating + eps("10.180.0.1")}, tables=("nat",))
    assert "10.180.0.9" not in mixed
    assert "--to-destination 10.180.0.1:80" in mixed


def test_ipv6_addresses_and_endpoints_are_skipped() -> None:
    service = svc(cluster_ips=("fd00::1", "172.30.0.41"), external_ips=("fd00::2",))
    out = render([service], {SVC1: eps("fd00::10", "10.180.0.1")})
    assert "fd00" not in out
    assert "--to-destination 10.180.0.1:80" in out


def test_nodeport_addresses_and_no_random_fully() -> None:
    out = render(
        [svc()],
        {},
        tables=("nat",),
        nodeport_destinations=nodeport_destinations(["10.0.0.0/8", "fd00::/64", "192.168.1.5"]),
        random_fully=False,
    )
    lines = out.splitlines()
    assert lines[-2:] == [
        '-A UPROXY-SERVICES -d 10.0.0.0/8 -m comment --comment "uproxy service nodeports; must '
        'be last" -m addrtype --dst-type LOCAL -j UPROXY-NODEPORTS',
        '-A UPROXY-SERVICES -d 192.168.1.5/32 -m comment --comment "uproxy service nodeports; '
        'must be last" -m addrtype --dst-type LOCAL -j UPROXY-NODEPORTS',
    ]
    assert lines[-3].endswith("-j MASQUERADE")
    assert nodeport_destinations(["0.0.0.0/0"]) == (None,)


def test_jumps_hook_every_chain_kube_proxy_hooks() -> None:
    rules = compute_rules({}, {}, RuleContext())
    hooks = {t: [(j.chain, j.target, j.new_only) for j in js] for t, js in rules.jumps.items()}
    assert hooks == {
        "nat": [
            ("PREROUTING", "UPROXY-SERVICES", False),
            ("OUTPUT", "UPROXY-SERVICES", False),
            ("POSTROUTING", "UPROXY-POSTROUTING", False),
        ],
        "filter": [
            ("INPUT", "UPROXY-LB-FIREWALL", True),
            ("FORWARD", "UPROXY-LB-FIREWALL", True),
            ("OUTPUT", "UPROXY-LB-FIREWALL", True),
            ("INPUT", "UPROXY-EXTERNAL-SERVICES", True),
            ("FORWARD", "UPROXY-FORWARD", False),
            ("FORWARD", "UPROXY-SERVICES", True),
            ("FORWARD", "UPROXY-EXTERNAL-SERVICES", True),
            ("OUTPUT", "UPROXY-SERVICES", True),
        ],
    }


@pytest.mark.parametrize(
    ("n", "spelled"),
    [(2, "0.50000000000"), (3, "0.33333333349"), (4, "0.25000000000"), (7, "0.14285714272")],
)
def test_probability_is_kube_proxys_value_as_iptables_save_prints_it(n: int, spelled: str) -> None:
    assert probability(n) == spelled


def test_chain_names_fit_the_kernels_limit_and_are_kube_proxys_hashes() -> None:
    long_name = ServicePortName("n" * 63, "s" * 63, "p" * 15)
    assert len(port_chain(SVC_PREFIX, long_name, Protocol.UDP)) <= 28
    sep = endpoint_chain(long_name, Protocol.UDP, Endpoint("10.0.0.1", 53))
    assert sep.startswith(SEP_PREFIX) and len(sep) <= 28
    assert port_chain(SVC_PREFIX, SVC1, Protocol.TCP) == "UPROXY-SVC-XPGD46QRK7WJZT7O"
    assert endpoint_chain(SVC1, Protocol.TCP, Endpoint("10.180.0.1", 80)) == (
        "UPROXY-SEP-SXIVWICOYRO3J4NJ"
    )


# -- loadBalancerSourceRanges (kube-proxy's KUBE-FW-* and KUBE-PROXY-FIREWALL) ----------------

FW_SERVICE = svc(
    external_ips=("192.168.99.11",),
    load_balancer_ips=("5.6.7.8", "2001:db8::5"),
    node_port=3001,
    load_balancer_source_ranges=("203.0.113.0/25", "198.51.100.0/24", "2001:db8:1::/64"),
)


def test_source_ranges_send_lb_traffic_through_a_firewall_chain_and_drop_the_rest() -> None:
    # 203.0.113.7 is a node address inside a range: the LB IP itself is an allowed source too.
    out = render([FW_SERVICE], {SVC1: eps("10.180.0.1")}, node_ips=("203.0.113.7",))
    fw = "UPROXY-FW-XPGD46QRK7WJZT7O"
    ext = "UPROXY-EXT-XPGD46QRK7WJZT7O"
    assert out == expect(
        f"""
        *nat
        :{ext}
        :{fw}
        :UPROXY-MARK-MASQ
        :UPROXY-NODEPORTS
        :UPROXY-POSTROUTING
        :UPROXY-SEP-SXIVWICOYRO3J4NJ
        :UPROXY-SERVICES
        :UPROXY-SVC-XPGD46QRK7WJZT7O
        -A {ext} -m comment --comment "masquerade traffic for ns1/svc1:p80 external destinations" -j UPROXY-MARK-MASQ
        -A {ext} -m comment --comment "ns1/svc1:p80" -j UPROXY-SVC-XPGD46QRK7WJZT7O
        -A {fw} -s 203.0.113.0/25 -m comment --comment "ns1/svc1:p80 loadbalancer IP" -j {ext}
        -A {fw} -s 198.51.100.0/24 -m comment --comment "ns1/svc1:p80 loadbalancer IP" -j {ext}
        -A {fw} -s 5.6.7.8/32 -m comment --comment "ns1/svc1:p80 loadbalancer IP" -j {ext}
        -A {fw} -m comment --comment "other traffic to ns1/svc1:p80 will be dropped by UPROXY-LB-FIREWALL"
        {MARK_MASQ}
        -A UPROXY-NODEPORTS -p tcp -m comment --comment "ns1/svc1:p80" -m tcp --dport 3001 -j {ext}
        {POSTROUTING}
        -A UPROXY-SEP-SXIVWICOYRO3J4NJ -s 10.180.0.1/32 -m comment --comment "ns1/svc1:p80" -j UPROXY-MARK-MASQ
        -A UPROXY-SEP-SXIVWICOYRO3J4NJ -p tcp -m comment --comment "ns1/svc1:p80" -j DNAT --to-destination 10.180.0.1:80
        -A UPROXY-SERVICES -d 172.30.0.41/32 -p tcp -m comment --comment "ns1/svc1:p80 cluster IP" -m tcp --dport 80 -j UPROXY-SVC-XPGD46QRK7WJZT7O
        -A UPROXY-SERVICES -d 192.168.99.11/32 -p tcp -m comment --comment "ns1/svc1:p80 external IP" -m tcp --dport 80 -j {ext}
        -A UPROXY-SERVICES -d 5.6.7.8/32 -p tcp -m comment --comment "ns1/svc1:p80 loadbalancer IP" -m tcp --dport 80 -j {fw}
        {NODEPORTS_JUMP}
        -A UPROXY-SVC-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 -> 10.180.0.1:80" -j UPROXY-SEP-SXIVWICOYRO3J4NJ
        *filter
        :UPROXY-EXTERNAL-SERVICES
        :UPROXY-FORWARD
        :UPROXY-LB-FIREWALL
        :UPROXY-SERVICES
        {FORWARD}
        -A UPROXY-LB-FIREWALL -d 5.6.7.8/32 -p tcp -m comment --comment "ns1/svc1:p80 traffic not accepted by {fw}" -m tcp --dport 80 -j DROP
        """  # noqa: E501
    )


def test_without_a_node_address_in_the_ranges_the_lb_ip_is_no_allowed_source() -> None:
    out = render([FW_SERVICE], {SVC1: eps("10.180.0.1")}, tables=("nat",), node_ips=("10.0.0.1",))
    fw = [line for line in out.splitlines() if line.startswith("-A UPROXY-FW-")]
    assert [line.split(" -m comment")[0] for line in fw] == [
        "-A UPROXY-FW-XPGD46QRK7WJZT7O -s 203.0.113.0/25",
        "-A UPROXY-FW-XPGD46QRK7WJZT7O -s 198.51.100.0/24",
        "-A UPROXY-FW-XPGD46QRK7WJZT7O",
    ]


@pytest.mark.parametrize(
    "ranges",
    [
        (),  # no ranges: no firewall
        ("2001:db8:1::/64",),  # only the other family's: this family is not firewalled
    ],
)
def test_a_family_without_ranges_of_its_own_gets_no_firewall(ranges: tuple[str, ...]) -> None:
    plain = svc(load_balancer_ips=("5.6.7.8",))
    ranged = svc(load_balancer_ips=("5.6.7.8",), load_balancer_source_ranges=ranges)
    endpoints = {SVC1: eps("10.180.0.1")}
    assert render([ranged], endpoints) == render([plain], endpoints)
    assert "UPROXY-FW-" not in render([ranged], endpoints)


def test_without_endpoints_the_lb_ip_is_rejected_and_no_firewall_chain_is_written() -> None:
    plain = svc(load_balancer_ips=("5.6.7.8",))
    ranged = svc(load_balancer_ips=("5.6.7.8",), load_balancer_source_ranges=("10.0.0.0/8",))
    assert render([ranged], {}) == render([plain], {})
    assert "-d 5.6.7.8/32" in render([ranged], {}, tables=("filter",))


def test_a_range_of_everything_is_written_without_a_source_match() -> None:
    # iptables-save prints `-s 0.0.0.0/0` as nothing; the rule must read back as written.
    ranged = svc(load_balancer_ips=("5.6.7.8",), load_balancer_source_ranges=("0.0.0.0/0",))
    out = render([ranged], {SVC1: eps("10.180.0.1")}, tables=("nat",))
    assert (
        '-A UPROXY-FW-XPGD46QRK7WJZT7O -m comment --comment "ns1/svc1:p80 loadbalancer IP" '
        "-j UPROXY-EXT-XPGD46QRK7WJZT7O"
    ) in out.splitlines()
