"""uproxy's own iptables chains: the interface both backends implement, and the
iptables-save / -restore plumbing they share.

Everything uproxy installs lives in chains named `UPROXY-*` plus the few rules in built-in chains
that jump to them; nothing else is ever touched, so uproxy can run beside kube-proxy or Docker.

Rules are handled as *rule specs*: the text after `-A CHAIN ` exactly as iptables-save prints it.
Both backends' save tools print the same canonical text, so "is this rule there?" is a string
comparison, and a restore batch of such specs is what both backends load fastest.

The backends: `nft_backend.NftNetfilter` (the iptables-nft tools) and
`legacy_backend.LegacyNetfilter` (python-iptables and the iptables-legacy tools); `detect` picks
one the way kube-proxy's iptables-wrapper does. All their methods block; callers run them in a
worker thread.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import subprocess
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import structlog

from uproxy.errors import KernelError

log = structlog.get_logger(__name__)

OWN_PREFIX = "UPROXY-"
BackendName = Literal["legacy", "nft"]
BackendChoice = Literal["auto", "legacy", "nft"]
Family = Literal[4, 6]

BUILTIN_CHAINS: Mapping[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}

_TOOL_TIMEOUT = 60.0
_NO_QUOTE = frozenset("_-0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_JUMP = re.compile(r"(?:^| )-[jg] (\S+)")
_FAILED_LINE = re.compile(r"line (\d+) failed")


class ToolMissing(KernelError):
    """An iptables tool this backend needs is not installed."""


def save_quote(value: str) -> str:
    """Quote `value` exactly as iptables-save does (xtables_save_string), so specs compare equal."""
    if value and all(c in _NO_QUOTE for c in value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("'", "\\'")
    return f'"{escaped}"'


def jump_target(spec: str) -> str | None:
    """The chain or target a rule spec jumps to (`-j X` / `-g X`), if any."""
    match = _JUMP.search(spec)
    return match.group(1) if match else None


def is_own(chain: str) -> bool:
    return chain.startswith(OWN_PREFIX)


@dataclass(frozen=True, slots=True)
class Jump:
    """A rule in a built-in chain that sends traffic into one of uproxy's chains."""

    chain: str  # built-in chain, e.g. PREROUTING
    target: str  # one of uproxy's chains
    comment: str
    first: bool = True  # insert at the top; False appends at the bottom
    destination: str | None = None  # CIDR, as iptables-save prints it (10.1.0.0/16)
    dst_local: bool = False  # -m addrtype --dst-type LOCAL
    new_only: bool = False  # -m conntrack --ctstate NEW

    @property
    def spec(self) -> str:
        parts = []
        if self.destination is not None:
            parts.append(f"-d {self.destination}")
        if self.dst_local:
            parts.append("-m addrtype --dst-type LOCAL")
        if self.new_only:
            parts.append("-m conntrack --ctstate NEW")
        parts.append(f"-m comment --comment {save_quote(self.comment)}")
        parts.append(f"-j {self.target}")
        return " ".join(parts)


@dataclass(frozen=True, slots=True)
class TableState:
    """What uproxy owns in one table, as the kernel has it."""

    chains: dict[str, list[str]] = field(default_factory=dict)  # own chain -> specs, kernel order
    jumps: list[tuple[str, str]] = field(default_factory=list)  # (other chain, spec) into ours

    @classmethod
    def from_chains(cls, chains: Mapping[str, Sequence[str]]) -> TableState:
        own = {name: list(specs) for name, specs in chains.items() if is_own(name)}
        jumps = [
            (name, spec)
            for name, specs in chains.items()
            if not is_own(name)
            for spec in specs
            if is_own(jump_target(spec) or "")
        ]
        return cls(own, jumps)


@dataclass(frozen=True, slots=True)
class TableUpdate:
    """Changes to uproxy's own chains in one table, applied in this order in one commit."""

    replace: Mapping[str, Sequence[str]] = field(default_factory=dict)  # create/flush, then fill
    delete: Mapping[str, Sequence[str]] = field(default_factory=dict)  # each spec removed once
    append: Mapping[str, Sequence[str]] = field(default_factory=dict)
    delete_chains: Sequence[str] = ()  # flushed and removed; nothing may jump to them

    def __bool__(self) -> bool:
        return bool(
            self.replace
            or any(self.delete.values())
            or any(self.append.values())
            or self.delete_chains
        )

    def check_own(self) -> None:
        """Refuse, as a programming error, any change outside uproxy's own chains."""
        for chain in [*self.replace, *self.delete, *self.append, *self.delete_chains]:
            if not is_own(chain):
                raise ValueError(f"refusing to change {chain!r}: not one of uproxy's chains")

    def restore_lines(self) -> list[str]:
        lines = [f":{chain} - [0:0]" for chain in self.replace]  # --noflush: create or flush
        for chain, specs in self.replace.items():
            lines += [f"-A {chain} {spec}" for spec in specs]
        for chain, specs in self.delete.items():
            lines += [f"-D {chain} {spec}" for spec in specs]
        for chain, specs in self.append.items():
            lines += [f"-A {chain} {spec}" for spec in specs]
        lines += [f"-F {chain}" for chain in self.delete_chains]
        lines += [f"-X {chain}" for chain in self.delete_chains]
        return lines


class Netfilter(Protocol):
    """What the portals need from an iptables backend. Every method blocks."""

    backend: BackendName
    family: Family

    def read(self, table: str) -> TableState:
        """uproxy's chains in `table` with their rules, and every rule elsewhere that jumps into
        them; empty (and nothing created) when the table does not exist."""

    def apply(self, updates: Mapping[str, TableUpdate]) -> None:
        """Apply each table's update to uproxy's own chains, in one tool run: per table
        atomically (all of it or, raising KernelError, none of it), tables in order."""

    def ensure_jumps(self, table: str, jumps: Sequence[Jump]) -> None:
        """Make the rules in `table`'s built-in chains that jump into uproxy's chains exactly
        `jumps`: add the missing ones (top or bottom), delete stale and duplicate ones."""

    def delete_everything(self) -> None:
        """Remove every jump into uproxy's chains and the chains themselves, in every table of
        this backend. Idempotent; never creates a table."""


# -- iptables-save / -restore plumbing shared by both backends --------------------------------


def tool_prefix(backend: BackendName, family: Family = 4) -> str:
    """The tools of one backend and family: iptables-nft, ip6tables-legacy, ..."""
    return f"{'ip6tables' if family == 6 else 'iptables'}-{backend}"


def find_tool(name: str) -> str | None:
    """`name` on PATH, or in the sbin directories a minimal service PATH may lack."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/local/sbin"])
    return shutil.which(name, path=path)


def run_tool(argv: Sequence[str], stdin: str | None = None) -> str:
    """Run an iptables tool; its stdout, or KernelError carrying the failing restore line."""
    exe = find_tool(argv[0])
    if exe is None:
        raise ToolMissing(f"{argv[0]} not found (install the iptables package)")
    try:
        proc = subprocess.run(
            [exe, *argv[1:]],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=_TOOL_TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise KernelError(f"{argv[0]} did not finish within {_TOOL_TIMEOUT:.0f}s") from None
    if proc.returncode != 0:
        message = proc.stderr.strip() or proc.stdout.strip()
        failed = _FAILED_LINE.search(message)
        if failed and stdin is not None:
            lines = stdin.splitlines()
            number = int(failed.group(1))
            if 0 < number <= len(lines):
                message += f" [{lines[number - 1]}]"
        raise KernelError(f"{argv[0]} failed (exit {proc.returncode}): {message}")
    return proc.stdout


def parse_save(text: str) -> dict[str, dict[str, list[str]]]:
    """iptables-save output -> table -> chain -> rule specs, in order (built-in chains too)."""
    tables: dict[str, dict[str, list[str]]] = {}
    chains: dict[str, list[str]] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        if line[0] == "*":
            chains = tables.setdefault(line[1:].strip(), {})
        elif line[0] == ":":
            chains.setdefault(line[1:].split(" ", 1)[0], [])
        elif line.startswith("-A "):
            parts = line.split(" ", 2)
            chains.setdefault(parts[1], []).append(parts[2] if len(parts) > 2 else "")
    return tables


def parse_listing(text: str) -> list[str]:
    """`iptables -S CHAIN` output -> that chain's rule specs."""
    specs = []
    for line in text.splitlines():
        if line.startswith("-A "):
            parts = line.split(" ", 2)
            specs.append(parts[2] if len(parts) > 2 else "")
    return specs


def plan_jumps(
    current: Mapping[str, Sequence[str]], jumps: Sequence[Jump]
) -> tuple[list[tuple[str, str]], list[Jump]]:
    """(stale (chain, spec) to delete, missing jumps to add) for built-in chains `current`."""
    wanted = Counter((j.chain, j.spec) for j in jumps)
    kept: Counter[tuple[str, str]] = Counter()
    stale = []
    for chain, specs in current.items():
        for spec in specs:
            if not is_own(jump_target(spec) or ""):
                continue  # a foreign rule: never ours to judge
            if kept[(chain, spec)] < wanted[(chain, spec)]:
                kept[(chain, spec)] += 1
            else:
                stale.append((chain, spec))
    missing = [j for j in jumps if kept[(j.chain, j.spec)] == 0]
    return stale, missing


def jump_lines(stale: Sequence[tuple[str, str]], missing: Sequence[Jump]) -> list[str]:
    lines = [f"-D {chain} {spec}" for chain, spec in stale]
    # Inserting at 1 one after the other reverses order; insert backwards to keep list order.
    lines += [f"-I {j.chain} 1 {j.spec}" for j in reversed(missing) if j.first]
    lines += [f"-A {j.chain} {j.spec}" for j in missing if not j.first]
    return lines


def delete_everything_lines(tables: Mapping[str, Mapping[str, Sequence[str]]]) -> list[str]:
    """A restore batch removing every jump into uproxy's chains, then the chains themselves."""
    lines: list[str] = []
    for table, chains in tables.items():
        state = TableState.from_chains(chains)
        if not state.chains and not state.jumps:
            continue
        lines.append(f"*{table}")
        lines += [f"-D {chain} {spec}" for chain, spec in state.jumps]
        lines += [f"-F {chain}" for chain in state.chains]
        lines += [f"-X {chain}" for chain in state.chains]
        lines.append("COMMIT")
    return lines


class RestoreTools:
    """Reading and writing through one backend's iptables-save / iptables-restore."""

    def __init__(self, save: str, restore: str, restore_args: Sequence[str] = ()) -> None:
        self.save_tool = save
        self.restore_tool = restore
        self.restore_args = tuple(restore_args)

    def save(self, table: str | None = None) -> dict[str, dict[str, list[str]]]:
        argv = [self.save_tool] if table is None else [self.save_tool, "-t", table]
        return parse_save(run_tool(argv))

    def restore(self, lines: Sequence[str]) -> None:
        if lines:
            text = "\n".join(lines) + "\n"
            run_tool([self.restore_tool, "--noflush", *self.restore_args], text)

    def apply(self, updates: Mapping[str, TableUpdate]) -> None:
        lines = []
        for table, update in updates.items():
            update.check_own()
            if update:
                lines += [f"*{table}", *update.restore_lines(), "COMMIT"]
        self.restore(lines)

    def delete_everything(self) -> None:
        try:
            tables = self.save()
        except ToolMissing:
            return  # no tools, so no rules of ours could have been written with them
        except KernelError as exc:
            # e.g. a kernel without nf_tables: what cannot be read was never written either.
            log.info("netfilter_unreadable", tool=self.save_tool, error=str(exc))
            return
        self.restore(delete_everything_lines(tables))


def run_tool_quietly(argv: Sequence[str]) -> str:
    """A tool's output, or "" when it fails (for looking, never for changing)."""
    try:
        return run_tool(argv)
    except KernelError:
        return ""


def normalize_cidr(cidr: str) -> str:
    return str(ipaddress.ip_network(cidr, strict=False))
