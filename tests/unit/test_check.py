from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from uproxy.check import HEADERS, check_paths, format_table

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def write_docs(path: Path, *objects: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump_all(objects))
    return path


def service(name: str, ports: list[dict[str, Any]], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"ports": ports, **spec},
    }


def endpoint_slice(
    name: str, service_name: str, port: dict[str, Any], endpoints: list[dict[str, Any]], **kw: Any
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": "shop",
            "labels": {"kubernetes.io/service-name": service_name},
        },
        "addressType": kw.get("address_type", "IPv4"),
        "ports": [port],
        "endpoints": endpoints,
    }


def table_and_errors(paths: list[Path]) -> tuple[str, list[str]]:
    result = check_paths(paths)
    assert result.table is not None
    return result.table, result.errors


def rows(table: str) -> list[list[str]]:
    return [line.split() for line in table.splitlines()]


def test_bundled_examples() -> None:
    table, errors = table_and_errors([EXAMPLES])
    assert errors == []
    assert table.splitlines() == [
        "SERVICE PORT      PROTOCOL  PORT  CLUSTER-IPS  EXTERNAL  NODEPORT  AFFINITY       "
        "ENDPOINTS",
        "default/dns:dns   UDP       53    10.96.0.53   -         -         None           "
        "127.0.0.1:15353",
        "default/sticky    TCP       8080  10.96.0.20   -         -         ClientIP/600s  "
        "127.0.0.1:18081,127.0.0.1:18082",
        "default/web:http  TCP       80    10.96.0.10   -         -         None           "
        "127.0.0.1:18081,127.0.0.1:18082",
    ]


def test_columns_are_aligned(tmp_path: Path) -> None:
    write_docs(
        tmp_path / "a.yaml",
        service("a-rather-long-service-name", [{"port": 1}], clusterIP="10.0.0.1"),
        service("b", [{"port": 65535, "protocol": "UDP"}], clusterIP="10.0.0.2"),
    )
    table, _ = table_and_errors([tmp_path])
    lines = table.splitlines()
    starts = [0]
    for header in HEADERS[1:]:
        starts.append(lines[0].index(header, starts[-1] + 1))
    for line in lines[1:]:
        for start in starts[1:]:
            assert line[start - 2 : start] == "  "
            assert line[start] != " "


def test_addresses_node_port_and_affinity(tmp_path: Path) -> None:
    svc = service(
        "front",
        [{"name": "http", "port": 80, "nodePort": 30080}],
        type="LoadBalancer",
        clusterIPs=["10.96.1.1", "fd00::1"],
        externalIPs=["192.0.2.10"],
        sessionAffinity="ClientIP",
    )
    svc["status"] = {"loadBalancer": {"ingress": [{"ip": "198.51.100.1"}]}}
    write_docs(tmp_path / "front.yaml", svc)
    table, errors = table_and_errors([tmp_path])
    assert errors == []
    assert rows(table)[1] == [
        "shop/front:http",
        "TCP",
        "80",
        "10.96.1.1,fd00::1",
        "192.0.2.10,198.51.100.1",
        "30080",
        "ClientIP/10800s",
        "<none>",
    ]


def test_not_ready_endpoints_are_counted(tmp_path: Path) -> None:
    write_docs(
        tmp_path / "x.yaml",
        service("api", [{"port": 80}], clusterIP="10.96.2.2"),
        endpoint_slice(
            "api-1",
            "api",
            {"port": 8080},
            [
                {"addresses": ["10.1.0.2"]},
                {"addresses": ["10.1.0.1"], "conditions": {"ready": True}},
                {"addresses": ["10.1.0.3"], "conditions": {"ready": False}},
            ],
        ),
    )
    table, errors = table_and_errors([tmp_path])
    assert errors == []
    assert table.splitlines()[1].endswith("10.1.0.1:8080,10.1.0.2:8080 (+1 not ready)")


def test_terminating_fallback_is_shown(tmp_path: Path) -> None:
    draining = {"ready": False, "serving": True, "terminating": True}
    write_docs(
        tmp_path / "x.yaml",
        service("api", [{"port": 80}], clusterIP="10.96.2.2"),
        endpoint_slice(
            "api-1",
            "api",
            {"port": 8080},
            [
                {"addresses": ["10.1.0.1"], "conditions": draining},
                {"addresses": ["10.1.0.2"], "conditions": {"ready": False}},
            ],
        ),
    )
    table, errors = table_and_errors([tmp_path])
    assert errors == []
    assert table.splitlines()[1].endswith("10.1.0.1:8080 (+1 not ready)")


def test_fqdn_endpoints_shown_unresolved(tmp_path: Path) -> None:
    write_docs(
        tmp_path / "x.yaml",
        service("ext", [{"port": 80}], clusterIP="10.96.3.3"),
        endpoint_slice(
            "ext-1",
            "ext",
            {"port": 8080},
            [{"addresses": ["web-1"]}, {"addresses": ["web-2.example.com"]}],
            address_type="FQDN",
        ),
    )
    table, errors = table_and_errors([tmp_path])
    assert errors == []
    assert table.splitlines()[1].endswith("web-1:8080,web-2.example.com:8080")


def test_errors_are_all_listed_and_good_files_still_shown(tmp_path: Path) -> None:
    write_docs(tmp_path / "good.yaml", service("ok", [{"port": 80}], clusterIP="10.96.0.1"))
    write_docs(
        tmp_path / "bad.yaml",
        service("sctp", [{"port": 80, "protocol": "SCTP"}]),
        service("noport", [{"port": "abc"}]),
    )
    table, errors = table_and_errors([tmp_path, tmp_path / "absent.yaml"])
    assert len(errors) == 3
    assert any("absent.yaml: no such file or directory" in e for e in errors)
    errors = [e for e in errors if "absent.yaml" not in e]
    assert errors[0] == (
        f"{tmp_path / 'bad.yaml'} (document 1): Service shop/sctp: spec.ports[0].protocol: "
        "SCTP is not supported by uproxy (only TCP and UDP)"
    )
    assert errors[1].startswith(f"{tmp_path / 'bad.yaml'} (document 2): Service shop/noport:")
    assert [r[0] for r in rows(table)[1:]] == ["shop/ok"]


def test_empty_directory_is_an_error_without_a_table(tmp_path: Path) -> None:
    result = check_paths([tmp_path])
    assert result.table is None
    assert result.errors == [
        f"{tmp_path}: no manifest files (*.yaml, *.yml, *.json) in this directory"
    ]


def test_other_kinds_are_errors_unless_allowed(tmp_path: Path) -> None:
    write_docs(
        tmp_path / "mixed.yaml",
        service("ok", [{"port": 80}], clusterIP="10.96.0.1"),
        {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": dict(name="d", namespace="x")},
        {"apiVersion": "v1", "kind": "Services", "metadata": {"name": "typo"}},
    )
    other = f"{tmp_path / 'mixed.yaml'} (document 2): Deployment x/d: not a kind uproxy reads"
    typo = (
        f"{tmp_path / 'mixed.yaml'} (document 3): Services typo: unknown kind 'Services' "
        "(did you mean Service?)"
    )
    strict = check_paths([tmp_path])
    assert [e.split(" (v1 Service")[0] for e in strict.errors] == [other, typo]
    assert strict.other_kinds_refused
    relaxed = check_paths([tmp_path], allow_other_kinds=True)
    assert relaxed.errors == [typo]
    assert [w.split(" (v1 Service")[0] for w in relaxed.warnings] == [other]
    assert relaxed.table is not None and "shop/ok" in relaxed.table


def test_format_table() -> None:
    assert format_table([("A", "BB"), ("ccc", "d")]) == "A    BB\nccc  d"
