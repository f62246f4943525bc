"""Conformance probes: authentication, RBAC, service-account tokens and the admission plugins that
depend on who asks (ServiceAccount, OwnerReferencesPermissionEnforcement, RBAC escalation).

A second identity is a ServiceAccount of the probe namespace with a token from the TokenRequest
API, in both modes. RBAC changes reach a real server's authorizer through informers, so
permission changes are awaited.
"""

from __future__ import annotations

import copy
import http.client
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

if TYPE_CHECKING:  # conftest is imported by path: another tier's conftest may be first
    from conftest import Cluster

pytestmark = pytest.mark.local

RBAC = "/apis/rbac.authorization.k8s.io/v1"


def kubeconfig_with_user(cluster: Cluster, path: Path, user: dict[str, Any]) -> Path:
    """The cluster's kubeconfig with the current context's user replaced."""
    config = yaml.safe_load(cluster.kubeconfig.read_text())
    context_name = config["current-context"]
    context = next(c for c in config["contexts"] if c["name"] == context_name)["context"]
    users = [u for u in config["users"] if u["name"] != context["user"]]
    config["users"] = [*users, {"name": context["user"], "user": user}]
    path.write_text(yaml.safe_dump(config))
    return path


def as_user(cluster: Cluster, path: Path, user: dict[str, Any]) -> Cluster:
    return type(cluster)(kubeconfig_with_user(cluster, path, user), cluster.namespace, None, None)


def service_account_token(cluster: Cluster, name: str, **spec: Any) -> dict[str, Any]:
    return cluster.ok(
        "POST",
        f"/api/v1/namespaces/{cluster.namespace}/serviceaccounts/{name}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec},
    )


def new_identity(cluster: Cluster, tmp_path: Path, name: str) -> Cluster:
    """A fresh ServiceAccount and a client that authenticates with its token."""
    cluster.ok(
        "POST",
        f"/api/v1/namespaces/{cluster.namespace}/serviceaccounts",
        {"metadata": {"name": name}},
    )
    token = service_account_token(cluster, name)["status"]["token"]
    return as_user(cluster, tmp_path / f"{name}.kubeconfig", {"token": token})


def grant(cluster: Cluster, name: str, account: str, rules: list[dict[str, Any]]) -> None:
    """A Role with the rules and a RoleBinding of it to the ServiceAccount (as the admin)."""
    ns = cluster.namespace
    cluster.ok(
        "POST", f"{RBAC}/namespaces/{ns}/roles", {"metadata": {"name": name}, "rules": rules}
    )
    cluster.ok(
        "POST",
        f"{RBAC}/namespaces/{ns}/rolebindings",
        {
            "metadata": {"name": name},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}],
        },
    )


def sa_user(cluster: Cluster, account: str) -> str:
    return f"system:serviceaccount:{cluster.namespace}:{account}"


def sa_groups(cluster: Cluster) -> list[str]:
    return [
        "system:serviceaccounts",
        f"system:serviceaccounts:{cluster.namespace}",
        "system:authenticated",
    ]


def test_an_unknown_token_is_401_unauthorized(cluster: Cluster, tmp_path: Path) -> None:
    """apiserver filters/authentication.go: a failed authentication → apierrors.NewUnauthorized
    ("Unauthorized"), whatever is asked."""
    stranger = as_user(cluster, tmp_path / "kc", {"token": "not-a-token-this-cluster-issued"})
    for path in ("/version", f"/api/v1/namespaces/{cluster.namespace}/pods"):
        status, body = stranger.request("GET", path)
        assert status == 401, (path, status, body)
        assert body["reason"] == "Unauthorized" and body["message"] == "Unauthorized", body
        assert body["kind"] == "Status" and body["code"] == 401


def test_anonymous_requests_read_only_public_info(cluster: Cluster, tmp_path: Path) -> None:
    """Anonymous requests (kube-apiserver --anonymous-auth defaults to true) are
    system:anonymous in system:unauthenticated, which the bootstrap policy binds only to
    system:public-info-viewer (/healthz, /livez, /readyz, /version): see
    https://kubernetes.io/docs/reference/access-authn-authz/rbac/#discovery-roles and
    responsewriters.forbiddenMessage for the denial."""
    anonymous = as_user(cluster, tmp_path / "kc", {})
    assert anonymous.request("GET", "/version")[0] == 200
    status, body = anonymous.request("GET", f"/api/v1/namespaces/{cluster.namespace}/pods")
    assert status == 403, body
    assert body["message"].startswith(
        'pods is forbidden: User "system:anonymous" cannot list resource "pods" in API group "" '
        f'in the namespace "{cluster.namespace}"'
    ), body
    status, body = anonymous.request("GET", "/apis")
    assert status == 403, body
    assert body["message"].startswith('forbidden: User "system:anonymous" cannot get path "/apis"')


def test_forbidden_answers_name_user_verb_resource_and_scope(
    cluster: Cluster, tmp_path: Path, uniq: str
) -> None:
    """responsewriters.Forbidden: apierrors.NewForbidden(group/resource, name, forbiddenMessage)
    — "<resource>[.<group>] ["<name>"] is forbidden: User "<u>" cannot <verb> resource
    "<resource>[/<subresource>]" in API group "<group>" (in the namespace "<ns>" | at the
    cluster scope)"; details carry name, group, kind (the resource)."""
    account = f"nobody-{uniq}"
    other = new_identity(cluster, tmp_path, account)
    ns, user = cluster.namespace, sa_user(cluster, account)

    status, body = other.request("GET", f"/api/v1/namespaces/{ns}/pods/p1")
    assert status == 403 and body["reason"] == "Forbidden", body
    assert body["message"].startswith(
        f'pods "p1" is forbidden: User "{user}" cannot get resource "pods" in API group "" '
        f'in the namespace "{ns}"'
    ), body
    assert body["details"] == {"name": "p1", "kind": "pods"}, body

    status, body = other.request("GET", f"/api/v1/namespaces/{ns}/pods/p1/log")
    assert status == 403, body
    assert body["message"].startswith(
        f'pods "p1" is forbidden: User "{user}" cannot get resource "pods/log" in API group "" '
        f'in the namespace "{ns}"'
    ), body

    status, body = other.request("GET", f"{RBAC}/namespaces/{ns}/roles")
    assert status == 403, body
    assert body["message"].startswith(
        f'roles.rbac.authorization.k8s.io is forbidden: User "{user}" cannot list resource '
        f'"roles" in API group "rbac.authorization.k8s.io" in the namespace "{ns}"'
    ), body
    assert body["details"] == {"group": "rbac.authorization.k8s.io", "kind": "roles"}, body

    status, body = other.request("GET", "/api/v1/namespaces")
    assert status == 403, body
    assert body["message"].startswith(
        f'namespaces is forbidden: User "{user}" cannot list resource "namespaces" in API group '
        '"" at the cluster scope'
    ), body

    status, body = other.request("DELETE", f"/api/v1/namespaces/{ns}/configmaps")
    assert status == 403, body
    assert 'cannot deletecollection resource "configmaps" in API group ""' in body["message"]


def test_roles_grant_verbs_subresources_and_resource_names(
    cluster: Cluster, tmp_path: Path, uniq: str
) -> None:
    """RBAC rule matching (k8s.io/component-helpers/auth/rbac/validation): verbs, resources
    with "<resource>/<subresource>", resourceNames limiting named requests only (a list is
    never allowed by a rule with resourceNames); https://kubernetes.io/docs/reference/
    access-authn-authz/rbac/#referring-to-resources."""
    account = f"reader-{uniq}"
    other = new_identity(cluster, tmp_path, account)
    ns = cluster.namespace
    for name in ("mine", "theirs"):
        cluster.ok(
            "POST",
            f"/api/v1/namespaces/{ns}/configmaps",
            {"metadata": {"name": f"{name}-{uniq}"}, "data": {"a": "b"}},
        )
    grant(
        cluster,
        f"reader-{uniq}",
        account,
        [
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [f"mine-{uniq}"],
                "verbs": ["get", "update"],
            },
            {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        ],
    )
    mine = f"/api/v1/namespaces/{ns}/configmaps/mine-{uniq}"
    cluster.wait_for(lambda: other.request("GET", mine)[0] == 200)
    assert other.request("GET", f"/api/v1/namespaces/{ns}/configmaps/theirs-{uniq}")[0] == 403
    assert other.request("GET", f"/api/v1/namespaces/{ns}/configmaps")[0] == 403
    assert other.request("DELETE", mine)[0] == 403
    # pods/log granted, pods not: the subresource is its own resource.
    assert other.request("GET", f"/api/v1/namespaces/{ns}/pods/none-{uniq}/log")[0] == 404
    assert other.request("GET", f"/api/v1/namespaces/{ns}/pods/none-{uniq}")[0] == 403


def test_self_subject_reviews_answer_for_the_caller(
    cluster: Cluster, tmp_path: Path, uniq: str
) -> None:
    """SelfSubjectAccessReview (authorization.k8s.io/v1, what `kubectl auth can-i` sends),
    SelfSubjectRulesReview (`kubectl auth can-i --list`) and SelfSubjectReview
    (authentication.k8s.io/v1, `kubectl auth whoami`), all creatable by any
    authenticated user (system:basic-user); https://kubernetes.io/docs/reference/
    access-authn-authz/authorization/#checking-api-access."""
    account = f"asker-{uniq}"
    other = new_identity(cluster, tmp_path, account)
    ns = cluster.namespace
    review = other.ok(
        "POST",
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    info = review["status"]["userInfo"]
    assert review["kind"] == "SelfSubjectReview"
    assert info["username"] == sa_user(cluster, account)
    assert set(sa_groups(cluster)) <= set(info["groups"]), info

    def can_i(attributes: dict[str, Any]) -> bool:
        answer = other.ok(
            "POST",
            "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "SelfSubjectAccessReview",
                "spec": attributes,
            },
        )
        assert answer["kind"] == "SelfSubjectAccessReview"
        return bool(answer["status"]["allowed"])

    list_pods = {"resourceAttributes": {"namespace": ns, "verb": "list", "resource": "pods"}}
    assert not can_i(list_pods)
    assert can_i({"nonResourceAttributes": {"path": "/version", "verb": "get"}})
    grant(
        cluster,
        f"asker-{uniq}",
        account,
        [{"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]}],
    )
    cluster.wait_for(lambda: can_i(list_pods))
    other_ns = {"resourceAttributes": {"namespace": "default", "verb": "list", "resource": "pods"}}
    assert not can_i(other_ns)
    rules = other.ok(
        "POST",
        "/apis/authorization.k8s.io/v1/selfsubjectrulesreviews",
        {
            "apiVersion": "authorization.k8s.io/v1",
            "kind": "SelfSubjectRulesReview",
            "spec": {"namespace": ns},
        },
    )["status"]
    assert {"verbs": ["list"], "apiGroups": [""], "resources": ["pods"]} in rules["resourceRules"]
    assert not any("secrets" in r.get("resources", []) for r in rules["resourceRules"]), rules
    status, body = other.request(
        "POST",
        "/apis/authorization.k8s.io/v1/selfsubjectaccessreviews",
        {"apiVersion": "authorization.k8s.io/v1", "kind": "SelfSubjectAccessReview", "spec": {}},
    )
    assert status == 422 and body["reason"] == "Invalid", body


def test_token_requests_issue_tokens_bound_to_the_service_account(
    cluster: Cluster, tmp_path: Path, uniq: str
) -> None:
    """TokenRequest (serviceaccounts/<name>/token, `kubectl create token`):
    pkg/registry/core/serviceaccount/storage/token.go and
    pkg/apis/authentication/validation (expirationSeconds ≥ 600); a token names its
    ServiceAccount's uid, so a deleted and re-created ServiceAccount's old tokens are refused
    (https://kubernetes.io/docs/reference/access-authn-authz/service-accounts-admin/
    #bound-service-account-token-volume)."""
    account = f"tok-{uniq}"
    ns = cluster.namespace
    path = f"/api/v1/namespaces/{ns}/serviceaccounts"
    cluster.ok("POST", path, {"metadata": {"name": account}})
    issued = service_account_token(cluster, account, expirationSeconds=600)
    assert issued["kind"] == "TokenRequest" and issued["status"]["token"]
    assert issued["status"]["expirationTimestamp"]
    assert issued["spec"]["expirationSeconds"] == 600

    status, body = cluster.request(
        "POST",
        f"{path}/{account}/token",
        {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {"expirationSeconds": 599},
        },
    )
    assert status == 422 and body["reason"] == "Invalid", body
    assert body["details"]["causes"][0]["field"] == "spec.expirationSeconds", body
    assert "may not specify a duration less than 10 minutes" in body["message"]

    status, body = cluster.request(
        "POST",
        f"{path}/missing-{uniq}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
    )
    assert status == 404 and body["reason"] == "NotFound", body

    holder = as_user(cluster, tmp_path / "kc", {"token": issued["status"]["token"]})
    review = "/apis/authentication.k8s.io/v1/selfsubjectreviews"
    ssr = {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"}
    assert holder.request("POST", review, ssr)[0] == 201
    cluster.ok("DELETE", f"{path}/{account}")
    cluster.ok("POST", path, {"metadata": {"name": account}})
    cluster.wait_for(lambda: holder.request("POST", review, ssr)[0] == 401, timeout=30)


def test_rbac_refuses_granting_what_the_granter_lacks(
    cluster: Cluster, tmp_path: Path, uniq: str
) -> None:
    """RBAC escalation prevention (https://kubernetes.io/docs/reference/access-authn-authz/
    rbac/#privilege-escalation-prevention-and-bootstrapping): creating a Role needs every
    permission it grants (or `escalate`), a RoleBinding the referenced role's permissions (or
    `bind`); the message is ConfirmNoEscalation's (pkg/registry/rbac/validation/rule.go) in
    apierrors.NewForbidden."""
    account = f"granter-{uniq}"
    other = new_identity(cluster, tmp_path, account)
    ns = cluster.namespace
    grant(
        cluster,
        f"granter-{uniq}",
        account,
        [
            {
                "apiGroups": ["rbac.authorization.k8s.io"],
                "resources": ["roles", "rolebindings"],
                "verbs": ["create"],
            },
            {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]},
        ],
    )
    held = {
        "metadata": {"name": f"held-{uniq}"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}],
    }
    cluster.wait_for(lambda: other.request("POST", f"{RBAC}/namespaces/{ns}/roles", held)[0] == 201)

    wanted = {
        "metadata": {"name": f"wanted-{uniq}"},
        "rules": [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "list"]}],
    }
    status, body = other.request("POST", f"{RBAC}/namespaces/{ns}/roles", wanted)
    assert status == 403 and body["reason"] == "Forbidden", body
    groups = " ".join(f'"{g}"' for g in sa_groups(cluster))
    assert body["message"].startswith(
        f'roles.rbac.authorization.k8s.io "wanted-{uniq}" is forbidden: user '
        f'"{sa_user(cluster, account)}" (groups=[{groups}]) is attempting to grant RBAC '
        "permissions not currently held:\n"
        '{APIGroups:[""], Resources:["secrets"], Verbs:["get" "list"]}'
    ), body
    assert cluster.request("GET", f"{RBAC}/namespaces/{ns}/roles/wanted-{uniq}")[0] == 404

    # Binding a role with permissions the granter lacks: refused the same way.
    cluster.ok("POST", f"{RBAC}/namespaces/{ns}/roles", wanted)
    binding = {
        "metadata": {"name": f"wanted-{uniq}"},
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": f"wanted-{uniq}",
        },
        "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}],
    }
    status, body = other.request("POST", f"{RBAC}/namespaces/{ns}/rolebindings", binding)
    assert status == 403, body
    assert body["message"].startswith(
        f'rolebindings.rbac.authorization.k8s.io "wanted-{uniq}" is forbidden: user '
    ), body
    assert "is attempting to grant RBAC permissions not currently held" in body["message"]
    # A binding to a role that does not exist: the role registry's NotFound.
    dangling = copy.deepcopy(binding)
    dangling["metadata"]["name"] = dangling["roleRef"]["name"] = f"none-{uniq}"
    status, body = other.request("POST", f"{RBAC}/namespaces/{ns}/rolebindings", dangling)
    assert status == 404 and body["reason"] == "NotFound", body
    assert body["message"] == f'roles.rbac.authorization.k8s.io "none-{uniq}" not found', body
    held_binding = copy.deepcopy(binding)
    held_binding["metadata"]["name"] = f"held-{uniq}"
    held_binding["roleRef"]["name"] = f"held-{uniq}"
    assert other.request("POST", f"{RBAC}/namespaces/{ns}/rolebindings", held_binding)[0] == 201


def test_block_owner_deletion_needs_update_on_the_owners_finalizers(
    cluster: Cluster, tmp_path: Path, uniq: str
) -> None:
    """OwnerReferencesPermissionEnforcement (plugin/pkg/admission/gc/gc_admission.go, enabled
    by default): setting blockOwnerDeletion=true needs `update` on the owner's `finalizers`
    subresource; refused with "cannot set blockOwnerDeletion if an ownerReference refers to a
    resource you can't set finalizers on: , <nil>" (reason and error of the authorizer)."""
    account = f"child-{uniq}"
    other = new_identity(cluster, tmp_path, account)
    ns = cluster.namespace
    owner = cluster.ok(
        "POST", f"/api/v1/namespaces/{ns}/configmaps", {"metadata": {"name": f"owner-{uniq}"}}
    )
    grant(
        cluster,
        f"child-{uniq}",
        account,
        [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["create"]}],
    )

    def child(name: str, block: bool) -> dict[str, Any]:
        return {
            "metadata": {
                "name": name,
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "name": owner["metadata"]["name"],
                        "uid": owner["metadata"]["uid"],
                        "blockOwnerDeletion": block,
                    }
                ],
            }
        }

    path = f"/api/v1/namespaces/{ns}/configmaps"
    cluster.wait_for(lambda: other.request("POST", path, child(f"free-{uniq}", False))[0] == 201)
    status, body = other.request("POST", path, child(f"blocking-{uniq}", True))
    assert status == 403 and body["reason"] == "Forbidden", body
    assert body["message"] == (
        f'configmaps "blocking-{uniq}" is forbidden: cannot set blockOwnerDeletion if an '
        "ownerReference refers to a resource you can't set finalizers on: , <nil>"
    ), body
    assert cluster.request("GET", f"{path}/blocking-{uniq}")[0] == 404

    grant(
        cluster,
        f"finalizers-{uniq}",
        account,
        [{"apiGroups": [""], "resources": ["configmaps/finalizers"], "verbs": ["update"]}],
    )
    cluster.wait_for(lambda: other.request("POST", path, child(f"blocking-{uniq}", True))[0] == 201)


def test_every_namespace_has_a_default_service_account(cluster: Cluster, uniq: str) -> None:
    """The ServiceAccount controller creates `default` in every namespace
    (https://kubernetes.io/docs/concepts/security/service-accounts/#default-service-accounts)."""
    name = f"sa-ns-{uniq}"
    cluster.ok("POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    try:
        cluster.wait_for(
            lambda: (
                cluster.request("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default")[0]
                == 200
            ),
            timeout=30,
        )
    finally:
        cluster.request("DELETE", f"/api/v1/namespaces/{name}")


def test_pods_run_as_an_existing_service_account(cluster: Cluster, uniq: str) -> None:
    """The ServiceAccount admission plugin (plugin/pkg/admission/serviceaccount/admission.go):
    serviceAccountName defaults to `default`; a missing account is refused with
    admission.NewForbidden("error looking up service account <ns>/<name>: serviceaccount
    "<name>" not found")."""
    ns = cluster.namespace
    path = f"/api/v1/namespaces/{ns}/pods"

    def pod(name: str, **spec: Any) -> dict[str, Any]:
        container = {"name": "c", "image": "busybox", "command": ["true"]}
        return {"metadata": {"name": name}, "spec": {"containers": [container], **spec}}

    status, body = cluster.request(
        "POST", path, pod(f"lost-{uniq}", serviceAccountName=f"nope-{uniq}")
    )
    assert status == 403 and body["reason"] == "Forbidden", body
    assert body["message"] == (
        f'pods "lost-{uniq}" is forbidden: error looking up service account '
        f'{ns}/nope-{uniq}: serviceaccount "nope-{uniq}" not found'
    ), body
    assert cluster.request("GET", f"{path}/lost-{uniq}")[0] == 404
    created = cluster.ok("POST", f"{path}?dryRun=All", pod(f"plain-{uniq}"))
    assert created["spec"]["serviceAccountName"] == "default"


def _raw_request(cluster: Cluster, headers: dict[str, str]) -> tuple[int, dict[str, Any]]:
    import json

    emulator = cluster.emulator
    assert emulator is not None and emulator.emulator is not None
    host, port = emulator.url.removeprefix("https://").rsplit(":", 1)
    context = ssl.create_default_context(cadata=emulator.emulator.ca_pem.decode())
    connection = http.client.HTTPSConnection(host, int(port), context=context, timeout=10)
    try:
        connection.request(
            "GET",
            "/version",
            headers={"Authorization": f"Bearer {emulator.emulator.admin_token}", **headers},
        )
        response = connection.getresponse()
        return response.status, json.loads(response.read())
    finally:
        connection.close()


def test_only_the_local_user_reaches_the_emulator(cluster: Cluster) -> None:
    """Emulator-only protection, no real-server counterpart: a local API server that runs pods
    as processes must not be reachable from web pages. A browser's cross-origin request carries
    an Origin header; a DNS-rebinding page reaches 127.0.0.1 under its own host name (Host
    header). Both are refused with 403, even with a valid token."""
    cluster.require_emulator("Host/Origin checks protect the local emulator only")
    assert _raw_request(cluster, {})[0] == 200
    status, body = _raw_request(cluster, {"Origin": "https://example.com"})
    assert status == 403 and "Origin" in body["message"], body
    status, body = _raw_request(cluster, {"Host": "attacker.example:80"})
    assert status == 403 and "Host" in body["message"], body
