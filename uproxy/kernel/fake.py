"""A stateful in-memory netfilter (and conntrack table) for unit tests.

Modelled on Kubernetes' pkg/util/iptables/testing/fake.go: tables hold chains hold rule specs, and
every write obeys the kernel's invariants (a jump needs its chain, a referenced chain cannot be
deleted, deleting a rule that is not there fails, a failed batch changes nothing). Tests assert on
the resulting state (`rules`, `chains`, `dump`), never on which calls were made; the helpers named
`hand_*` play an admin editing the tables behind uproxy's back.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

from uproxy.errors import KernelError
from uproxy.kernel.conntrack import UdpFlow, UdpFlowMatch
from uproxy.kernel.netfilter import (
    BUILTIN_CHAINS,
    BackendName,
    Family,
    Jump,
    TableState,
    TableUpdate,
    is_own,
    jump_target,
    plan_jumps,
)

# Targets that are extensions, not chains; any other jump target must be a chain in the table.
EXTENSION_TARGETS = frozenset(
    [
        "ACCEPT",
        "DROP",
        "RETURN",
        "REJECT",
        "REDIRECT",
        "DNAT",
        "SNAT",
        "MASQUERADE",
        "MARK",
        "CONNMARK",
        "LOG",
        "NOTRACK",
        "CT",
        "QUEUE",
        "NFQUEUE",
        "TPROXY",
    ]
)

Chains = dict[str, list[str]]

MAX_CHAIN_NAME = 28  # x_tables' limit (XT_EXTENSION_MAXNAMELEN - 1); nf_tables via iptables-nft too


class FakeNetfilter:
    def __init__(self, backend: BackendName = "nft", family: Family = 4) -> None:
        self.backend: BackendName = backend
        self.family: Family = family
        self.tables: dict[str, Chains] = {}
        self.commits = 0  # successful writes that changed something: lets tests see "no-op"
        self._failures: list[KernelError] = []

    # -- the Netfilter interface -------------------------------------------------------------

    def read(self, table: str) -> TableState:
        return TableState.from_chains(copy.deepcopy(self.tables.get(table, {})))

    def apply(self, updates: Mapping[str, TableUpdate]) -> None:
        for update in updates.values():
            update.check_own()
        self._maybe_fail()
        for table, update in updates.items():  # like the tools: one commit per table, in order
            if update:
                self._apply_one(table, update)

    def _apply_one(self, table: str, update: TableUpdate) -> None:
        work = self._working_copy(table)
        for chain, specs in update.replace.items():
            work[chain] = list(specs)
        for chain, specs in update.delete.items():
            rules = self._chain(work, chain)
            for spec in specs:
                if spec not in rules:
                    raise KernelError(f"-D {chain} {spec}: Bad rule (no such rule in {table})")
                rules.remove(spec)
        for chain, specs in update.append.items():
            self._chain(work, chain).extend(specs)
        for chain in update.delete_chains:
            self._chain(work, chain).clear()
        for chain in update.delete_chains:
            self._delete_chain(work, table, chain)
        self._commit(table, work)

    def ensure_jumps(self, table: str, jumps: Sequence[Jump]) -> None:
        self._maybe_fail()
        work = self._working_copy(table)
        stale, missing = plan_jumps({c: work[c] for c in BUILTIN_CHAINS[table]}, jumps)
        if not stale and not missing:
            return
        for chain, spec in stale:
            work[chain].remove(spec)
        for jump in reversed(missing):
            if jump.first:
                work[jump.chain].insert(0, jump.spec)
        for jump in missing:
            if not jump.first:
                work[jump.chain].append(jump.spec)
        self._commit(table, work)

    def delete_everything(self) -> None:
        self._maybe_fail()
        for table in list(self.tables):
            work = self._working_copy(table)
            state = TableState.from_chains(work)
            if not state.chains and not state.jumps:
                continue
            for chain, spec in state.jumps:
                work[chain].remove(spec)
            for chain in state.chains:
                del work[chain]
            self._commit(table, work)

    # -- for tests ---------------------------------------------------------------------------

    def fail_next(self, error: str = "injected failure", times: int = 1) -> None:
        """Make the next `times` calls that would touch the kernel raise KernelError."""
        self._failures += [KernelError(error)] * times

    def rules(self, table: str, chain: str) -> list[str]:
        return list(self.tables.get(table, {}).get(chain, []))

    def chains(self, table: str) -> list[str]:
        """uproxy's chains in `table`."""
        return [c for c in self.tables.get(table, {}) if is_own(c)]

    def owned(self) -> dict[str, Chains]:
        """Everything uproxy owns: its chains and the rules elsewhere that jump into them."""
        out: dict[str, Chains] = {}
        for table, chains in self.tables.items():
            state = TableState.from_chains(chains)
            mine: Chains = {c: list(r) for c, r in state.chains.items()}
            for chain, spec in state.jumps:
                mine.setdefault(chain, []).append(spec)
            if mine:
                out[table] = mine
        return out

    def dump(self) -> str:
        """iptables-save-like text, for failure messages."""
        lines = []
        for table, chains in self.tables.items():
            lines.append(f"*{table}")
            lines += [f":{chain}" for chain in chains]
            lines += [f"-A {chain} {spec}" for chain, specs in chains.items() for spec in specs]
            lines.append("COMMIT")
        return "\n".join(lines)

    def hand_add_rule(self, table: str, chain: str, spec: str, *, first: bool = False) -> None:
        work = self._working_copy(table)
        rules = work.setdefault(chain, [])  # a foreign user chain springs into existence
        if first:
            rules.insert(0, spec)
        else:
            rules.append(spec)
        self._commit(table, work, count=False)

    def hand_delete_rule(self, table: str, chain: str, spec: str) -> None:
        work = self._working_copy(table)
        self._chain(work, chain).remove(spec)
        self._commit(table, work, count=False)

    def hand_delete_chain(self, table: str, chain: str) -> None:
        """`iptables -F CHAIN; iptables -X CHAIN`: fails while anything jumps to it."""
        work = self._working_copy(table)
        self._chain(work, chain).clear()
        self._delete_chain(work, table, chain)
        self._commit(table, work, count=False)

    # -- invariants ----------------------------------------------------------------------------

    def _maybe_fail(self) -> None:
        if self._failures:
            raise self._failures.pop(0)

    def _working_copy(self, table: str) -> Chains:
        if table not in BUILTIN_CHAINS:
            raise KernelError(f"can't initialize iptables table `{table}': Table does not exist")
        current = self.tables.get(table) or {c: [] for c in BUILTIN_CHAINS[table]}
        return copy.deepcopy(current)

    @staticmethod
    def _chain(work: Chains, chain: str) -> list[str]:
        try:
            return work[chain]
        except KeyError:
            raise KernelError(f"chain {chain} does not exist") from None

    @staticmethod
    def _delete_chain(work: Chains, table: str, chain: str) -> None:
        if chain in BUILTIN_CHAINS[table]:
            raise KernelError(f"cannot delete built-in chain {chain}")
        users = [c for c, specs in work.items() for s in specs if jump_target(s) == chain]
        if users:
            raise KernelError(f"chain {chain} is still referenced from {sorted(set(users))}")
        del work[chain]

    def _commit(self, table: str, work: Chains, *, count: bool = True) -> None:
        for chain, specs in work.items():
            if len(chain) > MAX_CHAIN_NAME:
                raise KernelError(
                    f"chain name {chain!r} is longer than {MAX_CHAIN_NAME} characters"
                )
            for spec in specs:
                target = jump_target(spec)
                if target is not None and target not in EXTENSION_TARGETS and target not in work:
                    raise KernelError(f"{chain}: jump to missing chain {target}")
        if work != self.tables.get(table):
            self.tables[table] = work
            if count:
                self.commits += 1


class FakeConntrack:
    """A UDP conntrack table; calling it deletes the flows the matches select."""

    def __init__(self, flows: Sequence[UdpFlow] = ()) -> None:
        self.flows = list(flows)

    async def __call__(self, matches: Sequence[UdpFlowMatch]) -> int:
        before = len(self.flows)
        self.flows = [f for f in self.flows if not any(m.matches(f) for m in matches)]
        return before - len(self.flows)
