"""The Services both demos offer (as examples/compose/), and what their backends answer."""

from __future__ import annotations

SERVICE_CIDR = "10.96.0.0/16"
WEB_VIP, WEB_PORT = "10.96.0.10", 80
STICKY_VIP, STICKY_PORT = "10.96.0.20", 8080
DNS_VIP, DNS_PORT = "10.96.0.53", 53
HTTP_BACKEND_PORT = 8080
DNS_BACKEND_PORT = 5353
WEB_BACKENDS = ("web-a", "web-b", "web-c")  # compose service names, namespace roles
RESOLVER = "resolver"
DNS_ANSWER = "192.0.2.53"  # TEST-NET-1: what the resolver answers for every name
DNS_QUESTION = "demo.uproxy.test"
