"""The contract between sources and the change trackers."""

from __future__ import annotations

from typing import Protocol

from uproxy.model import EndpointSlice, NodeInfo, ObjectKey, ServicePort


class ConfigHandler(Protocol):
    """Receives converted objects from a source. Calls are cheap and never raise."""

    def service_updated(self, key: ObjectKey, ports: tuple[ServicePort, ...]) -> None:
        """The Service `key` now has exactly these ports (an add or an update)."""

    def service_deleted(self, key: ObjectKey) -> None:
        """The Service `key` is gone (a no-op when it was never known)."""

    def slice_updated(self, endpoint_slice: EndpointSlice) -> None:
        """The EndpointSlice `endpoint_slice.key` now looks like this (an add or an update)."""

    def slice_deleted(self, key: ObjectKey) -> None:
        """The EndpointSlice `key` is gone (a no-op when it was never known)."""

    def node_updated(self, node: NodeInfo) -> None:
        """The Node `node.name` now looks like this (an add or an update)."""

    def node_deleted(self, name: str) -> None:
        """The Node `name` is gone (a no-op when it was never known)."""

    def source_synced(self, source: str) -> None:
        """`source` has delivered its complete initial state; called once per source."""


class Source(Protocol):
    """A long-running producer of handler calls."""

    name: str

    async def run(self, handler: ConfigHandler) -> None:
        """Deliver the initial state, call `source_synced`, then follow changes until cancelled.

        Never raises for bad input: it logs the error and keeps the last good state.
        """

    def refresh(self) -> None:
        """Re-read the source now (SIGHUP); a no-op for sources that are already live."""
