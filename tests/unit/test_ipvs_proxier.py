"""IpvsProxier against the stateful fakes: assertions are on the resulting IPVS table, addresses,
sysctls and chains, never on which calls were made. Graceful termination runs on an injected
clock."""

from __future__ import annotations

import errno
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from uproxy.errors import KernelError
from uproxy.kernel.conntrack import UdpFlow
from uproxy.kernel.fake import FakeConntrack, FakeNetfilter
from uproxy.kernel.ipvs import (
    DUMMY_INTERFACE,
    IpvsError,
    RealServer,
    ServiceConfig,
    VirtualServer,
    Worker,
)
from uproxy.kernel.ipvs_fake import FakeIpvs
from uproxy.kernel.netfilter import Jump, TableUpdate
from uproxy.model import Endpoint, Protocol, ProxyState, ServicePort, ServicePortName
from uproxy.proxier.ipvs import IpvsProxier, check_capabilities
from uproxy.proxier.ipvs_cleanup import cleanup_blocking
from uproxy.proxier.ipvs_desired import (
    LOCAL_CLIENT_RULE,
    POSTROUTING_CHAIN,
    Kind,
    compute_desired,
    masquerade_rules,
    nodeport_ips,
)
from uproxy.proxier.ipvs_owned import OwnedServers

TCP, UDP = Protocol.TCP, Protocol.UDP
WEB = ServicePortName("default", "web", "http")
DNS = ServicePortName("kube-system", "dns", "dns")
NODE_IP = "192.0.2.10"
GRACE = 15.0


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def svc(name: ServicePortName = WEB, protocol: Protocol = TCP, port: int = 80, **kw: Any) -> Any:
    kw.setdefault("cluster_ips", ("10.96.0.10",))
    return ServicePort(name, protocol, port, **kw)


def eps(*ips: str, port: int = 8080, **kw: Any) -> tuple[Endpoint, ...]:
    return tuple(Endpoint(ip, port, **kw) for ip in ips)


def state(*pairs: tuple[ServicePort, Sequence[Endpoint]]) -> ProxyState:
    return ProxyState(
        services={s.name: s for s, _ in pairs}, endpoints={s.name: tuple(e) for s, e in pairs}
    )


def vs(ip: str = "10.96.0.10", port: int = 80, protocol: Protocol = TCP) -> VirtualServer:
    return VirtualServer(protocol, ip, port)


def rs(ip: str, port: int = 8080) -> RealServer:
    return RealServer(ip, port)


class Rig:
    """A proxier on fakes, with the fakes at hand."""

    def __init__(self, tmp: Path, **kw: Any) -> None:
        self.ipvs = FakeIpvs(node_ips=kw.pop("node_ips", (NODE_IP,)))
        self.nf = FakeNetfilter()
        self.nf6 = FakeNetfilter("nft", 6)
        self.conntrack = FakeConntrack()
        self.conntrack6 = FakeConntrack()
        self.clock = Clock()
        self.state_file = tmp / "ipvs-virtual-servers"
        self.worker = Worker("test-netlink")
        self.kw = kw
        self.proxier = self.new_proxier()

    def new_proxier(self) -> IpvsProxier:
        """A fresh proxier on the same kernel: what a restart of uproxy looks like."""
        return IpvsProxier(
            ipvs=self.ipvs,
            host=self.ipvs,
            netfilter=self.nf,
            netfilter6=self.nf6,
            families=self.kw.get("families", (4, 6)),
            worker=self.worker,
            graceful_period=self.kw.get("graceful_period", GRACE),
            scheduler=self.kw.get("scheduler", "rr"),
            node_name=self.kw.get("node_name", "node-a"),
            nodeport_addresses=self.kw.get("nodeport_addresses", ()),
            strict_arp=self.kw.get("strict_arp", False),
            state_file=self.state_file,
            conntrack=self.conntrack,
            conntrack6=self.conntrack6,
            clock=self.clock,
            housekeeping_interval=None,  # the tests call housekeep() themselves
        )

    @property
    def addresses(self) -> set[str]:
        return self.ipvs.links.get(DUMMY_INTERFACE, set())

    def rules(self) -> list[str]:
        return self.nf.rules("nat", POSTROUTING_CHAIN)

    def rules6(self) -> list[str]:
        return self.nf6.rules("nat", POSTROUTING_CHAIN)


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    r = Rig(tmp_path)
    yield r
    r.worker.close()


# -- the pure part -----------------------------------------------------------------------------


def test_desired_state_covers_every_address_kind() -> None:
    service = svc(
        cluster_ips=("10.96.0.10",),
        external_ips=("203.0.113.5",),
        load_balancer_ips=("198.51.100.7",),
        node_port=30080,
        affinity_timeout=600,
    )
    desired = compute_desired(
        state((service, eps("10.1.0.2", "10.1.0.3"))),
        scheduler="lc",
        node_name="n",
        node_ips=["192.0.2.10", "192.0.2.11"],
    )
    assert set(desired.servers) == {
        vs("10.96.0.10"),
        vs("203.0.113.5"),
        vs("198.51.100.7"),
        vs("192.0.2.10", 30080),
        vs("192.0.2.11", 30080),
    }
    # NodePorts sit on node addresses, which are not uproxy's to put on its interface.
    assert desired.addresses == {"10.96.0.10", "203.0.113.5", "198.51.100.7"}
    for server in desired.servers.values():
        assert server.config == ServiceConfig("lc", 600)
        assert server.dests == {rs("10.1.0.2"), rs("10.1.0.3")}
    assert desired.servers[vs("192.0.2.10", 30080)].kind is Kind.NODEPORT
    assert desired.servers[vs("203.0.113.5")].kind is Kind.EXTERNAL


def test_endpoint_selection_policies_and_families() -> None:
    local = Endpoint("10.1.0.2", 8080, node_name="n")
    remote = Endpoint("10.1.0.3", 8080, node_name="other")
    v6 = Endpoint("fd00::2", 8080, node_name="n")
    not_ready = Endpoint("10.1.0.4", 8080, ready=False, serving=True, terminating=True)
    service = svc(internal_traffic_local=True, external_ips=("203.0.113.5",), node_port=30080)
    desired = compute_desired(
        state((service, (local, remote, v6, not_ready))),
        scheduler="rr",
        node_name="n",
        node_ips=["192.0.2.10"],
    )
    # Internal Local: the ClusterIP gets this node's endpoints only; external traffic gets all.
    assert desired.servers[vs()].dests == {rs("10.1.0.2")}
    assert desired.servers[vs("203.0.113.5")].dests == {rs("10.1.0.2"), rs("10.1.0.3")}
    assert not desired.servers[vs("203.0.113.5")].local_only
    # Only terminating endpoints left: they serve (select_endpoints' rule).
    only_terminating = compute_desired(
        state((svc(), (not_ready,))), scheduler="rr", node_name="n", node_ips=[]
    )
    assert only_terminating.servers[vs()].dests == {rs("10.1.0.4")}
    etp = svc(external_traffic_local=True, node_port=30080)
    desired = compute_desired(
        state((etp, (local, remote))), scheduler="rr", node_name="n", node_ips=["192.0.2.10"]
    )
    assert desired.servers[vs()].dests == {rs("10.1.0.2"), rs("10.1.0.3")}
    assert desired.servers[vs("192.0.2.10", 30080)].dests == {rs("10.1.0.2")}
    assert desired.servers[vs("192.0.2.10", 30080)].local_only


def test_conflicting_services_first_name_wins() -> None:
    a = svc(ServicePortName("a", "x"), cluster_ips=("10.96.0.1",), external_ips=("203.0.113.5",))
    b = svc(ServicePortName("b", "y"), cluster_ips=("10.96.0.2",), external_ips=("203.0.113.5",))
    desired = compute_desired(
        state((b, eps("10.1.0.3")), (a, eps("10.1.0.2"))),
        scheduler="rr",
        node_name="n",
        node_ips=[],
    )
    assert desired.servers[vs("203.0.113.5")].owner == a.name
    assert len(desired.conflicts) == 1 and "b/y" in desired.conflicts[0]


def test_nodeport_addresses_filter() -> None:
    ips = ["192.0.2.10", "198.51.100.1", "fd00::10"]
    assert nodeport_ips(ips, ()) == ["192.0.2.10", "198.51.100.1", "fd00::10"]
    assert nodeport_ips(ips, ("192.0.2.0/24",)) == ["192.0.2.10"]
    assert nodeport_ips(ips, ("192.0.2.0/24", "fd00::/64")) == ["192.0.2.10", "fd00::10"]


def test_masquerade_rules() -> None:
    cluster = svc(ServicePortName("a", "c"), cluster_ips=("10.96.0.1",))
    nodeport = svc(ServicePortName("a", "n"), cluster_ips=("10.96.0.2",), node_port=30080)
    local = svc(
        ServicePortName("a", "l"),
        cluster_ips=("10.96.0.3",),
        node_port=30081,
        external_traffic_local=True,
    )
    desired = compute_desired(
        state(
            (cluster, eps("10.1.0.2")),
            (nodeport, eps("10.1.0.3")),
            (local, eps("10.1.0.3", node_name="n")),
        ),
        scheduler="rr",
        node_name="n",
        node_ips=[NODE_IP],
    )
    assert masquerade_rules(desired) == [
        LOCAL_CLIENT_RULE,
        "-s 10.1.0.2/32 -d 10.1.0.2/32 -m ipvs --vdir ORIGINAL --vmethod MASQ "
        '-m comment --comment "uproxy IPVS: hairpin" -j MASQUERADE',
        "-s 10.1.0.3/32 -d 10.1.0.3/32 -m ipvs --vdir ORIGINAL --vmethod MASQ "
        '-m comment --comment "uproxy IPVS: hairpin" -j MASQUERADE',
        f"-m ipvs --vproto 6 --vaddr {NODE_IP} --vport 30081 --vdir ORIGINAL --vmethod MASQ "
        '-m comment --comment "a/l: Local policy" -j RETURN',
        f"-m ipvs --vaddr {NODE_IP} --vdir ORIGINAL --vmethod MASQ "
        '-m comment --comment "uproxy IPVS: external traffic" -j MASQUERADE',
    ]


def test_owned_servers_record(tmp_path: Path) -> None:
    record = OwnedServers(tmp_path / "sub" / "owned")
    assert record.load() == set()
    servers = {vs(), vs("fd00::1", 53, UDP)}
    record.add(servers)
    assert OwnedServers(tmp_path / "sub" / "owned").load() == servers
    record.discard([vs()])
    assert OwnedServers(tmp_path / "sub" / "owned").load() == {vs("fd00::1", 53, UDP)}
    record.clear()
    assert record.load() == set()


# -- syncing ----------------------------------------------------------------------------------


async def test_cluster_ip_service(rig: Rig) -> None:
    await rig.proxier.sync(state((svc(), eps("10.1.0.2", "10.1.0.3"))))
    assert rig.ipvs.table() == {vs(): {rs("10.1.0.2"): 1, rs("10.1.0.3"): 1}}
    assert rig.ipvs.servers[vs()].config == ServiceConfig("rr", None)
    assert rig.addresses == {"10.96.0.10"}
    assert DUMMY_INTERFACE in rig.ipvs.links_up
    for key in (
        "net.ipv4.vs.conntrack",
        "net.ipv4.vs.expire_nodest_conn",
        "net.ipv4.vs.expire_quiescent_template",
        "net.ipv4.ip_forward",
    ):
        assert rig.ipvs.sysctls[key] == "1", key
    assert rig.ipvs.sysctls["net.ipv4.conf.all.arp_ignore"] == "0"  # no --ipvs-strict-arp
    assert rig.rules()[0] == LOCAL_CLIENT_RULE
    assert any(POSTROUTING_CHAIN in spec for spec in rig.nf.rules("nat", "POSTROUTING"))
    assert rig.state_file.read_text() == "TCP 10.96.0.10 80\n"


async def test_second_sync_changes_nothing(rig: Rig) -> None:
    desired = state(
        (svc(node_port=30080, external_ips=("203.0.113.5",)), eps("10.1.0.2")),
        (svc(DNS, UDP, 53, cluster_ips=("10.96.0.53",)), eps("10.1.0.9", port=53)),
    )
    await rig.proxier.sync(desired)
    writes, commits = rig.ipvs.writes, rig.nf.commits
    await rig.proxier.sync(desired)
    rig.clock.now += 60  # a full resync reads everything back, and still changes nothing
    await rig.proxier.sync(desired)
    assert (rig.ipvs.writes, rig.nf.commits) == (writes, commits)


async def test_nodeports_per_node_address(tmp_path: Path) -> None:
    rig = Rig(
        tmp_path,
        node_ips=("192.0.2.10", "198.51.100.1"),
        nodeport_addresses=("198.51.100.0/24",),
    )
    try:
        await rig.proxier.sync(state((svc(node_port=30080), eps("10.1.0.2"))))
        assert set(rig.ipvs.table()) == {vs(), vs("198.51.100.1", 30080)}
        assert rig.addresses == {"10.96.0.10"}
        # A new node address matching --nodeport-addresses gets its virtual server.
        rig.ipvs.node_ips.append("198.51.100.2")
        await rig.proxier.sync(state((svc(node_port=30080), eps("10.1.0.2"))))
        assert vs("198.51.100.2", 30080) in rig.ipvs.table()
        # One that goes away loses it, though uproxy-ipvs0 never held that address.
        rig.ipvs.node_ips.remove("198.51.100.1")
        await rig.proxier.sync(state((svc(node_port=30080), eps("10.1.0.2"))))
        assert vs("198.51.100.1", 30080) not in rig.ipvs.table()
    finally:
        rig.worker.close()


async def test_affinity_is_persistence_and_scheduler_changes_in_place(tmp_path: Path) -> None:
    rig = Rig(tmp_path, scheduler="sh")
    try:
        await rig.proxier.sync(state((svc(affinity_timeout=300), eps("10.1.0.2"))))
        assert rig.ipvs.servers[vs()].config == ServiceConfig("sh", 300)
        rig.ipvs.connect(vs())
        await rig.proxier.sync(state((svc(affinity_timeout=None), eps("10.1.0.2"))))
        assert rig.ipvs.servers[vs()].config == ServiceConfig("sh", None)
        # Changed in place: the real server and its connection are still there.
        assert rig.ipvs.servers[vs()].dests[rs("10.1.0.2")].active == 1
    finally:
        rig.worker.close()


async def test_strict_arp(tmp_path: Path) -> None:
    rig = Rig(tmp_path, strict_arp=True)
    try:
        await rig.proxier.sync(state())
        assert rig.ipvs.sysctls["net.ipv4.conf.all.arp_ignore"] == "1"
        assert rig.ipvs.sysctls["net.ipv4.conf.all.arp_announce"] == "2"
    finally:
        rig.worker.close()


async def test_foreign_virtual_servers_are_never_touched(rig: Rig) -> None:
    foreign = vs("172.16.0.1", 443)
    rig.ipvs.add_service(foreign, ServiceConfig("wlc"))
    rig.ipvs.add_dest(foreign, rs("172.16.1.1", 443), 5)
    await rig.proxier.sync(state((svc(), eps("10.1.0.2"))))
    await rig.proxier.sync(state())
    rig.clock.now += GRACE + 1
    await rig.proxier.housekeep()
    assert rig.ipvs.table() == {foreign: {rs("172.16.1.1", 443): 5}}
    assert rig.ipvs.servers[foreign].config == ServiceConfig("wlc")


async def test_a_foreign_virtual_server_that_clashes_with_a_desired_one_is_left_alone(
    rig: Rig,
) -> None:
    clash = vs()  # the ClusterIP's virtual server, made by someone else first
    rig.ipvs.add_service(clash, ServiceConfig("wlc", 60))
    rig.ipvs.add_dest(clash, rs("172.16.1.1", 443), 5)
    api = svc(ServicePortName("default", "api", "http"), cluster_ips=("10.96.0.11",))
    with structlog.testing.capture_logs() as logs:
        await rig.proxier.sync(state((svc(), eps("10.1.0.2")), (api, eps("10.1.0.3"))))
        await rig.proxier.sync(state((svc(), eps("10.1.0.2", "10.1.0.4")), (api, eps("10.1.0.3"))))
    assert rig.ipvs.table()[clash] == {rs("172.16.1.1", 443): 5}
    assert rig.ipvs.servers[clash].config == ServiceConfig("wlc", 60)
    assert rig.ipvs.table()[vs("10.96.0.11")] == {rs("10.1.0.3"): 1}  # the rest is served
    reports = [e for e in logs if e["event"] == "ipvs_foreign_virtual_server"]
    assert [e["virtual_server"] for e in reports] == [str(clash)]  # once, not every sync
    assert rig.proxier.foreign_clashes == 1
    assert clash not in OwnedServers(rig.state_file).load()

    # The service goes away, a restart, and a shutdown with cleanup: still never touched.
    await rig.proxier.sync(state((api, eps("10.1.0.3"))))
    rig.clock.now += GRACE + 1
    await rig.proxier.housekeep()
    assert rig.ipvs.table()[clash] == {rs("172.16.1.1", 443): 5}
    await rig.proxier.sync(state((svc(), eps("10.1.0.2")), (api, eps("10.1.0.3"))))
    assert rig.ipvs.table()[clash] == {rs("172.16.1.1", 443): 5}
    restarted = rig.new_proxier()
    await restarted.sync(state((svc(), eps("10.1.0.2"))))
    assert rig.ipvs.table()[clash] == {rs("172.16.1.1", 443): 5}
    assert restarted.foreign_clashes == 1


async def test_once_its_owner_deletes_the_clash_uproxy_serves_the_port(rig: Rig) -> None:
    rig.ipvs.add_service(vs(), ServiceConfig("wlc"))
    await rig.proxier.sync(state((svc(), eps("10.1.0.2"))))
    assert rig.ipvs.table()[vs()] == {}
    rig.ipvs.delete_service(vs())
    await rig.proxier.sync(state((svc(), eps("10.1.0.2"))))
    assert rig.ipvs.table()[vs()] == {rs("10.1.0.2"): 1}
    assert rig.ipvs.servers[vs()].config == ServiceConfig("rr")
    assert vs() in OwnedServers(rig.state_file).load()


async def test_cleanup_on_exit_spares_a_foreign_clash(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    rig.ipvs.add_service(vs(), ServiceConfig("wlc"))
    try:
        proxier = IpvsProxier(
            ipvs=rig.ipvs,
            host=rig.ipvs,
            netfilter=rig.nf,
            worker=rig.worker,
            state_file=rig.state_file,
            conntrack=rig.conntrack,
            clock=rig.clock,
            housekeeping_interval=None,
            cleanup_on_exit=True,
        )
        await proxier.sync(
            state(
                (svc(), eps("10.1.0.2")), (svc(DNS, cluster_ips=("10.96.0.53",)), eps("10.1.0.3"))
            )
        )
        await proxier.shutdown(0)
    finally:
        rig.worker.close()
    assert set(rig.ipvs.table()) == {vs()}


async def test_udp_endpoint_removed_at_once_and_flows_flushed(rig: Rig) -> None:
    dns = svc(DNS, UDP, 53, cluster_ips=("10.96.0.53",))
    dns_vs = vs("10.96.0.53", 53, UDP)
    await rig.proxier.sync(state((dns, eps("10.1.0.8", "10.1.0.9", port=53))))
    rig.conntrack.flows = [
        UdpFlow("10.0.0.5", 4000, "10.96.0.53", 53, "10.1.0.8", 53),
        UdpFlow("10.0.0.6", 4000, "10.96.0.53", 53, "10.1.0.9", 53),
    ]
    await rig.proxier.sync(state((dns, eps("10.1.0.9", port=53))))
    assert rig.ipvs.table() == {dns_vs: {rs("10.1.0.9", 53): 1}}
    assert rig.proxier.terminating == {}
    assert [f.reply_src for f in rig.conntrack.flows] == ["10.1.0.9"]


async def test_udp_flows_flushed_when_first_backend_appears(rig: Rig) -> None:
    dns = svc(DNS, UDP, 53, cluster_ips=("10.96.0.53",))
    await rig.proxier.sync(state((dns, ())))
    rig.conntrack.flows = [UdpFlow("10.0.0.5", 4000, "10.96.0.53", 53, "10.96.0.53", 53)]
    await rig.proxier.sync(state((dns, eps("10.1.0.9", port=53))))
    assert rig.conntrack.flows == []


async def test_tcp_endpoint_drains_then_goes(rig: Rig) -> None:
    await rig.proxier.sync(state((svc(), eps("10.1.0.2", "10.1.0.3"))))
    assert rig.ipvs.connect(vs()) == rs("10.1.0.2")  # rr: one connection each
    assert rig.ipvs.connect(vs()) == rs("10.1.0.3")
    await rig.proxier.sync(state((svc(), eps("10.1.0.3"))))
    # Weight 0: no new connections, the open one goes on.
    assert rig.ipvs.table() == {vs(): {rs("10.1.0.2"): 0, rs("10.1.0.3"): 1}}
    assert rig.proxier.terminating == {(vs(), rs("10.1.0.2")): 1000.0 + GRACE}
    assert rig.ipvs.connect(vs()) == rs("10.1.0.3")
    rig.clock.now += 5
    await rig.proxier.housekeep()
    assert rs("10.1.0.2") in rig.ipvs.table()[vs()]
    rig.ipvs.close(vs(), rs("10.1.0.2"))
    await rig.proxier.housekeep()  # drained: deleted well before the graceful period ends
    assert rig.ipvs.table() == {vs(): {rs("10.1.0.3"): 1}}
    assert rig.proxier.terminating == {}


async def test_graceful_period_is_a_bound(rig: Rig) -> None:
    await rig.proxier.sync(state((svc(), eps("10.1.0.2", "10.1.0.3"))))
    rig.ipvs.set_connections(vs(), rs("10.1.0.2"), active=3, inactive=7)
    await rig.proxier.sync(state((svc(), eps("10.1.0.3"))))
    rig.clock.now += GRACE - 0.1
    await rig.proxier.housekeep()
    assert rig.ipvs.table()[vs()][rs("10.1.0.2")] == 0
    rig.clock.now += 0.1
    await rig.proxier.housekeep()
    assert rig.ipvs.table() == {vs(): {rs("10.1.0.3"): 1}}


async def test_inactive_connections_hold_too(rig: Rig) -> None:
    await rig.proxier.sync(state((svc(), eps("10.1.0.2", "10.1.0.3"))))
    rig.ipvs.set_connections(vs(), rs("10.1.0.2"), active=0, inactive=1)  # e.g. TIME_WAIT
    await rig.proxier.sync(state((svc(), eps("10.1.0.3"))))
    await rig.proxier.housekeep()
    assert rs("10.1.0.2") in rig.ipvs.table()[vs()]
    rig.ipvs.set_connections(vs(), rs("10.1.0.2"))
    await rig.proxier.housekeep()
    assert rs("10.1.0.2") not in rig.ipvs.table()[vs()]


async def test_terminating_endpoint_that_returns_gets_its_weight_back(rig: Rig) -> None:
    await rig.proxier.sync(state((svc(), eps("10.1.0.2", "10.1.0.3"))))
    rig.ipvs.connect(vs())
    await rig.proxier.sync(state((svc(), eps("10.1.0.3"))))
    assert rig.ipvs.table()[vs()][rs("10.1.0.2")] == 0
    await rig.proxier.sync(state((svc(), eps("10.1.0.2", "10.1.0.3"))))
    assert rig.ipvs.table() == {vs(): {rs("10.1.0.2"): 1, rs("10.1.0.3"): 1}}
    assert rig.proxier.terminating == {}
    rig.clock.now += GRACE * 2
    await rig.proxier.housekeep()
    assert rig.ipvs.table() == {vs(): {rs("10.1.0.2"): 1, rs("10.1.0.3"): 1}}


async def test_removed_tcp_service_drains_with_its_address(rig: Rig) -> None:
    await rig.proxier.sync(state((svc(), eps("10.1.0.2"))))
    rig.ipvs.connect(vs())
    await rig.proxier.sync(state())
    # The virtual server and its address stay while the connection lasts, at weight 0.
    assert rig.ipvs.table() == {vs(): {rs("10.1.0.2"): 0}}
    assert rig.addresses == {"10.96.0.10"}
    rig.clock.now += GRACE
    await rig.proxier.housekeep()
    assert rig.ipvs.table() == {}
    assert rig.addresses == set()
    assert rig.state_file.read_text() == ""


async def test_removed_service_without_connections_goes_at_once(rig: Rig) -> None:
    await rig.proxier.sync(
        state(
            (svc(), eps("10.1.0.2")),
            (svc(DNS, UDP, 53, cluster_ips=("10.96.0.53",)), eps("10.1.0.9", port=53)),
        )
    )
    await rig.proxier.sync(state())
    assert rig.ipvs.table() == {}
    assert rig.addresses == set()


async def test_zero_graceful_period_deletes_at_once(tmp_path: Path) -> None:
    rig = Rig(tmp_path, graceful_period=0)
    try:
        await rig.proxier.sync(state((svc(), eps("10.1.0.2", "10.1.0.3"))))
        rig.ipvs.connect(vs())
        await rig.proxier.sync(state((svc(), eps("10.1.0.3"))))
        assert rig.ipvs.table() == {vs(): {rs("10.1.0.3"): 1}}
    finally:
        rig.worker.close()


async def test_restart_recognises_what_uproxy_owns(rig: Rig) -> None:
    foreign = vs("192.0.2.10", 31000)  # on a node address, like a NodePort, but not uproxy's
    rig.ipvs.add_service(foreign, ServiceConfig("rr"))
    old = state(
        (svc(node_port=30080), eps("10.1.0.2")),
        (svc(DNS, UDP, 53, cluster_ips=("10.96.0.53",), node_port=30053), eps("10.1.0.9")),
    )
    await rig.proxier.sync(old)
    assert len(rig.ipvs.table()) == 5
    # uproxy restarts and learns that the DNS service is gone meanwhile.
    rig.proxier = rig.new_proxier()
    await rig.proxier.sync(state((svc(node_port=30080), eps("10.1.0.2"))))
    assert set(rig.ipvs.table()) == {vs(), vs(NODE_IP, 30080), foreign}
    assert rig.addresses == {"10.96.0.10"}


async def test_restart_resumes_graceful_termination(rig: Rig) -> None:
    await rig.proxier.sync(state((svc(), eps("10.1.0.2", "10.1.0.3"))))
    rig.ipvs.connect(vs())
    await rig.proxier.sync(state((svc(), eps("10.1.0.3"))))
    rig.proxier = rig.new_proxier()
    rig.clock.now += 100
    await rig.proxier.sync(state((svc(), eps("10.1.0.3"))))
    # A weight-0 real server that is not wanted: terminating again, with a fresh period.
    assert rig.proxier.terminating == {(vs(), rs("10.1.0.2")): rig.clock.now + GRACE}
    rig.clock.now += GRACE
    await rig.proxier.housekeep()
    assert rig.ipvs.table() == {vs(): {rs("10.1.0.3"): 1}}


async def test_drift_is_repaired_by_the_full_resync(rig: Rig) -> None:
    desired = state((svc(), eps("10.1.0.2", "10.1.0.3")))
    await rig.proxier.sync(desired)
    rig.ipvs.delete_dest(vs(), rs("10.1.0.3"))  # an admin, behind uproxy's back
    rig.ipvs.set_dest(vs(), rs("10.1.0.2"), 7)
    rig.ipvs.links[DUMMY_INTERFACE].discard("10.96.0.10")
    rig.ipvs.links[DUMMY_INTERFACE].add("10.96.99.99")  # uproxy-ipvs0's addresses are uproxy's
    rig.clock.now += 30
    await rig.proxier.sync(desired)
    assert rig.ipvs.table() == {vs(): {rs("10.1.0.2"): 1, rs("10.1.0.3"): 1}}
    assert rig.addresses == {"10.96.0.10"}


async def test_failed_sync_raises_and_the_next_converges(rig: Rig) -> None:
    await rig.proxier.sync(state((svc(), eps("10.1.0.2"))))
    rig.ipvs.connect(vs())
    rig.ipvs.fail_next()
    with pytest.raises(KernelError):
        await rig.proxier.sync(state((svc(), eps("10.1.0.3"))))
    # What worked before is still in place.
    assert rig.ipvs.table() == {vs(): {rs("10.1.0.2"): 1}}
    await rig.proxier.sync(state((svc(), eps("10.1.0.3"))))
    assert rig.ipvs.table() == {vs(): {rs("10.1.0.2"): 0, rs("10.1.0.3"): 1}}


async def test_unknown_scheduler_fails_the_sync(tmp_path: Path) -> None:
    rig = Rig(tmp_path, scheduler="mh")
    rig.ipvs.schedulers.discard("mh")
    try:
        with pytest.raises(IpvsError) as caught:
            await rig.proxier.sync(state((svc(), eps("10.1.0.2"))))
        assert caught.value.code == errno.ENOENT
    finally:
        rig.worker.close()


async def test_userspace_leftovers_are_removed(rig: Rig) -> None:
    rig.nf.apply(
        {
            "nat": TableUpdate(replace={"UPROXY-PORTALS": ["-d 10.96.0.10/32 -j REDIRECT"]}),
            "filter": TableUpdate(replace={"UPROXY-PROXY-PORTS": []}),
        }
    )
    rig.nf.ensure_jumps("nat", [Jump("PREROUTING", "UPROXY-PORTALS", "portals")])
    rig.nf.ensure_jumps("filter", [Jump("INPUT", "UPROXY-PROXY-PORTS", "proxy ports")])
    rig.nf.hand_add_rule("nat", "POSTROUTING", "-j MASQUERADE")  # someone else's
    await rig.proxier.sync(state((svc(), eps("10.1.0.2"))))
    assert rig.nf.chains("nat") == [POSTROUTING_CHAIN]
    assert rig.nf.chains("filter") == []
    assert rig.nf.rules("nat", "PREROUTING") == []
    assert "-j MASQUERADE" in rig.nf.rules("nat", "POSTROUTING")


async def test_view_reports_kernel_connections(rig: Rig) -> None:
    service = svc(affinity_timeout=None)
    endpoints = eps("10.1.0.2", "10.1.0.3") + eps("10.1.0.4", ready=False, serving=False)
    await rig.proxier.sync(state((service, endpoints)))
    for _ in range(3):
        rig.ipvs.connect(vs())
    rig.clock.now += 100  # statistics are due
    await rig.proxier.housekeep()
    [view] = rig.proxier.view()
    assert view.service == service
    assert view.proxy_port == 80
    assert view.endpoints == endpoints
    assert view.in_use == frozenset(endpoints[:2])
    assert view.per_endpoint == {endpoints[0]: 2, endpoints[1]: 1}
    assert view.connections == 3
    assert view.stats.total == 3


async def test_cleanup_removes_only_uproxys_state(rig: Rig) -> None:
    foreign = vs("172.16.0.1", 443)
    rig.ipvs.add_service(foreign, ServiceConfig("wlc"))
    await rig.proxier.sync(state((svc(node_port=30080), eps("10.1.0.2"))))
    await rig.proxier.shutdown(0)
    worker = Worker("test-cleanup")
    try:
        netfilters = (rig.nf, rig.nf6)
        worker.call(cleanup_blocking, rig.ipvs, rig.ipvs, OwnedServers(rig.state_file), netfilters)
        # Twice: idempotent.
        worker.call(cleanup_blocking, rig.ipvs, rig.ipvs, OwnedServers(rig.state_file), netfilters)
    finally:
        worker.close()
    assert set(rig.ipvs.table()) == {foreign}
    assert DUMMY_INTERFACE not in rig.ipvs.links
    assert rig.nf.owned() == {}
    assert rig.nf6.owned() == {}
    assert not rig.state_file.exists()


async def test_cleanup_on_exit(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    proxier = IpvsProxier(
        ipvs=rig.ipvs,
        host=rig.ipvs,
        netfilter=rig.nf,
        state_file=rig.state_file,
        conntrack=rig.conntrack,
        housekeeping_interval=0.01,
        cleanup_on_exit=True,
    )
    await proxier.sync(state((svc(), eps("10.1.0.2"))))
    await proxier.shutdown(1)
    rig.worker.close()
    assert rig.ipvs.table() == {}
    assert DUMMY_INTERFACE not in rig.ipvs.links


def test_capability_check_names_the_alternative() -> None:
    with pytest.raises(KernelError, match="--mode userspace"):
        check_capabilities(FakeIpvs(available=False), "rr")
    missing = FakeIpvs(schedulers=("rr",))
    with pytest.raises(KernelError, match="ip_vs_mh"):
        check_capabilities(missing, "mh")
    check_capabilities(missing, "rr")


def test_fake_enforces_kernel_invariants() -> None:
    fake = FakeIpvs()
    fake.add_service(vs(), ServiceConfig("rr"))
    with pytest.raises(IpvsError) as caught:
        fake.add_service(vs(), ServiceConfig("rr"))
    assert caught.value.code == errno.EEXIST
    with pytest.raises(IpvsError) as caught:
        fake.add_dest(vs("10.96.0.99"), rs("10.1.0.2"), 1)
    assert caught.value.code == errno.ESRCH
    with pytest.raises(IpvsError) as caught:
        fake.add_dest(vs(), rs("fd00::2"), 1)
    assert caught.value.code == errno.EINVAL
    with pytest.raises(IpvsError) as caught:
        fake.set_dest(vs(), rs("10.1.0.2"), 1)
    assert caught.value.code == errno.ENOENT
    with pytest.raises(IpvsError) as caught:
        fake.add_address("nope0", "10.0.0.1")
    assert caught.value.code == errno.ENODEV
    fake.delete_dest(vs(), rs("10.1.0.2"))  # missing: fine, as the interface says
    fake.delete_service(vs("10.96.0.99"))


async def test_worker_runs_everything_on_one_thread() -> None:
    worker = Worker("test-one-thread")
    try:
        idents = {await worker.run(threading.get_ident) for _ in range(5)}
        idents.add(worker.call(threading.get_ident))
        assert len(idents) == 1 and threading.get_ident() not in idents
        # Already on the worker: runs inline instead of deadlocking on its own queue.
        assert await worker.run(worker.call, threading.get_ident) in idents
    finally:
        worker.close()


# -- IPv6 and dual stack ------------------------------------------------------------------------

NODE6 = "2001:db8::10"
DUAL = svc(cluster_ips=("10.96.0.10", "fd00:96::10"), node_port=30080)
DUAL_ENDPOINTS = eps("10.1.0.2", "fd00:11::2", "fd00:11::3")


def dual_rig(tmp_path: Path, **kw: Any) -> Rig:
    return Rig(tmp_path, node_ips=(NODE_IP, NODE6), **kw)


async def test_ipv6_service(rig: Rig) -> None:
    service = svc(cluster_ips=("fd00:96::10",))
    endpoints = eps("fd00:11::2") + eps("10.1.0.2")  # the IPv4 one cannot serve an IPv6 VIP
    await rig.proxier.sync(state((service, endpoints)))
    assert rig.ipvs.table() == {vs("fd00:96::10"): {rs("fd00:11::2"): 1}}
    assert rig.addresses == {"fd00:96::10"}
    # Its masquerade rules are in ip6tables; iptables gets none of its real servers.
    assert rig.rules() == [LOCAL_CLIENT_RULE]
    assert rig.rules6() == [
        LOCAL_CLIENT_RULE,
        "-s fd00:11::2/128 -d fd00:11::2/128 -m ipvs --vdir ORIGINAL --vmethod MASQ "
        '-m comment --comment "uproxy IPVS: hairpin" -j MASQUERADE',
    ]
    assert rig.nf6.rules("nat", "POSTROUTING") == rig.nf.rules("nat", "POSTROUTING")


async def test_dual_stack_service_gets_each_familys_real_servers(tmp_path: Path) -> None:
    rig = dual_rig(tmp_path)
    try:
        await rig.proxier.sync(state((DUAL, DUAL_ENDPOINTS)))
    finally:
        rig.worker.close()
    v6 = {rs("fd00:11::2"): 1, rs("fd00:11::3"): 1}
    assert rig.ipvs.table() == {
        vs("10.96.0.10"): {rs("10.1.0.2"): 1},
        vs("fd00:96::10"): v6,
        vs(NODE_IP, 30080): {rs("10.1.0.2"): 1},
        vs(NODE6, 30080): v6,  # the NodePort on the node's IPv6 address
    }
    assert rig.addresses == {"10.96.0.10", "fd00:96::10"}
    external = "--vdir ORIGINAL --vmethod MASQ -m comment --comment "
    external += '"uproxy IPVS: external traffic" -j MASQUERADE'
    assert rig.rules()[-1] == f"-m ipvs --vaddr {NODE_IP} {external}"
    assert rig.rules6()[-1] == f"-m ipvs --vaddr {NODE6} {external}"
    assert not any(":" in rule.split("--comment")[0] for rule in rig.rules())
    assert not any("10." in rule for rule in rig.rules6())


def test_a_single_stack_service_has_no_nodeport_of_the_other_family() -> None:
    only4 = svc(node_port=30080)
    only6 = svc(ServicePortName("default", "v6"), cluster_ips=("fd00:96::10",), node_port=30081)
    desired = compute_desired(
        state((only4, eps("10.1.0.2")), (only6, eps("fd00:11::2"))),
        scheduler="rr",
        node_name="n",
        node_ips=[NODE_IP, NODE6],
    )
    assert set(desired.servers) == {
        vs(),
        vs("fd00:96::10"),
        vs(NODE_IP, 30080),
        vs(NODE6, 30081),
    }


async def test_ipv6_left_out_serves_ipv4_alone(tmp_path: Path) -> None:
    rig = dual_rig(tmp_path, families=(4,))
    try:
        await rig.proxier.sync(state((DUAL, DUAL_ENDPOINTS)))
    finally:
        rig.worker.close()
    assert rig.ipvs.table() == {
        vs("10.96.0.10"): {rs("10.1.0.2"): 1},
        vs(NODE_IP, 30080): {rs("10.1.0.2"): 1},
    }
    assert rig.addresses == {"10.96.0.10"}


async def test_affinity_over_ipv6_is_persistence(tmp_path: Path) -> None:
    rig = dual_rig(tmp_path)
    sticky = svc(cluster_ips=("10.96.0.10", "fd00:96::10"), affinity_timeout=600)
    try:
        await rig.proxier.sync(state((sticky, DUAL_ENDPOINTS)))
    finally:
        rig.worker.close()
    for ip in ("10.96.0.10", "fd00:96::10"):
        assert rig.ipvs.servers[vs(ip)].config == ServiceConfig("rr", 600)


async def test_ipv6_udp_flows_are_flushed_in_ipv6s_table(rig: Rig) -> None:
    dns = svc(DNS, UDP, 53, cluster_ips=("10.96.0.53", "fd00:96::53"))
    await rig.proxier.sync(state((dns, ())))
    flow4 = UdpFlow("10.0.0.5", 4000, "10.96.0.53", 53, "10.96.0.53", 53)
    flow6 = UdpFlow("fd00:10::5", 4000, "fd00:96::53", 53, "fd00:96::53", 53)
    rig.conntrack.flows = [flow4]
    rig.conntrack6.flows = [flow6]
    await rig.proxier.sync(state((dns, eps("fd00:11::2", port=53))))  # only IPv6 has one now
    assert rig.conntrack6.flows == []
    assert rig.conntrack.flows == [flow4]


async def test_ipv6_forwarding_off_is_reported_once_and_left_alone(rig: Rig) -> None:
    ipv4_only = state((svc(), eps("10.1.0.2")))
    dual = state((svc(cluster_ips=("10.96.0.10", "fd00:96::10")), DUAL_ENDPOINTS))
    with structlog.testing.capture_logs() as logs:
        await rig.proxier.sync(ipv4_only)
        for _ in range(2):
            rig.clock.now += 100  # full syncs, which check the sysctls
            await rig.proxier.sync(dual)
    assert [e["event"] for e in logs].count("ipv6_forwarding_off") == 1
    assert rig.ipvs.sysctls["net.ipv6.conf.all.forwarding"] == "0"
    assert rig.ipvs.sysctls["net.ipv4.ip_forward"] == "1"


async def test_ipv6_load_balancer_firewall_in_ip6tables(rig: Rig) -> None:
    await rig.proxier.sync(state((ranged(), eps("10.1.0.2", "fd00:11::2"))))
    firewall6 = rig.nf6.rules("filter", "UPROXY-IPVS-FIREWALL")
    match = '-d 2001:db8::7/128 -p tcp -m comment --comment "default/web:http loadbalancer IP"'
    assert firewall6 == [
        f"-s fd00::/8 {match} -m tcp --dport 80 -j RETURN",
        '-d 2001:db8::7/128 -p tcp -m comment --comment "default/web:http traffic not in '
        'loadBalancerSourceRanges" -m tcp --dport 80 -j DROP',
    ]
    assert rig.nf6.rules("filter", "INPUT") == rig.nf.rules("filter", "INPUT")
    assert not any("2001:db8" in r for r in rig.nf.rules("filter", "UPROXY-IPVS-FIREWALL"))


async def test_other_modes_ip6tables_leftovers_are_removed(rig: Rig) -> None:
    rig.nf6.apply({"nat": TableUpdate(replace={"UPROXY-PORTALS": ["-d fd00:96::10/128 -j DNAT"]})})
    rig.nf6.ensure_jumps("nat", [Jump("PREROUTING", "UPROXY-PORTALS", "portals")])
    await rig.proxier.sync(state((svc(cluster_ips=("fd00:96::10",)), eps("fd00:11::2"))))
    assert rig.nf6.chains("nat") == [POSTROUTING_CHAIN]
    assert rig.nf6.rules("nat", "PREROUTING") == []


async def test_a_failed_sync_never_loses_ownership(rig: Rig) -> None:
    other = svc(ServicePortName("default", "other"), cluster_ips=("10.96.0.11",))
    nodeport = svc(node_port=30080)
    await rig.proxier.sync(state((nodeport, eps("10.1.0.2")), (other, eps("10.1.0.3", "10.1.0.4"))))
    rig.ipvs.connect(vs("10.96.0.11"))
    await rig.proxier.sync(state((nodeport, eps("10.1.0.2")), (other, eps("10.1.0.4"))))
    assert rig.proxier.terminating  # housekeeping has work to do
    rig.ipvs.fail_next()
    with pytest.raises(KernelError):
        await rig.proxier.sync(state((other, eps("10.1.0.4"))))  # the NodePort service goes
    await rig.proxier.housekeep()
    await rig.proxier.sync(state((other, eps("10.1.0.4"))))
    # The NodePort's virtual server sits on a node address: only the record says it is uproxy's.
    assert vs(NODE_IP, 30080) not in rig.ipvs.table()
    assert set(rig.ipvs.table()) == {vs("10.96.0.11")}


async def test_a_sync_failing_after_creating_keeps_the_record(rig: Rig) -> None:
    other = svc(ServicePortName("default", "other"), cluster_ips=("10.96.0.11",))
    await rig.proxier.sync(state((other, eps("10.1.0.3", "10.1.0.4"))))
    rig.ipvs.connect(vs("10.96.0.11"))
    await rig.proxier.sync(state((other, eps("10.1.0.4"))))
    assert rig.proxier.terminating  # housekeeping has work to do
    rig.nf.fail_next()  # the IPVS part of the next sync works, its masquerade rules fail
    with pytest.raises(KernelError):
        await rig.proxier.sync(state((other, eps("10.1.0.4")), (svc(node_port=30080), ())))
    assert vs(NODE_IP, 30080) in rig.ipvs.table()
    await rig.proxier.housekeep()
    await rig.proxier.sync(state((other, eps("10.1.0.4"))))
    assert set(rig.ipvs.table()) == {vs("10.96.0.11")}


# -- loadBalancerSourceRanges ------------------------------------------------------------------


def ranged(**kw: Any) -> Any:
    kw.setdefault("load_balancer_ips", ("198.51.100.7", "2001:db8::7"))
    kw.setdefault("external_ips", ("203.0.113.5",))
    kw.setdefault("load_balancer_source_ranges", ("10.0.0.0/8", "192.0.2.0/24", "fd00::/8"))
    return svc(**kw)


def test_source_ranges_render_a_filter_firewall_for_ipv4_lb_virtual_servers() -> None:
    # 192.0.2.10, a node address, is in a range: the LB IP is an allowed source too.
    desired = compute_desired(
        state((ranged(), eps("10.1.0.2"))),
        scheduler="rr",
        node_name="n",
        node_ips=[],
        node_addresses=["192.0.2.10"],
    )
    comment = '-m comment --comment "default/web:http loadbalancer IP"'
    match = f"-d 198.51.100.7/32 -p tcp {comment} -m tcp --dport 80"
    assert list(desired.firewall_of(4)) == [
        f"-s 10.0.0.0/8 {match} -j RETURN",
        f"-s 192.0.2.0/24 {match} -j RETURN",
        f"-s 198.51.100.7/32 {match} -j RETURN",
        '-d 198.51.100.7/32 -p tcp -m comment --comment "default/web:http traffic not in '
        'loadBalancerSourceRanges" -m tcp --dport 80 -j DROP',
    ]
    # Without a node address in the ranges, and with only IPv6 ranges (per family), or none.
    assert (
        len(
            compute_desired(
                state((ranged(), eps("10.1.0.2"))), scheduler="rr", node_name="n", node_ips=[]
            ).firewall_of(4)
        )
        == 3
    )
    for ranges in ((), ("fd00::/8",)):
        only = ranged(load_balancer_source_ranges=ranges)
        plain = compute_desired(
            state((only, eps("10.1.0.2"))), scheduler="rr", node_name="n", node_ips=[]
        )
        assert plain.firewall_of(4) == ()


async def test_the_firewall_chain_comes_and_goes_with_the_ranges(rig: Rig) -> None:
    await rig.proxier.sync(state((ranged(), eps("10.1.0.2"))))
    firewall = rig.nf.rules("filter", "UPROXY-IPVS-FIREWALL")
    # The fake node's address, 192.0.2.10, is in a range: the LB IP may be a source too.
    assert [r.split("-d ")[0].strip() for r in firewall] == [
        "-s 10.0.0.0/8",
        "-s 192.0.2.0/24",
        "-s 198.51.100.7/32",
        "",
    ]
    assert firewall[-1].endswith("-j DROP")
    assert rig.nf.rules("filter", "INPUT") == [
        '-m conntrack --ctstate NEW -m comment --comment "uproxy IPVS load balancer firewall" '
        "-j UPROXY-IPVS-FIREWALL"
    ]
    rig.clock.now += 1
    await rig.proxier.sync(state((ranged(load_balancer_source_ranges=()), eps("10.1.0.2"))))
    assert rig.nf.owned().get("filter") is None
    rig.clock.now += 1
    await rig.proxier.sync(state((ranged(), eps("10.1.0.2"))))
    assert rig.nf.rules("filter", "UPROXY-IPVS-FIREWALL") == firewall
    cleanup_blocking(rig.ipvs, rig.ipvs, OwnedServers(rig.state_file), [rig.nf, rig.nf6])
    assert rig.nf.owned() == {}
    assert rig.nf6.owned() == {}


def test_topology_hints_pick_this_zones_real_servers() -> None:
    hinted = (
        Endpoint("10.1.0.2", 8080, zone_hints=("zone-a",)),
        Endpoint("10.1.0.3", 8080, zone_hints=("zone-b",)),
    )
    zoned = state((svc(), hinted))
    here = compute_desired(
        ProxyState(services=zoned.services, endpoints=zoned.endpoints, node_zone="zone-a"),
        scheduler="rr",
        node_name="n",
        node_ips=[],
    )
    assert here.servers[vs()].dests == {rs("10.1.0.2")}
    nowhere = compute_desired(zoned, scheduler="rr", node_name="n", node_ips=[])
    assert nowhere.servers[vs()].dests == {rs("10.1.0.2"), rs("10.1.0.3")}  # no zone: all
