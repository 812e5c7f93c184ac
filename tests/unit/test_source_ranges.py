"""loadBalancerSourceRanges as every mode reads it, and the node addresses allowFromNode needs."""

from __future__ import annotations

from typing import Any

from uproxy.kernel.node_ips import parse_addresses
from uproxy.model import Protocol, ServicePort, ServicePortName
from uproxy.source_ranges import allowed_sources


def lb(**fields: Any) -> ServicePort:
    fields.setdefault("load_balancer_ips", ("192.0.2.80", "2001:db8::80"))
    return ServicePort(ServicePortName("ns", "web"), Protocol.TCP, 80, **fields)


def texts(svc: ServicePort, family: int, node_ips: tuple[str, ...] = ()) -> list[str]:
    return [str(n) for n in allowed_sources(svc, family, node_ips)]


def test_each_family_takes_only_its_own_ranges() -> None:
    svc = lb(load_balancer_source_ranges=("10.0.0.0/8", "2001:db8:1::/64", "198.51.100.0/24"))
    assert texts(svc, 4) == ["10.0.0.0/8", "198.51.100.0/24"]
    assert texts(svc, 6) == ["2001:db8:1::/64"]


def test_a_family_without_ranges_or_without_lb_ips_is_not_firewalled() -> None:
    assert texts(lb(load_balancer_source_ranges=("10.0.0.0/8",)), 6) == []
    assert texts(lb(), 4) == []
    only_v6 = lb(load_balancer_ips=("2001:db8::80",), load_balancer_source_ranges=("10.0.0.0/8",))
    assert texts(only_v6, 4) == []


def test_a_node_address_in_a_range_allows_the_lb_ips_of_that_family_as_sources() -> None:
    svc = lb(load_balancer_source_ranges=("10.0.0.0/8", "2001:db8:1::/64"))
    assert texts(svc, 4, ("10.1.2.3", "2001:db8:9::1")) == ["10.0.0.0/8", "192.0.2.80/32"]
    assert texts(svc, 6, ("10.1.2.3", "2001:db8:9::1")) == ["2001:db8:1::/64"]
    assert texts(svc, 6, ("2001:db8:1::7",)) == ["2001:db8:1::/64", "2001:db8::80/128"]


def test_node_ips_are_the_global_addresses_of_ip_address_show() -> None:
    text = """[{"ifname": "lo", "addr_info": [{"local": "127.0.0.1", "scope": "host"}]},
    {"ifname": "eth0", "addr_info": [{"local": "192.0.2.10", "scope": "global"},
    {"local": "fe80::1", "scope": "link"}, {"local": "2001:db8::10", "scope": "global"}]}]"""
    assert parse_addresses(text) == ("192.0.2.10", "2001:db8::10")
