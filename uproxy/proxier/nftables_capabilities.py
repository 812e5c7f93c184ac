"""What the nftables mode needs from `nft` and the kernel, checked before it starts."""

from __future__ import annotations

from typing import Protocol

from uproxy.errors import KernelError

# Every feature the table uses, in a table that `nft -c` validates and never creates.
_PROBE = """\
table FAMILY uproxy-probe {
  set clients { type ADDR; flags dynamic,timeout; timeout 10s; }
  map services { type ADDR . inet_proto . inet_service : verdict; }
  chain endpoint { update @clients { KW saddr }; meta l4proto tcp dnat to TARGET; }
  chain service { KW saddr @clients goto endpoint; numgen random mod 2 == 0 goto endpoint; }
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    KW daddr . meta l4proto . th dport vmap @services
    fib daddr type local meta l4proto . th dport vmap { tcp . 30000 : goto service }
  }
  chain postrouting {
    type nat hook postrouting priority srcnat; policy accept;
    meta mark & 0x4000 == 0x4000 masquerade fully-random
  }
  chain reject-chain { meta l4proto tcp reject with tcp reset; reject; }
  chain input {
    type filter hook input priority -110; policy accept;
    ct state new goto reject-chain
  }
}
"""


class Checker(Protocol):
    def check(self, script: str) -> None:
        """Validate `script` against nft and the kernel without applying it."""


def probe(family: int) -> str:
    v4 = family == 4
    return (
        _PROBE.replace("FAMILY", "ip" if v4 else "ip6")
        .replace("ADDR", "ipv4_addr" if v4 else "ipv6_addr")
        .replace("KW", "ip" if v4 else "ip6")
        .replace("TARGET", "10.0.0.1:80" if v4 else "[fd00::1]:80")
    )


def check_nftables(nft: Checker, family: int = 4) -> None:
    """Refuse to start, naming what is missing, when the nftables mode cannot work."""
    try:
        nft.check(probe(family))
    except KernelError as exc:
        raise KernelError(
            "nftables mode needs nft and a kernel with nf_tables NAT, numgen, fib, dynamic sets "
            f"with timeouts, conntrack and reject; this host refused: {exc}. "
            "Run with --mode iptables or --mode userspace instead"
        ) from None
