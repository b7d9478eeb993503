"""What the labeler asks of the Kubernetes API: the :class:`NodeApi` protocol and its types.

The labeler (:mod:`.nodelabels`) speaks only to this protocol; :mod:`.client` implements
it with lightkube, and the tests with a stand-in API server. Standard library only.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

__all__ = ["FIELD_MANAGER", "KubeError", "NodeApi", "NodeEvent"]

FIELD_MANAGER = "preloader"


@dataclass(frozen=True)
class NodeEvent:
    """A core/v1 Event about the node: ``type`` ``Normal`` or ``Warning``."""

    reason: str
    message: str
    type: str = "Normal"


class KubeError(Exception):
    """A request to the API server failed: refused, not found, or not reached.

    :ivar operation: ``get``, ``patch`` or ``event``.
    """

    def __init__(self, operation: str, message: str) -> None:
        super().__init__(message)
        self.operation = operation


class NodeApi(Protocol):
    """The three calls the labeler makes; :func:`connect` gives the lightkube one."""

    async def get_node(self) -> tuple[str, dict[str, str]]:
        """The node's ``metadata.uid`` and ``metadata.labels``."""
        ...

    async def patch_labels(self, changes: Mapping[str, str | None]) -> dict[str, str]:
        """Merge-patch the node's labels (``None`` removes one); the labels after it."""
        ...

    async def post_event(self, event: NodeEvent, node_uid: str) -> None:
        """Create an Event about the node."""
        ...

    async def aclose(self) -> None: ...
