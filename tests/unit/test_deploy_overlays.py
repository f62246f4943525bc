"""deploy/overlays: the cluster-wide install and the namespace-scoped one, as kustomize renders them.

The namespaced install must grant, in each tenant namespace, everything the cluster-wide
ClusterRole grants on namespaced kinds (so the operator works there exactly as cluster-wide),
and cluster-wide only reads of cluster-scoped kinds. tests/local/test_deploy_overlays_rbac.py
applies both to the API emulator and runs the operator under each.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from test_deploy import KOPF_PERMISSIONS, Permission, rule_triples, the

ROOT = Path(__file__).resolve().parents[2]
OVERLAYS = ROOT / "deploy" / "overlays"
ACCOUNT = {"kind": "ServiceAccount", "name": "sftjob-operator", "namespace": "sftjob-system"}

# The cluster-scoped kinds the operator (or Kopf) reads; everything else it touches is namespaced.
CLUSTER_SCOPED = {
    ("apiextensions.k8s.io", "customresourcedefinitions"),
    ("", "namespaces"),
    ("tuning.sftjob.dev", "sftprofiles"),
    ("kopf.dev", "clusterkopfpeerings"),
}
READ_VERBS = {"get", "list", "watch"}

pytestmark = pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl not installed")


def render(path: Path) -> list[dict[str, Any]]:
    text = subprocess.run(
        ["kubectl", "kustomize", str(path)], capture_output=True, text=True, check=True
    ).stdout
    return [d for d in yaml.safe_load_all(text) if d]


@pytest.fixture(scope="module")
def cluster() -> list[dict[str, Any]]:
    return render(OVERLAYS / "cluster")


@pytest.fixture(scope="module")
def namespaced() -> list[dict[str, Any]]:
    return render(OVERLAYS / "namespaced")


def tenant_namespaces(objects: list[dict[str, Any]]) -> set[str]:
    return {o["metadata"]["namespace"] for o in objects if o["kind"] == "Role"}


def operator_env(objects: list[dict[str, Any]]) -> dict[str, str]:
    (container,) = the(objects, "Deployment", "sftjob-operator")["spec"]["template"]["spec"][
        "containers"
    ]
    return {e["name"]: e.get("value", "") for e in container["env"]}


def operator_args(objects: list[dict[str, Any]]) -> list[str]:
    (container,) = the(objects, "Deployment", "sftjob-operator")["spec"]["template"]["spec"][
        "containers"
    ]
    return list(container["args"])


def test_deploy_is_the_cluster_overlay(cluster: list[dict[str, Any]]) -> None:
    # `kubectl apply -k deploy/` (the README's install) and the cluster overlay are one install.
    assert render(ROOT / "deploy") == cluster
    assert "-A" in operator_args(cluster)
    kinds = {o["kind"] for o in cluster}
    assert "Role" not in kinds and "KopfPeering" not in kinds
    assert the(cluster, "ClusterKopfPeering", "sftjob-operator")


def test_namespaced_overlay_has_no_cluster_wide_write(namespaced: list[dict[str, Any]]) -> None:
    role = the(namespaced, "ClusterRole", "sftjob-operator")
    granted = rule_triples(role["rules"])
    assert granted, "the read-only ClusterRole is empty"
    writes = {t for t in granted if t[2] not in READ_VERBS}
    assert not writes, f"cluster-wide writes in namespaced mode: {writes}"
    assert {(g, r) for g, r, _ in granted} <= CLUSTER_SCOPED - {("kopf.dev", "clusterkopfpeerings")}
    # Only the one ClusterRole, bound once, to the operator's account.
    assert [o["metadata"]["name"] for o in namespaced if o["kind"] == "ClusterRole"] == [
        "sftjob-operator"
    ]
    binding = the(namespaced, "ClusterRoleBinding", "sftjob-operator")
    assert binding["roleRef"]["name"] == "sftjob-operator" and binding["subjects"] == [ACCOUNT]
    assert not [o for o in namespaced if o["kind"] == "ClusterKopfPeering"]


def test_each_tenant_namespace_grants_what_the_cluster_role_grants_on_namespaced_kinds(
    cluster: list[dict[str, Any]], namespaced: list[dict[str, Any]]
) -> None:
    cluster_grants = rule_triples(the(cluster, "ClusterRole", "sftjob-operator")["rules"])
    on_namespaced: set[Permission] = {t for t in cluster_grants if t[:2] not in CLUSTER_SCOPED}
    on_cluster_scoped = (
        cluster_grants
        - on_namespaced
        - {("kopf.dev", "clusterkopfpeerings", v) for v in ("list", "watch", "patch")}
    )
    # Kopf's namespaced peering, in place of the cluster-wide one.
    peering = {
        ("kopf.dev", "kopfpeerings", v)
        for v in KOPF_PERMISSIONS[("kopf.dev", "clusterkopfpeerings")]
    }
    tenants = tenant_namespaces(namespaced)
    assert tenants == {"team-a", "team-b"}
    for namespace in tenants:
        roles = [
            o for o in namespaced if o["kind"] == "Role" and o["metadata"]["namespace"] == namespace
        ]
        (role,) = roles
        granted = rule_triples(role["rules"])
        assert granted == on_namespaced | peering, namespace
        (binding,) = [
            o
            for o in namespaced
            if o["kind"] == "RoleBinding" and o["metadata"]["namespace"] == namespace
        ]
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert binding["subjects"] == [ACCOUNT]
        peerings = [
            o
            for o in namespaced
            if o["kind"] == "KopfPeering" and o["metadata"]["namespace"] == namespace
        ]
        assert [p["metadata"]["name"] for p in peerings] == ["sftjob-operator"]
    read_only = rule_triples(the(namespaced, "ClusterRole", "sftjob-operator")["rules"])
    assert on_cluster_scoped <= read_only


def test_namespaced_operator_watches_exactly_the_tenant_namespaces(
    namespaced: list[dict[str, Any]],
) -> None:
    from sftjob_operator.cli import build_parser, watched_namespaces

    args = build_parser().parse_args(operator_args(namespaced))
    watched = watched_namespaces(args.namespace, args.all_namespaces, operator_env(namespaced))
    assert watched is not None, "the namespaced operator runs with -A"
    assert set(watched) == tenant_namespaces(namespaced)
    # Peered (not standalone), under the name of the KopfPeering objects.
    assert not args.standalone and args.peering == "sftjob-operator"


def test_both_overlays_install_the_same_shared_objects(
    cluster: list[dict[str, Any]], namespaced: list[dict[str, Any]]
) -> None:
    def shared(objects: list[dict[str, Any]]) -> dict[tuple[str, str], Any]:
        kinds = {"Namespace", "CustomResourceDefinition", "ServiceAccount"}
        return {(o["kind"], o["metadata"]["name"]): o for o in objects if o["kind"] in kinds}

    assert shared(cluster) == shared(namespaced)
    # The Deployment differs only in what the operator watches.
    in_cluster = copy.deepcopy(the(cluster, "Deployment", "sftjob-operator"))
    in_namespaced = copy.deepcopy(the(namespaced, "Deployment", "sftjob-operator"))
    for deployment in (in_cluster, in_namespaced):
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        container.pop("args")
        container["env"] = [e for e in container["env"] if e["name"] != "SFTJOB_NAMESPACES"]
    assert in_cluster == in_namespaced


@pytest.mark.parametrize("overlay", ["cluster", "namespaced"])
def test_the_operator_pod_meets_its_namespaces_pod_security_level(overlay: str) -> None:
    """The operator's namespace enforces a Pod Security level (restricted); the Deployment's
    pod template passes it, by the emulator's checks of that admission plugin."""
    from sftjob_local.emulator.pod_security import evaluate, forbidden_detail, policy_of

    objects = render(OVERLAYS / overlay)
    deployment = the(objects, "Deployment", "sftjob-operator")
    namespace = the(objects, "Namespace", deployment["metadata"]["namespace"])
    policy, problems = policy_of(namespace["metadata"]["labels"])
    assert not problems and policy["enforce"].level == "restricted"
    template = deployment["spec"]["template"]
    assert forbidden_detail(evaluate(policy["enforce"], template)) == ""
