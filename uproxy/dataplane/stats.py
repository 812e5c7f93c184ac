"""Per-service-port counters kept by the data plane; plain integers, read by observers."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(slots=True)
class PortStats:
    active: int = 0  # open TCP connections, or live UDP sessions
    total: int = 0  # connections accepted, or UDP sessions created
    bytes_in: int = 0  # client -> backend
    bytes_out: int = 0  # backend -> client
    dial_failures: int = 0  # failed attempts to reach an endpoint
    dial_retries: int = 0  # connections that needed more than one attempt
    no_endpoint: int = 0  # connections or datagrams refused for want of an endpoint
    dropped: int = 0  # UDP datagrams dropped (session limit, full buffers)
    udp_refused: int = 0  # of those, datagrams refused a new session at --udp-max-sessions


def sum_stats(stats: Iterable[PortStats]) -> PortStats:
    total = PortStats()
    for one in stats:
        for field in dataclasses.fields(PortStats):
            setattr(total, field.name, getattr(total, field.name) + getattr(one, field.name))
    return total
