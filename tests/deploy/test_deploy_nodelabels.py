"""deploy/ for node labels: the DaemonSet's RBAC, its settings and the affinity that uses them.

The admission policies of ``deploy/node-warmup-policy`` are evaluated as CEL (cel-python)
on the requests the API server would judge: the agent's own PATCH and Event, as lightkube
sends them to the stand-in API server, and the changes a compromised pod could try. Schema
validation of these folders is in test_deploy_manifests.py with the others.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import anyio
import celpy
import pytest
import yaml
from celpy import celtypes

from preloader.labels import LABEL_PREFIX, LABEL_VALUE, NodeLabelConfig
from preloader.serve.kube import nodelabels
from preloader.serve.kube.api import FIELD_MANAGER, NodeEvent
from preloader.serve.kube.nodelabels import STOP_SECONDS

from ..lib import manifests as dm
from ..lib.kubeapi import KubeApi, merge_patch


def _kind(resources: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [r for r in resources if r["kind"] == kind]


def _daemonset() -> tuple[list[dict[str, Any]], dict[str, Any]]:
    resources = dm.render("node-warmup")
    [daemonset] = _kind(resources, "DaemonSet")
    return resources, daemonset


def _preloader(daemonset: dict[str, Any]) -> dict[str, Any]:
    [container] = list(dm.containers(daemonset["spec"]["template"]["spec"]))
    return container


def test_the_daemonset_runs_as_its_service_account_with_the_node_name() -> None:
    resources, daemonset = _daemonset()
    spec = daemonset["spec"]["template"]["spec"]
    [account] = _kind(resources, "ServiceAccount")
    assert spec["serviceAccountName"] == account["metadata"]["name"]
    assert spec.get("automountServiceAccountToken", True) is True
    env = {e["name"]: e for e in _preloader(daemonset)["env"]}
    assert env["NODE_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "spec.nodeName"}}
    assert env["PRELOADER_NODE_LABEL"]["value"] == "true"
    # Time to take the labels off after SIGTERM: the agent's stop plus the bounded removal.
    assert spec["terminationGracePeriodSeconds"] > STOP_SECONDS + 1


def test_rbac_is_get_and_patch_nodes_and_create_events_in_default_only() -> None:
    resources, daemonset = _daemonset()
    account = daemonset["spec"]["template"]["spec"]["serviceAccountName"]
    [cluster_role] = _kind(resources, "ClusterRole")
    [role] = _kind(resources, "Role")
    assert cluster_role["rules"] == [
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}
    ]
    assert role["metadata"]["namespace"] == "default"  # where Events about a Node go
    assert role["rules"] == [{"apiGroups": [""], "resources": ["events"], "verbs": ["create"]}]
    bindings = _kind(resources, "ClusterRoleBinding") + _kind(resources, "RoleBinding")
    assert {(b["roleRef"]["kind"], b["roleRef"]["name"]) for b in bindings} == {
        ("ClusterRole", cluster_role["metadata"]["name"]),
        ("Role", role["metadata"]["name"]),
    }
    for binding in bindings:
        assert [(s["kind"], s["name"]) for s in binding["subjects"]] == [
            ("ServiceAccount", account)
        ]


def test_the_affinity_prefers_the_label_the_daemonset_sets() -> None:
    resources, daemonset = _daemonset()
    [config_map] = _kind(resources, "ConfigMap")
    data = config_map["data"]
    config = NodeLabelConfig.resolve(
        "node", data["PRELOADER_PATHS"].split(":"), data["PRELOADER_MODEL_NAMES"].split()
    )
    keys = {key for _, key in config.keys}
    [server] = _kind(dm.render("warm-node-affinity"), "StatefulSet")
    affinity = server["spec"]["template"]["spec"]["affinity"]["nodeAffinity"]
    assert "requiredDuringSchedulingIgnoredDuringExecution" not in affinity
    [term] = affinity["preferredDuringSchedulingIgnoredDuringExecution"]
    [expression] = term["preference"]["matchExpressions"]
    assert expression["key"] in keys
    assert (expression["operator"], expression["values"]) == ("In", ["warm"])
    # The server mounts the claim the DaemonSet warms: the same PV, the same page cache.
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in server["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    warmed = {
        v["persistentVolumeClaim"]["claimName"]
        for v in daemonset["spec"]["template"]["spec"]["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims <= warmed


# ------------------------------------------- the admission policies, evaluated as CEL

ACCOUNT = "preloader-node-warmup"
NODE = "gpu-node-1"
NODE_POLICY = "preloader-node-labels"
EVENT_POLICY = "preloader-node-events"
KEY = LABEL_PREFIX + "qwen3-32b"


def _policies() -> dict[str, dict[str, Any]]:
    rendered = dm.render("node-warmup-policy")
    return {p["metadata"]["name"]: p for p in _kind(rendered, "ValidatingAdmissionPolicy")}


def _admit(
    policy: str, request: dict[str, Any], new: dict[str, Any], old: dict[str, Any] | None = None
) -> list[str] | None:
    """Evaluate a policy of ``deploy/node-warmup-policy`` as the API server does.

    :param policy: the policy's name.
    :param new: ``object``, the object as it would be stored (after a PATCH is applied).
    :param old: ``oldObject``, the stored object (``None`` for a CREATE).
    :return: ``None`` when the policy does not apply (a match condition is false), else the
        messages of the validations that fail (empty: admitted).
    """
    spec = _policies()[policy]["spec"]
    env = celpy.Environment()

    def evaluate(expression: str, variables: dict[str, Any]) -> Any:
        activation = {
            "request": celpy.json_to_cel(request),
            "object": celpy.json_to_cel(new),
            "oldObject": celpy.json_to_cel(old),
            "variables": celtypes.MapType(
                {celtypes.StringType(k): v for k, v in variables.items()}
            ),
        }
        return env.program(env.compile(expression)).evaluate(activation)

    if not all(evaluate(c["expression"], {}) for c in spec["matchConditions"]):
        return None
    variables: dict[str, Any] = {}
    for variable in spec.get("variables", []):
        variables[variable["name"]] = evaluate(variable["expression"], variables)
    return [v["message"] for v in spec["validations"] if not evaluate(v["expression"], variables)]


def _request(
    namespace: str = "default", node: str | None = NODE, account: str = ACCOUNT
) -> dict[str, Any]:
    """An admission request by a pod-bound service account token (node name in extra);
    with no ``node``, one by a token that names none (``extra`` left out, as it is empty)."""
    user: dict[str, Any] = {"username": f"system:serviceaccount:{namespace}:{account}"}
    if node:
        user["extra"] = {"authentication.kubernetes.io/node-name": [node]}
    return {"operation": "UPDATE", "userInfo": user}


_NODE: dict[str, Any] = {
    "apiVersion": "v1",
    "kind": "Node",
    "metadata": {
        "name": NODE,
        "uid": "7d3c1f0e-5a4b-4c2d-9e8f-0a1b2c3d4e5f",
        "resourceVersion": "918273",
        "creationTimestamp": "2026-01-01T00:00:00Z",
        "labels": {
            "kubernetes.io/hostname": NODE,
            "kubernetes.io/os": "linux",
            "node.kubernetes.io/instance-type": "ecs.gn7i-c32g1.32xlarge",
            "nvidia.com/gpu.present": "true",
            "team": "ml",
        },
        "annotations": {
            "node.alpha.kubernetes.io/ttl": "0",
            "volumes.kubernetes.io/controller-managed-attach-detach": "true",
        },
        "managedFields": [
            {
                "manager": "kubelet",
                "operation": "Update",
                "apiVersion": "v1",
                "time": "2026-01-01T00:00:00Z",
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {"f:kubernetes.io/hostname": {}}}},
            }
        ],
    },
    "spec": {
        "podCIDR": "10.0.3.0/24",
        "podCIDRs": ["10.0.3.0/24"],
        "providerID": "alicloud://cn-hangzhou.i-0abc",
        "taints": [{"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}],
    },
    "status": {
        "capacity": {"cpu": "32", "memory": "195780Mi", "nvidia.com/gpu": "1"},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady"}],
        "nodeInfo": {"kubeletVersion": "v1.30.4"},
    },
}


def _node(**labels: str) -> dict[str, Any]:
    """A Node as the API server stores it: a GPU node, its kubelet's labels, ``labels`` too."""
    node = copy.deepcopy(_NODE)
    node["metadata"]["labels"].update(labels)
    return node


def _patched(node: dict[str, Any], body: Any) -> dict[str, Any]:
    """The object a merge PATCH gives the admission policy: ``body`` applied, and the
    API server's own bookkeeping of the write (managedFields) on top."""
    new: dict[str, Any] = merge_patch(node, body)
    new["metadata"]["managedFields"] = [
        *node["metadata"]["managedFields"],
        {
            "manager": FIELD_MANAGER,
            "operation": "Update",
            "apiVersion": "v1",
            "time": "2026-01-01T00:05:00Z",
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:metadata": {"f:labels": {f"f:{KEY}": {}}}},
        },
    ]
    return new


def _agent_requests(tmp_path: Path) -> tuple[list[Any], list[dict[str, Any]]]:
    """The bodies the agent sends to label its node, post an Event and unlabel it.

    :return: the PATCH bodies (label on, label off) and the Events as created.
    """
    with KubeApi(node_name=NODE) as kube:
        config = NodeLabelConfig.resolve(
            NODE, ["/models/qwen3-32b"], kubeconfig=str(kube.kubeconfig(tmp_path))
        )
        assert [key for _, key in config.keys] == [KEY]

        async def talk() -> None:
            api = nodelabels.connect(config)
            try:
                uid, _ = await api.get_node()
                await api.patch_labels({KEY: LABEL_VALUE})
                await api.post_event(NodeEvent("ModelWarm", "/models/qwen3-32b warm"), uid)
                await api.patch_labels({KEY: None})
            finally:
                await api.aclose()

        anyio.run(talk)
        patches = [r.body for r in kube.requests if r.method == "PATCH"]
        return patches, list(kube.events)


def test_both_policies_are_enforced_and_match_the_daemonsets_account() -> None:
    resources, daemonset = _daemonset()
    [account] = _kind(resources, "ServiceAccount")
    assert (
        daemonset["spec"]["template"]["spec"]["serviceAccountName"] == account["metadata"]["name"]
    )
    rendered = dm.render("node-warmup-policy")
    bindings = {
        b["spec"]["policyName"]: b for b in _kind(rendered, "ValidatingAdmissionPolicyBinding")
    }
    assert set(bindings) == set(_policies()) == {NODE_POLICY, EVENT_POLICY}
    for binding in bindings.values():
        assert binding["spec"]["validationActions"] == ["Deny"]
        assert "matchResources" not in binding["spec"]  # every namespace, every object
    for policy in _policies().values():
        assert policy["spec"]["failurePolicy"] == "Fail"
    # The account as rendered, in whatever namespace it is applied: the policy applies.
    for namespace in ("default", "gpu-warmup", "kube-system"):
        request = _request(namespace, account=account["metadata"]["name"])
        assert _admit(NODE_POLICY, request, _changed("taint"), _node()) == [DENIED["taint"]]


def test_the_agents_real_patches_are_admitted(tmp_path: Path) -> None:
    (label_on, label_off), _ = _agent_requests(tmp_path)
    cold = _node()
    warm = _patched(cold, label_on)
    assert warm["metadata"]["labels"][KEY] == "warm"
    assert _admit(NODE_POLICY, _request(), warm, cold) == []
    unlabelled = _patched(warm, label_off)
    assert KEY not in unlabelled["metadata"]["labels"]
    assert _admit(NODE_POLICY, _request(), unlabelled, warm) == []
    # The start-up clean-up: a stale label of the scheme comes off.
    stale = _node(**{LABEL_PREFIX + "old-model": "warm"})
    off = _patched(stale, {"metadata": {"labels": {LABEL_PREFIX + "old-model": None}}})
    assert _admit(NODE_POLICY, _request(), off, stale) == []


def test_the_patches_are_admitted_from_any_namespace_only_on_the_own_node(tmp_path: Path) -> None:
    (label_on, _), _ = _agent_requests(tmp_path)
    cold = _node()
    warm = _patched(cold, label_on)
    assert _admit(NODE_POLICY, _request("gpu-warmup"), warm, cold) == []
    own_node_only = ["the preloader may change only the node its pod runs on"]
    assert _admit(NODE_POLICY, _request("gpu-warmup", node="gpu-node-2"), warm, cold) == (
        own_node_only
    )
    assert _admit(NODE_POLICY, _request(node=None), warm, cold) == own_node_only


def _changed(change: str) -> dict[str, Any]:
    """The node after one change a compromised pod might try, beside a preloader label."""
    node = _node(**{KEY: "warm"})
    meta, spec = node["metadata"], node["spec"]
    match change:
        case "owner reference without a uid":
            meta["ownerReferences"] = [{"apiVersion": "v1", "kind": "Pod", "name": "gone"}]
        case "owner reference":
            meta["ownerReferences"] = [
                {"apiVersion": "v1", "kind": "Pod", "name": "gone", "uid": "0000"}
            ]
        case "annotation":
            meta["annotations"]["node.alpha.kubernetes.io/ttl"] = "3600"
        case "new annotation":
            meta["annotations"]["cluster-autoscaler.kubernetes.io/scale-down-disabled"] = "true"
        case "finalizer":
            meta["finalizers"] = ["example.com/hold"]
        case "label":
            meta["labels"]["team"] = "attacker"
        case "new label":
            meta["labels"]["nvidia.com/gpu.deploy.driver"] = "false"
        case "removed label":
            del meta["labels"]["nvidia.com/gpu.present"]
        case "preloader label not warm":
            meta["labels"][KEY] = "cold"
        case "taint":
            spec["taints"].append({"key": "evict", "effect": "NoExecute"})
        case "removed taints":
            del spec["taints"]
        case "unschedulable":
            spec["unschedulable"] = True
        case "status":
            node["status"]["capacity"]["nvidia.com/gpu"] = "8"
        case "generation":
            meta["generation"] = 7
        case _:
            raise AssertionError(change)
    return node


DENIED = {
    "owner reference without a uid": "the preloader may not change the node's owner references",
    "owner reference": "the preloader may not change the node's owner references",
    "annotation": "the preloader may not change the node's annotations",
    "new annotation": "the preloader may not change the node's annotations",
    "finalizer": "the preloader may not change the node's finalizers",
    "label": "the preloader may only set preloader.dev/ labels to warm or remove them",
    "new label": "the preloader may only set preloader.dev/ labels to warm or remove them",
    "removed label": "the preloader may only set preloader.dev/ labels to warm or remove them",
    "preloader label not warm": (
        "the preloader may only set preloader.dev/ labels to warm or remove them"
    ),
    "taint": "the preloader may not change the node's spec (taints, unschedulable)",
    "removed taints": "the preloader may not change the node's spec (taints, unschedulable)",
    "unschedulable": "the preloader may not change the node's spec (taints, unschedulable)",
    "status": "the preloader may not change the node's status",
    "generation": "the preloader may not change the node's name, uid, generation or deletion",
}


@pytest.mark.parametrize("namespace", ["default", "gpu-warmup"])
@pytest.mark.parametrize("change", sorted(DENIED))
def test_the_policy_denies_every_other_change_to_the_node(change: str, namespace: str) -> None:
    old = _node()
    assert _admit(NODE_POLICY, _request(namespace), _changed(change), old) == [DENIED[change]]
    # Also when the preloader label is already there and only the other change is new.
    old = _node(**{KEY: "warm"})
    assert _admit(NODE_POLICY, _request(namespace), _changed(change), old) == [DENIED[change]]


def test_the_policy_leaves_other_users_alone() -> None:
    tainted = _changed("taint")
    for username in (
        "system:serviceaccount:kube-system:node-controller",
        "system:serviceaccount:default:preloader-node-warmup-2",
        "preloader-node-warmup",  # a user, not a service account
        "system:node:gpu-node-1",
    ):
        request = _request()
        request["userInfo"]["username"] = username
        assert _admit(NODE_POLICY, request, tainted, _node()) is None, username


def test_the_agents_real_event_is_admitted_and_only_about_its_own_node(tmp_path: Path) -> None:
    _, [event] = _agent_requests(tmp_path)
    create = _request("gpu-warmup") | {"operation": "CREATE"}
    assert _admit(EVENT_POLICY, create, event) == []
    assert event["involvedObject"]["kind"] == "Node"
    about_other = copy.deepcopy(event)
    about_other["involvedObject"]["name"] = "gpu-node-2"
    about_pod = copy.deepcopy(event)
    about_pod["involvedObject"] = {"kind": "Pod", "namespace": "default", "name": NODE}
    own_node_only = ["the preloader may post Events only about the node its pod runs on"]
    for forged in (about_other, about_pod):
        assert _admit(EVENT_POLICY, create, forged) == own_node_only
    from_kubelet = copy.deepcopy(event)
    from_kubelet["source"] = {"component": "kubelet", "host": NODE}
    from_kubelet["reportingComponent"] = "kubelet"
    assert _admit(EVENT_POLICY, create, from_kubelet) == [
        "the preloader may post Events only as the preloader"
    ]
    unbound = _request(node=None) | {"operation": "CREATE"}
    assert _admit(EVENT_POLICY, unbound, event) == own_node_only
    other = _request(account="event-exporter") | {"operation": "CREATE"}
    assert _admit(EVENT_POLICY, other, from_kubelet) is None


# ------------------------------------------- deployed in another namespace

#: How to deploy the DaemonSet in another namespace (the docs show this overlay): the
#: namespace goes on what has none, the events Role stays in `default` (where Events about a
#: Node must go), and both bindings name the account in its namespace.
NAMESPACE_OVERLAY = """\
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - {warmup}
  - {policy}
transformers:
  - |-
    apiVersion: builtin
    kind: NamespaceTransformer
    metadata:
      name: gpu-warmup
      namespace: gpu-warmup
    unsetOnly: true
patches:
  - target:
      kind: RoleBinding
      name: preloader-node-events
    patch: |-
      - op: replace
        path: /subjects/0/namespace
        value: gpu-warmup
"""


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl not installed")
def test_in_another_namespace_rbac_and_policy_follow_the_account(tmp_path: Path) -> None:
    def relative(folder: str) -> str:
        return os.path.relpath(dm.DEPLOY / folder, tmp_path)

    overlay = NAMESPACE_OVERLAY.format(
        warmup=relative("node-warmup"), policy=relative("node-warmup-policy")
    )
    (tmp_path / "kustomization.yaml").write_text(overlay)
    output = subprocess.run(
        ["kubectl", "kustomize", str(tmp_path)], check=True, capture_output=True, text=True
    ).stdout
    resources = [doc for doc in yaml.safe_load_all(output) if doc]
    [daemonset] = _kind(resources, "DaemonSet")
    [account] = _kind(resources, "ServiceAccount")
    namespace = account["metadata"]["namespace"]
    assert namespace == daemonset["metadata"]["namespace"] == "gpu-warmup"
    [role] = _kind(resources, "Role")
    [role_binding] = _kind(resources, "RoleBinding")
    assert role["metadata"]["namespace"] == role_binding["metadata"]["namespace"] == "default"
    [cluster_binding] = _kind(resources, "ClusterRoleBinding")
    for binding in (role_binding, cluster_binding):
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": account["metadata"]["name"], "namespace": namespace}
        ]
    request = _request(namespace, account=account["metadata"]["name"])
    assert _admit(NODE_POLICY, request, _changed("taint"), _node()) == [DENIED["taint"]]
