"""deploy/ for node labels: the DaemonSet's RBAC, its settings and the affinity that uses them.

Schema validation of these folders is in test_deploy_manifests.py with the others.
"""

from __future__ import annotations

from typing import Any

import celpy
from celpy import celtypes

from preloader.labels import NodeLabelConfig
from preloader.serve.kube.nodelabels import STOP_SECONDS

from ..lib import manifests as dm


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


def test_the_admission_policy_names_the_daemonsets_service_account() -> None:
    resources, _ = _daemonset()
    [binding] = _kind(resources, "ClusterRoleBinding")
    [subject] = binding["subjects"]
    policy_folder = dm.render("node-warmup-policy")
    [policy] = _kind(policy_folder, "ValidatingAdmissionPolicy")
    [policy_binding] = _kind(policy_folder, "ValidatingAdmissionPolicyBinding")
    username = f"system:serviceaccount:{subject['namespace']}:{subject['name']}"
    [condition] = policy["spec"]["matchConditions"]
    assert f"'{username}'" in condition["expression"]
    assert policy_binding["spec"]["policyName"] == policy["metadata"]["name"]
    assert policy_binding["spec"]["validationActions"] == ["Deny"]
    expressions = " ".join(v["expression"] for v in policy["spec"]["validations"])
    assert "authentication.kubernetes.io/node-name" in expressions
    assert "preloader.dev/" in expressions and "object.spec == oldObject.spec" in expressions


# ------------------------------------------- the admission policy, evaluated as CEL


def _admit(request: dict[str, Any], old: dict[str, Any], new: dict[str, Any]) -> list[str] | None:
    """Evaluate ``deploy/node-warmup-policy`` as the API server does for a node UPDATE.

    :return: ``None`` when the policy does not apply (match conditions false), else the
        messages of the validations that fail (empty: admitted).
    """
    [policy] = _kind(dm.render("node-warmup-policy"), "ValidatingAdmissionPolicy")
    spec = policy["spec"]
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
    for variable in spec["variables"]:
        variables[variable["name"]] = evaluate(variable["expression"], variables)
    return [v["message"] for v in spec["validations"] if not evaluate(v["expression"], variables)]


def _node(name: str = "gpu-node-1", **labels: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {"team": "ml", **labels}},
        "spec": {"podCIDR": "10.0.0.0/24"},
    }


def _request(
    node: str | None = "gpu-node-1", account: str = "preloader-node-warmup"
) -> dict[str, Any]:
    extra = {"authentication.kubernetes.io/node-name": [node]} if node else {}
    return {
        "operation": "UPDATE",
        "userInfo": {"username": f"system:serviceaccount:default:{account}", "extra": extra},
    }


def test_the_policy_admits_preloader_labels_on_the_own_node() -> None:
    warm = {"preloader.dev/qwen3-32b": "warm"}
    assert _admit(_request(), _node(), _node(**warm)) == []
    assert _admit(_request(), _node(**warm), _node()) == []


def test_the_policy_denies_another_node_and_a_token_without_a_node() -> None:
    warm = {"preloader.dev/qwen3-32b": "warm"}
    other = _admit(_request(), _node("gpu-node-2"), _node("gpu-node-2", **warm))
    assert other == ["the preloader may change only the node its pod runs on"]
    unbound = _admit(_request(node=None), _node(), _node(**warm))
    assert unbound == ["the preloader may change only the node its pod runs on"]


def test_the_policy_denies_other_labels_taints_and_annotations() -> None:
    relabelled = _node()
    relabelled["metadata"]["labels"]["team"] = "attacker"
    assert _admit(_request(), _node(), relabelled) == [
        "the preloader may change only preloader.dev/ labels"
    ]
    unlabelled = _node()
    del unlabelled["metadata"]["labels"]["team"]
    assert _admit(_request(), _node(), unlabelled) == [
        "the preloader may change only preloader.dev/ labels"
    ]
    tainted = _node()
    tainted["spec"]["taints"] = [{"key": "x", "effect": "NoExecute"}]
    annotated = _node()
    annotated["metadata"]["annotations"] = {"x": "y"}
    for changed in (tainted, annotated):
        assert _admit(_request(), _node(), changed) == [
            "the preloader may not change the node's annotations, finalizers or spec"
        ]


def test_the_policy_leaves_other_users_alone() -> None:
    tainted = _node()
    tainted["spec"]["taints"] = [{"key": "x", "effect": "NoSchedule"}]
    assert _admit(_request(account="someone-else"), _node(), tainted) is None
