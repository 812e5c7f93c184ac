"""deploy/uproxy.yaml: valid Kubernetes objects that say what a node proxy needs."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml
from kubernetes_asyncio import client

from uproxy.cli import cli

MANIFEST = Path(__file__).resolve().parents[2] / "deploy" / "uproxy.yaml"
MODELS = {
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("rbac.authorization.k8s.io/v1", "ClusterRole"): "V1ClusterRole",
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): "V1ClusterRoleBinding",
    ("apps/v1", "DaemonSet"): "V1DaemonSet",
}


@pytest.fixture
async def objects() -> AsyncIterator[dict[str, Any]]:
    """Every document as its kubernetes_asyncio model, by kind."""
    documents = [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d is not None]
    async with client.ApiClient() as api:
        models: dict[str, Any] = {}
        for doc in documents:
            model_name = MODELS[(doc["apiVersion"], doc["kind"])]
            model = api.deserialize(SimpleNamespace(data=json.dumps(doc)), model_name)
            # The deserialiser drops fields it does not know: a misspelt one shows up here.
            assert api.sanitize_for_serialization(model) == doc, doc["kind"]
            assert doc["kind"] not in models, f"two {doc['kind']} documents"
            models[doc["kind"]] = model
        yield models


def allows(role: Any, group: str, resource: str, verb: str) -> bool:
    return any(
        group in rule.api_groups and resource in rule.resources and verb in rule.verbs
        for rule in role.rules
    )


def test_every_document_is_a_known_kind(objects: dict[str, Any]) -> None:
    assert set(objects) == {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet"}
    assert objects["ServiceAccount"].metadata.namespace == "kube-system"
    assert objects["DaemonSet"].metadata.namespace == "kube-system"


def test_rbac_lets_the_service_account_list_and_watch(objects: dict[str, Any]) -> None:
    role, binding = objects["ClusterRole"], objects["ClusterRoleBinding"]
    for group, resource in (
        ("", "services"),
        ("discovery.k8s.io", "endpointslices"),
        ("", "nodes"),
    ):
        for verb in ("list", "watch"):
            assert allows(role, group, resource, verb), (group, resource, verb)
    assert not any("*" in rule.verbs or "*" in rule.resources for rule in role.rules)
    assert (binding.role_ref.kind, binding.role_ref.name) == ("ClusterRole", role.metadata.name)
    account = objects["ServiceAccount"].metadata
    assert [(s.kind, s.name, s.namespace) for s in binding.subjects] == [
        ("ServiceAccount", account.name, account.namespace)
    ]
    pod = objects["DaemonSet"].spec.template.spec
    assert pod.service_account_name == account.name


def test_daemonset_runs_on_the_host_network_of_every_node(objects: dict[str, Any]) -> None:
    daemonset = objects["DaemonSet"]
    pod = daemonset.spec.template.spec
    assert (
        daemonset.spec.selector.match_labels.items()
        <= daemonset.spec.template.metadata.labels.items()
    )
    assert pod.host_network is True
    assert pod.dns_policy == "ClusterFirstWithHostNet"
    assert pod.priority_class_name == "system-node-critical"
    assert [(t.operator, t.key, t.effect) for t in pod.tolerations] == [("Exists", None, None)]


def test_container_has_capabilities_mounts_and_liveness(objects: dict[str, Any]) -> None:
    pod = objects["DaemonSet"].spec.template.spec
    (container,) = pod.containers
    assert container.image == "uproxy:latest"
    assert {"NET_ADMIN", "NET_RAW"} <= set(container.security_context.capabilities.add)
    assert not container.security_context.privileged

    env = {e.name: e for e in container.env}
    assert env["NODE_NAME"].value_from.field_ref.field_path == "spec.nodeName"
    assert "--hostname-override=$(NODE_NAME)" in container.args

    volumes = {v.name: v for v in pod.volumes}
    mounts = {m.mount_path: m for m in container.volume_mounts}
    lock = volumes[mounts["/run/xtables.lock"].name].host_path
    assert (lock.path, lock.type) == ("/run/xtables.lock", "FileOrCreate")
    assert not mounts["/run/xtables.lock"].read_only
    assert volumes[mounts["/lib/modules"].name].host_path.path == "/lib/modules"
    assert mounts["/lib/modules"].read_only is True

    probe = container.liveness_probe.http_get
    assert (probe.path, probe.port) == ("/healthz", 10256)


def test_container_args_are_uproxy_flags(objects: dict[str, Any]) -> None:
    (container,) = objects["DaemonSet"].spec.template.spec.containers
    command, *args = container.args
    assert command == "run"
    run = cli.commands["run"]
    # Parsing (not running) rejects unknown flags and bad values.
    with run.make_context("run", list(args)) as context:
        assert context.params["hostname_override"] == "$(NODE_NAME)"
        healthz = context.params["healthz_bind_address"]
    assert healthz.endswith(":10256")


def test_the_image_is_a_kustomize_parameter_and_the_lock_is_the_hosts() -> None:
    kustomization = yaml.safe_load((MANIFEST.parent / "kustomization.yaml").read_text())
    assert kustomization["resources"] == ["uproxy.yaml"]
    (daemonset,) = [
        d for d in yaml.safe_load_all(MANIFEST.read_text()) if d and d["kind"] == "DaemonSet"
    ]
    pod = daemonset["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    # kustomize's images transformer matches on the name before the tag.
    assert [i["name"] for i in kustomization["images"]] == [container["image"].split(":")[0]]
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"]: v.get("hostPath", {}).get("path") for v in pod["volumes"]}
    assert mounts["run-uproxy"] == volumes["run-uproxy"] == "/run/uproxy"
