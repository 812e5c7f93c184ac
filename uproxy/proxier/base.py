"""The one interface every proxy mode implements."""

from __future__ import annotations

from typing import Protocol

from uproxy.model import ProxyState


class Proxier(Protocol):
    async def sync(self, state: ProxyState) -> None:
        """Converge to `state`. Level-triggered and idempotent; raises on a failed sync, which the
        runner retries. Must leave whatever was already working in place when it fails."""

    async def shutdown(self, grace: float) -> None:
        """Stop accepting, give open connections up to `grace` seconds, then close everything."""
