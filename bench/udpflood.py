"""A small UDP sender and receiver for the packets-per-second load (not uproxy's code).

    python -m bench.udpflood send HOST PORT --seconds S [--size 64]
    python -m bench.udpflood recv HOST PORT

The sender blasts fixed-size datagrams from one connected socket (one flow) as fast as it can
for S seconds and prints {"sent", "errors", "seconds"}. The receiver counts datagrams until
SIGTERM and prints {"received", "first", "last"} (monotonic clock); it says "ready" on stdout
once bound. Both are plain blocking loops: one syscall per datagram, no timeouts (a socket
timeout would add a poll() per datagram), so the generator costs as little as Python allows.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
import time
from collections.abc import Sequence
from types import FrameType

_BATCH = 256  # datagrams between clock reads
_RCVBUF = 8 << 20
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)  # Python does not export it everywhere


class _Stop(Exception):
    pass


def _raise_stop(signum: int, frame: FrameType | None) -> None:
    raise _Stop


def send(host: str, port: int, seconds: float, size: int) -> dict[str, float]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.connect((host, port))
    payload = bytes(size)
    sent = errors = 0
    start = time.monotonic()
    deadline = start + seconds
    send_ = sock.send
    while True:
        for _ in range(_BATCH):
            try:
                send_(payload)
            except OSError:  # ECONNREFUSED from an ICMP error, ENOBUFS: count and go on
                errors += 1
        sent += _BATCH
        if time.monotonic() >= deadline:
            break
    elapsed = time.monotonic() - start
    sock.close()
    return {"sent": sent - errors, "errors": errors, "seconds": elapsed}


def recv(host: str, port: int) -> dict[str, float]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        # FORCE (root) bypasses net.core.rmem_max: the receiver must not be what drops.
        sock.setsockopt(socket.SOL_SOCKET, _SO_RCVBUFFORCE, _RCVBUF)
    except OSError:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _RCVBUF)
    sock.bind((host, port))
    buf = bytearray(65536)
    received = 0
    first = last = 0.0
    signal.signal(signal.SIGTERM, _raise_stop)
    signal.signal(signal.SIGINT, _raise_stop)
    print("ready", flush=True)
    recv_into = sock.recv_into
    try:
        recv_into(buf)
        first = last = time.monotonic()
        received = 1
        while True:
            recv_into(buf)
            received += 1
            if received & 1023 == 0:
                last = time.monotonic()
    except _Stop:
        pass
    return {"received": received, "first": first, "last": last}


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.udpflood")
    parser.add_argument("mode", choices=["send", "recv"])
    parser.add_argument("host")
    parser.add_argument("port", type=int)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args(argv)
    if args.mode == "send":
        result = send(args.host, args.port, min(args.seconds, 120.0), args.size)
    else:
        result = recv(args.host, args.port)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
