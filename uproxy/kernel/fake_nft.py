"""A stateful in-memory nftables table for unit tests.

Like `fake.FakeNetfilter`, it obeys the kernel's rules rather than recording calls: a rule needs
its chain, a `goto`/`jump`/`vmap` target and an `@set` must exist, a deleted chain must be empty
and unreferenced, a deleted element must be there, and a failed transaction changes nothing.
Tests assert on the resulting table (`chains`, `elements`, `dump`).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

from uproxy.errors import KernelError
from uproxy.kernel.nft import Chain, Element, Listing, Map, Object, Rule, Set, Transaction, Verb

_CHAIN_REF = re.compile(r"\b(?:goto|jump) ([^\s,}]+)")
_SET_REF = re.compile(r"@([^\s,}]+)")


@dataclass
class _Table:
    chains: dict[str, list[str]] = field(default_factory=dict)
    base: dict[str, str | None] = field(default_factory=dict)
    sets: dict[str, Set] = field(default_factory=dict)
    maps: dict[str, Map] = field(default_factory=dict)
    elements: dict[str, dict[str, str | None]] = field(default_factory=dict)  # set/map -> items


class FakeNft:
    def __init__(self) -> None:
        self.table: _Table | None = None
        self.transactions = 0  # applied transactions: lets a test see that a sync wrote nothing
        self._failures: list[KernelError] = []

    # -- the Nft interface -------------------------------------------------------------------

    def apply(self, tx: Transaction) -> None:
        if self._failures:
            raise self._failures.pop(0)
        work = copy.deepcopy(self.table) if self.table is not None else _Table()
        for number, (verb, obj) in enumerate(tx.ops, start=2):  # line 1 is `add table`
            try:
                _apply(work, verb, obj)
            except KernelError as exc:
                raise KernelError(f"nft failed: line {number}: {exc}") from None
        self.table = work
        self.transactions += 1

    def listing(self) -> Listing | None:
        t = self.table
        if t is None:
            return None
        return Listing(frozenset(t.chains), frozenset(t.sets), frozenset(t.maps))

    def delete_table(self) -> None:
        self.table = None

    # -- for tests ---------------------------------------------------------------------------

    def fail_next(self, error: str = "injected failure") -> None:
        self._failures.append(KernelError(error))

    def chains(self) -> dict[str, list[str]]:
        return copy.deepcopy(self.table.chains) if self.table is not None else {}

    def elements(self, name: str) -> dict[str, str | None]:
        if self.table is None:
            return {}
        return dict(self.table.elements.get(name, {}))

    def hand_delete_rule(self, chain: str, text: str) -> None:
        """An admin's `nft delete rule ... handle N`."""
        assert self.table is not None
        self.table.chains[chain].remove(text)

    def hand_add_chain(self, name: str, rules: list[str]) -> None:
        """What a killed run, or an admin, left in the table."""
        if self.table is None:
            self.table = _Table()
        self.table.chains[name] = list(rules)
        self.table.base[name] = None

    def dump(self) -> str:
        if self.table is None:
            return "(no table)"
        out = []
        for name, rules in self.table.chains.items():
            out.append(f"chain {name}")
            out += [f"  {rule}" for rule in rules]
        for name, items in self.table.elements.items():
            out.append(f"{name} = {items}")
        return "\n".join(out)


def _apply(t: _Table, verb: Verb, obj: Object) -> None:
    match verb, obj:
        case "add", Chain(name, base):
            if name not in t.chains:
                t.chains[name] = []
                t.base[name] = base
        case "flush", Chain(name):
            _need(t.chains, name, "chain")
            t.chains[name] = []
        case "delete", Chain(name):
            _need(t.chains, name, "chain")
            if t.chains[name] or _chain_users(t, name):
                raise KernelError(f"delete chain {name}: Device or resource busy")
            del t.chains[name]
            del t.base[name]
        case "add", Set(name=name) | Map(name=name):
            container = t.sets if isinstance(obj, Set) else t.maps
            if name not in container:
                container[name] = obj  # type: ignore[assignment]
                t.elements[name] = {}
        case "flush", Set(name=name) | Map(name=name):
            _need(t.elements, name, "set or map")
            t.elements[name] = {}
        case "delete", Set(name=name) | Map(name=name):
            _need(t.elements, name, "set or map")
            if any(name in _SET_REF.findall(r) for rules in t.chains.values() for r in rules):
                raise KernelError(f"delete set {name}: Device or resource busy")
            t.sets.pop(name, None)
            t.maps.pop(name, None)
            del t.elements[name]
        case "add", Rule(chain, text):
            _need(t.chains, chain, "chain")
            _check_refs(t, text)
            t.chains[chain].append(text)
        case "add", Element(container, key, value):
            _need(t.elements, container, "set or map")
            if value is not None:
                _check_refs(t, value)
            t.elements[container][key] = value
        case "delete", Element(container, key):
            _need(t.elements, container, "set or map")
            if key not in t.elements[container]:
                missing = f"delete element {container} {{ {key} }}"
                raise KernelError(f"{missing}: No such file or directory")
            del t.elements[container][key]
        case _:
            raise KernelError(f"{verb} {obj!r}: not something nft does")


def _need(container: Mapping[str, object], name: str, kind: str) -> None:
    if name not in container:
        raise KernelError(f"{kind} {name}: No such file or directory")


def _check_refs(t: _Table, text: str) -> None:
    for chain in _CHAIN_REF.findall(text):
        if chain not in t.chains:
            raise KernelError(f"{text}: chain {chain}: No such file or directory")
    for name in _SET_REF.findall(text):
        if name not in t.elements:
            raise KernelError(f"{text}: set {name}: No such file or directory")


def _chain_users(t: _Table, name: str) -> bool:
    in_rules = any(name in _CHAIN_REF.findall(r) for rs in t.chains.values() for r in rs)
    in_maps = any(
        v is not None and name in _CHAIN_REF.findall(v)
        for items in t.elements.values()
        for v in items.values()
    )
    return in_rules or in_maps
