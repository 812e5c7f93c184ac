"""Worker processes as real subprocesses: `python -m uproxy worker --fd N`."""

from __future__ import annotations

import asyncio
import socket
import sys

from uproxy.settings import Settings
from uproxy.workers.supervisor import Spawn, WorkerProcess


class Subprocess:
    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self._process = process

    @property
    def pid(self) -> int:
        return self._process.pid

    async def wait(self) -> int:
        return await self._process.wait()

    def kill(self) -> None:
        self._process.kill()


def subprocess_spawner(settings: Settings) -> Spawn:
    async def spawn(index: int, channel: socket.socket) -> WorkerProcess:
        fd = channel.fileno()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "uproxy",
            "worker",
            "--fd",
            str(fd),
            "--event-loop",
            settings.event_loop,
            "--log-level",
            settings.log_level,
            "--log-format",
            settings.log_format,
            pass_fds=(fd,),
        )
        return Subprocess(process)

    return spawn
