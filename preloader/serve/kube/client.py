"""The lightkube side of :mod:`preloader.serve.kube.nodelabels` (the ``k8s`` extra).

Imported only when ``--node-label`` is on: importing this module imports lightkube.
Labels change by a JSON merge patch of the Node (``application/merge-patch+json``: maps
merge key by key and ``null`` removes a key, so other labels are left alone); Events are
created with ``POST /api/v1/namespaces/default/events``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from datetime import datetime, timezone

import httpx2
import yaml
from lightkube import ApiError, AsyncClient, ConfigError, KubeConfig
from lightkube.models.core_v1 import EventSource, ObjectReference
from lightkube.models.meta_v1 import ObjectMeta
from lightkube.resources.core_v1 import Event, Node
from lightkube.types import PatchType

from .api import FIELD_MANAGER, KubeError, NodeEvent

__all__ = ["LightkubeNodeApi", "load_config"]


def load_config(kubeconfig: str | None, service_account: str) -> KubeConfig:
    """The kubeconfig file when given, else the in-cluster service account.

    :param kubeconfig: a kubeconfig file, or ``None`` for the in-cluster service account.
    :param service_account: where the in-cluster token, CA and namespace are mounted.
    :return: the configuration, its current context already resolved once.
    :raises ValueError: one line naming the file (or the missing in-cluster config) and
        what is wrong: missing, not YAML, not a kubeconfig mapping, or a context that
        names a cluster or user the file does not define.
    """
    if kubeconfig:
        return _loaded(lambda: _from_file(kubeconfig), kubeconfig)
    token = os.path.join(service_account, "token")
    if not os.path.exists(token):
        raise ValueError(
            f"no in-cluster config ({token}: no such file; is automountServiceAccountToken "
            "off?) and no --kubeconfig/KUBECONFIG"
        )
    return _loaded(lambda: KubeConfig.from_service_account(service_account), "no in-cluster config")


def _from_file(path: str) -> KubeConfig:
    """The kubeconfig at ``path``, checked as the client will use it (``config.get()``).

    lightkube reads the YAML into dicts without checking their shape, so a malformed file
    fails later with whatever Python error the shape causes; this turns each into one line.

    :raises ConfigError: the file is missing, or is not a usable kubeconfig.
    """
    try:
        config = KubeConfig.from_file(path)
    except yaml.YAMLError as err:
        raise ConfigError("not YAML: " + " ".join(str(err).split())) from None
    except (AttributeError, TypeError, KeyError, ValueError) as err:
        raise ConfigError(
            "not a kubeconfig (a mapping with clusters, contexts and users lists): "
            f"{type(err).__name__}: {err}"
        ) from None
    try:
        config.get()
    except KeyError as err:
        raise ConfigError(
            f"the current context names {err.args[0]!r}, which is not among the file's "
            "clusters or users"
        ) from None
    except (AttributeError, TypeError, ValueError) as err:
        raise ConfigError(f"not a usable kubeconfig: {type(err).__name__}: {err}") from None
    return config


def _loaded(load: Callable[[], KubeConfig], what: str) -> KubeConfig:
    """``load()``; its failure as one :class:`ValueError` line that starts with ``what``."""
    try:
        return load()
    except ConfigError as err:
        raise ValueError(f"{what}: {err}") from None
    except KeyError as err:  # the service account's KUBERNETES_SERVICE_* is not set
        raise ValueError(f"{what}: {err.args[0]} is not set") from None
    except OSError as err:
        raise ValueError(f"{what}: {err.strerror}") from None


class LightkubeNodeApi:
    """:class:`~preloader.serve.kube.nodelabels.NodeApi` over a lightkube :class:`AsyncClient`."""

    def __init__(self, config: KubeConfig, node: str, namespace: str, timeout: float) -> None:
        self._client = AsyncClient(
            config,
            timeout=httpx2.Timeout(timeout),
            field_manager=FIELD_MANAGER,
            trust_env=False,
        )
        self._node = node
        self._namespace = namespace

    async def get_node(self) -> tuple[str, dict[str, str]]:
        try:
            node = await self._client.get(Node, self._node)
        except (ApiError, httpx2.HTTPError) as err:
            raise KubeError("get", _message(err, f"get node {self._node}")) from err
        meta = node.metadata
        return (meta.uid if meta else None) or "", dict((meta.labels if meta else None) or {})

    async def patch_labels(self, changes: Mapping[str, str | None]) -> dict[str, str]:
        body = {"metadata": {"labels": dict(changes)}}
        try:
            node = await self._client.patch(Node, self._node, body, patch_type=PatchType.MERGE)
        except (ApiError, httpx2.HTTPError) as err:
            raise KubeError("patch", _message(err, f"patch node {self._node}")) from err
        meta = node.metadata
        return dict((meta.labels if meta else None) or {})

    async def post_event(self, event: NodeEvent, node_uid: str) -> None:
        now = datetime.now(timezone.utc).replace(microsecond=0)
        obj = Event(
            metadata=ObjectMeta(generateName=f"{self._node}.preloader.", namespace=self._namespace),
            involvedObject=ObjectReference(
                apiVersion="v1", kind="Node", name=self._node, uid=node_uid
            ),
            reason=event.reason,
            message=event.message,
            type=event.type,
            source=EventSource(component=FIELD_MANAGER, host=self._node),
            reportingComponent=FIELD_MANAGER,
            reportingInstance=self._node,
            firstTimestamp=now,
            lastTimestamp=now,
            count=1,
        )
        try:
            await self._client.create(obj)
        except (ApiError, httpx2.HTTPError) as err:
            raise KubeError("event", _message(err, f"create event {event.reason}")) from err

    async def aclose(self) -> None:
        await self._client.close()


def _message(err: Exception, what: str) -> str:
    if isinstance(err, ApiError):
        status = err.status
        code = status.code if status is not None else None
        text = status.message if status is not None else str(err)
        return f"{what}: {code} {status.reason if status else ''}: {text}".replace("  ", " ")
    return f"{what}: {type(err).__name__}: {err}"
