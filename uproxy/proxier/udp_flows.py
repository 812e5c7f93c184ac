"""Which UDP conntrack entries a change to one service port leaves pointing the wrong way, for
the kernel modes (kube-proxy's pkg/proxy/conntrack cleanup).

UDP has no connection to end, so a client that keeps sending keeps its conntrack entry and with
it the NAT decision of its first datagram. After a change, these entries must go:

* those answered by an endpoint that no traffic may reach any more;
* those to a virtual address whose traffic had no endpoint until now (rejected or dropped, and so
  never NATed), internal and external traffic judged apart since their endpoints differ;
* those to a virtual address the service no longer has.
"""

from __future__ import annotations

from typing import Protocol as TypingProtocol

from uproxy.endpoints import EndpointSelection
from uproxy.kernel.conntrack import UdpFlowMatch
from uproxy.model import Protocol, ServicePort


class Rendered(TypingProtocol):
    """One service port as a kernel mode last programmed it."""

    @property
    def service(self) -> ServicePort: ...

    @property
    def selection(self) -> EndpointSelection: ...


def _internal(svc: ServicePort) -> set[UdpFlowMatch]:
    return {UdpFlowMatch.destination(ip, svc.port) for ip in svc.cluster_ips}


def _external(svc: ServicePort) -> set[UdpFlowMatch]:
    out = {
        UdpFlowMatch.destination(ip, svc.port) for ip in (*svc.external_ips, *svc.load_balancer_ips)
    }
    if svc.node_port:
        out.add(UdpFlowMatch.destination(None, svc.node_port))  # on any address
    return out


def stale_udp_flows(old: Rendered | None, new: Rendered | None) -> set[UdpFlowMatch]:
    """The UDP entries to delete once `new` (None: removed) has replaced `old` (None: new, or
    nothing known of what a previous run left) in the kernel."""
    if not any(r is not None and r.service.protocol is Protocol.UDP for r in (old, new)):
        return set()
    kept = set(new.selection.reachable) if new is not None else set()
    matches: set[UdpFlowMatch] = set()
    if old is not None:
        matches |= {
            UdpFlowMatch.endpoint(e.ip, e.port) for e in old.selection.reachable if e not in kept
        }
    if new is not None:
        svc, sel = new.service, new.selection
        if sel.internal and not (old is not None and old.selection.internal):
            matches |= _internal(svc)
        if sel.external and not (old is not None and old.selection.external):
            matches |= _external(svc)
    if old is not None:
        before = _internal(old.service) | _external(old.service)
        after = _internal(new.service) | _external(new.service) if new is not None else set()
        matches |= before - after
    return matches
