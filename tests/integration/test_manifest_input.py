"""A newcomer's mistakes with manifests, through the real CLI: `uproxy run` refuses a --config
that holds nothing it can use, and `run` and `check` name everything they would ignore.

No root needed: listeners only (`--no-portals`) on loopback.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.manifests import endpoint_slice, service, write
from tests.uproxy_process import REPO, UproxyProcess, loopback_run_args

DEPLOY = REPO / "deploy" / "uproxy.yaml"
READS = "(v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Node (for this node's zone))"


def uproxy(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "uproxy", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
    )


@pytest.fixture
def procs() -> Iterator[list[UproxyProcess]]:
    started: list[UproxyProcess] = []
    yield started
    for p in started:
        p.__exit__()


def mistakes() -> list[dict[str, Any]]:
    """A wrong apiVersion, a misspelt kind, and a slice that names no Service."""
    unlabelled = endpoint_slice("web", [{"port": 80}], ["127.0.0.1"], name="orphan")
    del unlabelled["metadata"]["labels"]
    return [
        {**service("v2web", [{"port": 80}]), "apiVersion": "v2"},
        {**service("typo", [{"port": 80}]), "kind": "Servce"},
        unlabelled,
    ]


def empty_dir(tmp_path: Path) -> Path:
    (tmp_path / "empty").mkdir()
    return tmp_path / "empty"


def empty_file(tmp_path: Path) -> Path:
    (tmp_path / "empty.yaml").write_text("")
    return tmp_path / "empty.yaml"


def only_other_kinds(tmp_path: Path) -> Path:
    return DEPLOY


def only_mistakes(tmp_path: Path) -> Path:
    return write(tmp_path / "mistakes.yaml", *mistakes())


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: p / "nonexistent", "no such file or directory"),
        (empty_dir, "no manifest files (*.yaml, *.yml, *.json) in this directory"),
        (empty_file, "holds no Service or EndpointSlice that uproxy can use"),
        (only_other_kinds, "holds no Service or EndpointSlice that uproxy can use"),
        (only_mistakes, "holds no Service or EndpointSlice that uproxy can use"),
    ],
    ids=["nonexistent", "empty-dir", "empty-file", "deploy-yaml", "only-mistakes"],
)
def test_run_refuses_a_config_with_nothing_usable(
    tmp_path: Path, make: Any, reason: str, procs: list[UproxyProcess]
) -> None:
    path = make(tmp_path)
    proc = UproxyProcess(loopback_run_args(path))
    procs.append(proc)
    assert proc.proc.wait(timeout=30) == 1
    fatal = proc.wait_event("fatal")
    assert fatal["error"] == f"--config {path}: {reason}"
    # Nothing was started: no health endpoint answered "ok" for a proxy with no services.
    assert proc.count("healthz_listening") == 0 and proc.count("starting") == 0


def test_run_names_what_it_ignores_and_serves_the_rest(
    tmp_path: Path, procs: list[UproxyProcess]
) -> None:
    config = tmp_path / "manifests"
    config.mkdir()
    write(config / "a.yaml", service("web", [{"name": "http", "port": 80}]), *mistakes())
    (config / "b.yaml").write_text("")
    proc = UproxyProcess(loopback_run_args(config))
    procs.append(proc)
    proc.port_of("default/web:http")
    a, b = str(config / "a.yaml"), str(config / "b.yaml")
    assert proc.wait_event("manifest_ignored", path=a, document=2) == proc.wait_event(
        "manifest_ignored", object="Service default/v2web"
    )
    assert proc.wait_event("manifest_ignored", document=3)["object"] == "Servce default/typo"
    orphan = proc.wait_event("manifest_ignored", document=4)
    assert orphan["object"] == "EndpointSlice default/orphan"
    assert "kubernetes.io/service-name" in orphan["reason"]
    assert proc.wait_event("manifest_ignored", path=b)["reason"].startswith("empty file")
    # Later mistakes are warnings, never fatal: the last good state stays in force.
    write(config / "c.yaml", {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {}})
    other = proc.wait_event("manifest_ignored", path=str(config / "c.yaml"))
    assert other["object"] == "Deployment <no name>" and READS in other["reason"]
    for name in ("a.yaml", "b.yaml", "c.yaml"):
        (config / name).unlink()
    proc.wait_event("manifest_ignored", path=str(config), reason="no manifest files "
                    "(*.yaml, *.yml, *.json) in this directory")  # fmt: skip
    config.rmdir()
    proc.wait_event("manifest_invalid", path=str(config), error="no such file or directory")
    assert proc.proc.poll() is None
    assert proc.stop() == 0


def check_output(*args: str) -> tuple[int, list[str], list[str]]:
    done = uproxy("check", *args)
    return done.returncode, done.stdout.splitlines(), done.stderr.splitlines()


def test_check_flags_every_mistake_and_prints_no_empty_table(tmp_path: Path) -> None:
    path = write(tmp_path / "mistakes.yaml", *mistakes())
    code, out, err = check_output("--config", str(path))
    assert code == 1
    assert out == []  # no table header above the errors
    assert err == [
        f"error: {path} (document 1): Service default/v2web: apiVersion v2 is not read: "
        "uproxy reads Service v1",
        f"error: {path} (document 2): Servce default/typo: unknown kind 'Servce' "
        "(did you mean Service?)",
        f"error: {path} (document 3): EndpointSlice default/orphan: no "
        "kubernetes.io/service-name label, so it belongs to no Service",
        f"error: {path}: holds no Service or EndpointSlice that uproxy can use",
        "4 error(s)",
    ]


@pytest.mark.parametrize("make", [empty_dir, empty_file], ids=["empty-dir", "empty-file"])
def test_check_fails_on_empty_input(tmp_path: Path, make: Any) -> None:
    path = make(tmp_path)
    code, out, err = check_output("--config", str(path))
    assert code == 1 and out == []
    assert err[-2] == f"error: {path}: " + (
        "no manifest files (*.yaml, *.yml, *.json) in this directory"
        if path.is_dir()
        else "holds no Service or EndpointSlice that uproxy can use"
    )
    if path.is_file():
        assert err[0] == f"error: {path}: empty file: no Kubernetes objects in it"


def test_check_other_kinds_fail_unless_allowed(tmp_path: Path) -> None:
    mixed = write(
        tmp_path / "mixed.yaml",
        service("web", [{"name": "http", "port": 80}], cluster_ip="10.96.0.10"),
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "conf-1"}},
    )
    node = f"{mixed} (document 2): ConfigMap conf-1: not a kind uproxy reads {READS}"
    code, out, err = check_output("--config", str(mixed))
    assert code == 1 and out[0].startswith("SERVICE PORT") and out[1].startswith("default/web")
    assert err == [
        f"error: {node}",
        "1 error(s) (--allow-other-kinds accepts objects of other kinds)",
    ]
    code, out, err = check_output("--config", str(mixed), "--allow-other-kinds")
    assert code == 0 and out[1].startswith("default/web")
    assert err == [f"warning: {node}"]


def test_check_deploy_manifest(tmp_path: Path) -> None:
    code, out, err = check_output("--config", str(DEPLOY))
    assert code == 1 and out == []
    kinds = [line.split(": ")[2].split()[0] for line in err[:-2]]
    assert kinds == ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "DaemonSet"]
    # Allowed, the other kinds are warnings; a file with no Service at all is still an error.
    code, out, err = check_output("--config", str(DEPLOY), "--allow-other-kinds")
    assert code == 1
    assert [line.split(":")[0] for line in err] == ["warning"] * 4 + ["error", "1 error(s)"]
    assert err[-2] == f"error: {DEPLOY}: holds no Service or EndpointSlice that uproxy can use"


def test_check_bundled_examples_pass() -> None:
    code, out, err = check_output("--config", str(REPO / "examples"))
    assert (code, err) == (0, [])
    assert [line.split()[0] for line in out[1:]] == [
        "default/dns:dns",
        "default/sticky",
        "default/web:http",
    ]
