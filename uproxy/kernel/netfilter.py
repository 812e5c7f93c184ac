"""uproxy's own iptables chains: one small interface, two real backends.

Everything uproxy installs lives in chains named `UPROXY-*` plus the few rules in built-in chains
that jump to them; nothing else is ever touched, so uproxy can run beside kube-proxy or Docker.

Rules are handled as *rule specs*: the text after `-A CHAIN ` exactly as iptables-save prints it.
Both backends' save tools print the same canonical text, so "is this rule there?" is a string
comparison, and a restore batch of such specs is what both backends load fastest.

Backends (all methods block; callers run them in a worker thread):

* `NftNetfilter`: the iptables-nft tools (Debian 12's default), so an admin's `iptables -t nat -S`
  shows uproxy's rules. Reads with `iptables-nft-save`, writes with `iptables-nft-restore
  --noflush` batches (one nf_tables transaction per table).
* `LegacyNetfilter`: python-iptables (libiptc, in process) for what it is good at: checking and
  editing the handful of jump rules in built-in chains by structural equality, and removing
  everything uproxy owns. The bulk contents of uproxy's own chains go through
  `iptables-legacy-restore --noflush` and are read with `iptables-legacy-save`, because measured on
  this project's hosts python-iptables costs ~0.65 ms of Python per rule written (10,000 rules:
  ~6.4 s) and ~0.12 ms per rule read *before* rendering any match (rendering a match goes through
  the fd-1 pipe below), while the restore tool loads 10,000 rules in ~0.17 s and the save tool
  dumps them in ~0.04 s. Both end in the same kernel operation (one whole-table replace), so the
  tool is as atomic as libiptc; only its speed differs, and the 1 s full-sync target needs it.

python-iptables points file descriptor 1 at a pipe while it renders a match, so any other thread
writing to stdout at that moment would lose its output into that pipe (and corrupt the parse).
Every python-iptables call therefore holds `STDOUT_LOCK`; uproxy's log output must take the same
lock (the CLI's logger factory does). The calls run in worker threads, never on the event loop,
so the loop waits at most a few milliseconds for a log line while libiptc works.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import ipaddress
import os
import platform
import re
import shutil
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal, Protocol

import structlog

from uproxy.errors import KernelError
from uproxy.logs import STDOUT_LOCK

log = structlog.get_logger(__name__)

OWN_PREFIX = "UPROXY-"
BackendName = Literal["legacy", "nft"]
BackendChoice = Literal["auto", "legacy", "nft"]

BUILTIN_CHAINS: Mapping[str, tuple[str, ...]] = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}

_TOOL_TIMEOUT = 60.0
_XTABLES_LOCK_WAIT = 5.0
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


class _RestoreTools:
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


# -- nf_tables through the iptables-nft tools ------------------------------------------------


class NftNetfilter:
    backend: BackendName = "nft"

    def __init__(self, prefix: str = "iptables-nft") -> None:
        self._cmd = prefix
        self._tools = _RestoreTools(f"{prefix}-save", f"{prefix}-restore")

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


# -- legacy x_tables: python-iptables for jumps and cleanup, restore for bulk -----------------


def legacy_tables() -> set[str]:
    """The legacy tables that exist. Touching any other one would create it in the kernel."""
    try:
        return set(Path("/proc/net/ip_tables_names").read_text().split())
    except OSError:
        return set()


@contextlib.contextmanager
def xtables_lock() -> Iterator[None]:
    """The lock every iptables-legacy tool takes, so libiptc's whole-table read-modify-write
    cannot interleave with another writer's and lose either update."""
    path = os.environ.get("XTABLES_LOCKFILE", "/run/xtables.lock")
    try:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    except OSError:
        yield  # e.g. a read-only /run: nothing to coordinate with
        return
    try:
        deadline = time.monotonic() + _XTABLES_LOCK_WAIT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES) or time.monotonic() > deadline:
                    raise KernelError(f"cannot take the xtables lock {path}: {exc}") from None
                time.sleep(0.02)
        yield
    finally:
        os.close(fd)


def _import_iptc() -> ModuleType | None:
    try:
        import iptc
    except Exception as exc:  # missing libiptc raises all sorts of errors at import time
        log.warning("python_iptables_unavailable", error=str(exc), fallback="iptables-legacy-*")
        return None
    module: ModuleType = iptc
    return module


class LegacyNetfilter:
    backend: BackendName = "legacy"

    def __init__(self, prefix: str = "iptables-legacy") -> None:
        self._tools = _RestoreTools(f"{prefix}-save", f"{prefix}-restore", ["-w", "5"])
        self._iptc = _import_iptc()

    def read(self, table: str) -> TableState:
        if table not in legacy_tables():
            return TableState()
        return TableState.from_chains(self._tools.save(table).get(table, {}))

    def apply(self, updates: Mapping[str, TableUpdate]) -> None:
        self._tools.apply(updates)

    def ensure_jumps(self, table: str, jumps: Sequence[Jump]) -> None:
        if self._iptc is None:
            self._ensure_jumps_text(table, jumps)
            return
        with xtables_lock(), STDOUT_LOCK:
            self._ensure_jumps_iptc(self._iptc, table, jumps)

    def delete_everything(self) -> None:
        tables = legacy_tables()
        if not tables:
            return
        if self._iptc is not None:
            try:
                with xtables_lock(), STDOUT_LOCK:
                    leftover = self._delete_everything_iptc(self._iptc, tables)
            except self._iptc.IPTCError as exc:
                raise KernelError(f"python-iptables: {exc}") from None
            if not leftover:
                return
        # Without python-iptables, or when a user chain still jumps into ours (libiptc only
        # scanned the built-in chains): the tools see every chain at once.
        self._tools.delete_everything()

    # python-iptables compares rules structurally (match and target buffers), so the jumps it
    # checks need no text rendering, and thus never go through the fd-1 pipe.

    def _iptc_rule(self, iptc: Any, jump: Jump) -> Any:
        rule = iptc.Rule()
        if jump.destination is not None:
            rule.dst = jump.destination
        if jump.dst_local:
            rule.create_match("addrtype").dst_type = "LOCAL"
        if jump.new_only:
            rule.create_match("conntrack").ctstate = "NEW"
        rule.create_match("comment").comment = jump.comment
        rule.target = iptc.Target(rule, jump.target)
        return rule

    def _ensure_jumps_iptc(self, iptc: Any, table_name: str, jumps: Sequence[Jump]) -> None:
        try:
            table = iptc.Table(table_name, autocommit=False)
            table.refresh()  # drop the cached handle: the restore tool changed the table
            changed = False
            for chain_name in BUILTIN_CHAINS[table_name]:
                wanted = [(j, self._iptc_rule(iptc, j)) for j in jumps if j.chain == chain_name]
                found = [False] * len(wanted)
                chain = iptc.Chain(table, chain_name)
                for rule in chain.rules:
                    if not is_own(rule.target.name):
                        continue
                    index = next(
                        (i for i, (_, w) in enumerate(wanted) if not found[i] and w == rule),
                        None,
                    )
                    if index is None:
                        chain.delete_rule(rule)
                        changed = True
                    else:
                        found[index] = True
                for (jump, rule), present in reversed(list(zip(wanted, found, strict=True))):
                    if not present and jump.first:
                        chain.insert_rule(rule)
                        changed = True
                for (jump, rule), present in zip(wanted, found, strict=True):
                    if not present and not jump.first:
                        chain.append_rule(rule)
                        changed = True
            if changed:
                table.commit()
        except iptc.IPTCError as exc:
            raise KernelError(f"python-iptables ({table_name}): {exc}") from None
        finally:
            with contextlib.suppress(Exception):
                iptc.Table(table_name).refresh()  # never keep uncommitted edits around

    def _ensure_jumps_text(self, table: str, jumps: Sequence[Jump]) -> None:
        chains = self._tools.save(table).get(table, {}) if table in legacy_tables() else {}
        current = {c: chains.get(c, []) for c in BUILTIN_CHAINS[table]}
        stale, missing = plan_jumps(current, jumps)
        if stale or missing:
            self._tools.restore([f"*{table}", *jump_lines(stale, missing), "COMMIT"])

    def _delete_everything_iptc(self, iptc: Any, tables: set[str]) -> bool:
        """Remove uproxy's jumps and chains from `tables`; True when something could not go."""
        leftover = False
        for name in sorted(tables):
            table = iptc.Table(name, autocommit=False)
            table.refresh()
            own = [chain for chain in table.chains if is_own(chain.name)]
            if not own:
                continue
            for builtin in BUILTIN_CHAINS.get(name, ()):
                if not table.is_chain(builtin):
                    continue
                chain = iptc.Chain(table, builtin)
                for rule in chain.rules:
                    if is_own(rule.target.name):
                        chain.delete_rule(rule)
            for chain in own:
                chain.flush()
            try:
                for chain in own:
                    chain.delete()
                table.commit()
            except iptc.IPTCError:
                leftover = True  # still referenced from a user chain
            table.refresh()
        return leftover


# -- choosing a backend ----------------------------------------------------------------------

_KUBELET_HINT = re.compile(r"^:(KUBE-IPTABLES-HINT|KUBE-KUBELET-CANARY)\b", re.MULTILINE)


def run_tool_quietly(argv: Sequence[str]) -> str:
    """A tool's output, or "" when it fails (for looking, never for changing)."""
    try:
        return run_tool(argv)
    except KernelError:
        return ""


def _rule_count(text: str) -> int:
    return sum(1 for line in text.splitlines() if line.startswith("-"))


def _iptables_mode() -> BackendName | None:
    """Which backend the host's plain `iptables` command is."""
    version = run_tool_quietly(["iptables", "--version"])
    if "nf_tables" in version:
        return "nft"
    if "legacy" in version:
        return "legacy"
    return None


def detect_backend(choice: BackendChoice = "auto") -> BackendName:
    """The host's iptables mode, decided as kube-proxy's iptables-wrapper does.

    1. The kubelet's hint chains (KUBE-IPTABLES-HINT, KUBE-KUBELET-CANARY) in mangle: the mode the
       node already uses. nft is checked with `-t mangle`; legacy is dumped whole, because
       `iptables-legacy-save -t mangle` would create the legacy mangle table.
    2. Else the backend holding more rules.
    3. Else (both empty) whichever backend the host's `iptables` command is.
    """
    if choice != "auto":
        return choice
    nft_mangle = run_tool_quietly(["iptables-nft-save", "-t", "mangle"]) + run_tool_quietly(
        ["ip6tables-nft-save", "-t", "mangle"]
    )
    if _KUBELET_HINT.search(nft_mangle):
        return "nft"
    legacy = run_tool_quietly(["iptables-legacy-save"]) + run_tool_quietly(
        ["ip6tables-legacy-save"]
    )
    if _KUBELET_HINT.search(legacy):
        return "legacy"
    nft_rules = _rule_count(
        run_tool_quietly(["iptables-nft-save"]) + run_tool_quietly(["ip6tables-nft-save"])
    )
    legacy_rules = _rule_count(legacy)
    if legacy_rules != nft_rules:
        return "legacy" if legacy_rules > nft_rules else "nft"
    mode = _iptables_mode()
    if mode is not None:
        return mode
    if find_tool("iptables-nft-restore"):
        return "nft"
    if find_tool("iptables-legacy-restore"):
        return "legacy"
    raise KernelError("no iptables tools found (install the iptables package)")


def open_backend(name: BackendName) -> Netfilter:
    """The real backend `name`; KernelError when its tools are missing."""
    prefix = "iptables-nft" if name == "nft" else "iptables-legacy"
    for tool in (f"{prefix}-save", f"{prefix}-restore"):
        if find_tool(tool) is None:
            raise ToolMissing(f"{tool} not found (install the iptables package)")
    return NftNetfilter() if name == "nft" else LegacyNetfilter()


def build_netfilter(choice: BackendChoice = "auto") -> Netfilter:
    """Detect (for "auto") and open the backend uproxy runs on; logs the choice."""
    name = detect_backend(choice)
    log.info("iptables_backend", backend=name, chosen_by="flag" if choice != "auto" else "detected")
    return open_backend(name)


def physdev_supported() -> bool:
    """Whether the kernel has the physdev match (registered, or available as a module)."""
    with contextlib.suppress(OSError):
        if "physdev" in Path("/proc/net/ip_tables_matches").read_text().split():
            return True
    if Path("/sys/module/xt_physdev").exists():
        return True
    modules = Path("/lib/modules", platform.release(), "kernel/net/netfilter")
    return any(modules.glob("xt_physdev.ko*")) if modules.is_dir() else False


def normalize_cidr(cidr: str) -> str:
    return str(ipaddress.ip_network(cidr, strict=False))
