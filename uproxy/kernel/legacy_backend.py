"""The legacy x_tables backend.

python-iptables (libiptc, in process) does what it is good at: checking and editing the handful of
jump rules in built-in chains by structural equality, and removing everything uproxy owns. The
bulk contents of uproxy's own chains go through `iptables-legacy-restore --noflush` and are read
with `iptables-legacy-save`, because measured on this project's hosts python-iptables costs
~0.65 ms of Python per rule written (10,000 rules: ~6.4 s) and ~0.12 ms per rule read *before*
rendering any match (rendering a match goes through the fd-1 pipe below), while the restore tool
loads 10,000 rules in ~0.17 s and the save tool dumps them in ~0.04 s. Both end in the same kernel
operation (one whole-table replace), so the tool is as atomic as libiptc; only its speed differs,
and the 1 s full-sync target needs it.

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
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import structlog

from uproxy.errors import KernelError
from uproxy.kernel.netfilter import (
    BUILTIN_CHAINS,
    BackendName,
    Family,
    Jump,
    RestoreTools,
    TableState,
    TableUpdate,
    is_own,
    jump_lines,
    plan_jumps,
    tool_prefix,
)
from uproxy.logs import STDOUT_LOCK

log = structlog.get_logger(__name__)


_XTABLES_LOCK_WAIT = 5.0


def legacy_tables(family: Family = 4) -> set[str]:
    """The legacy tables that exist. Touching any other one would create it in the kernel."""
    names = "ip6_tables_names" if family == 6 else "ip_tables_names"
    try:
        return set(Path("/proc/net", names).read_text().split())
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

    def __init__(self, family: Family = 4, *, python_iptables: bool = True) -> None:
        """`python_iptables` False takes the text path the backend falls back to when
        python-iptables cannot load (the tests drive both)."""
        self.family: Family = family
        prefix = tool_prefix("legacy", family)
        self._tools = RestoreTools(f"{prefix}-save", f"{prefix}-restore", ["-w", "5"])
        self._iptc = _import_iptc() if python_iptables else None

    def read(self, table: str) -> TableState:
        if table not in legacy_tables(self.family):
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
        tables = legacy_tables(self.family)
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

    def _table(self, iptc: Any, name: str, *, autocommit: bool = True) -> Any:
        table_class = iptc.Table6 if self.family == 6 else iptc.Table
        return table_class(name, autocommit=autocommit)

    def _iptc_rule(self, iptc: Any, jump: Jump) -> Any:
        rule = iptc.Rule6() if self.family == 6 else iptc.Rule()
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
            table = self._table(iptc, table_name, autocommit=False)
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
                self._table(iptc, table_name).refresh()  # never keep uncommitted edits around

    def _ensure_jumps_text(self, table: str, jumps: Sequence[Jump]) -> None:
        chains = (
            self._tools.save(table).get(table, {}) if table in legacy_tables(self.family) else {}
        )
        current = {c: chains.get(c, []) for c in BUILTIN_CHAINS[table]}
        stale, missing = plan_jumps(current, jumps)
        if stale or missing:
            self._tools.restore([f"*{table}", *jump_lines(stale, missing), "COMMIT"])

    def _delete_everything_iptc(self, iptc: Any, tables: set[str]) -> bool:
        """Remove uproxy's jumps and chains from `tables`; True when something could not go."""
        leftover = False
        for name in sorted(tables):
            table = self._table(iptc, name, autocommit=False)
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
