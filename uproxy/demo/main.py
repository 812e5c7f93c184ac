"""`uproxy demo`: build the namespaces, start the backends and uproxy, show what the client
sees, and tear everything down: on success, failure, Ctrl-C or SIGTERM.

Services (as examples/compose/): web 10.96.0.10:80 (round robin over web-a/b/c:8080), sticky
10.96.0.20:8080 (the same backends, ClientIP affinity), dns 10.96.0.53:53/UDP (resolver:5353).
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import signal
import sys
from collections.abc import Iterator
from types import FrameType

from uproxy.demo.roles import say
from uproxy.demo.services import DNS_QUESTION, DNS_VIP, STICKY_PORT, STICKY_VIP, WEB_VIP
from uproxy.demo.topology import CLIENT_IP, Demo, DemoError, sweep_stale_namespaces


class Interrupted(Exception):
    """SIGINT, SIGTERM or SIGHUP arrived: stop and tear down."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


@contextlib.contextmanager
def _signals_interrupt() -> Iterator[list[int]]:
    """SIGINT, SIGTERM and SIGHUP raise Interrupted (once: a second one during teardown is
    ignored, so teardown always finishes); the previous handlers come back afterwards."""
    received: list[int] = []

    def handler(signum: int, _: FrameType | None) -> None:
        if received:
            return
        received.append(signum)
        raise Interrupted(signum)

    wanted = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    previous = {sig: signal.signal(sig, handler) for sig in wanted}
    try:
        yield received
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _problems() -> str | None:
    if sys.platform != "linux":
        return "the demo needs Linux network namespaces"
    if os.geteuid() != 0:
        return "the demo needs root (it creates network namespaces): run it with sudo"
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    for tool, package in (("ip", "iproute2"), ("iptables", "iptables")):
        if shutil.which(tool, path=path) is None:
            return f"`{tool}` not found (apt-get install {package})"
    return None


def self_command() -> str:
    """This very uproxy, as a shell command that works wherever it is installed: a bare `uproxy`
    in a hint fails when the venv is not on PATH."""
    argv0 = sys.argv[0]
    if os.path.basename(argv0) == "__main__.py":  # python -m uproxy
        return f"{shlex.quote(sys.executable)} -m uproxy"
    found = argv0 if os.sep in argv0 else shutil.which(argv0)
    return shlex.quote(os.path.abspath(found or argv0))


def run_demo(
    *,
    requests: int = 6,
    iptables_backend: str = "auto",
    keep_running: bool = False,
    verbose: bool = False,
) -> int:
    """`uproxy demo`: build, run, show the client's view, tear down. Exit code: 0 when the
    client saw round robin, affinity and a DNS answer; 1 when not (or on an error); 2 when
    the host cannot run it; 128+N when stopped by signal N."""
    problem = _problems()
    if problem is not None:
        say(f"uproxy demo: {problem}", file=sys.stderr)
        return 2
    demo = Demo(requests=requests, iptables_backend=iptables_backend, verbose=verbose)
    code = 1
    client_done = False
    with _signals_interrupt() as received:
        try:
            stale = sweep_stale_namespaces()
            if stale:
                say(f"removed {len(stale)} namespaces left by an earlier demo")
            say(f"building namespaces {demo.run_id}-{{client,node,web-a,web-b,web-c,resolver}}")
            demo.build()
            demo.start_backends()
            config = demo.write_manifests()
            say(f"starting uproxy in {demo.namespaces['node']} (manifests: {config})")
            demo.start_uproxy(config)
            say(f"\nthe client ({CLIENT_IP}) calls the services' virtual IPs:")
            code = demo.run_client()
            client_done = True
            demo.show_status()
            if keep_running:
                client = demo.namespaces["client"]
                say(
                    f"\nrunning until Ctrl-C; try:\n"
                    f"  ip netns exec {client} curl -s http://{WEB_VIP}/\n"
                    f"  ip netns exec {client} curl -s http://{STICKY_VIP}:{STICKY_PORT}/\n"
                    f"  ip netns exec {client} dig +short @{DNS_VIP} {DNS_QUESTION}\n"
                    f"  ip netns exec {demo.namespaces['node']} {self_command()} status"
                )
                signal.pause()
        except Interrupted as exc:
            say(f"\n{exc}: stopping", file=sys.stderr)
            if not (keep_running and client_done):  # there, Ctrl-C is the way out
                code = 128 + exc.signum
        except DemoError as exc:
            say(f"uproxy demo: {exc}", file=sys.stderr)
            code = 1
        finally:
            # An interrupt from here on is ignored (see _signals_interrupt): teardown finishes.
            received.append(0)
            removed = demo.teardown()
            say(f"torn down: {removed} namespaces removed")
    return code
