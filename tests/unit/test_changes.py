from __future__ import annotations

import pytest
import structlog

from uproxy.changes import ChangeTracker, SourceHandler
from uproxy.model import (
    AddressType,
    EndpointSlice,
    NodeInfo,
    ObjectKey,
    Protocol,
    ServicePort,
    ServicePortName,
    SliceEndpoint,
    SlicePort,
)

WEB = ObjectKey("default", "web")
HTTP = ServicePortName("default", "web", "http")


def web_ports(port: int = 80) -> tuple[ServicePort, ...]:
    return (ServicePort(HTTP, Protocol.TCP, port, cluster_ips=("10.96.0.10",)),)


def web_slice(name: str, *ips: str, service: ObjectKey = WEB) -> EndpointSlice:
    return EndpointSlice(
        key=ObjectKey("default", name),
        service=service,
        address_type=AddressType.IPV4,
        ports=(SlicePort("http", 8080, Protocol.TCP),),
        endpoints=tuple(SliceEndpoint((ip,)) for ip in ips),
    )


class Counter:
    def __init__(self) -> None:
        self.calls = 0

    def __call__(self) -> None:
        self.calls += 1


def tracker() -> ChangeTracker:
    t = ChangeTracker(["files"], on_change=Counter())
    t.source_synced("files")
    return t


def test_nothing_synced_until_every_source_reports() -> None:
    t = ChangeTracker(["files", "api"], on_change=Counter())
    t.source_synced("files")
    assert not t.synced
    t.source_synced("api")
    assert t.synced


def test_repeated_changes_collapse_into_final_state() -> None:
    t = tracker()
    t.service_updated(WEB, web_ports(80))
    t.service_updated(WEB, web_ports(81))
    t.service_updated(WEB, web_ports(82))
    snap = t.snapshot()
    assert snap.state.services[HTTP].port == 82
    assert snap.changed == {WEB}
    assert not t.pending


def test_change_that_returns_to_start_is_dropped() -> None:
    t = tracker()
    t.service_updated(WEB, web_ports(80))
    t.snapshot()
    t.service_updated(WEB, web_ports(81))
    t.service_updated(WEB, web_ports(80))
    assert not t.pending
    t.service_deleted(ObjectKey("default", "never-seen"))
    assert not t.pending


def test_identical_update_is_not_a_change() -> None:
    t = tracker()
    t.service_updated(WEB, web_ports())
    t.slice_updated(web_slice("web-a", "10.1.0.1"))
    t.snapshot()
    t.service_updated(WEB, web_ports())
    t.slice_updated(web_slice("web-a", "10.1.0.1"))
    assert not t.pending


def test_slices_merge_per_service_port() -> None:
    t = tracker()
    t.service_updated(WEB, web_ports())
    t.slice_updated(web_slice("web-a", "10.1.0.1", "10.1.0.2"))
    t.slice_updated(web_slice("web-b", "10.1.0.3"))
    eps = t.snapshot().state.endpoints[HTTP]
    assert [e.ip for e in eps] == ["10.1.0.1", "10.1.0.2", "10.1.0.3"]
    assert {e.port for e in eps} == {8080}


def test_slice_deleted_removes_its_endpoints() -> None:
    t = tracker()
    t.service_updated(WEB, web_ports())
    t.slice_updated(web_slice("web-a", "10.1.0.1"))
    t.slice_updated(web_slice("web-b", "10.1.0.3"))
    t.snapshot()
    t.slice_deleted(ObjectKey("default", "web-a"))
    snap = t.snapshot()
    assert [e.ip for e in snap.state.endpoints[HTTP]] == ["10.1.0.3"]
    assert snap.changed == {WEB}


def test_slice_moving_between_services_updates_both() -> None:
    other = ObjectKey("default", "api")
    api = ServicePortName("default", "api", "http")
    t = tracker()
    t.service_updated(WEB, web_ports())
    t.service_updated(other, (ServicePort(api, Protocol.TCP, 80),))
    t.slice_updated(web_slice("moving", "10.1.0.1"))
    t.snapshot()
    t.slice_updated(web_slice("moving", "10.1.0.1", service=other))
    snap = t.snapshot()
    assert snap.state.endpoints[HTTP] == ()
    assert [e.ip for e in snap.state.endpoints[api]] == ["10.1.0.1"]
    assert snap.changed == {WEB, other}


def test_endpoints_arriving_before_service_are_used() -> None:
    t = tracker()
    t.slice_updated(web_slice("web-a", "10.1.0.1"))
    t.service_updated(WEB, web_ports())
    assert [e.ip for e in t.snapshot().state.endpoints[HTTP]] == ["10.1.0.1"]


def test_deleted_service_leaves_no_state() -> None:
    t = tracker()
    t.service_updated(WEB, web_ports())
    t.slice_updated(web_slice("web-a", "10.1.0.1"))
    t.snapshot()
    t.service_deleted(WEB)
    snap = t.snapshot()
    assert HTTP not in snap.state.services
    assert HTTP not in snap.state.endpoints


def test_oldest_change_time_is_reported_once() -> None:
    now = [10.0]
    t = ChangeTracker(["files"], on_change=Counter(), clock=lambda: now[0])
    t.source_synced("files")
    t.service_updated(WEB, web_ports(80))
    now[0] = 11.0
    t.service_updated(WEB, web_ports(81))
    assert t.snapshot().oldest_change == 10.0
    assert t.snapshot().oldest_change is None


API = ObjectKey("default", "api")
API_HTTP = ServicePortName("default", "api", "http")


def api_ports() -> tuple[ServicePort, ...]:
    return (ServicePort(API_HTTP, Protocol.TCP, 80, cluster_ips=("10.96.0.11",)),)


def test_changed_ports_name_only_what_changed() -> None:
    t = tracker()
    t.service_updated(WEB, web_ports())
    t.service_updated(API, api_ports())
    t.slice_updated(web_slice("web-1", "10.1.0.1"))
    first = t.snapshot()
    assert first.changed_ports == {HTTP, API_HTTP}
    t.slice_updated(web_slice("web-1", "10.1.0.1", "10.1.0.2"))
    snap = t.snapshot()
    assert snap.changed_ports == {HTTP}
    assert [e.ip for e in snap.state.endpoints[HTTP]] == ["10.1.0.1", "10.1.0.2"]
    assert snap.state.services.keys() == {HTTP, API_HTTP}


def test_changed_ports_include_renamed_and_removed_ports() -> None:
    t = tracker()
    t.service_updated(WEB, web_ports())
    t.slice_updated(web_slice("web-1", "10.1.0.1"))
    t.snapshot()
    renamed = ServicePortName("default", "web", "https")
    t.service_updated(WEB, (ServicePort(renamed, Protocol.TCP, 443, cluster_ips=("10.96.0.10",)),))
    snap = t.snapshot()
    assert snap.changed_ports == {HTTP, renamed}
    assert snap.state.services.keys() == {renamed}
    assert HTTP not in snap.state.endpoints
    t.service_deleted(WEB)
    snap = t.snapshot()
    assert snap.changed_ports == {renamed}
    assert snap.state.services == {} and snap.state.endpoints == {}


def test_snapshots_are_not_changed_by_later_updates() -> None:
    t = tracker()
    t.service_updated(WEB, web_ports(80))
    before = t.snapshot()
    t.service_updated(WEB, web_ports(81))
    t.snapshot()
    assert before.state.services[HTTP].port == 80


def zoned_tracker(node_zone: str | None = None) -> ChangeTracker:
    t = ChangeTracker(["files"], on_change=Counter(), node_name="node-a", node_zone=node_zone)
    t.source_synced("files")
    t.service_updated(WEB, web_ports())
    t.snapshot()
    return t


def test_this_nodes_zone_reaches_the_state_and_resyncs_every_port() -> None:
    t = zoned_tracker()
    t.node_updated(NodeInfo("node-b", "zone-x"))  # another node: not ours
    assert not t.pending
    t.node_updated(NodeInfo("node-a", "zone-a"))
    assert t.pending
    snap = t.snapshot()
    assert snap.state.node_zone == "zone-a"
    assert snap.changed_ports == {HTTP}
    t.node_updated(NodeInfo("node-a", "zone-a"))
    assert not t.pending
    t.node_deleted("node-a")
    assert t.snapshot().state.node_zone == ""


def test_a_zone_given_by_flag_is_not_overridden_by_the_node() -> None:
    t = zoned_tracker(node_zone="zone-flag")
    t.node_updated(NodeInfo("node-a", "zone-a"))
    assert not t.pending
    assert t.snapshot().state.node_zone == "zone-flag"


def test_the_local_copy_of_a_duplicate_endpoint_wins() -> None:
    t = zoned_tracker()
    remote = web_slice("web-1", "10.0.0.1")
    local = EndpointSlice(
        key=ObjectKey("default", "web-2"),
        service=WEB,
        address_type=AddressType.IPV4,
        ports=(SlicePort("http", 8080, Protocol.TCP),),
        endpoints=(SliceEndpoint(("10.0.0.1",), ready=False, node_name="node-a"),),
    )
    t.slice_updated(remote)
    t.slice_updated(local)
    (endpoint,) = t.snapshot().state.endpoints[HTTP]
    assert endpoint.node_name == "node-a"


def test_this_nodes_eligibility_is_kept_without_a_resync() -> None:
    t = zoned_tracker()
    t.node_updated(NodeInfo("node-a", "", eligible=False))
    assert t.node_eligible is False
    assert not t.pending  # nothing for the proxier to do
    t.node_deleted("node-a")
    assert t.node_eligible is True


def two_sources() -> tuple[ChangeTracker, SourceHandler, SourceHandler]:
    t = ChangeTracker(["kubernetes", "manifests"], on_change=Counter())
    api, files = t.handler("kubernetes"), t.handler("manifests")
    api.source_synced("kubernetes")
    files.source_synced("manifests")
    return t, api, files


def test_a_source_deleting_its_object_leaves_the_other_sources_copy() -> None:
    t, api, files = two_sources()
    api.service_updated(WEB, web_ports(80))
    api.slice_updated(web_slice("web-a", "10.1.0.1"))
    files.service_updated(WEB, web_ports(81))
    files.slice_updated(web_slice("web-a", "10.2.0.1"))
    snap = t.snapshot()
    assert snap.state.services[HTTP].port == 80  # the API wins
    assert [e.ip for e in snap.state.endpoints[HTTP]] == ["10.1.0.1"]
    files.service_deleted(WEB)
    files.slice_deleted(ObjectKey("default", "web-a"))
    assert not t.pending  # the winner's copies never changed
    snap = t.snapshot()
    assert snap.state.services[HTTP].port == 80
    assert [e.ip for e in snap.state.endpoints[HTTP]] == ["10.1.0.1"]


def test_deleting_the_winners_copy_falls_back_to_the_other() -> None:
    t, api, files = two_sources()
    files.service_updated(WEB, web_ports(81))
    files.slice_updated(web_slice("web-a", "10.2.0.1"))
    api.service_updated(WEB, web_ports(80))
    api.slice_updated(web_slice("web-a", "10.1.0.1"))
    assert t.snapshot().state.services[HTTP].port == 80
    api.service_deleted(WEB)
    api.slice_deleted(ObjectKey("default", "web-a"))
    snap = t.snapshot()
    assert snap.changed == {WEB}
    assert snap.state.services[HTTP].port == 81
    assert [e.ip for e in snap.state.endpoints[HTTP]] == ["10.2.0.1"]
    files.service_deleted(WEB)
    assert HTTP not in t.snapshot().state.services


def test_objects_of_different_names_from_two_sources_both_count() -> None:
    t, api, files = two_sources()
    api.service_updated(WEB, web_ports())
    files.service_updated(API, api_ports())
    files.service_deleted(WEB)  # never the file's: the API's stays
    assert t.snapshot().state.services.keys() == {HTTP, API_HTTP}


def test_a_conflict_is_reported_once_naming_both_sources() -> None:
    t, api, files = two_sources()
    with structlog.testing.capture_logs() as logs:
        files.service_updated(WEB, web_ports(81))
        api.service_updated(WEB, web_ports(80))
        api.service_updated(WEB, web_ports(82))
        files.service_updated(WEB, web_ports(83))
    conflicts = [e for e in logs if e["event"] == "source_conflict"]
    assert conflicts == [
        {
            "event": "source_conflict",
            "log_level": "warning",
            "kind": "Service",
            "object": "default/web",
            "sources": ["kubernetes", "manifests"],
            "winner": "kubernetes",
            "hint": "the first source wins; deleting its copy falls back to the other's",
        }
    ]
    assert t.snapshot().state.services[HTTP].port == 82


def test_a_tracker_of_several_sources_names_the_source_of_every_update() -> None:
    t, _, _ = two_sources()
    with pytest.raises(ValueError, match="handler"):
        t.service_updated(WEB, web_ports())
    with pytest.raises(ValueError, match="unknown source"):
        t.handler("elsewhere")


def test_a_service_uses_only_the_slices_of_the_source_it_came_from() -> None:
    t, api, files = two_sources()
    files.service_updated(WEB, web_ports())
    files.slice_updated(web_slice("web-file", "10.2.0.1"))
    assert [e.ip for e in t.snapshot().state.endpoints[HTTP]] == ["10.2.0.1"]
    api.service_updated(WEB, web_ports())  # the same spec: only the owner changes
    api.slice_updated(web_slice("web-api", "10.1.0.1"))
    snap = t.snapshot()
    assert snap.changed_ports == {HTTP}
    assert [e.ip for e in snap.state.endpoints[HTTP]] == ["10.1.0.1"]
    api.service_deleted(WEB)
    assert [e.ip for e in t.snapshot().state.endpoints[HTTP]] == ["10.2.0.1"]
