"""Servers on the backend side, readiness checks, and the nginx/HAProxy configuration text."""

from __future__ import annotations

import os
import resource
import select
import shutil
import subprocess
import time
from pathlib import Path

from bench import topology
from bench.procs import Daemon

PORT_HTTP = 80
PORT_IPERF = 5201
PORT_UDP = 9000
NGINX_STREAM_MODULE = Path("/usr/lib/nginx/modules/ngx_stream_module.so")
# The descriptor limit daemons get: what this process may have (a container may cap even root,
# which then cannot raise it). 1,000 idle connections need ~2,000 descriptors in a proxy.
NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
if NOFILE == resource.RLIM_INFINITY or NOFILE > 1 << 20:
    NOFILE = 1 << 20


def tool(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    return shutil.which(name, path=path)


def wait_listening(ns: str, port: int, *, udp: bool = False, timeout: float = 10.0) -> None:
    """Until something in `ns` listens on `port` (TCP, or a bound UDP socket)."""
    flags = "-Hlun" if udp else "-Hltn"
    deadline = time.monotonic() + timeout
    while True:
        out = topology.run(topology.netns_exec(ns, ["ss", flags, f"sport = :{port}"]), check=False)
        if out.strip():
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on port {port} in {ns} after {timeout:.0f}s")
        time.sleep(0.05)


def http_probe(ns: str, host: str, *, timeout: float = 10.0) -> None:
    """Until an HTTP request from `ns` to host:80 answers 200: the whole path works."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        argv = ["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-m", "2"]
        out = topology.run(
            topology.netns_exec(ns, [*argv, f"http://{host}:{PORT_HTTP}/"]), check=False
        )
        last = out.strip()
        if last == "200":
            return
        time.sleep(0.1)
    raise TimeoutError(f"http://{host}:{PORT_HTTP}/ did not answer 200 from {ns} (last: {last!r})")


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    """One line of a child's stdout (binary pipe), or TimeoutError; never blocks longer."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    while b"\n" not in data:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"no line from {proc.args!r} within {timeout:.0f}s")
        ready, _, _ = select.select([fd], [], [], remaining)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise EOFError(f"{proc.args!r} exited (code {proc.poll()}) without a line")
            data += chunk
    return data.split(b"\n", 1)[0].decode()


# -- the HTTP backend ------------------------------------------------------------------------


def nginx_common(workdir: Path) -> str:
    """Paths that keep a private nginx away from /var/log/nginx, /run and the system config."""
    return f"""
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
worker_rlimit_nofile {NOFILE};
"""


def nginx_http_backend_conf(workdir: Path) -> str:
    # One worker: the backend shares two cores with the generator and the proxy; a small fixed
    # reply keeps it far cheaper per request than anything in front of it.
    return f"""
worker_processes 1;
{nginx_common(workdir)}
events {{ worker_connections {NOFILE // 2}; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 600s;
    server {{
        listen {topology.BACKEND_IP}:{PORT_HTTP} backlog=65535;
        location / {{ default_type text/plain; return 200 "hello from the backend\\n"; }}
    }}
}}
"""


def start_nginx(ns: str, conf: str, workdir: Path, name: str) -> Daemon:
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "nginx.conf"
    path.write_text(conf)
    nginx = tool("nginx")
    if nginx is None:
        raise FileNotFoundError("nginx not installed")
    argv = [nginx, "-p", str(workdir), "-e", str(workdir / "error.log"), "-c", str(path)]
    argv += ["-g", "daemon off; master_process on;"]
    return Daemon(topology.netns_exec(ns, argv), workdir / f"{name}.out")


def start_http_backend(topo: topology.Topology, workdir: Path) -> Daemon:
    daemon = start_nginx(topo.backend, nginx_http_backend_conf(workdir), workdir, "backend")
    wait_listening(topo.backend, PORT_HTTP)
    daemon.check_alive("backend nginx")
    return daemon


def start_iperf_server(topo: topology.Topology, workdir: Path) -> Daemon:
    """A one-off iperf3 server (`-1`): a fresh one per test, so a broken test cannot wedge the
    next one."""
    argv = ["iperf3", "-s", "-1", "-B", topology.BACKEND_IP, "-p", str(PORT_IPERF)]
    daemon = Daemon(topology.netns_exec(topo.backend, argv), workdir / "iperf3-server.out")
    wait_listening(topo.backend, PORT_IPERF)
    return daemon
