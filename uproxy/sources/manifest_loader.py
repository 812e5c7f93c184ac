"""Manifest files, parsed: Services and EndpointSlices from YAML/JSON, pure and synchronous.

`uproxy check` uses this as is; ManifestSource (uproxy/sources/manifests.py) calls it whenever a
file changes. A file is all or nothing: every error in it is reported, and a file with any error
contributes nothing.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from uproxy.convert import (
    Converted,
    NodeResult,
    ServiceResult,
    SkippedObject,
    SliceResult,
    convert_object,
)
from uproxy.errors import ConversionError, ManifestError
from uproxy.model import EndpointSlice, NodeInfo, ObjectKey, ServicePort

try:
    from yaml import CSafeLoader as _YamlLoader
except ImportError:  # PyYAML built without libyaml
    from yaml import SafeLoader as _YamlLoader  # type: ignore[assignment]

MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")
# What uproxy reads: kind -> apiVersion.
READ_KINDS = {"Service": "v1", "EndpointSlice": "discovery.k8s.io/v1", "Node": "v1"}
_READ_TEXT = "v1 Service, discovery.k8s.io/v1 EndpointSlice, v1 Node (for this node's zone)"
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


@dataclass(frozen=True, slots=True)
class Ignored:
    """Something in the manifests uproxy will not use, and why. `other_kind` marks a well-formed
    object of a kind uproxy does not read (a Deployment beside the Services), as opposed to a
    mistake (a misspelt kind, a wrong apiVersion, a slice of no Service, an empty file)."""

    path: str
    document: int | None
    item: int | None
    object: str | None  # "Servce default/web"
    reason: str
    other_kind: bool = False

    def __str__(self) -> str:
        where = self.path
        if self.document is not None:
            where += f" ({_Location(self.document, self.item)})"
        what = f"{self.object}: " if self.object else ""
        return f"{where}: {what}{self.reason}"


def _object_name(obj: Mapping[str, Any]) -> str:
    meta = obj.get("metadata")
    meta = meta if isinstance(meta, Mapping) else {}
    name = meta.get("name") if isinstance(meta.get("name"), str) else "<no name>"
    namespace = meta.get("namespace")
    return f"{namespace}/{name}" if isinstance(namespace, str) and namespace else str(name)


def _why_unread(api_version: str, kind: str) -> tuple[str, bool]:
    """Why an object of this apiVersion and kind is not read, and whether it is another kind."""
    if kind in READ_KINDS:
        wanted = READ_KINDS[kind]
        return f"apiVersion {api_version} is not read: uproxy reads {kind} {wanted}", False
    # A kind one or two letters from a read one is a typo, not a Deployment beside the Services.
    lowered = {known.lower(): known for known in READ_KINDS}
    close = difflib.get_close_matches(kind.lower(), lowered, n=1, cutoff=0.75)
    if close:
        return f"unknown kind {kind!r} (did you mean {lowered[close[0]]}?)", False
    return f"not a kind uproxy reads ({_READ_TEXT})", True


@dataclass(frozen=True)
class LoadedFile:
    """Everything one manifest file contributes."""

    path: Path
    services: dict[ObjectKey, tuple[ServicePort, ...]] = field(default_factory=dict)
    slices: dict[ObjectKey, EndpointSlice] = field(default_factory=dict)
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    skipped: tuple[SkippedObject, ...] = ()
    ignored: tuple[Ignored, ...] = ()
    # (kind, key) -> (document, List item or None), so duplicate errors can point at both copies.
    origins: dict[tuple[str, ObjectKey], tuple[int, int | None]] = field(default_factory=dict)


@dataclass(frozen=True)
class Manifests:
    """The union of several files: what the source delivers."""

    services: dict[ObjectKey, tuple[ServicePort, ...]] = field(default_factory=dict)
    slices: dict[ObjectKey, EndpointSlice] = field(default_factory=dict)
    nodes: dict[str, NodeInfo] = field(default_factory=dict)


# --- parsing ----------------------------------------------------------------------------------

# Bounds on what one file may hold, so no input can exhaust memory, time or the stack.
MAX_FILE_BYTES = 10 * 1024 * 1024
MAX_DEPTH = 64  # mappings and lists nested in one another
# YAML nodes in one file, an alias counted each time it is used (a "billion laughs" bomb
# expands to far more).
MAX_NODES = 1_000_000


def _bounded_int(value: int | str) -> int:
    """An integer that fits 64 bits (no Kubernetes field holds more); ValueError otherwise."""
    if isinstance(value, str):
        value = int(value)
    if value.bit_length() > 64:
        raise ValueError("integer too large (Kubernetes integers fit in 64 bits)")
    return value


def _first_clause(error: Exception) -> str:
    # Python's int-limit message goes on to suggest sys.set_int_max_str_digits(): not for users.
    return str(error).split(";", 1)[0]


class _BoundsError(Exception):
    """A document over a bound, found while walking it."""


class _StrictYamlLoader(_YamlLoader):
    """The safe loader, but a scalar its tag cannot construct (`!!bool maybe`, `2001-13-01`,
    an integer of 4,300+ digits) is a marked YAML error rather than a bare ValueError."""

    def construct_object(self, node: yaml.Node, deep: bool = False) -> object:
        try:
            value = super().construct_object(node, deep)
            return _bounded_int(value) if type(value) is int else value
        except (ValueError, KeyError, TypeError, OverflowError) as e:
            value = node.value if isinstance(node.value, str) else ""
            shown = value if len(value) <= 40 else value[:37] + "..."
            reason = _first_clause(e) if not isinstance(e, KeyError) else "not a valid value"
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.tag} {shown!r}: {reason}", node.start_mark
            ) from None


def _check_yaml_node(root: yaml.Node) -> None:
    """Depth and node-count bounds, walked without recursion (aliases are shared nodes)."""
    stack: list[tuple[yaml.Node, int]] = [(root, 1)]
    visited = 0
    while stack:
        node, depth = stack.pop()
        visited += 1
        if visited > MAX_NODES:
            raise _BoundsError(
                f"more than {MAX_NODES:,} YAML nodes once aliases are expanded (an alias bomb?)"
            )
        if isinstance(node, yaml.MappingNode):
            children = [n for pair in node.value for n in pair]
        elif isinstance(node, yaml.SequenceNode):
            children = list(node.value)
        else:
            continue
        if depth > MAX_DEPTH:
            line = node.start_mark.line + 1
            raise _BoundsError(f"nested deeper than {MAX_DEPTH} levels (at line {line})")
        stack.extend((child, depth + 1) for child in children)


def _check_json_depth(root: object) -> None:
    stack: list[tuple[object, int]] = [(root, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children: list[object] = list(value.values())
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth > MAX_DEPTH:
            raise _BoundsError(f"nested deeper than {MAX_DEPTH} levels")
        stack.extend((child, depth + 1) for child in children)


def _parse_json(path: Path, text: str) -> list[object]:
    try:
        document = json.loads(text, parse_int=_bounded_int)
    except json.JSONDecodeError as e:
        raise ManifestError(
            str(path), None, f"invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}"
        ) from None
    except RecursionError:
        raise ManifestError(
            str(path), None, f"invalid JSON: nested deeper than {MAX_DEPTH} levels"
        ) from None
    except ValueError as e:  # e.g. an integer of more than 4,300 digits
        raise ManifestError(str(path), None, f"invalid JSON: {_first_clause(e)}") from None
    try:
        _check_json_depth(document)
    except _BoundsError as e:
        raise ManifestError(str(path), None, f"invalid JSON: {e}") from None
    return [document]


def _parse_yaml(path: Path, text: str) -> list[object]:
    loader = _StrictYamlLoader(text)
    documents: list[object] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            if node is None:
                continue
            _check_yaml_node(node)
            documents.append(loader.construct_document(node))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = e.problem or e.context or "syntax error"
        raise ManifestError(str(path), None, f"invalid YAML{where}: {problem}") from None
    except yaml.YAMLError as e:
        raise ManifestError(str(path), None, f"invalid YAML: {e}") from None
    except _BoundsError as e:
        raise ManifestError(str(path), None, f"invalid YAML: {e}") from None
    except RecursionError:
        message = f"invalid YAML: nested deeper than {MAX_DEPTH} levels"
        raise ManifestError(str(path), None, message) from None
    finally:
        loader.dispose()
    return documents


def _looks_utf16(head: bytes) -> bool:
    # ASCII text as UTF-16 without a byte-order mark: every other byte NUL, and only those.
    even, odd = head[0::2], head[1::2]
    if len(head) < 4:
        return False
    return (odd.count(0) == len(odd) and 0 not in even) or (
        even.count(0) == len(even) and 0 not in odd
    )


def _decode(path: Path, data: bytes) -> str:
    if data.startswith((b"\xff\xfe", b"\xfe\xff")) or _looks_utf16(data[:64]):
        raise ManifestError(str(path), None, "UTF-16 text is not read: save the file as UTF-8")
    if b"\0" in data:
        raise ManifestError(str(path), None, "a binary file (it holds NUL bytes), not YAML or JSON")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        message = f"not UTF-8 text (byte {e.start + 1}: {e.reason}); save the file as UTF-8"
        raise ManifestError(str(path), None, message) from None


def _read_documents(path: Path) -> list[object]:
    try:
        with path.open("rb") as file:
            data = file.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise ManifestError(str(path), None, "no such file") from None
    except OSError as e:
        raise ManifestError(str(path), None, f"cannot read: {e.strerror or e}") from None
    if len(data) > MAX_FILE_BYTES:
        limit = MAX_FILE_BYTES // (1024 * 1024)
        raise ManifestError(str(path), None, f"larger than {limit} MiB, the most uproxy reads")
    text = _decode(path, data)
    if not text.strip():
        return []
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
        self.nodes: dict[str, NodeInfo] = {}
        self.skipped: list[SkippedObject] = []
        self.ignored: list[Ignored] = []
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
        except (ValueError, TypeError, OverflowError, RecursionError) as e:
            # A value of a type no reader expected (a date, a huge float): still an answer.
            name = f"{kind[1]} {_object_name(obj)}"
            self._error(where, f"{name}: cannot be read: {type(e).__name__}: {e}")
            return
        if result is None:
            reason, other = _why_unread(*kind)
            self._ignore(where, f"{kind[1]} {_object_name(obj)}", reason, other_kind=other)
        elif isinstance(result, SkippedObject) and result.kind == "EndpointSlice":
            # A slice is skipped only for want of the label: no Service would ever use it.
            self._ignore(
                where,
                f"EndpointSlice {result.key}",
                f"{result.reason}, so it belongs to no Service",
                other_kind=False,
            )
        else:
            self._record(where, result)

    def _ignore(self, where: _Location, name: str, reason: str, *, other_kind: bool) -> None:
        self.ignored.append(
            Ignored(str(self.path), where.document, where.item, name, reason, other_kind)
        )

    def note_empty(self) -> None:
        self.ignored.append(
            Ignored(str(self.path), None, None, None, "empty file: no Kubernetes objects in it")
        )

    def _record(self, where: _Location, result: Converted) -> None:
        kind = "Service" if isinstance(result, ServiceResult) else "EndpointSlice"
        if isinstance(result, SkippedObject):
            kind = result.kind
        elif isinstance(result, NodeResult):
            kind = "Node"
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
        elif isinstance(result, NodeResult):
            self.nodes[result.node.name] = result.node
        else:
            self.skipped.append(result)

    def _error(self, where: _Location, message: str) -> None:
        self.errors.append(where.error(str(self.path), message))

    def build(self) -> LoadedFile:
        return LoadedFile(
            path=self.path,
            services=self.services,
            slices=self.slices,
            nodes=self.nodes,
            skipped=tuple(self.skipped),
            ignored=tuple(self.ignored),
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
    if all(doc is None for doc in documents):
        builder.note_empty()
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
        for name, node in loaded.nodes.items():
            if ("Node", ObjectKey("", name)) not in duplicates:
                merged.nodes[name] = node
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


NO_MANIFEST_FILES = (
    f"no manifest files ({', '.join('*' + s for s in MANIFEST_SUFFIXES)}) in this directory"
)
NOTHING_USABLE = "holds no Service or EndpointSlice that uproxy can use"


@dataclass(frozen=True)
class LoadReport:
    """Everything `paths` hold: the good files, every error, everything ignored, and the given
    paths that hold nothing uproxy can use (each also one of `errors`)."""

    files: dict[Path, LoadedFile]
    errors: list[ManifestError]
    ignored: list[Ignored]
    unusable: dict[Path, ManifestError]


def load_report(paths: Sequence[Path]) -> LoadReport:
    """Load every file under `paths`, and judge each given path on its own: one that does not
    exist, or holds no Service or EndpointSlice at all, is a mistake (a typo, the wrong folder)."""
    listed: dict[Path, list[Path]] = {}
    errors: list[ManifestError] = []
    unusable: dict[Path, ManifestError] = {}
    every_file: dict[Path, None] = {}
    for path in paths:
        found, path_errors = expand_paths([path])
        if path_errors:
            errors.extend(path_errors)
            unusable[path] = path_errors[0]
            continue
        listed[path] = found
        every_file.update(dict.fromkeys(found))
    loaded: dict[Path, LoadedFile] = {}
    ignored: list[Ignored] = []
    for file in every_file:
        result, file_errors = load_file_collecting(file)
        errors.extend(file_errors)
        ignored.extend(result.ignored)
        if not file_errors:
            loaded[file] = result
    errors.extend(merge_files(loaded.values())[1])
    for path, found in listed.items():
        if path in unusable:
            continue
        if not found:
            reason = NO_MANIFEST_FILES
        elif not any(loaded[f].origins for f in found if f in loaded):
            reason = NOTHING_USABLE
        else:
            continue
        unusable[path] = ManifestError(str(path), None, reason)
        errors.append(unusable[path])
    return LoadReport(loaded, errors, ignored, unusable)
