"""Messages between the main process and a worker: pickled objects over a SOCK_SEQPACKET pair,
with sockets passed alongside (SCM_RIGHTS).

A message is split into chunks (a seqpacket record is limited by the socket buffer); the first
byte of each chunk says whether more follow. File descriptors ride on the chunks, at most
`FDS_PER_CHUNK` each, and belong to the message whose chunks carried them. Both ends are uproxy
processes started by the same main process, so pickle is trusted here.
"""

from __future__ import annotations

import asyncio
import pickle
import socket
from collections.abc import Sequence
from typing import Any

CHUNK = 60 * 1024
FDS_PER_CHUNK = 250  # the kernel's SCM_MAX_FD is 253
_MORE, _LAST = b"\x01", b"\x00"


class ChannelClosed(Exception):
    """The other end has gone (its process exited or closed the channel)."""


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(the main process's end, the worker's end)."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    return ours, theirs


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        sock.setblocking(False)
        self._sending = asyncio.Lock()

    def close(self) -> None:
        self._sock.close()

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    async def send(self, message: object, fds: Sequence[int] = ()) -> None:
        """Send one message (and these descriptors, which stay open here)."""
        data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
        chunks = [data[i : i + CHUNK] for i in range(0, len(data), CHUNK)] or [b""]
        fd_chunks = [list(fds[i : i + FDS_PER_CHUNK]) for i in range(0, len(fds), FDS_PER_CHUNK)]
        while len(chunks) < len(fd_chunks):
            chunks.append(b"")
        async with self._sending:
            for n, chunk in enumerate(chunks):
                flag = _LAST if n == len(chunks) - 1 else _MORE
                await self._send_chunk(flag + chunk, fd_chunks[n] if n < len(fd_chunks) else [])

    async def receive(self) -> tuple[Any, list[socket.socket]]:
        """The next message and the sockets that came with it (now owned by the caller)."""
        parts: list[bytes] = []
        fds: list[int] = []
        while True:
            chunk, chunk_fds = await self._receive_chunk()
            fds += chunk_fds
            parts.append(chunk[1:])
            if chunk[:1] == _LAST:
                break
        try:
            message = pickle.loads(b"".join(parts))
        except BaseException:
            for fd in fds:
                socket.close(fd)
            raise
        return message, [socket.socket(fileno=fd) for fd in fds]

    async def _send_chunk(self, chunk: bytes, fds: list[int]) -> None:
        while True:
            if self.closed:
                raise ChannelClosed("channel closed")
            try:
                if fds:
                    socket.send_fds(self._sock, [chunk], fds)
                else:
                    self._sock.send(chunk)
                return
            except BlockingIOError:
                await self._ready(writing=True)
            except (BrokenPipeError, ConnectionResetError) as exc:
                raise ChannelClosed(str(exc)) from None

    async def _receive_chunk(self) -> tuple[bytes, list[int]]:
        while True:
            if self.closed:
                raise ChannelClosed("channel closed")
            try:
                data, fds, flags, _ = socket.recv_fds(self._sock, CHUNK + 1, FDS_PER_CHUNK)
            except BlockingIOError:
                await self._ready(writing=False)
                continue
            except ConnectionResetError as exc:
                raise ChannelClosed(str(exc)) from None
            if flags & socket.MSG_CTRUNC:
                for fd in fds:
                    socket.close(fd)
                raise ChannelClosed("descriptors truncated")
            if not data:
                for fd in fds:
                    socket.close(fd)
                raise ChannelClosed("end of channel")
            return data, fds

    async def _ready(self, *, writing: bool) -> None:
        loop = asyncio.get_running_loop()
        fd = self._sock.fileno()
        ready = loop.create_future()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        if writing:
            loop.add_writer(fd, wake)
        else:
            loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            if writing:
                loop.remove_writer(fd)
            else:
                loop.remove_reader(fd)
