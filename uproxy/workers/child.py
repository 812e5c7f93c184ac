"""A forwarding worker: applies the main process's syncs to listeners on the handed sockets.

It has no sources, no portals and no admin server; it reports what its listeners see. It stops
on Stop from the main process, on SIGTERM (systemd signals every process of the unit), and when
the channel ends (the main process is gone); SIGINT is left to the main process, which a
terminal's Ctrl-C reaches as well.
"""

from __future__ import annotations

import asyncio
import signal
import socket

import structlog

from uproxy.dataplane.sockopt import raise_nofile_limit
from uproxy.proxier.base import drain
from uproxy.proxier.portals import NoPortals
from uproxy.proxier.userspace import ListenerStartError, UserspaceProxier
from uproxy.workers.channel import Channel, ChannelClosed
from uproxy.workers.handed import HandedSockets
from uproxy.workers.messages import Applied, Apply, Init, Report, Stop

log = structlog.get_logger(__name__)


class Worker:
    def __init__(self, channel: Channel, init: Init) -> None:
        self._channel = channel
        self._init = init
        settings = init.settings
        self._handed = HandedSockets(
            udp_timeout=settings.udp_timeout,
            udp_max_sessions=settings.udp_max_sessions,
            tcp_options=settings.tcp_options(),
        )
        self.proxier = UserspaceProxier(
            bind_address=settings.bind_address,
            port_range=None,
            node_name=settings.hostname,
            udp_timeout=settings.udp_timeout,
            udp_max_sessions=settings.udp_max_sessions,
            portals=NoPortals(),
            listener_factory=self._handed,
        )
        self._stopping = asyncio.Event()
        self._hurry = asyncio.Event()
        self._grace = settings.shutdown_grace

    def stop(self, grace: float) -> None:
        if self._stopping.is_set():
            if grace < self._grace:
                self._hurry.set()
        else:
            self._grace = grace
            self._stopping.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.stop, self._init.settings.shutdown_grace)
        tasks = [
            loop.create_task(self._receive(), name="worker-receive"),
            loop.create_task(self._report(), name="worker-report"),
        ]
        try:
            await self._stopping.wait()
            await self._drain()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            loop.remove_signal_handler(signal.SIGTERM)
            self._handed.close_unused()

    async def _receive(self) -> None:
        try:
            while True:
                message, sockets = await self._channel.receive()
                if isinstance(message, Apply):
                    await self._apply(message, sockets)
                elif isinstance(message, Stop):
                    self.stop(message.grace)
                else:
                    for sock in sockets:
                        sock.close()
        except ChannelClosed:
            log.warning("worker_orphaned", action="draining")
            self.stop(self._init.settings.shutdown_grace)
        except Exception as exc:  # deaf to the main process: drain, exit, be restarted
            log.error("worker_channel_failed", error=str(exc), exc_info=exc)
            self.stop(self._init.settings.shutdown_grace)

    async def _apply(self, message: Apply, sockets: list[socket.socket]) -> None:
        if self._stopping.is_set():
            for sock in sockets:
                sock.close()
            return
        self._handed.hand(message.keys, sockets)
        error = None
        try:
            await self.proxier.sync(message.state, message.changed)
        except ListenerStartError as exc:
            error = str(exc)
        except Exception as exc:  # reported, not fatal: the main process retries the sync
            log.error("worker_sync_error", error=str(exc), exc_info=exc)
            error = f"{type(exc).__name__}: {exc}"
        finally:
            self._handed.close_unused()
        await self._channel.send(Applied(message.seq, error, self.proxier.view()))

    async def _report(self) -> None:
        while True:
            await asyncio.sleep(self._init.report_interval)
            await self._channel.send(Report(self.proxier.view()))

    async def _drain(self) -> None:
        await drain(self.proxier, self._grace, self._hurry)


async def serve_worker(fd: int) -> None:
    """The whole life of one worker process, on channel `fd`."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    raise_nofile_limit()
    channel = Channel(socket.socket(fileno=fd))
    try:
        init, sockets = await channel.receive()
        for sock in sockets:
            sock.close()
        if not isinstance(init, Init):
            raise ChannelClosed(f"expected Init, got {type(init).__name__}")
        structlog.contextvars.bind_contextvars(worker=init.index)
        log.info("worker_running")
        await Worker(channel, init).run()
        log.info("worker_stopped")
    finally:
        channel.close()
