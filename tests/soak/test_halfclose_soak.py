"""Soak: tens of thousands of short half-closed connections through a real `uproxy run`.

Not part of the default run (marker `soak`): `pytest -m soak tests/soak`. Guards the uvloop
use-after-free around pending write_eof() shutdowns and the weakly-held-task bug: uproxy runs with
an aggressive garbage collector (gc.set_threshold(10)), half of the connections are half-closed by
the client first and half by the server first, byte counts are checked at both ends, and the
proxy's open descriptors must return to their baseline afterwards.
"""

from __future__ import annotations

import asyncio
import os
import struct
import time
from pathlib import Path

import pytest

from tests.manifests import backend_slices, service, write
from tests.uproxy_process import UproxyProcess, loopback_run_args

pytestmark = [pytest.mark.soak, pytest.mark.parametrize("event_loop_name", ["uvloop", "asyncio"])]

CONNECTIONS = int(os.environ.get("UPROXY_SOAK_CONNECTIONS", "50000"))
CONCURRENCY = 200
REQUEST = 3000
REPLY = 5000
TRAILER = 700
HEADER = struct.Struct("!BI")  # mode, request size
CLIENT_FIRST, SERVER_FIRST = 1, 2


class Tally:
    def __init__(self) -> None:
        self.ok = 0
        self.bad: list[str] = []
        # Backend connections closed before a byte arrived: dial attempts uproxy gave up on
        # (250 ms) and retried elsewhere, which the backend accepted late on a loaded machine.
        self.abandoned = 0


async def backend(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tally: Tally) -> None:
    try:
        try:
            first = await reader.readexactly(HEADER.size)
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise
            tally.abandoned += 1
            return
        mode, size = HEADER.unpack(first)
        if mode == CLIENT_FIRST:
            body = await reader.read()  # until the client's EOF
            if len(body) != size:
                tally.bad.append(f"backend: client-first request {len(body)} != {size}")
            writer.write(b"s" * REPLY)
            await writer.drain()
        else:
            await reader.readexactly(size)
            writer.write(b"s" * REPLY)
            writer.write_eof()  # the server half-closes first ...
            await writer.drain()
            trailer = await reader.read()  # ... and still reads what the client sends after
            if len(trailer) != TRAILER:
                tally.bad.append(f"backend: trailer {len(trailer)} != {TRAILER}")
        tally.ok += 1
    except Exception as exc:
        tally.bad.append(f"backend: {exc!r}")
    finally:
        writer.close()


async def client(port: int, mode: int, tally: Tally) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(HEADER.pack(mode, REQUEST) + b"c" * REQUEST)
        if mode == CLIENT_FIRST:
            writer.write_eof()
        await writer.drain()
        reply = await reader.read()  # until the server's EOF
        if len(reply) != REPLY:
            tally.bad.append(f"client: reply {len(reply)} != {REPLY} (mode {mode})")
            return
        if mode == SERVER_FIRST:
            writer.write(b"t" * TRAILER)
            writer.write_eof()
            await writer.drain()
        tally.ok += 1
    except Exception as exc:
        tally.bad.append(f"client: {exc!r}")
    finally:
        writer.close()
        await writer.wait_closed()


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def soak(config: Path, event_loop_name: str) -> None:
    server_tally, client_tally = Tally(), Tally()
    server = await asyncio.start_server(
        lambda r, w: backend(r, w, server_tally), "127.0.0.1", 0, backlog=1024
    )
    backend_port = server.sockets[0].getsockname()[1]
    write(
        config / "soak.yaml",
        service("soak", [{"name": "p", "port": 80}]),
        *backend_slices("soak", "p", [("127.0.0.1", backend_port)]),
    )
    gc_wrapper = "import gc, sys; gc.set_threshold(10); from uproxy.cli import main; main()"
    proc = UproxyProcess(
        loopback_run_args(config, "--event-loop", event_loop_name),
        python_args=["-c", gc_wrapper],
    )
    try:
        port = await asyncio.to_thread(proc.port_of, "default/soak:p")
        # One connection first: the loop creates some descriptors lazily on first use (uvloop's
        # resolver wake-up), and those are not per-connection leaks.
        await client(port, CLIENT_FIRST, Tally())
        await asyncio.sleep(0.5)
        server_tally.ok = 0
        baseline = open_fds(proc.proc.pid)
        started = time.monotonic()
        semaphore = asyncio.Semaphore(CONCURRENCY)

        async def one(i: int) -> None:
            async with semaphore:
                await client(port, CLIENT_FIRST if i % 2 else SERVER_FIRST, client_tally)

        async with asyncio.TaskGroup() as group:
            for i in range(CONNECTIONS):
                group.create_task(one(i))
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 10
        while open_fds(proc.proc.pid) > baseline and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        after = open_fds(proc.proc.pid)
        alive = proc.proc.poll() is None
        print(
            f"\nsoak[{event_loop_name}]: {CONNECTIONS} connections in {elapsed:.1f}s "
            f"({CONNECTIONS / elapsed:.0f}/s); client ok {client_tally.ok}, backend ok "
            f"{server_tally.ok} (+{server_tally.abandoned} abandoned dials); "
            f"fds {baseline} -> {after}"
        )
        assert alive, "\n".join(proc.lines[-30:])
        assert client_tally.bad == [] and server_tally.bad == []
        assert client_tally.ok == CONNECTIONS and server_tally.ok == CONNECTIONS
        assert after <= baseline
        assert proc.stop() == 0
        crashes = [line for line in proc.lines if "destroyed but it is pending" in line]
        assert crashes == []
    finally:
        proc.__exit__()
        server.close()
        await server.wait_closed()


def test_half_close_churn(tmp_path: Path, event_loop_name: str) -> None:
    import uvloop

    # The load generator always runs on uvloop; the parameter is the proxy's loop.
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(soak(tmp_path, event_loop_name))
