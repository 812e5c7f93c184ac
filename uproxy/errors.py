"""The project's exception types. The CLI maps them to exit codes; the core never exits."""

from __future__ import annotations


class UproxyError(Exception):
    """Base of every error uproxy raises on purpose."""


class ConversionError(UproxyError):
    """A Kubernetes object that cannot be turned into the service model.

    `field` is a dotted path inside the object (for example `spec.ports[1].protocol`).
    """

    def __init__(self, kind: str, name: str, field: str, message: str) -> None:
        self.kind = kind
        self.name = name
        self.field = field
        self.message = message
        super().__init__(f"{kind} {name}: {field}: {message}")


class ManifestError(UproxyError):
    """A manifest file that cannot be used, located by file and document (1-based)."""

    def __init__(self, path: str, document: int | None, message: str) -> None:
        self.path = path
        self.document = document
        self.message = message
        where = f"{path}" if document is None else f"{path} (document {document})"
        super().__init__(f"{where}: {message}")


class SettingsError(UproxyError):
    """Flags that do not make a valid configuration."""


class KernelError(UproxyError):
    """The kernel refused or lacks something uproxy needs."""
