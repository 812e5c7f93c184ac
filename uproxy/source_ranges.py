"""spec.loadBalancerSourceRanges as every mode's firewall reads it (kube-proxy's semantics).

Ranges apply to LoadBalancer IPs only, never to ClusterIPs, externalIPs or NodePorts. Like
kube-proxy's per-family proxiers, each family looks at its own ranges alone: a family without a
range of its own is not firewalled, even when the other family has ranges.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

from uproxy.addresses import of_family
from uproxy.model import ServicePort

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def allowed_sources(svc: ServicePort, family: int, node_ips: Iterable[str]) -> tuple[Network, ...]:
    """The sources that may reach `svc`'s LoadBalancer IPs of `family`, in order: its ranges of
    that family, then the LoadBalancer IPs themselves when a range holds a node address
    (kube-proxy's allowFromNode: a node calling a VIP that is routed locally arrives with the VIP
    as its source). Empty: no firewall for this family."""
    lb_ips = of_family(svc.load_balancer_ips, family)
    if not lb_ips:
        return ()
    ranges = [
        net
        for net in (
            ipaddress.ip_network(text, strict=False) for text in svc.load_balancer_source_ranges
        )
        if net.version == family
    ]
    if not ranges:
        return ()
    nodes = [ipaddress.ip_address(ip) for ip in of_family(node_ips, family)]
    out: list[Network] = list(dict.fromkeys(ranges))
    if any(ip in net for net in ranges for ip in nodes):
        out += [ipaddress.ip_network(ip) for ip in lb_ips]
    return tuple(out)
