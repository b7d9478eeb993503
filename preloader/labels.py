"""Node label names and the ``--node-label`` settings: pure, and a shared leaf.

``serve --node-label`` sets ``preloader.dev/<name>=warm`` on the Node per served path
(:mod:`preloader.serve.kube.nodelabels`); this module makes ``<name>`` from a model name
and checks the settings before anything connects. It imports nothing of the package but
:mod:`.errors`, so :mod:`.settings` can hold a :class:`NodeLabelConfig`.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass

from .errors import UsageError

__all__ = [
    "LABEL_PREFIX",
    "LABEL_VALUE",
    "SERVICE_ACCOUNT",
    "NodeLabelConfig",
    "label_key",
    "label_name",
    "parse_model_names",
]

LABEL_PREFIX = "preloader.dev/"
"""Every label this module sets starts with this; at start it removes stale ones."""
LABEL_VALUE = "warm"
"""The value of a label that says the path is warm on the node."""
_NAME_MAX = 63
_HASH_CHARS = 10
_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


_NOT_NAME = re.compile(r"[^-A-Za-z0-9_.]+")


# A Node's name is a DNS-1123 subdomain: lower-case dot-separated labels of letters,
# digits and '-', each starting and ending with a letter or digit, 253 characters at most.
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
SERVICE_ACCOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
"""Where the kubelet mounts a pod's service-account token, CA and namespace."""


def label_name(model: str) -> str:
    """The label name segment for ``model`` (at most 63 characters, a valid name).

    Runs of characters a label name cannot hold (``/``, spaces, ...) become one ``-``,
    and leading or trailing ``-_.`` are dropped. A result longer than 63 characters is
    cut to 52 and ends in ``-`` plus the first 10 hex digits of the SHA-256 of ``model``
    as given, so two long names that share a beginning still get two labels.

    :raises UsageError: when nothing of ``model`` is left (``"///"``).
    """
    name = _NOT_NAME.sub("-", model).strip("-_.")
    if not name:
        raise UsageError(f"model name {model!r}: has no letter or digit to make a label from")
    if len(name) > _NAME_MAX:
        digest = hashlib.sha256(model.encode()).hexdigest()[:_HASH_CHARS]
        name = name[: _NAME_MAX - _HASH_CHARS - 1].rstrip("-_.") + "-" + digest
    assert _NAME.match(name), name
    return name


def label_key(model: str) -> str:
    """``preloader.dev/`` + :func:`label_name`."""
    return LABEL_PREFIX + label_name(model)


def parse_model_names(items: Sequence[str]) -> dict[str, str]:
    """``["/models/Qwen3-32B=qwen3-32b"]`` -> ``{"/models/Qwen3-32B": "qwen3-32b"}``.

    :raises UsageError: for an item without ``=`` or with an empty side.
    """
    names: dict[str, str] = {}
    for item in items:
        path, sep, name = item.rpartition("=")
        if not sep or not path or not name:
            raise UsageError(f"model name {item!r}: expected PATH=NAME")
        names[os.path.normpath(path)] = name
    return names


@dataclass(frozen=True)
class NodeLabelConfig:
    """What the labeler needs; built and checked by :meth:`resolve`.

    :ivar node_name: the Node to label (``NODE_NAME`` from the downward API).
    :ivar keys: ``(served path, label key)`` for every served path.
    :ivar grace_seconds: how long a path may stay ``degraded`` before its label goes.
    :ivar resync_seconds: how often the node is read again to put right labels changed
        by someone else.
    :ivar kubeconfig: a kubeconfig file to use instead of the in-cluster service account.
    :ivar service_account: where the in-cluster token, CA and namespace are mounted.
    """

    node_name: str
    keys: tuple[tuple[str, str], ...]
    grace_seconds: float = 60.0
    kubeconfig: str | None = None
    service_account: str = SERVICE_ACCOUNT
    resync_seconds: float = 60.0

    @classmethod
    def resolve(
        cls,
        node_name: str | None,
        paths: Sequence[str],
        model_names: Sequence[str] = (),
        grace_seconds: float = 60.0,
        kubeconfig: str | None = None,
        resync_seconds: float = 60.0,
    ) -> NodeLabelConfig:
        """Check the settings and derive one label key per path.

        :raises UsageError: no node name or one that is not a DNS-1123 subdomain, a bad
            ``PATH=NAME``, a name for a path that is not served, or two paths that would
            share a label.
        """
        if not node_name:
            raise UsageError(
                "--node-label needs the node's name: --node-name or NODE_NAME (from the "
                "downward API: fieldRef spec.nodeName)"
            )
        if len(node_name) > 253 or not _NODE_NAME.match(node_name):
            raise UsageError(
                f"--node-name/NODE_NAME {node_name!r}: not a node name (a DNS-1123 "
                "subdomain: lower-case letters, digits, '-' and '.', at most 253 characters)"
            )
        names = parse_model_names(model_names)
        served = {os.path.normpath(p) for p in paths}
        for path in names:
            if path not in served:
                raise UsageError(f"model name for {path}: not a served path")
        keys: dict[str, str] = {}
        for path in paths:
            normal = os.path.normpath(path)
            key = label_key(names.get(normal) or os.path.basename(normal))
            if key in keys:
                raise UsageError(
                    f"{path} and {keys[key]}: both would be labelled {key}; "
                    "give one of them --model-name PATH=NAME"
                )
            keys[key] = path
        return cls(
            node_name,
            tuple((p, k) for k, p in keys.items()),
            grace_seconds,
            kubeconfig,
            resync_seconds=resync_seconds,
        )
