"""Hold N idle keep-alive connections open through a proxy, for its memory figure.

    python -m bench.idleconns HOST PORT --count 1000 [--hold 60]

Each connection makes one HTTP/1.1 request and reads the whole reply, so both legs through the
proxy are established and have carried data (a proxy that dials its backend lazily has dialled
it), then stays idle. Prints {"open": n, "failed": m, "seconds": t} once all are up, holds them
until SIGTERM or --hold seconds, then closes them.
"""

from __future__ import annotations

import argparse
import json
import resource
import signal
import socket
import sys
import time
from collections.abc import Sequence
from types import FrameType

REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def _read_reply(sock: socket.socket) -> bool:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return False
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    while len(body) < length:
        chunk = sock.recv(4096)
        if not chunk:
            return False
        body += chunk
    return head.startswith(b"HTTP/1.1 200")


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idleconns")
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--hold", type=float, default=60.0)
    args = parser.parse_args(argv)
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    signal.signal(signal.SIGTERM, _raise_stop)
    socks: list[socket.socket] = []
    failed = 0
    start = time.monotonic()
    try:
        for _ in range(args.count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.settimeout(5.0)
            try:
                sock.connect((args.host, args.port))
                sock.sendall(REQUEST)
                ok = _read_reply(sock)
            except OSError:
                ok = False
            if ok:
                socks.append(sock)
            else:
                failed += 1
                sock.close()
        report = {"open": len(socks), "failed": failed, "seconds": time.monotonic() - start}
        print(json.dumps(report), flush=True)
        time.sleep(min(args.hold, 300.0))
    except _Stop:
        pass
    finally:
        for sock in socks:
            sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
