"""IP address helpers every rule renderer shares."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable


def of_family(addresses: Iterable[str], family: int) -> list[str]:
    """The valid addresses of `family` (4 or 6), normalised, in order, each once: one family's
    rules never take the other family's addresses (kube-proxy runs a proxier per family)."""
    out: list[str] = []
    for text in addresses:
        try:
            ip = ipaddress.ip_address(text)
        except ValueError:
            continue
        if ip.version == family and str(ip) not in out:
            out.append(str(ip))
    return out
