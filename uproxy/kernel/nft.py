"""nftables: uproxy's own table, changed only in whole transactions.

A sync builds a `Transaction` of structured operations (add, flush, delete of chains, rules,
sets, maps and elements) and hands it to an `Nft`, which applies it atomically: all of it or,
raising KernelError, none of it. `NftCommand` renders the transaction as one `nft -f -` script,
as kube-proxy's knftables does (Python bindings exist only as a Debian package, not on PyPI);
`uproxy.kernel.fake_nft.FakeNft` applies it to an in-memory table with the kernel's rules.

Nothing outside the table `ip uproxy` is ever touched.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from uproxy.errors import KernelError
from uproxy.kernel.netfilter import find_tool

FAMILY = "ip"  # the IPv4 table; "ip6" holds the IPv6 one
FAMILIES = {4: "ip", 6: "ip6"}
TABLE = "uproxy"
_TIMEOUT = 60.0
_ERROR_LINE = re.compile(r"^/dev/stdin:(\d+):")


@dataclass(frozen=True, slots=True)
class Chain:
    name: str
    # For a base chain: "type nat hook prerouting priority dstnat; policy accept;".
    base: str | None = None


@dataclass(frozen=True, slots=True)
class Set:
    name: str
    type: str  # "ipv4_addr"
    flags: tuple[str, ...] = ()
    timeout: int | None = None  # seconds, for dynamic sets with timeouts

    def body(self) -> str:
        parts = [f"type {self.type};"]
        if self.flags:
            parts.append(f"flags {','.join(self.flags)};")
        if self.timeout is not None:
            parts.append(f"timeout {self.timeout}s;")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class Map:
    name: str
    type: str  # "ipv4_addr . inet_proto . inet_service : verdict"

    def body(self) -> str:
        return f"type {self.type};"


@dataclass(frozen=True, slots=True)
class Rule:
    chain: str
    text: str


@dataclass(frozen=True, slots=True)
class Element:
    """A map element `key : value`, or a set element `key` (value None)."""

    container: str
    key: str
    value: str | None = None


Object = Chain | Set | Map | Rule | Element
Verb = Literal["add", "flush", "delete"]


@dataclass
class Transaction:
    """Operations applied in order, atomically. `add` of an existing chain, set or map is a no-op
    (its contents stay); `flush` empties a chain, set or map; `delete` removes one, which fails
    while anything still refers to it."""

    ops: list[tuple[Verb, Object]] = field(default_factory=list)

    def add(self, obj: Object) -> None:
        self.ops.append(("add", obj))

    def flush(self, obj: Chain | Set | Map) -> None:
        self.ops.append(("flush", obj))

    def delete(self, obj: Chain | Set | Map | Element) -> None:
        self.ops.append(("delete", obj))

    def __len__(self) -> int:
        return len(self.ops)

    def __bool__(self) -> bool:
        return bool(self.ops)

    def lines(self, family: str = FAMILY) -> Iterator[str]:
        """The transaction as `nft -f` input for table `family uproxy`, after `add table`."""
        where = f"{family} {TABLE}"
        yield f"add table {where}"
        # Runs of elements for one map go in one command: nft parses them much faster.
        batch: list[Element] = []
        batch_verb: Verb = "add"
        for verb, obj in self.ops:
            if (
                isinstance(obj, Element)
                and batch
                and (verb != batch_verb or obj.container != batch[0].container)
            ):
                yield _elements(batch_verb, batch, where)
                batch = []
            if isinstance(obj, Element):
                batch_verb = verb
                batch.append(obj)
                continue
            if batch:
                yield _elements(batch_verb, batch, where)
                batch = []
            yield _line(verb, obj, where)
        if batch:
            yield _elements(batch_verb, batch, where)


def _item(verb: Verb, element: Element) -> str:
    if element.value is None or verb == "delete":
        return element.key
    return f"{element.key} : {element.value}"


def _elements(verb: Verb, elements: Sequence[Element], where: str) -> str:
    items = ", ".join(_item(verb, e) for e in elements)
    return f"{verb} element {where} {elements[0].container} {{ {items} }}"


def _line(verb: Verb, obj: Object, where: str) -> str:
    match obj:
        case Chain(name, base):
            body = f" {{ {base} }}" if verb == "add" and base else ""
            return f"{verb} chain {where} {name}{body}"
        case Set(name=name):
            body = f" {{ {obj.body()} }}" if verb == "add" else ""
            return f"{verb} set {where} {name}{body}"
        case Map(name=name):
            body = f" {{ {obj.body()} }}" if verb == "add" else ""
            return f"{verb} map {where} {name}{body}"
        case Rule(chain, text):
            return f"add rule {where} {chain} {text}"
        case Element():
            return _elements(verb, [obj], where)
    raise TypeError(f"not an nftables object: {obj!r}")


@dataclass(frozen=True, slots=True)
class Listing:
    """What uproxy's table holds, by name."""

    chains: frozenset[str] = frozenset()
    sets: frozenset[str] = frozenset()
    maps: frozenset[str] = frozenset()


class Nft(Protocol):
    def apply(self, tx: Transaction) -> None:
        """Apply `tx` atomically (creating the table if needed); KernelError naming the
        failing operation when the kernel refuses, and then nothing changed. Blocks."""

    def listing(self) -> Listing | None:
        """What the table holds; None when it does not exist. Blocks."""

    def delete_table(self) -> None:
        """Remove the table and everything in it; fine when it does not exist. Blocks."""


class NftCommand:
    """The real `nft` command, one process per transaction. Blocks: run it in a worker thread."""

    def __init__(self, tool: str = "nft", family: str = FAMILY) -> None:
        self.family = family
        exe = find_tool(tool)
        if exe is None:
            raise KernelError(f"{tool} not found (install Debian's nftables package)")
        self._exe = exe

    def apply(self, tx: Transaction) -> None:
        self._run(["-f", "-"], "\n".join(tx.lines(self.family)) + "\n")

    def check(self, script: str) -> None:
        """Have nft and the kernel validate `script` without applying it."""
        self._run(["-c", "-f", "-"], script)

    def listing(self) -> Listing | None:
        # Names only: listing the table itself would print every rule and element (1.5 s of
        # JSON with 10,000 services, where these take a tenth of that).
        if TABLE not in parse_names(self._run(["-j", "list", "tables", self.family]), "table"):
            return None
        chains, sets, maps = (
            parse_names(self._run(["-j", "list", kind, self.family]), kind[:-1])
            for kind in ("chains", "sets", "maps")
        )
        return Listing(chains, sets, maps)

    def delete_table(self) -> None:
        where = f"{self.family} {TABLE}"
        self._run(["-f", "-"], f"add table {where}\ndelete table {where}\n")

    def _run(self, args: Sequence[str], stdin: str | None = None) -> str:
        try:
            proc = subprocess.run(
                [self._exe, *args],
                input=stdin,
                capture_output=True,
                text=True,
                timeout=_TIMEOUT,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise KernelError(f"nft did not finish within {_TIMEOUT:.0f}s") from None
        if proc.returncode != 0:
            raise KernelError(f"nft failed (exit {proc.returncode}): {_first_error(proc.stderr)}")
        return proc.stdout


def _first_error(stderr: str) -> str:
    """nft's first error, with the script line it names (the rest repeats it with carets)."""
    lines = stderr.strip().splitlines()
    for i, line in enumerate(lines):
        if "Error:" in line:
            where = lines[i + 1].strip() if i + 1 < len(lines) else ""
            message = line.split("Error:", 1)[1].strip()
            return f"{message} [{where}]" if where else message
    return stderr.strip() or "no message"


def parse_names(text: str, kind: str) -> frozenset[str]:
    """`nft -j list {tables,chains,sets,maps} ip` output -> the names of uproxy's `kind`s."""
    names = set()
    for item in json.loads(text).get("nftables", []):
        obj = item.get(kind)
        if obj is None:
            continue
        owner = obj.get("name") if kind == "table" else obj.get("table")
        if kind == "table":
            names.add(owner)
        elif owner == TABLE:
            names.add(obj["name"])
    return frozenset(names)
