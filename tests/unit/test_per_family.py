"""One proxier per IP family behind one interface: a dual-stack service port is one row."""

from __future__ import annotations

from uproxy.kernel.fake import FakeConntrack
from uproxy.kernel.fake_nft import FakeNft
from uproxy.model import Endpoint, Protocol, ProxyState, ServicePort, ServicePortName
from uproxy.observe.status import render_table, status_document
from uproxy.proxier.families import PerFamily
from uproxy.proxier.nftables import NftablesProxier
from uproxy.proxier.nftables_rules import NatConfig

WEB = ServicePortName("default", "web", "http")
V4 = Endpoint("10.1.0.1", 8080, node_name="node-a")
V6 = Endpoint("fd00:1::1", 8080, node_name="node-a")


def dual_stack() -> tuple[PerFamily, dict[int, FakeNft]]:
    tables = {4: FakeNft(), 6: FakeNft()}
    proxiers = [
        NftablesProxier(
            nft=tables[family],
            node_name="node-a",
            config=NatConfig(family=family),
            conntrack=FakeConntrack(),
            resync_period=30.0,
        )
        for family in (4, 6)
    ]
    return PerFamily(proxiers), tables


async def test_a_dual_stack_port_shows_both_families_endpoints_in_one_row() -> None:
    proxier, tables = dual_stack()
    service = ServicePort(WEB, Protocol.TCP, 80, cluster_ips=("10.96.0.10", "fd00:96::10"))
    await proxier.sync(ProxyState(services={WEB: service}, endpoints={WEB: (V4, V6)}))

    (view,) = proxier.view()
    assert view.endpoints == (V4, V6)
    assert view.in_use == {V4, V6}
    document = status_document(proxier.view(), "nftables")
    (port,) = document["servicePorts"]
    assert port["clusterIPs"] == ["10.96.0.10", "fd00:96::10"]
    assert [e["address"] for e in port["endpoints"]] == ["10.1.0.1:8080", "[fd00:1::1]:8080"]
    assert "10.96.0.10:80,[fd00:96::10]:80" in render_table(document)
    # and each family's table got only its own family's endpoint
    assert any("10.1.0.1" in rule for rules in tables[4].chains().values() for rule in rules)
    assert not any("fd00" in rule for rules in tables[4].chains().values() for rule in rules)
    assert any("fd00:1::1" in rule for rules in tables[6].chains().values() for rule in rules)


async def test_a_single_family_port_is_its_familys_view_unchanged() -> None:
    proxier, _ = dual_stack()
    service = ServicePort(WEB, Protocol.TCP, 80, cluster_ips=("fd00:96::10",))
    await proxier.sync(ProxyState(services={WEB: service}, endpoints={WEB: (V6,)}))
    (view,) = proxier.view()
    assert view.in_use == {V6}
