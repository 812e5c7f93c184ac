"""The nf_tables backend, through the iptables-nft tools (Debian 12's default), or
the ip6tables-nft tools for IPv6, so an admin's
`iptables -t nat -S` shows uproxy's rules. Reads with `iptables-nft-save`, writes with
`iptables-nft-restore --noflush` batches (one nf_tables transaction per table).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import structlog

from uproxy.kernel.netfilter import (
    BUILTIN_CHAINS,
    BackendName,
    Family,
    Jump,
    RestoreTools,
    TableState,
    TableUpdate,
    jump_lines,
    parse_listing,
    plan_jumps,
    run_tool,
    tool_prefix,
)

log = structlog.get_logger(__name__)


class NftNetfilter:
    backend: BackendName = "nft"

    def __init__(self, family: Family = 4) -> None:
        self.family: Family = family
        prefix = tool_prefix("nft", family)
        self._cmd = prefix
        self._tools = RestoreTools(f"{prefix}-save", f"{prefix}-restore")

    def read(self, table: str) -> TableState:
        # iptables-nft-save never creates a table; a missing one reads as empty built-ins.
        return TableState.from_chains(self._tools.save(table).get(table, {}))

    def apply(self, updates: Mapping[str, TableUpdate]) -> None:
        self._tools.apply(updates)

    def ensure_jumps(self, table: str, jumps: Sequence[Jump]) -> None:
        # `-S CHAIN` fetches one chain only: milliseconds even beside 10,000 rules of ours,
        # where a whole-table save takes ~0.2 s.
        current = {
            chain: parse_listing(run_tool([self._cmd, "-t", table, "-S", chain]))
            for chain in BUILTIN_CHAINS[table]
        }
        stale, missing = plan_jumps(current, jumps)
        if stale or missing:
            self._tools.restore([f"*{table}", *jump_lines(stale, missing), "COMMIT"])

    def delete_everything(self) -> None:
        self._tools.delete_everything()
