"""The one rule for stale UDP conntrack entries both kernel modes follow."""

from __future__ import annotations

from dataclasses import dataclass, replace

from uproxy.endpoints import EndpointSelection, categorize_endpoints
from uproxy.kernel.conntrack import UdpFlowMatch
from uproxy.model import Endpoint, Protocol, ServicePort, ServicePortName
from uproxy.proxier.udp_flows import stale_udp_flows

DNS = ServicePort(
    ServicePortName("default", "dns", "dns"),
    Protocol.UDP,
    53,
    cluster_ips=("10.96.0.53",),
    external_ips=("203.0.113.7",),
    node_port=30053,
)
A, B = Endpoint("10.1.0.1", 53), Endpoint("10.1.0.2", 53)


@dataclass(frozen=True)
class Programmed:
    service: ServicePort
    selection: EndpointSelection


def programmed(service: ServicePort, *endpoints: Endpoint) -> Programmed:
    return Programmed(service, categorize_endpoints(endpoints, service, "node-a"))


def test_an_endpoint_no_longer_reachable_loses_its_flows() -> None:
    assert stale_udp_flows(programmed(DNS, A, B), programmed(DNS, A)) == {
        UdpFlowMatch.endpoint("10.1.0.2", 53)
    }


def test_a_service_that_gains_its_first_endpoint_loses_its_unnated_flows() -> None:
    assert stale_udp_flows(programmed(DNS), programmed(DNS, A)) == {
        UdpFlowMatch.destination("10.96.0.53", 53),
        UdpFlowMatch.destination("203.0.113.7", 53),
        UdpFlowMatch.destination(None, 30053),
    }
    # Unknown past (a start): treated as new.
    assert UdpFlowMatch.destination("10.96.0.53", 53) in stale_udp_flows(None, programmed(DNS, A))


def test_an_address_the_service_no_longer_has_loses_its_flows() -> None:
    fewer = replace(DNS, external_ips=())
    assert stale_udp_flows(programmed(DNS, A), programmed(fewer, A)) == {
        UdpFlowMatch.destination("203.0.113.7", 53)
    }


def test_a_removed_service_takes_its_flows_and_tcp_has_none() -> None:
    gone = stale_udp_flows(programmed(DNS, A), None)
    assert UdpFlowMatch.endpoint("10.1.0.1", 53) in gone
    assert UdpFlowMatch.destination(None, 30053) in gone
    web = replace(DNS, protocol=Protocol.TCP)
    assert stale_udp_flows(programmed(web, A, B), programmed(web, A)) == set()
