"""How the TCP data plane treats dead and idle peers: one frozen value, built from Settings."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from uproxy.dataplane.sockopt import set_keepalive


@dataclass(frozen=True, slots=True)
class TcpOptions:
    # kube-proxy's userspace mode had Go's dialer defaults on both legs: probes after 15 s idle,
    # every 15 s; the kernel's 9 probes.
    keepalive: bool = True
    keepalive_idle: float = 15.0
    keepalive_interval: float = 15.0
    keepalive_count: int = 9
    idle_timeout: float | None = None  # close a connection idle both ways this long
    linger_timeout: float = 30.0  # how long a closed connection may take to flush, then reset

    def apply_keepalive(self, sock: Any) -> None:
        """Keepalive on `sock` (a listener passes it on to every socket it accepts)."""
        if self.keepalive:
            set_keepalive(
                sock,
                _whole_seconds(self.keepalive_idle),
                _whole_seconds(self.keepalive_interval),
                self.keepalive_count,
            )


def _whole_seconds(value: float) -> int:
    # The kernel counts keepalive times in whole seconds, at least one.
    return max(1, math.ceil(value))
