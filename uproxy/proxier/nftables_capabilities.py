"""What the nftables mode needs from `nft` and the kernel, checked before it starts."""

from __future__ import annotations

from typing import Protocol

from uproxy.errors import KernelError

# Every feature the table uses, in a table that `nft -c` validates and never creates.
_PROBE = """\
table ip uproxy-probe {
  set clients { type ipv4_addr; flags dynamic,timeout; timeout 10s; }
  map services { type ipv4_addr . inet_proto . inet_service : verdict; }
  chain endpoint { update @clients { ip saddr }; meta l4proto tcp dnat to 10.0.0.1:80; }
  chain service { ip saddr @clients goto endpoint; numgen random mod 1 vmap { 0 : goto endpoint }; }
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    ip daddr . meta l4proto . th dport vmap @services
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


def check_nftables(nft: Checker) -> None:
    """Refuse to start, naming what is missing, when the nftables mode cannot work."""
    try:
        nft.check(_PROBE)
    except KernelError as exc:
        raise KernelError(
            "nftables mode needs nft and a kernel with nf_tables NAT, numgen, fib, dynamic sets "
            f"with timeouts, conntrack and reject; this host refused: {exc}. "
            "Run with --mode iptables or --mode userspace instead"
        ) from None
