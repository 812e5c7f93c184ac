"""The manifest source: Services and EndpointSlices from YAML/JSON files, followed as they change.

`ManifestSource` polls the files (parsed by uproxy/sources/manifest_loader.py), resolves the names
of FQDN slices (uproxy/sources/fqdn_resolver.py), and turns differences into handler calls. A
file is all or nothing: one bad object keeps the file's last good contents in force.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Sequence
from pathlib import Path

import structlog

from uproxy.errors import ManifestError, SettingsError
from uproxy.model import AddressType, ObjectKey
from uproxy.sources.base import ConfigHandler
from uproxy.sources.fqdn_resolver import (
    DnsCache,
    Resolver,
    fqdn_families,
    fqdn_hosts,
    resolve_host,
    resolve_slice,
)
from uproxy.sources.manifest_loader import (
    NO_MANIFEST_FILES,
    Ignored,
    LoadedFile,
    ManifestItemError,
    Manifests,
    list_directory,
    load_file_collecting,
    load_report,
    merge_files,
)

log = structlog.get_logger(__name__)

# A name that does not answer in time must not hold up the delivery of everything else for long.
_DNS_TIMEOUT = 5.0
_MIN_PERIOD = 0.01

Signature = tuple[int, int, int, int]


def _log_invalid(error: ManifestError) -> None:
    item = {"item": error.item} if isinstance(error, ManifestItemError) else {}
    log.error(
        "manifest_invalid", path=error.path, document=error.document, error=error.message, **item
    )


def log_ignored(ignored: Ignored) -> None:
    log.warning(
        "manifest_ignored",
        path=ignored.path,
        document=ignored.document,
        **({"item": ignored.item} if ignored.item is not None else {}),
        object=ignored.object,
        reason=ignored.reason,
    )


def check_start_paths(paths: Sequence[Path]) -> None:
    """Raise SettingsError naming the first path given at start that does not exist or holds no
    Service or EndpointSlice (a typo, the wrong folder), after logging what was found there.
    Later, a path that disappears or breaks only keeps its last good state."""
    report = load_report(paths)
    if not report.unusable:
        return  # the source logs what it finds as it loads
    fatal = [id(e) for e in report.unusable.values()]  # said once, by the fatal error
    for error in report.errors:
        if id(error) not in fatal:
            _log_invalid(error)
    for ignored in report.ignored:
        log_ignored(ignored)
    raise SettingsError(f"--config {next(iter(report.unusable.values()))}")


def _signature(path: Path) -> Signature | None:
    try:
        st = os.stat(path)  # follows symlinks: ConfigMap mounts swap a `..data` symlink
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino, st.st_dev)


def _vanished(path: Path) -> bool:
    """Whether `path` is gone (a stat that fails for another reason is an error to report)."""
    return not os.path.lexists(path)


class ManifestSource:
    """Services and EndpointSlices from manifest files and directories, polled for changes."""

    name = "manifests"

    def __init__(
        self,
        paths: Sequence[Path],
        *,
        poll_interval: float = 0.25,
        dns_refresh: float = 10.0,
        resolver: Resolver | None = None,
        fqdn_families: str = "service",
    ) -> None:
        self._paths = [Path(p) for p in paths]
        # A zero or negative period from a flag would otherwise turn the loops into busy-waits.
        self._poll_interval = max(poll_interval, _MIN_PERIOD)
        self._dns_refresh = max(dns_refresh, _MIN_PERIOD)
        self._dns = DnsCache(resolver or resolve_host, timeout=_DNS_TIMEOUT)
        self._fqdn_families = fqdn_families
        self._wake = asyncio.Event()
        self._force = False
        self._dirty = True
        self._good: dict[Path, LoadedFile] = {}
        self._signatures: dict[Path, Signature | None] = {}
        self._listing: dict[Path, list[Path]] = {}
        self._missing: set[Path] = set()
        self._empty_dirs: set[Path] = set()
        self._duplicate_errors: list[str] = []
        self._files: list[Path] = []
        self._delivered = Manifests()

    def refresh(self) -> None:
        self._force = True
        self._wake.set()

    async def run(self, handler: ConfigHandler) -> None:
        async with asyncio.TaskGroup() as tasks:
            tasks.create_task(self._dns_loop())
            await self._watch(handler)

    async def _watch(self, handler: ConfigHandler) -> None:
        await self._step(handler, force=True)
        try:
            handler.source_synced(self.name)
        except Exception as e:
            log.exception("manifest_source_error", error=str(e))
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._poll_interval):
                    await self._wake.wait()
            self._wake.clear()
            force, self._force = self._force, False
            await self._step(handler, force=force)

    async def _step(self, handler: ConfigHandler, *, force: bool) -> None:
        try:
            await self._scan(handler, force=force)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("manifest_source_error", error=str(e))

    async def _dns_loop(self) -> None:
        while True:
            await asyncio.sleep(self._dns_refresh)
            try:
                if await self._dns.resolve(self._wanted_hosts(), only_new=False):
                    self._dirty = True
                    self._wake.set()
            except Exception as e:
                log.exception("manifest_source_error", error=str(e))

    # --- files

    def _list_files(self) -> list[Path]:
        files: dict[Path, None] = {}
        for path in self._paths:
            for file in self._expand(path):
                files.setdefault(file, None)
        return list(files)

    def _expand(self, path: Path) -> list[Path]:
        try:
            if path.is_dir():
                self._listing[path] = list_directory(path)
                self._note_empty(path, not self._listing[path])
            elif path.is_file():
                self._listing[path] = [path]
            else:
                self._note_missing(path)
                return []
        except OSError as e:
            # A transient listing failure must not look like every file was deleted.
            log.error("manifest_invalid", path=str(path), document=None, error=f"cannot list: {e}")
            return self._listing.get(path, [])
        self._missing.discard(path)
        return self._listing[path]

    def _note_empty(self, directory: Path, empty: bool) -> None:
        if not empty:
            self._empty_dirs.discard(directory)
        elif directory not in self._empty_dirs:
            self._empty_dirs.add(directory)
            log_ignored(Ignored(str(directory), None, None, None, NO_MANIFEST_FILES))

    def _note_missing(self, path: Path) -> None:
        self._listing.pop(path, None)
        if path not in self._missing:
            self._missing.add(path)
            log.error(
                "manifest_invalid", path=str(path), document=None, error="no such file or directory"
            )

    async def _reload(self, path: Path) -> None:
        loaded, errors = await asyncio.to_thread(load_file_collecting, path)
        if errors and _vanished(path):
            self._good.pop(path, None)  # deleted while being read: gone, not broken
            self._signatures.pop(path, None)
            return
        for error in errors:
            _log_invalid(error)
        if errors:
            return
        self._good[path] = loaded
        for ignored in loaded.ignored:
            log_ignored(ignored)
        for skipped in loaded.skipped:
            log.info(
                "manifest_object_skipped",
                path=str(path),
                kind=skipped.kind,
                name=str(skipped.key),
                reason=skipped.reason,
            )

    async def _reload_changed(self, files: list[Path], force: bool) -> bool:
        changed = False
        for path in files:
            signature = _signature(path)
            if signature is None and _vanished(path):
                # Deleted since the directory was listed: gone, not broken (the next listing
                # agrees; a path given by name that vanished is reported by that listing).
                changed |= self._good.pop(path, None) is not None
                self._signatures.pop(path, None)
                continue
            if not force and path in self._signatures and self._signatures[path] == signature:
                continue
            self._signatures[path] = signature
            changed = True
            await self._reload(path)
        for gone in set(self._signatures) - set(files):
            del self._signatures[gone]
            self._good.pop(gone, None)
            changed = True
        return changed

    # --- state

    def _wanted_hosts(self) -> dict[str, ObjectKey]:
        return fqdn_hosts(self._merged().slices.values())

    def _merged(self) -> Manifests:
        merged, errors = merge_files(self._good[p] for p in self._files if p in self._good)
        messages = [str(e) for e in errors]
        if messages != self._duplicate_errors:
            self._duplicate_errors = messages
            for error in errors:
                _log_invalid(error)
        return merged

    async def _scan(self, handler: ConfigHandler, *, force: bool) -> None:
        self._files = self._list_files()
        if await self._reload_changed(self._files, force):
            self._dirty = True
        if not self._dirty:
            return
        self._dirty = False
        merged = self._merged()
        hosts = fqdn_hosts(merged.slices.values())
        await self._dns.resolve(hosts, only_new=not force)
        for key, slice_ in merged.slices.items():
            if slice_.address_type is AddressType.FQDN:
                families = fqdn_families(
                    self._fqdn_families, merged.services.get(slice_.service, ())
                )
                merged.slices[key] = resolve_slice(slice_, self._dns.addresses, families)
        self._deliver(handler, merged)

    def _deliver(self, handler: ConfigHandler, target: Manifests) -> None:
        current = self._delivered
        if current == target:
            return
        # Record progress call by call so a failing handler is retried, not forgotten.
        self._dirty = True
        for key in sorted(current.slices.keys() - target.slices.keys()):
            handler.slice_deleted(key)
            del current.slices[key]
        for key in sorted(current.services.keys() - target.services.keys()):
            handler.service_deleted(key)
            del current.services[key]
        for key, ports in sorted(target.services.items()):
            if current.services.get(key) != ports:
                handler.service_updated(key, ports)
                current.services[key] = ports
        for key, slice_ in sorted(target.slices.items()):
            if current.slices.get(key) != slice_:
                handler.slice_updated(slice_)
                current.slices[key] = slice_
        for name in sorted(current.nodes.keys() - target.nodes.keys()):
            handler.node_deleted(name)
            del current.nodes[name]
        for name, node in sorted(target.nodes.items()):
            if current.nodes.get(name) != node:
                handler.node_updated(node)
                current.nodes[name] = node
        self._dirty = False
        log.info(
            "manifests_loaded",
            files=len([p for p in self._files if p in self._good]),
            services=len(current.services),
            slices=len(current.slices),
        )
