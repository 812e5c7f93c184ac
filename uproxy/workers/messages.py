"""What the main process and its workers tell each other."""

from __future__ import annotations

from dataclasses import dataclass

from uproxy.model import ProxyState, ServicePortName
from uproxy.proxier.base import Changed, PortView
from uproxy.settings import Settings

# A listening socket is known by its service port and its traffic: "cluster", or "external"
# for the second listener of externalTrafficPolicy: Local.
SocketKey = tuple[ServicePortName, str]


@dataclass(frozen=True, slots=True)
class Init:
    index: int
    settings: Settings
    report_interval: float


@dataclass(frozen=True, slots=True)
class Apply:
    """Converge to `state`; `keys` names the sockets passed with this message, in order."""

    seq: int
    state: ProxyState
    changed: Changed
    keys: tuple[SocketKey, ...]


@dataclass(frozen=True, slots=True)
class Applied:
    seq: int
    error: str | None
    views: list[PortView]


@dataclass(frozen=True, slots=True)
class Report:
    views: list[PortView]


@dataclass(frozen=True, slots=True)
class Stop:
    """Stop accepting and drain for `grace` seconds; a second Stop may shorten it."""

    grace: float
