"""One uproxy per network namespace: an flock on a file under /run that dies with its owner.

Two instances programming the same kernel rewrite each other's rules on every resync, and
`uproxy cleanup` would rip out a live instance's rules; both refuse while another instance
holds the lock, naming its PID. The lock file is keyed by the network namespace's inode, so
instances in different namespaces (tests, the demo) never conflict. The kernel drops an flock
when its holder dies, even by SIGKILL, so a stale file never blocks a restart.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

import structlog

from uproxy.errors import UproxyError

LOCK_DIR = Path("/run/uproxy")

log = structlog.get_logger(__name__)


class InstanceLocked(UproxyError):
    """Another uproxy holds this network namespace's lock."""

    def __init__(self, path: Path, pid: int | None, action: str) -> None:
        self.path = path
        self.pid = pid
        holder = f"pid {pid}" if pid is not None else "pid unknown"
        super().__init__(
            f"another uproxy ({holder}) is running in this network namespace (lock {path}); "
            f"{action}"
        )


def default_lock_path(netns: Path = Path("/proc/self/ns/net")) -> Path:
    """/run/uproxy/<inode of this process's network namespace>.lock."""
    return LOCK_DIR / f"netns-{os.stat(netns).st_ino}.lock"


def _holder(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


@contextlib.contextmanager
def instance_lock(path: Path, *, refusal: str) -> Iterator[None]:
    """Hold `path`'s lock for the block; InstanceLocked (with `refusal`, what to do about it)
    when another process holds it."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise UproxyError(
                f"cannot open the instance lock {path}: {exc.strerror}; "
                "point --lock-file at a writable place"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise InstanceLocked(path, _holder(path), refusal) from None
        # A holder that released (and unlinked) the file between our open and our flock left
        # us locking a file no one else will open: start again with the one at `path`.
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        log.debug("instance_lock_taken", path=str(path))
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(fd)
