"""The container image and the compose demo, built from the repository and run with podman.

The image is built from the Dockerfile as it is (on a locally made debian:bookworm-slim, since
no registry is reachable here), and `podman-compose up` runs the unmodified docker-compose.yml.
The driver (tests/container/podman.py) explains how podman is kept off the root namespace.
A cold run (debootstrap plus a full build) takes about four minutes; a warm one about half a
minute.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest

from tests.container import podman
from tests.integration import netns

pytestmark = pytest.mark.root

BACKENDS = {"web-a", "web-b", "web-c"}


@pytest.fixture(scope="module")
def env() -> Iterator[dict[str, str]]:
    try:
        podman.ensure_tools()
    except podman.Unavailable as exc:
        pytest.skip(f"container tests: {exc}")
    env = podman.podman_env()
    podman.ensure_base_image(env)
    podman.build_image(env)
    yield env


def image_run(env: dict[str, str], *args: str, entrypoint: str | None = None) -> str:
    """Run the image without a network (nothing here needs one) and return its output."""
    argv = ["run", "--rm", "--network", "none", "--no-healthcheck"]
    if entrypoint is not None:
        argv += ["--entrypoint", entrypoint]
    done = podman.podman(*argv, podman.IMAGE, *args, env=env, check=False)
    return f"exit={done.returncode}\n{done.stdout}{done.stderr}"


def test_image_is_small_labelled_and_runs_uproxy(env: dict[str, str]) -> None:
    info = json.loads(podman.podman("image", "inspect", podman.IMAGE, env=env).stdout)[0]
    config = info["Config"]
    assert config["Entrypoint"] == ["uproxy"]
    assert config["Cmd"] == ["run", "--config", "/etc/uproxy"]
    assert config["Labels"]["org.opencontainers.image.title"] == "uproxy"
    assert config["Labels"]["org.opencontainers.image.licenses"] == "Apache-2.0"
    assert "/healthz" in " ".join(info["Healthcheck"]["Test"])  # podman puts it at the top
    assert info["Size"] < 300_000_000, f"image is {info['Size'] / 1e6:.0f} MB"

    assert image_run(env, "--version").startswith("exit=0\nuproxy, version")
    # The bundled example is in the image, where the default command reads it.
    checked = image_run(env, "check", "--config", "/etc/uproxy")
    assert checked.startswith("exit=0") and "default/web:http" in checked, checked
    # python-iptables finds libxtables and libip4tc; the tools are there; the compiler is not.
    probe = (
        "python3 -c 'import iptc; print(\"iptc ok\")' && "
        "for t in iptables-legacy-save iptables-nft-save ip conntrack gcc cc; do "
        'command -v $t >/dev/null && echo "has $t" || echo "no $t"; done'
    )
    tools = image_run(env, "-c", probe, entrypoint="sh")
    assert "iptc ok" in tools, tools
    for tool in ("iptables-legacy-save", "iptables-nft-save", "ip", "conntrack"):
        assert f"has {tool}" in tools, tools
    assert "no gcc" in tools and "no cc" in tools, tools


def client_view(output: str) -> dict[str, list[str]]:
    """The client's lines (see uproxy/demo/roles.py): service -> the answers, in order."""
    view: dict[str, list[str]] = {}
    for line in output.splitlines():
        match = re.match(
            r"^(web|sticky|dns)\s+\S+/(?:TCP|UDP)\s+(?:round robin|ClientIP)?\s*(.*)$", line
        )
        if match:
            view[match.group(1)] = match.group(2).split()
    return view


def test_compose_demo_shows_round_robin_affinity_and_dns(env: dict[str, str]) -> None:
    assert podman.root_uproxy_rules() == []
    with podman.compose_run(env) as demo:
        sandbox = demo.sandbox.name
        demo.up()
        code = demo.wait_client()
        output = demo.logs("client")
        context = f"client:\n{output}\nuproxy:\n{demo.logs('uproxy')[-3000:]}"
        assert code == 0, context

        view = client_view(output)
        assert set(view["web"]) == BACKENDS, context  # round robin reaches every backend
        assert len(view["sticky"]) == 6 and len(set(view["sticky"])) == 1, context
        assert set(view["sticky"]) <= BACKENDS, context
        assert view["dns"] == ["demo.uproxy.test", "A", "192.0.2.53"], context

        # uproxy runs with capabilities, not privileged, in a network namespace of its own,
        # and its rules are there: not in the root namespace.
        uproxy = demo.inspect("uproxy")
        host_config = uproxy["HostConfig"]
        assert isinstance(host_config, dict)
        assert host_config["NetworkMode"] == "bridge"
        assert host_config["Privileged"] is False
        assert "CAP_NET_ADMIN" in host_config["CapAdd"]
        assert "CAP_NET_RAW" in str(uproxy["EffectiveCaps"])
        name = demo.container("uproxy")
        saved = demo.podman("exec", name, "sh", "-c", "iptables-nft-save; iptables-legacy-save")
        assert "UPROXY" in saved.stdout
        assert podman.root_uproxy_rules() == []
        # The image's HEALTHCHECK passes once uproxy has synced.
        health = demo.podman("healthcheck", "run", name, check=False)
        assert health.returncode == 0, health.stdout + health.stderr

        # SIGTERM: uproxy drains and exits 0 by itself, well before podman would SIGKILL.
        took = demo.stop_in_order()
        state = demo.inspect("uproxy")["State"]
        assert isinstance(state, dict)
        assert state["ExitCode"] == 0 and took < 8, f"exit {state['ExitCode']} after {took:.1f}s"
        # The backends handle SIGTERM too (as PID 1 they would otherwise wait for SIGKILL).
        demo.down()
        assert demo.timings["down"] < 9, demo.timings
        assert demo.leftovers() == {"containers": [], "pods": [], "networks": []}
    assert podman.root_uproxy_rules() == []
    assert sandbox not in netns.host_run("ip", "netns", "list").stdout
