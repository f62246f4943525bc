"""deploy/: what `kubectl apply -k deploy/` installs, the operator image and the Argo CD health.

The ClusterRole is checked three ways: against `kube.API_PERMISSIONS`, against every API
call in kube.py (read from its source), and against the Role the operator creates for
each job (RBAC lets it grant only what it holds). Anything else it grants must be in
KOPF_PERMISSIONS below, with the reason.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml
from sftjob_operator import kube
from sftjob_operator.api import GROUP, PLURAL
from sftjob_operator.children import build_role, owner_reference
from sftjob_operator.documents import sftjobs_in
from sftjob_operator.lifecycle import invalid_status
from sftjob_operator.profile_api import PROFILE_PLURAL

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
NAMESPACE = "sftjob-system"
RBAC = "rbac.authorization.k8s.io"

Permission = tuple[str, str, str]  # (apiGroup, resource, verb)

# What Kopf itself calls, beyond what kube.py calls. Each line is a reason to hold it.
KOPF_PERMISSIONS: dict[tuple[str, str], set[str]] = {
    # watching the handled resource; merge-patching away the finalizer an older version left
    (GROUP, PLURAL): {"list", "watch", "patch"},
    # the watch cache of the operator's children (server-side label selector on the job label)
    ("", "pods"): {"list", "watch"},
    ("", "configmaps"): {"list", "watch"},
    # posting events about handler progress and errors
    ("", "events"): {"create"},
    # peering between replicas, cluster-wide (-A): Kopf lists, watches and patches it
    ("kopf.dev", "clusterkopfpeerings"): {"list", "watch", "patch"},
    # noticing CRDs come and go
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},
    # the watch cache of what a job's policy is resolved from (handlers.cache_profile and
    # cache_namespace)
    (GROUP, PROFILE_PLURAL): {"list", "watch"},
    ("", "namespaces"): {"list", "watch"},
}

# (client attribute in kube.Kube, method) -> the API request it makes.
CLIENT_METHODS: dict[tuple[str, str], tuple[str, str, str]] = {
    ("core", "create_namespaced_config_map"): ("", "configmaps", "create"),
    ("core", "patch_namespaced_config_map"): ("", "configmaps", "patch"),
    ("core", "read_namespaced_config_map"): ("", "configmaps", "get"),
    ("core", "create_namespaced_service_account"): ("", "serviceaccounts", "create"),
    ("core", "create_namespaced_service"): ("", "services", "create"),
    ("core", "create_namespaced_pod"): ("", "pods", "create"),
    ("core", "list_namespaced_pod"): ("", "pods", "list"),
    ("core", "delete_namespaced_pod"): ("", "pods", "delete"),
    ("core", "create_namespaced_event"): ("", "events", "create"),
    ("rbac", "create_namespaced_role"): (RBAC, "roles", "create"),
    ("rbac", "create_namespaced_role_binding"): (RBAC, "rolebindings", "create"),
    ("core", "read_namespaced_service_account"): ("", "serviceaccounts", "get"),
    ("core", "read_namespaced_service"): ("", "services", "get"),
    ("core", "patch_namespaced_service"): ("", "services", "patch"),
    ("core", "read_namespaced_pod"): ("", "pods", "get"),
    ("rbac", "read_namespaced_role"): (RBAC, "roles", "get"),
    ("rbac", "read_namespaced_role_binding"): (RBAC, "rolebindings", "get"),
    ("custom", "patch_namespaced_custom_object_status"): (GROUP, f"{PLURAL}/status", "patch"),
    ("custom", "delete_namespaced_custom_object"): (GROUP, PLURAL, "delete"),
    ("custom", "get_namespaced_custom_object"): (GROUP, PLURAL, "get"),
    ("custom", "list_cluster_custom_object"): (GROUP, PROFILE_PLURAL, "list"),
    ("core", "read_namespace"): ("", "namespaces", "get"),
}
CLIENT_CLASSES = {"CoreV1Api", "RbacAuthorizationV1Api", "CustomObjectsApi"}


def triples(permissions: dict[tuple[str, str], set[str]]) -> set[Permission]:
    return {(g, r, v) for (g, r), verbs in permissions.items() for v in verbs}


def rule_triples(rules: list[dict[str, Any]]) -> set[Permission]:
    return {
        (g, r, v)
        for rule in rules
        for g in rule.get("apiGroups", [])
        for r in rule.get("resources", [])
        for v in rule.get("verbs", [])
    }


# ----------------------------------------------------------------------------- rendering


def files_of(kustomization_dir: Path) -> list[Path]:
    """The YAML files a kustomization lists, following directory resources (no kubectl)."""
    listed = yaml.safe_load((kustomization_dir / "kustomization.yaml").read_text())["resources"]
    out: list[Path] = []
    for entry in listed:
        path = (kustomization_dir / entry).resolve()
        out.extend(files_of(path) if path.is_dir() else [path])
    return out


@pytest.fixture(scope="module")
def rendered() -> list[dict[str, Any]]:
    """What `kubectl apply -k deploy/` sends; read from the files where kubectl is absent."""
    kubectl = shutil.which("kubectl")
    if kubectl:
        text = subprocess.run(
            [kubectl, "kustomize", str(DEPLOY)], capture_output=True, text=True, check=True
        ).stdout
        return [d for d in yaml.safe_load_all(text) if d]
    return [d for p in files_of(DEPLOY) for d in yaml.safe_load_all(p.read_text()) if d]


def the(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl not installed")
def test_kubectl_kustomize_renders_everything_in_order(rendered: list[dict[str, Any]]) -> None:
    kinds = [o["kind"] for o in rendered]
    names = {(o["kind"], o["metadata"]["name"]) for o in rendered}
    assert {
        ("Namespace", NAMESPACE),
        ("CustomResourceDefinition", f"{PLURAL}.{GROUP}"),
        ("CustomResourceDefinition", f"{PROFILE_PLURAL}.{GROUP}"),
        ("CustomResourceDefinition", "kopfpeerings.kopf.dev"),
        ("CustomResourceDefinition", "clusterkopfpeerings.kopf.dev"),
        ("ClusterKopfPeering", "sftjob-operator"),
        ("ServiceAccount", "sftjob-operator"),
        ("ClusterRole", "sftjob-operator"),
        ("ClusterRoleBinding", "sftjob-operator"),
        ("Deployment", "sftjob-operator"),
    } == names
    # kubectl applies in this order: the namespace and the CRDs before what needs them.
    assert kinds[0] == "Namespace"
    assert kinds.index("ClusterKopfPeering") > max(
        i for i, k in enumerate(kinds) if k == "CustomResourceDefinition"
    )
    assert kinds.index("Deployment") > kinds.index("ClusterRoleBinding")


def test_the_crds_are_the_generated_ones_unchanged(rendered: list[dict[str, Any]]) -> None:
    for plural, file in ((PLURAL, "sftjob.yaml"), (PROFILE_PLURAL, "sftprofile.yaml")):
        generated = yaml.safe_load((ROOT / "crds" / file).read_text())
        assert the(rendered, "CustomResourceDefinition", f"{plural}.{GROUP}") == generated
        # One copy only: deploy/ reaches it through crds/kustomization.yaml.
        copies = [p for p in DEPLOY.rglob("*.yaml") if f"{plural}.{GROUP}" in p.read_text()]
        assert copies == [], f"CRD copied into {copies}"


def test_peering_crds_and_the_cluster_wide_peering(rendered: list[dict[str, Any]]) -> None:
    for name, scope, kind in [
        ("kopfpeerings.kopf.dev", "Namespaced", "KopfPeering"),
        ("clusterkopfpeerings.kopf.dev", "Cluster", "ClusterKopfPeering"),
    ]:
        spec = the(rendered, "CustomResourceDefinition", name)["spec"]
        assert spec["group"] == "kopf.dev" and spec["scope"] == scope
        assert spec["names"]["kind"] == kind
        (version,) = spec["versions"]
        assert version["name"] == "v1" and version["served"] and version["storage"]
        status = version["schema"]["openAPIV3Schema"]["properties"]["status"]
        assert status == {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    # `-A` makes Kopf peer through a ClusterKopfPeering named by --peering (default below).
    peering = the(rendered, "ClusterKopfPeering", "sftjob-operator")
    assert peering["apiVersion"] == "kopf.dev/v1" and "namespace" not in peering["metadata"]
    from sftjob_operator.cli import build_parser

    args = build_parser().parse_args(deployment_args(rendered))
    assert args.peering == "sftjob-operator" and args.all_namespaces


# ----------------------------------------------------------------------------- RBAC


def cluster_role_grants(rendered: list[dict[str, Any]]) -> set[Permission]:
    return rule_triples(the(rendered, "ClusterRole", "sftjob-operator")["rules"])


def kube_py_calls() -> set[Permission]:
    """Every API request kube.py can make, read from its source."""
    tree = ast.parse(Path(kube.__file__).read_text())
    calls: set[Permission] = set()
    unmapped: list[str] = []
    for node in ast.walk(tree):
        # self.<client>.<method>, called or passed on (the creators table passes them on)
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
            and node.value.attr in {"core", "rbac", "custom"}
        ):
            key = (node.value.attr, node.attr)
            if key in CLIENT_METHODS:
                calls.add(CLIENT_METHODS[key])
            else:
                unmapped.append(f"self.{key[0]}.{key[1]} (line {node.lineno})")
    assert not unmapped, f"add these kube.py calls to CLIENT_METHODS: {unmapped}"
    return calls


def test_kube_py_talks_only_through_the_scanned_clients() -> None:
    tree = ast.parse(Path(kube.__file__).read_text())
    classes = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and node.attr.endswith("Api")
    }
    assert classes == CLIENT_CLASSES
    # Custom-object calls must address SFTJobs (or list SFTProfiles), as CLIENT_METHODS
    # assumes.
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and isinstance(node.func.value, ast.Attribute)
            and node.func.value.attr == "custom"
        ):
            names = [a.id for a in node.args if isinstance(a, ast.Name)]
            assert names[:1] == ["GROUP"], ast.unparse(node)
            assert "PLURAL" in names or "PROFILE_PLURAL" in names, ast.unparse(node)


def test_api_permissions_cover_every_call_in_kube_py() -> None:
    calls = kube_py_calls()
    # Guards the scan itself: were the clients renamed, it would find nothing and pass.
    assert calls == set(CLIENT_METHODS.values()), "CLIENT_METHODS lists calls kube.py dropped"
    missing = calls - triples(kube.API_PERMISSIONS)
    assert not missing, f"kube.py calls these but API_PERMISSIONS lacks them: {missing}"


def test_cluster_role_grants_what_the_operator_calls(rendered: list[dict[str, Any]]) -> None:
    granted = cluster_role_grants(rendered)
    for needed, source in [
        (kube_py_calls(), "kube.py calls"),
        (triples(kube.API_PERMISSIONS), "kube.API_PERMISSIONS"),
        (triples(kube.ADMISSION_PERMISSIONS), "kube.ADMISSION_PERMISSIONS"),
        (triples(KOPF_PERMISSIONS), "Kopf"),
    ]:
        assert not needed - granted, f"{source} need, the ClusterRole lacks: {needed - granted}"


def test_admission_permissions_follow_the_owner_references_children_carry() -> None:
    # OwnerReferencesPermissionEnforcement: blockOwnerDeletion needs update on the owner's
    # finalizers; the operator sets it on every child, so it must be listed (and granted).
    job = sftjobs_in((DEPLOY / "examples" / "tiny-cpu.yaml").read_text())[0]
    blocking = owner_reference(job).get("blockOwnerDeletion") is True
    needed = {(GROUP, f"{PLURAL}/finalizers", "update")} if blocking else set()
    assert triples(kube.ADMISSION_PERMISSIONS) == needed


def test_cluster_role_holds_what_the_per_job_role_grants(rendered: list[dict[str, Any]]) -> None:
    # RBAC escalation prevention: creating (and binding) a Role needs every permission in it.
    job = sftjobs_in((DEPLOY / "examples" / "tiny-cpu.yaml").read_text())[0]
    granted_to_trainer = rule_triples(build_role(job)["rules"])
    assert granted_to_trainer
    assert not granted_to_trainer - cluster_role_grants(rendered)


def test_cluster_role_grants_nothing_else(rendered: list[dict[str, Any]]) -> None:
    job = sftjobs_in((DEPLOY / "examples" / "tiny-cpu.yaml").read_text())[0]
    accounted = (
        triples(kube.API_PERMISSIONS)
        | triples(kube.ADMISSION_PERMISSIONS)
        | triples(KOPF_PERMISSIONS)
        | rule_triples(build_role(job)["rules"])
    )
    extra = cluster_role_grants(rendered) - accounted
    assert not extra, f"the ClusterRole grants more than the operator uses: {extra}"
    for rule in the(rendered, "ClusterRole", "sftjob-operator")["rules"]:
        assert "*" not in rule["apiGroups"] + rule["resources"] + rule["verbs"], rule
        assert "secrets" not in rule["resources"], rule
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"]), rule
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule


def test_binding_gives_the_role_to_the_deployment_account(
    rendered: list[dict[str, Any]],
) -> None:
    binding = the(rendered, "ClusterRoleBinding", "sftjob-operator")
    assert binding["roleRef"] == {
        "apiGroup": RBAC,
        "kind": "ClusterRole",
        "name": "sftjob-operator",
    }
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "sftjob-operator", "namespace": NAMESPACE}
    ]
    account = the(rendered, "ServiceAccount", "sftjob-operator")
    assert account["metadata"]["namespace"] == NAMESPACE
    pod = the(rendered, "Deployment", "sftjob-operator")["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == "sftjob-operator"


# ----------------------------------------------------------------------------- Deployment


def operator_container(rendered: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = the(rendered, "Deployment", "sftjob-operator")["spec"]["template"]["spec"][
        "containers"
    ]
    return container


def deployment_args(rendered: list[dict[str, Any]]) -> list[str]:
    return list(operator_container(rendered)["args"])


def test_deployment_runs_two_peered_replicas(rendered: list[dict[str, Any]]) -> None:
    deployment = the(rendered, "Deployment", "sftjob-operator")
    assert deployment["metadata"]["namespace"] == NAMESPACE
    assert deployment["spec"]["replicas"] == 2
    container = operator_container(rendered)
    assert container["image"] == "ghcr.io/sftjob/sftjob-operator:0.1.0"
    args = container["args"]
    assert args[0] == "operator" and "-A" in args and "--standalone" not in args
    assert "--liveness=http://0.0.0.0:8080/healthz" in args
    env = {e["name"]: e for e in container["env"]}
    assert env["SFTJOB_METRICS_PORT"]["value"] == "9090"
    assert env["POD_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"healthz": 8080, "metrics": 9090}
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz" and ports[probe["port"]] == 8080


def test_deployment_is_locked_down(rendered: list[dict[str, Any]]) -> None:
    pod = the(rendered, "Deployment", "sftjob-operator")["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    container = operator_container(rendered)
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"]) and "memory" in resources["limits"]
    namespace = the(rendered, "Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


# ----------------------------------------------------------------------------- image


def dockerfile() -> list[str]:
    """Instructions of operator/Dockerfile, continuation lines joined, comments dropped."""
    text = (ROOT / "operator" / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_operator_image_installs_only_the_operator_extra() -> None:
    lines = dockerfile()
    assert lines[0] == "FROM python:3.11-slim"
    installs = [line for line in lines if "pip install" in line]
    assert len(installs) == 1 and '".[operator]"' in installs[0]
    everything = "\n".join(lines)
    for banned in ("torch", "transformers", "trl", "trainer", "[dev", "local]", "sftjob_local"):
        assert banned not in everything, banned
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert not [d for d in extras["operator"] if re.match(r"(torch|transformers|trl)\b", d)]


def test_operator_image_runs_sftjob_as_non_root() -> None:
    lines = dockerfile()
    (user,) = [line.split()[1] for line in lines if line.startswith("USER ")]
    assert user.split(":")[0] not in {"root", "0"} and user.split(":")[0].isdigit()
    assert 'ENTRYPOINT ["sftjob"]' in lines
    assert 'CMD ["operator", "-A"]' in lines


# ----------------------------------------------------------------------------- Argo CD

ARGOCD = DEPLOY / "argocd"
HEALTH_KEY = "resource.customizations.health.tuning.sftjob.dev_SFTJob"


def test_argocd_cm_patch_carries_health_lua_verbatim() -> None:
    patch = yaml.safe_load((ARGOCD / "argocd-cm-patch.yaml").read_text())
    assert patch["kind"] == "ConfigMap" and patch["metadata"]["name"] == "argocd-cm"
    assert patch["data"][HEALTH_KEY] == (ARGOCD / "health.lua").read_text(), (
        "argocd-cm-patch.yaml drifted from health.lua: paste health.lua into it, indented"
    )


def lua_health(obj: dict[str, Any]) -> dict[str, str]:
    """Run health.lua the way Argo CD does: Lua 5.1 (gopher-lua), `obj` global, returns hs."""
    lupa = pytest.importorskip("lupa.lua51")
    lua = lupa.LuaRuntime()
    lua.globals().obj = lua.table_from(obj, recursive=True)
    result = lua.execute((ARGOCD / "health.lua").read_text())
    return dict(result.items())


def cond(kind: str, message: str, status: str = "True", reason: str = "Reason") -> dict[str, str]:
    return {"type": kind, "status": status, "reason": reason, "message": message}


def job(status: dict[str, Any] | None) -> dict[str, Any]:
    obj: dict[str, Any] = {"apiVersion": f"{GROUP}/v1alpha1", "kind": "SFTJob"}
    obj["metadata"] = {"name": "demo", "namespace": "default"}
    if status is not None:
        obj["status"] = status
    return obj


WAITING = {"status": "Progressing", "message": "Waiting for the operator"}


@pytest.mark.parametrize(
    ("status", "expected"),
    [
        pytest.param(None, WAITING, id="no-status"),
        pytest.param({}, WAITING, id="empty-status"),
        pytest.param(
            {"conditions": [cond("Planned", "planned 10 steps")]}, WAITING, id="planned-no-phase"
        ),
        pytest.param(
            {
                "phase": "Pending",
                "conditions": [cond("Running", "launch 1: 1 pod(s) created", "False")],
            },
            {"status": "Progressing", "message": "launch 1: 1 pod(s) created"},
            id="pending",
        ),
        pytest.param(
            {"phase": "Pending"}, {"status": "Progressing", "message": "Pending"}, id="pending-bare"
        ),
        pytest.param(
            {
                "phase": "Running",
                "conditions": [cond("Running", "launch 1: training on 2 pod(s)")],
                "progress": {"step": 40, "totalSteps": 100, "summary": "40/100"},
            },
            {"status": "Progressing", "message": "launch 1: training on 2 pod(s); step 40/100"},
            id="running",
        ),
        pytest.param(
            {"phase": "Restarting", "conditions": [cond("Restarting", "restart 1/3: OOM")]},
            {"status": "Progressing", "message": "restart 1/3: OOM"},
            id="restarting",
        ),
        pytest.param(
            {"phase": "Suspended", "conditions": [cond("Suspended", "suspended by the user")]},
            {"status": "Suspended", "message": "suspended by the user"},
            id="suspended",
        ),
        pytest.param(
            {
                "phase": "Succeeded",
                "conditions": [
                    cond("Running", "done", "False"),
                    cond("Succeeded", "all 1 rank(s) finished; output in /out"),
                ],
            },
            {"status": "Healthy", "message": "all 1 rank(s) finished; output in /out"},
            id="succeeded",
        ),
        pytest.param(
            {"phase": "Failed", "conditions": [cond("Failed", "rank 0: DataError: no rows")]},
            {"status": "Degraded", "message": "rank 0: DataError: no rows"},
            id="failed",
        ),
        pytest.param(
            {"phase": "Running", "conditions": [cond("Failed", "deadline exceeded")]},
            {"status": "Degraded", "message": "deadline exceeded"},
            id="failed-condition-wins-over-phase",
        ),
        pytest.param(
            {"phase": "Failed", "lastFailure": {"reason": "OutOfMemory", "message": "OOM at 7"}},
            {"status": "Degraded", "message": "OOM at 7"},
            id="failed-without-condition",
        ),
        pytest.param(
            {"phase": "Exploded"},
            {"status": "Unknown", "message": "Unknown phase Exploded"},
            id="unknown-phase",
        ),
    ],
)
def test_argocd_health(status: dict[str, Any] | None, expected: dict[str, str]) -> None:
    assert lua_health(job(status)) == expected


def test_argocd_health_of_a_real_invalid_spec_status() -> None:
    from datetime import UTC, datetime

    status = invalid_status(None, ["spec.training.epochs: must be > 0"], datetime.now(UTC), 1)
    assert lua_health(job(status)) == {
        "status": "Degraded",
        "message": "spec.training.epochs: must be > 0",
    }
