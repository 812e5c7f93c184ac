"""Manifest files, parsed: Services and EndpointSlices from YAML/JSON, pure and synchronous.

`uproxy check` uses this as is; ManifestSource (uproxy/sources/manifests.py) calls it whenever a
file changes. A file is all or nothing: every error in it is reported, and a file with any error
contributes nothing.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uproxy.convert import (
    ServiceResult,
    SkippedObject,
    SliceResult,
    convert_object,
)
from uproxy.errors import ConversionError, ManifestError
from uproxy.model import EndpointSlice, ObjectKey, ServicePort

try:
    from yaml import CSafeLoader as _YamlLoader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader as _YamlLoader  # type: ignore[assignment]

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
# Lists from the raw API (`kubectl get --raw`) leave kind/apiVersion off their items.
_LIST_ITEM_DEFAULTS = {
    ("v1", "ServiceList"): ("v1", "Service"),
    ("discovery.k8s.io/v1", "EndpointSliceList"): ("discovery.k8s.io/v1", "EndpointSlice"),
}


class ManifestItemError(ManifestError):
    """A ManifestError about one item of a `kind: List` document."""

    def __init__(self, path: str, document: int, item: int, message: str) -> None:
        super().__init__(path, document, message)
        self.item = item
        self.args = (f"{path} (document {document}, item {item}): {message}",)


@dataclass(frozen=True, slots=True)
class _Location:
    document: int
    item: int | None = None

    def __str__(self) -> str:
        base = f"document {self.document}"
        return base if self.item is None else f"{base}, item {self.item}"

    def error(self, path: str, message: str) -> ManifestError:
        if self.item is None:
            return ManifestError(path, self.document, message)
        return ManifestItemError(path, self.document, self.item, message)


@dataclass(frozen=True)
class LoadedFile:
    """Everything one manifest file contributes."""

    path: Path
    services: dict[ObjectKey, tuple[ServicePort, ...]] = field(default_factory=dict)
    slices: dict[ObjectKey, EndpointSlice] = field(default_factory=dict)
    skipped: tuple[SkippedObject, ...] = ()
    ignored_kinds: tuple[str, ...] = ()
    # (kind, key) -> (document, List item or None), so duplicate errors can point at both copies.
    origins: dict[tuple[str, ObjectKey], tuple[int, int | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifests:
    """The union of several files: what the source delivers."""

    services: dict[ObjectKey, tuple[ServicePort, ...]] = field(default_factory=dict)
    slices: dict[ObjectKey, EndpointSlice] = field(default_factory=dict)


# --- parsing ----------------------------------------------------------------------------------


def _parse_json(path: Path, text: str) -> list[object]:
    try:
        return [json.loads(text)]
    except json.JSONDecodeError as e:
        raise ManifestError(
            str(path), None, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None


def _parse_yaml(path: Path, text: str) -> list[object]:
    try:
        return list(yaml.load_all(text, Loader=_YamlLoader))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = e.problem or e.context or "syntax error"
        raise ManifestError(str(path), None, f"invalid YAML{where}: {problem}") from None
    except yaml.YAMLError as e:
        raise ManifestError(str(path), None, f"invalid YAML: {e}") from None


def _read_documents(path: Path) -> list[object]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise ManifestError(str(path), None, "no such file") from None
    except OSError as e:
        raise ManifestError(str(path), None, f"cannot read: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ManifestError(str(path), None, f"not UTF-8 text: {e.reason}") from None
    if path.suffix == ".json":
        return _parse_json(path, text)
    return _parse_yaml(path, text)


def _kind_of(obj: Mapping[str, Any]) -> tuple[str, str] | str:
    """(apiVersion, kind), or a message saying what is missing."""
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    if not isinstance(kind, str) or not kind:
        return "not a Kubernetes object: missing kind"
    if not isinstance(api_version, str) or not api_version:
        return f"{kind}: missing apiVersion"
    return (api_version, kind)


class _FileBuilder:
    """Accumulates one file's objects and every error found in it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.services: dict[ObjectKey, tuple[ServicePort, ...]] = {}
        self.slices: dict[ObjectKey, EndpointSlice] = {}
        self.skipped: list[SkippedObject] = []
        self.ignored: dict[str, None] = {}
        self.origins: dict[tuple[str, ObjectKey], tuple[int, int | None]] = {}
        self.errors: list[ManifestError] = []

    def add_document(self, number: int, doc: object) -> None:
        if doc is None:  # empty documents, e.g. a trailing `---`
            return
        kind = _kind_of(doc) if isinstance(doc, Mapping) else None
        if isinstance(doc, Mapping) and isinstance(kind, tuple) and kind[1].endswith("List"):
            self._add_list(number, doc, kind)
        else:
            self.add(_Location(number), doc)

    def _add_list(self, number: int, doc: Mapping[str, Any], kind: tuple[str, str]) -> None:
        items = doc.get("items")
        if not isinstance(items, list):
            self._error(_Location(number), f"{kind[1]}: items must be a list")
            return
        defaults = _LIST_ITEM_DEFAULTS.get(kind)
        for i, item in enumerate(items, start=1):
            if defaults is not None and isinstance(item, Mapping):
                item = {"apiVersion": defaults[0], "kind": defaults[1], **item}
            self.add(_Location(number, i), item)

    def add(self, where: _Location, obj: object) -> None:
        if not isinstance(obj, Mapping):
            self._error(
                where, f"expected a Kubernetes object (a mapping), got {type(obj).__name__}"
            )
            return
        kind = _kind_of(obj)
        if isinstance(kind, str):
            self._error(where, kind)
            return
        if kind[1].endswith("List") and where.item is not None:
            self._error(where, f"{kind[1]} inside a List is not supported")
            return
        try:
            result = convert_object(obj)
        except ConversionError as e:
            self._error(where, str(e))
            return
        if result is None:
            self.ignored.setdefault(f"{kind[0]}/{kind[1]}", None)
        else:
            self._record(where, result)

    def _record(
        self, where: _Location, result: ServiceResult | SliceResult | SkippedObject
    ) -> None:
        kind = "Service" if isinstance(result, ServiceResult) else "EndpointSlice"
        if isinstance(result, SkippedObject):
            kind = result.kind
        origin = (kind, result.key)
        if origin in self.origins:
            first = _Location(*self.origins[origin])
            self._error(where, f"{kind} {result.key} is defined twice (also {first})")
            return
        self.origins[origin] = (where.document, where.item)
        if isinstance(result, ServiceResult):
            self.services[result.key] = result.ports
        elif isinstance(result, SliceResult):
            self.slices[result.key] = result.endpoint_slice
        else:
            self.skipped.append(result)

    def _error(self, where: _Location, message: str) -> None:
        self.errors.append(where.error(str(self.path), message))

    def build(self) -> LoadedFile:
        return LoadedFile(
            path=self.path,
            services=self.services,
            slices=self.slices,
            skipped=tuple(self.skipped),
            ignored_kinds=tuple(self.ignored),
            origins=self.origins,
        )


def load_file_collecting(path: Path) -> tuple[LoadedFile, list[ManifestError]]:
    """Load one file, returning every error in it; the file is usable only when there are none."""
    builder = _FileBuilder(path)
    try:
        documents = _read_documents(path)
    except ManifestError as e:
        return builder.build(), [e]
    for number, doc in enumerate(documents, start=1):
        builder.add_document(number, doc)
    return builder.build(), builder.errors


def load_file(path: Path) -> LoadedFile:
    """Load one manifest file; raises the first ManifestError in it."""
    loaded, errors = load_file_collecting(path)
    if errors:
        raise errors[0]
    return loaded


def is_manifest_name(name: str) -> bool:
    """Whether a directory entry is a manifest (editor droppings and hidden files are not)."""
    if name.startswith((".", "#")) or name.endswith("~"):
        return False
    return name.endswith(MANIFEST_SUFFIXES)


def list_directory(directory: Path) -> list[Path]:
    """The manifest files directly in `directory`, sorted by name (symlinks followed)."""
    with os.scandir(directory) as entries:
        names = [e.name for e in entries if is_manifest_name(e.name) and e.is_file()]
    return [directory / name for name in sorted(names)]


def expand_paths(paths: Sequence[Path]) -> tuple[list[Path], list[ManifestError]]:
    """The files `paths` stand for, in order and without repeats, and errors for bad paths."""
    files: dict[Path, None] = {}
    errors: list[ManifestError] = []
    for path in paths:
        try:
            found = list_directory(path) if path.is_dir() else [path] if path.is_file() else None
        except OSError as e:
            errors.append(ManifestError(str(path), None, f"cannot list: {e.strerror or e}"))
            continue
        if found is None:
            errors.append(ManifestError(str(path), None, "no such file or directory"))
            continue
        for file in found:
            files.setdefault(file, None)
    return list(files), errors


def merge_files(files: Iterable[LoadedFile]) -> tuple[Manifests, list[ManifestError]]:
    """The union of several files; an object defined in two files keeps the first definition."""
    merged = Manifests()
    seen: dict[tuple[str, ObjectKey], str] = {}
    errors: list[ManifestError] = []
    for loaded in files:
        duplicates: set[tuple[str, ObjectKey]] = set()
        for origin, location in loaded.origins.items():
            where = _Location(*location)
            if origin in seen:
                duplicates.add(origin)
                message = f"{origin[0]} {origin[1]} is already defined in {seen[origin]}"
                errors.append(where.error(str(loaded.path), message))
            else:
                seen[origin] = f"{loaded.path} ({where})"
        for key, ports in loaded.services.items():
            if ("Service", key) not in duplicates:
                merged.services[key] = ports
        for key, slice_ in loaded.slices.items():
            if ("EndpointSlice", key) not in duplicates:
                merged.slices[key] = slice_
    return merged, errors


def load_paths(paths: Sequence[Path]) -> tuple[dict[Path, LoadedFile], list[ManifestError]]:
    """Load every file under `paths`; returns the good files and every error found anywhere."""
    files, errors = expand_paths(paths)
    loaded: dict[Path, LoadedFile] = {}
    for path in files:
        result, file_errors = load_file_collecting(path)
        errors.extend(file_errors)
        if not file_errors:
            loaded[path] = result
    errors.extend(merge_files(loaded.values())[1])
    return loaded, errors
