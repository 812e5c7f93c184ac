"""`uproxy cleanup` and --cleanup-on-exit: remove what every mode of uproxy ever installed.

All of uproxy's netfilter state, whichever mode made it (userspace portals, IPVS masquerading,
the kernel modes' NAT chains), lives in `UPROXY-*` chains, so one sweep per iptables backend
removes it all; IPVS state is removed by its own cleaner. Nothing that is not uproxy's is touched.
The kernel backends are injected: only the composition root builds real ones.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import structlog

from uproxy.errors import KernelError
from uproxy.kernel.netfilter import Netfilter, ToolMissing
from uproxy.threads import in_thread

log = structlog.get_logger(__name__)

Cleaner = Callable[[], Awaitable[None]]


async def cleanup_netfilter(backends: Sequence[Netfilter]) -> list[str]:
    """Remove every chain and rule uproxy owns from each backend; the errors, per backend."""
    errors = []
    for netfilter in backends:
        try:
            await in_thread(netfilter.delete_everything)
        except ToolMissing as exc:
            log.info(
                "cleanup_skipped",
                backend=netfilter.backend,
                family=netfilter.family,
                reason=str(exc),
            )
        except KernelError as exc:
            log.error(
                "cleanup_failed", backend=netfilter.backend, family=netfilter.family, error=str(exc)
            )
            errors.append(f"{netfilter.backend} (IPv{netfilter.family}): {exc}")
        else:
            log.info("cleanup_done", backend=netfilter.backend, family=netfilter.family)
    return errors


async def cleanup_everything(backends: Sequence[Netfilter], others: Sequence[Cleaner] = ()) -> None:
    """Run every cleaner, then sweep every backend. Idempotent; fine when nothing exists.
    Raises KernelError naming whatever could not be removed."""
    errors = []
    for cleaner in others:
        try:
            await cleaner()
        except KernelError as exc:
            errors.append(str(exc))
    errors += await cleanup_netfilter(backends)
    if errors:
        raise KernelError("; ".join(errors))
