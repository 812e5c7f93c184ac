"""Run the Dockerfile and docker-compose.yml with podman (as root), the way CI proves them.

    python -m tests.container.podman demo      # base image, build, compose demo, teardown
    python -m tests.container.podman build     # base image and build only
    python -m tests.container.podman base [--refresh]

What this machine is like, and what the driver does about it:

- No container registry is reachable, so the base image the Dockerfile's FROM names is made
  here: debootstrap a minimal bookworm, slimmed the way the official debian:bookworm-slim is,
  and `podman import` it under that very name. The tarball is cached under
  $UPROXY_TEST_CACHE (default /var/cache/uproxy-test); a cold start costs about a minute.
- podman reads a containers.conf of ours (through $CONTAINERS_CONF; system files are left
  alone): runc, cgroupfs (no systemd here), and default ulimits it can actually apply.
- Builds use the host's network namespace (`--network host`): a bridged build would make podman
  add NAT rules and turn on ip_forward in the root namespace. pip inside the build trusts the
  host's CA bundle, mounted where Debian's update-ca-certificates picks it up, because PyPI is
  reached through a TLS-inspecting proxy.
- The compose demo runs with podman inside a network namespace made for it (a "sandbox"): the
  bridges, netavark's firewall rules, aardvark-dns and ip_forward=1 all land there, and the root
  namespace's firewall, routes and sysctls are never touched. uproxy's own rules land in its
  container's namespace, one level further in. Every podman command that touches networks runs
  in the sandbox (netavark tears down where it set up).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tests.integration import netns

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("UPROXY_TEST_CACHE", "/var/cache/uproxy-test"))
BASE_IMAGE = "docker.io/library/debian:bookworm-slim"  # the Dockerfile's FROM, exactly
BASE_TARBALL = CACHE / "debian-bookworm-slim.tar"
IMAGE = "localhost/uproxy:latest"  # docker-compose.yml's `uproxy:latest`, as podman names it
MIRROR = os.environ.get("UPROXY_TEST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# Debian packages the driver needs; tests/run.sh installs them.
APT_PACKAGES = ("podman", "runc", "netavark", "aardvark-dns", "debootstrap")
COMPOSE_LABEL = "io.podman.compose.project"


class Unavailable(Exception):
    """podman, debootstrap or podman-compose is missing and cannot be installed here."""


def _log(message: str) -> None:
    print(f"[container] {message}", file=sys.stderr, flush=True)


def run(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 120,
    check: bool = True,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, **(env or {})},
        cwd=cwd or REPO,
    )
    if check and proc.returncode != 0:
        raise RuntimeError(
            f"{' '.join(argv)} failed (exit {proc.returncode}):\n"
            f"{proc.stdout[-4000:]}{proc.stderr[-4000:]}"
        )
    return proc


# -- tools --------------------------------------------------------------------------------------


def podman_compose_argv() -> list[str] | None:
    """podman-compose from this virtualenv (the test extra installs it), else from PATH."""
    script = Path(sys.executable).parent / "podman-compose"
    if script.exists():
        return [str(script)]
    found = shutil.which("podman-compose")
    return [found] if found else None


def _missing() -> list[str]:
    missing = netns.missing_tools("podman", "runc", "debootstrap", "nsenter")
    # Not on PATH: podman runs them from its helper directory.
    for helper in ("netavark", "aardvark-dns"):
        if not any(Path(d, helper).exists() for d in ("/usr/lib/podman", "/usr/libexec/podman")):
            missing.append(helper)
    return missing


def ensure_tools(install: bool = True) -> None:
    """Install the Debian packages when missing (root with apt only); Unavailable otherwise."""
    if os.geteuid() != 0:
        raise Unavailable("needs root (rootful podman, debootstrap, network namespaces)")
    missing = _missing()
    if missing and install and shutil.which("apt-get"):
        _log(f"installing {' '.join(APT_PACKAGES)}")
        env = {"DEBIAN_FRONTEND": "noninteractive"}
        done = run(["apt-get", "update", "-qq"], env=env, timeout=600, check=False)
        if done.returncode == 0:
            run(
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES],
                env=env,
                timeout=900,
                check=False,
            )
        missing = _missing()
    if missing:
        raise Unavailable(
            f"{', '.join(missing)} missing and not installable here "
            f"(apt-get install {' '.join(APT_PACKAGES)})"
        )
    if podman_compose_argv() is None:
        raise Unavailable("podman-compose missing (pip install -e '.[test]')")


# -- podman's configuration ---------------------------------------------------------------------


def _ulimit(kind: int, cap: int) -> int:
    _, hard = resource.getrlimit(kind)
    return cap if hard == resource.RLIM_INFINITY else min(hard, cap)


def containers_conf() -> Path:
    """Ours, in the cache directory, pointed at by $CONTAINERS_CONF."""
    # podman lowers its own RLIMIT_NPROC hard limit to kernel.pid_max before it starts a
    # container, and without CAP_SYS_RESOURCE nothing can raise it again: the container's
    # limits must fit under both that and our hard limits, or runc fails with EPERM.
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    nproc = _ulimit(resource.RLIMIT_NPROC, pid_max)
    nofile = _ulimit(resource.RLIMIT_NOFILE, 1 << 20)
    text = f"""# Written by tests/container/podman.py; used through CONTAINERS_CONF.
[containers]
default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]
log_driver = "k8s-file"

[engine]
runtime = "runc"
# No systemd on these machines: cgroups by hand, events to a file.
cgroup_manager = "cgroupfs"
events_logger = "file"
"""
    CACHE.mkdir(parents=True, exist_ok=True)
    path = CACHE / "containers.conf"
    if not path.exists() or path.read_text() != text:
        tmp = path.with_suffix(".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return path


def podman_env() -> dict[str, str]:
    return {"CONTAINERS_CONF": str(containers_conf())}


def podman(
    *args: str, env: Mapping[str, str], timeout: float = 120, check: bool = True
) -> subprocess.CompletedProcess[str]:
    return run(["podman", *args], env=env, timeout=timeout, check=check)


# -- the base image -----------------------------------------------------------------------------

# What debuerreotype does to make the official -slim images: no docs, man pages or locales,
# and apt deletes its downloads after installing.
_DPKG_EXCLUDES = """path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/lintian/overrides/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/man/*
"""
_RM_DOWNLOADS = (
    "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb"
    " /var/cache/apt/*.bin || true"
)
_APT_CLEAN = f"""DPkg::Post-Invoke {{ "{_RM_DOWNLOADS}"; }};
APT::Update::Post-Invoke {{ "{_RM_DOWNLOADS}"; }};
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
"""
_SOURCES = """Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def _slim(root: Path) -> None:
    (root / "etc/dpkg/dpkg.cfg.d/docker").write_text(_DPKG_EXCLUDES)
    (root / "etc/apt/apt.conf.d/docker-clean").write_text(_APT_CLEAN)
    (root / "etc/apt/apt.conf.d/docker-no-languages").write_text('Acquire::Languages "none";\n')
    (root / "etc/apt/sources.list").unlink(missing_ok=True)
    (root / "etc/apt/sources.list.d/debian.sources").write_text(_SOURCES)
    for pattern in (
        "usr/share/doc/*",
        "usr/share/man/*",
        "usr/share/info/*",
        "usr/share/locale/*",
        "var/cache/apt/archives/*.deb",
        "var/cache/apt/*.bin",
        "var/lib/apt/lists/*",
        "var/log/*.log",
        "var/log/apt/*",
    ):
        for path in root.glob(pattern):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()
    # The host's, copied in by debootstrap; podman provides both at run time.
    for name in ("etc/resolv.conf", "etc/hostname"):
        (root / name).unlink(missing_ok=True)


def make_base_tarball() -> None:
    """debootstrap a minimal bookworm into the cache (about a minute and 80 MB)."""
    CACHE.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE, prefix="rootfs-") as tmp:
        root = Path(tmp) / "root"
        started = time.monotonic()
        _log(f"debootstrap bookworm from {MIRROR} (cached afterwards in {CACHE})")
        run(
            ["debootstrap", "--variant=minbase", "bookworm", str(root), MIRROR],
            timeout=1800,
        )
        _slim(root)
        partial = BASE_TARBALL.with_suffix(".partial")
        run(["tar", "--numeric-owner", "-C", str(root), "-cf", str(partial), "."], timeout=600)
        partial.replace(BASE_TARBALL)
        _log(f"base tarball made in {time.monotonic() - started:.0f}s")


@contextlib.contextmanager
def _cache_lock() -> Iterator[None]:
    CACHE.mkdir(parents=True, exist_ok=True)
    with open(CACHE / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two runs must not debootstrap into one file
        yield


def ensure_base_image(env: Mapping[str, str], refresh: bool = False) -> None:
    with _cache_lock():
        if refresh:
            BASE_TARBALL.unlink(missing_ok=True)
            podman("rmi", "--force", BASE_IMAGE, env=env, check=False)
        if podman("image", "exists", BASE_IMAGE, env=env, check=False).returncode == 0:
            return
        if not BASE_TARBALL.exists():
            make_base_tarball()
        _log(f"importing {BASE_TARBALL} as {BASE_IMAGE}")
        # The configuration the official image has.
        changes = ["ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"]
        changes.append('CMD ["bash"]')
        flags = [arg for change in changes for arg in ("--change", change)]
        podman("import", *flags, str(BASE_TARBALL), BASE_IMAGE, env=env)


def build_image(env: Mapping[str, str]) -> float:
    """`podman build` of the repository's Dockerfile, tagged as the compose file expects."""
    argv = ["build", "--network", "host", "--pull=never", "--format", "docker", "-t", IMAGE]
    bundle = Path("/etc/ssl/certs/ca-certificates.crt")
    if bundle.exists():
        argv += ["--volume", f"{bundle}:/usr/local/share/ca-certificates/host-bundle.crt:ro"]
    started = time.monotonic()
    podman(*argv, str(REPO), env=env, timeout=1800)
    return time.monotonic() - started


# -- the compose demo ---------------------------------------------------------------------------


@dataclass
class ComposeRun:
    """One `podman-compose up` of the repository's docker-compose.yml, in a sandbox namespace."""

    env: dict[str, str]
    sandbox: netns.Namespace
    project: str = field(default_factory=lambda: f"upxt{os.getpid()}")
    timings: dict[str, float] = field(default_factory=dict)

    def in_sandbox(self, argv: Sequence[str]) -> list[str]:
        return ["nsenter", f"--net=/run/netns/{self.sandbox.name}", *argv]

    def podman(
        self, *args: str, timeout: float = 120, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return run(self.in_sandbox(["podman", *args]), env=self.env, timeout=timeout, check=check)

    def compose(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        compose = podman_compose_argv()
        assert compose is not None
        argv = [*compose, "-p", self.project, "-f", str(REPO / "docker-compose.yml"), *args]
        return run(self.in_sandbox(argv), env=self.env, timeout=timeout)

    def container(self, service: str) -> str:
        """The name of the service's container."""
        out = self.podman(
            "ps",
            "-a",
            "--filter",
            f"label={COMPOSE_LABEL}={self.project}",
            "--filter",
            f"label=com.docker.compose.service={service}",
            "--format",
            "{{.Names}}",
        ).stdout.split()
        if len(out) != 1:
            raise RuntimeError(f"expected one container for {service}, found {out}")
        return out[0]

    def inspect(self, service: str) -> dict[str, object]:
        document = json.loads(self.podman("inspect", self.container(service)).stdout)
        result: dict[str, object] = document[0]
        return result

    def logs(self, service: str) -> str:
        done = self.podman("logs", self.container(service), check=False)
        return done.stdout + done.stderr

    def up(self) -> None:
        started = time.monotonic()
        self.compose("up", "-d")
        self.timings["up"] = time.monotonic() - started

    def wait_client(self, timeout: float = 180) -> int:
        """The client's exit code, once it has shown its view."""
        started = time.monotonic()
        done = self.podman("wait", self.container("client"), timeout=timeout)
        self.timings["client"] = time.monotonic() - started
        return int(done.stdout.strip().splitlines()[-1])

    def stop(self, *services: str, timeout: int = 10) -> float:
        started = time.monotonic()
        names = [self.container(s) for s in services]
        self.podman("stop", "-t", str(timeout), *names, timeout=timeout + 60)
        return time.monotonic() - started

    def stop_in_order(self) -> float:
        """Stop the client and uproxy before the backends, as `docker compose down` does
        (dependents first); podman-compose 1.6 stops every container at once. Stopped after its
        backends are gone, uproxy logs `stopped` at once but its process lives on until a
        lookup of the vanished names gives up (aardvark-dns forwards them upstream, which the
        sandbox cannot reach): exit waits for in-flight getaddrinfo calls. That is uproxy's to
        fix; here it would only turn into a SIGKILL after podman's stop timeout."""
        return self.stop("client", "uproxy")

    def down(self) -> None:
        started = time.monotonic()
        self.compose("down")
        self.timings["down"] = time.monotonic() - started

    def leftovers(self) -> dict[str, list[str]]:
        """What of this project podman still has: containers, pods, networks."""
        label = f"label={COMPOSE_LABEL}={self.project}"
        containers = self.podman("ps", "-a", "--filter", label, "--format", "{{.Names}}")
        # podman-compose names its pod pod_<project> and gives it no labels.
        pods = self.podman(
            "pod", "ps", "--filter", f"name=^pod_{self.project}$", "--format", "{{.Name}}"
        )
        networks = self.podman("network", "ls", "--format", "{{.Name}}")
        return {
            "containers": containers.stdout.split(),
            "pods": pods.stdout.split(),
            "networks": [n for n in networks.stdout.split() if n.startswith(f"{self.project}_")],
        }

    def force_cleanup(self) -> None:
        """Whatever `down` left (or never ran): removed by label and name, never more."""
        left = self.leftovers()
        if left["containers"]:
            self.podman("rm", "--force", "--time", "0", *left["containers"], check=False)
        for pod in left["pods"]:
            self.podman("pod", "rm", "--force", pod, check=False)
        if left["networks"]:
            self.podman("network", "rm", "--force", *left["networks"], check=False)
        # aardvark-dns (and any conmon) started by podman in the sandbox: ours, by pid.
        pids = netns.host_run("ip", "netns", "pids", self.sandbox.name, check=False).stdout
        for pid in pids.split():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid), 9)


@contextlib.contextmanager
def compose_run(env: Mapping[str, str]) -> Iterator[ComposeRun]:
    with netns.network() as net:
        sandbox = net.namespace("podman")
        compose = ComposeRun(env=dict(env), sandbox=sandbox)
        try:
            yield compose
        finally:
            with contextlib.suppress(Exception):
                compose.force_cleanup()


def root_uproxy_rules() -> list[str]:
    """Lines mentioning UPROXY in the root namespace's rules (both backends): must be none."""
    lines: list[str] = []
    for tool in ("iptables-legacy-save", "iptables-nft-save"):
        if netns.missing_tools(tool):
            continue
        out = netns.host_run(tool, check=False).stdout
        lines += [line for line in out.splitlines() if "UPROXY" in line]
    return lines


# -- command line ---------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.container.podman")
    parser.add_argument("step", choices=["base", "build", "demo"])
    parser.add_argument("--refresh", action="store_true", help="debootstrap the base again")
    args = parser.parse_args(argv)
    try:
        ensure_tools()
    except Unavailable as exc:
        print(f"unavailable: {exc}", file=sys.stderr)
        return 2
    env = podman_env()
    started = time.monotonic()
    ensure_base_image(env, refresh=args.refresh)
    _log(f"base image ready in {time.monotonic() - started:.0f}s")
    if args.step == "base":
        return 0
    _log(f"image built in {build_image(env):.0f}s")
    if args.step == "build":
        return 0
    with compose_run(env) as demo:
        demo.up()
        code = demo.wait_client()
        print(demo.logs("client"), end="")
        demo.stop_in_order()
        demo.down()
        _log(f"timings: {demo.timings}")
    rules = root_uproxy_rules()
    if rules:
        print(f"UPROXY rules in the root namespace: {rules}", file=sys.stderr)
        return 1
    return code


if __name__ == "__main__":
    sys.exit(main())
