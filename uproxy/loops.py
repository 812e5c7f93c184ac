"""Event loop factories: uvloop by default, the standard loop on request.

A factory handed to asyncio.Runner, never a global policy install, so that tests and embedding
code keep whatever loop they chose.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from uproxy.settings import EventLoopName


def loop_factory(name: EventLoopName) -> Callable[[], asyncio.AbstractEventLoop]:
    if name == "uvloop":
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
        return factory
    return asyncio.new_event_loop
