"""iptables mode: what to write so the kernel holds the desired chains (pure).

Two kinds of chain. A service port's own chains (SVC, SVL, EXT, SEP) and the node-wide chains are
ordered lists: when one differs it is rewritten whole (`:CHAIN` flushes it in the same restore).
The shared chains (UPROXY-SERVICES, UPROXY-NODEPORTS and the filter chains) hold one rule per
service address, whose order does not matter, so they are converged rule by rule: a change to one
service costs a few `-D`/`-A` lines however many services there are. Only the NodePort jumps at
the end of nat UPROXY-SERVICES have a place; whenever rules are appended there they are deleted
and appended again after them, in the same atomic restore.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from uproxy.kernel.netfilter import TableUpdate
from uproxy.proxier.iptables_rules import SET_CHAINS, TABLES, PortRules

Tails = Mapping[tuple[str, str], Sequence[str]]

# Beyond this many stale rules in a shared chain, rewriting it is cheaper than searching for each.
_REWRITE_ABOVE = 64


@dataclass(frozen=True, slots=True)
class Change:
    """One service port's rules before and after (None: it did not exist)."""

    before: PortRules | None
    after: PortRules | None


def _set_chain_update(
    have: Sequence[str], want: Sequence[str], tail: Sequence[str]
) -> tuple[list[str], list[str]] | None:
    """(-D specs, -A specs) turning `have` into `want` (a set of rules ending with `tail`), or
    None when rewriting the chain is the better way."""
    missing = Counter(want) - Counter(have)
    extra = Counter(have) - Counter(want)
    tail_in_place = list(have[len(have) - len(tail) :]) == list(tail) if tail else True
    if not missing and not extra and tail_in_place:
        return [], []
    if extra.total() > max(_REWRITE_ABOVE, len(want) // 2):
        return None
    delete = list(extra.elements())
    tail_set = set(tail)
    append = []
    for spec in want:  # in desired order, each missing copy once; the tail comes last anyway
        if spec not in tail_set and missing[spec] > 0:
            missing[spec] -= 1
            append.append(spec)
    if append or not tail_in_place:
        left = Counter(have) - extra
        for spec in tail:
            delete += [spec] * left[spec]
        append += list(tail)
    return delete, append


def converge_table(
    table: str,
    current: Mapping[str, Sequence[str]],
    desired: Mapping[str, Sequence[str]],
    tails: Tails,
) -> tuple[TableUpdate, list[str]]:
    """(the update making uproxy's chains in `table` exactly `desired`, chains of uproxy's that
    should not exist: deleted last, once nothing of ours jumps to them)."""
    replace: dict[str, list[str]] = {}
    delete: dict[str, list[str]] = {}
    append: dict[str, list[str]] = {}
    for chain, want in desired.items():
        have = current.get(chain)
        if have is not None and list(have) == list(want):
            continue
        if have is None or (table, chain) not in SET_CHAINS:
            replace[chain] = list(want)
            continue
        plan = _set_chain_update(have, want, tails.get((table, chain), ()))
        if plan is None:
            replace[chain] = list(want)
            continue
        delete[chain], append[chain] = plan
    stale = [chain for chain in current if chain not in desired]
    return TableUpdate(replace=replace, delete=delete, append=append), stale


def partial_updates(changes: Iterable[Change], tails: Tails) -> dict[str, TableUpdate]:
    """Per-table updates for the changed service ports only, against what was written for them
    before (so the kernel must hold exactly that: the caller only trusts it after a success)."""
    replace: dict[str, dict[str, list[str]]] = defaultdict(dict)
    drop: dict[str, list[str]] = defaultdict(list)
    gone: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    added: dict[tuple[str, str], Counter[str]] = defaultdict(Counter)
    order: dict[tuple[str, str], list[str]] = defaultdict(list)
    for change in changes:
        before = change.before or PortRules()
        after = change.after or PortRules()
        if before == after:
            continue
        for chain, specs in after.chains.items():
            if before.chains.get(chain) != specs:
                replace["nat"][chain] = list(specs)
        drop["nat"] += [chain for chain in before.chains if chain not in after.chains]
        old, new = Counter(before.dispatch), Counter(after.dispatch)
        for table, chain, spec in (old - new).elements():
            gone[(table, chain)][spec] += 1
        for table, chain, spec in after.dispatch:
            key = (table, chain, spec)
            if new[key] > old[key]:
                new[key] -= 1
                added[(table, chain)][spec] += 1
                order[(table, chain)].append(spec)
    delete: dict[str, dict[str, list[str]]] = defaultdict(dict)
    append: dict[str, dict[str, list[str]]] = defaultdict(dict)
    for (table, chain), removed in gone.items():
        # A spec both removed by one port and added by another needs no change.
        net = removed - added[(table, chain)]
        if net:
            delete[table][chain] = list(net.elements())
    for (table, chain), in_order in order.items():
        net = added[(table, chain)] - gone[(table, chain)]
        if not net:
            continue
        wanted = []
        for spec in in_order:
            if net[spec] > 0:
                net[spec] -= 1
                wanted.append(spec)
        tail = list(tails.get((table, chain), ()))
        if tail:
            delete[table].setdefault(chain, []).extend(tail)
        append[table][chain] = wanted + tail
    out = {}
    for table in TABLES:
        update = TableUpdate(
            replace=replace[table],
            delete=delete[table],
            append=append[table],
            delete_chains=drop[table],
        )
        if update:
            out[table] = update
    return out


def rules_written(update: TableUpdate) -> int:
    return sum(len(v) for v in update.replace.values()) + sum(
        len(v) for v in update.append.values()
    )
