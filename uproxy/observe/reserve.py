"""Spare descriptors held for the admin servers, so /healthz answers when the process is out.

The classic reserve-fd trick: a few descriptors (on /dev/null) are held open from the start.
When an admin server's accept fails with EMFILE, it gives one back and accepts into it; when
that connection closes, the spare is taken again. While the reserve cannot be made whole, or
fewer than LOW_WATER descriptors are free, the process is out of descriptors, and /healthz says
so (degraded, not dead). Free descriptors are counted, not inferred from a failed accept: a data
plane at its limit hovers a descriptor or two below it (each failed dial frees one), so an
admin accept often succeeds while forwarding is starved.
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Callable

import structlog

log = structlog.get_logger(__name__)

DEFAULT_SPARES = 8
LOW_WATER = 16  # fewer free descriptors than this (beyond the spares) is exhaustion
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def open_devnull() -> int:
    return os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)


def free_descriptors() -> int:
    """How many more descriptors this process may open (its soft limit minus those open)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft - len(os.listdir("/proc/self/fd"))  # OSError when none is left to list with


class DescriptorReserve:
    """Holds up to `size` spare descriptors from `open_spare` (from the first `refill`);
    `close_spare` gives one back."""

    def __init__(
        self,
        size: int = DEFAULT_SPARES,
        *,
        open_spare: Callable[[], int] = open_devnull,
        close_spare: Callable[[int], None] = os.close,
        count_free: Callable[[], int] = free_descriptors,
    ) -> None:
        self.size = size
        self._open = open_spare
        self._close = close_spare
        self._count_free = count_free
        self._spares: list[int] = []
        self.used = 0  # spares given up to accept an admin connection, over the process's life
        self._short = False  # whether an exhaustion episode is under way (logged once each)

    @property
    def held(self) -> int:
        return len(self._spares)

    def refill(self) -> bool:
        """Take spares back up to `size`; whether the reserve is whole (False: out of them)."""
        while len(self._spares) < self.size:
            try:
                self._spares.append(self._open())
            except OSError as exc:
                if exc.errno not in OUT_OF_DESCRIPTORS:
                    raise
                return False
        if self._short:
            self._short = False
            log.info("admin_descriptor_reserve_restored", spares=self.size, used=self.used)
        return True

    def exhausted(self) -> bool:
        """Whether the process is out of descriptors now (the reserve aside)."""
        if not self.refill():
            return True
        try:
            return self._count_free() < LOW_WATER
        except OSError:
            return True

    def release_one(self) -> bool:
        """Give one spare back so an accept can have it; False when none is left."""
        if not self._spares:
            return False
        self._close(self._spares.pop())
        self.used += 1
        if not self._short:
            self._short = True
            log.warning("admin_descriptor_reserve_used", spares_left=len(self._spares))
        return True

    def close(self) -> None:
        while self._spares:
            self._close(self._spares.pop())
