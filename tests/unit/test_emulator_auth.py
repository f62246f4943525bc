"""The emulator's authentication and RBAC logic as pure functions (auth.py, rbac.py, access.py)."""

from __future__ import annotations

import pytest
from sftjob_local.emulator import auth, rbac
from sftjob_local.emulator.access import allowed_hosts, check_transport
from sftjob_local.emulator.errors import ApiError

USER = auth.service_account_user("ns", "sa", "uid-1")


@pytest.mark.parametrize(
    ("method", "path", "query", "expected"),
    [
        ("GET", "/api/v1/namespaces/ns/pods/p", {}, ("get", "", "pods", "", "p", "ns")),
        ("GET", "/api/v1/namespaces/ns/pods", {}, ("list", "", "pods", "", "", "ns")),
        (
            "GET",
            "/api/v1/namespaces/ns/pods",
            {"watch": "true", "fieldSelector": "metadata.name=p"},
            ("watch", "", "pods", "", "p", "ns"),
        ),
        ("GET", "/api/v1/namespaces/ns/pods/p/log", {}, ("get", "", "pods", "log", "p", "ns")),
        ("DELETE", "/api/v1/namespaces/ns/pods", {}, ("deletecollection", "", "pods", "", "", "ns")),
        ("PATCH", "/apis/g.x/v1/namespaces/ns/ws/w/status", {}, ("patch", "g.x", "ws", "status", "w", "ns")),
        ("PUT", "/api/v1/namespaces/ns", {}, ("update", "", "namespaces", "", "ns", "ns")),
        ("PUT", "/api/v1/namespaces/ns/finalize", {}, ("update", "", "namespaces", "finalize", "ns", "ns")),
        ("POST", "/apis/rbac.authorization.k8s.io/v1/clusterroles", {}, ("create", "rbac.authorization.k8s.io", "clusterroles", "", "", "")),
    ],
)  # fmt: skip
def test_request_attributes_follow_requestinfo(
    method: str, path: str, query: dict[str, str], expected: tuple[str, ...]
) -> None:
    a = rbac.request_attributes(method, path, query, USER)
    assert a.resource_request
    assert (a.verb, a.api_group, a.resource, a.subresource, a.name, a.namespace) == expected


@pytest.mark.parametrize("path", ["/version", "/apis", "/api", "/apis/g.x/v1", "/healthz/etcd"])
def test_discovery_and_health_are_non_resource_requests(path: str) -> None:
    a = rbac.request_attributes("GET", path, {}, USER)
    assert not a.resource_request and a.verb == "get" and a.path == path


def attrs(
    verb: str, resource: str, sub: str = "", name: str = "", group: str = ""
) -> rbac.Attributes:
    return rbac.Attributes(
        USER, verb, True, api_group=group, resource=resource, subresource=sub, name=name, namespace="ns"
    )  # fmt: skip


def test_rule_matching_wildcards_subresources_and_names() -> None:
    rule = {"apiGroups": [""], "resources": ["pods", "pods/log"], "verbs": ["get"]}
    assert rbac.rule_allows(attrs("get", "pods", name="p"), rule)
    assert rbac.rule_allows(attrs("get", "pods", "log", "p"), rule)
    assert not rbac.rule_allows(attrs("get", "pods", "status", "p"), rule)
    assert not rbac.rule_allows(attrs("list", "pods"), rule)
    assert not rbac.rule_allows(attrs("get", "pods", group="apps"), rule)
    any_status = {"apiGroups": ["*"], "resources": ["*/status"], "verbs": ["*"]}
    assert rbac.rule_allows(attrs("patch", "ws", "status", "w", "g.x"), any_status)
    assert not rbac.rule_allows(attrs("patch", "ws", "", "w", "g.x"), any_status)
    named = {"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["a"], "verbs": ["get", "list"]}  # fmt: skip
    assert rbac.rule_allows(attrs("get", "configmaps", name="a"), named)
    assert not rbac.rule_allows(attrs("get", "configmaps", name="b"), named)
    assert not rbac.rule_allows(attrs("list", "configmaps"), named)
    urls = {"nonResourceURLs": ["/apis/*", "/version"], "verbs": ["get"]}
    assert rbac.rule_allows(rbac.Attributes(USER, "get", False, path="/apis/x/v1"), urls)
    assert not rbac.rule_allows(rbac.Attributes(USER, "get", False, path="/versionx"), urls)


def test_forbidden_messages_are_the_apiservers() -> None:
    err = rbac.request_forbidden(attrs("get", "pods", "log", "p"), "")
    assert err.code == 403 and err.reason == "Forbidden"
    assert err.message == (
        'pods "p" is forbidden: User "system:serviceaccount:ns:sa" cannot get resource '
        '"pods/log" in API group "" in the namespace "ns"'
    )
    assert err.details == {"name": "p", "kind": "pods"}
    cluster = rbac.Attributes(USER, "list", True, api_group="g.x", resource="ws")
    assert rbac.request_forbidden(cluster, "RBAC: x").message == (
        'ws.g.x is forbidden: User "system:serviceaccount:ns:sa" cannot list resource "ws" in '
        'API group "g.x" at the cluster scope: RBAC: x'
    )
    path = rbac.Attributes(auth.ANONYMOUS, "get", False, path="/apis")
    assert rbac.request_forbidden(path, "").message == (
        'forbidden: User "system:anonymous" cannot get path "/apis"'
    )


def test_escalation_lists_the_missing_rules_compacted() -> None:
    owned = [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}]
    wanted = [
        {"apiGroups": [""], "resources": ["configmaps", "secrets"], "verbs": ["get", "list"]},
        {"nonResourceURLs": ["/metrics"], "verbs": ["get"]},
    ]
    missing = rbac.missing_rules(owned, wanted)
    assert rbac.escalation_error(USER, missing, []) == (
        'user "system:serviceaccount:ns:sa" (groups=["system:serviceaccounts" '
        '"system:serviceaccounts:ns" "system:authenticated"]) is attempting to grant RBAC '
        "permissions not currently held:\n"
        '{APIGroups:[""], Resources:["configmaps"], Verbs:["list"]}\n'
        '{APIGroups:[""], Resources:["secrets"], Verbs:["get" "list"]}\n'
        '{NonResourceURLs:["/metrics"], Verbs:["get"]}'
    )
    assert not rbac.missing_rules([{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}], wanted[:1])  # fmt: skip
    # An owner limited to names covers only requests for those names.
    named = [{"apiGroups": [""], "resources": ["pods"], "resourceNames": ["a"], "verbs": ["get"]}]
    assert rbac.missing_rules(named, [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}])
    assert not rbac.missing_rules(named, named)


def test_resolver_binds_subjects_and_reports_missing_roles() -> None:
    roles = {("ns", "reader"): {"rules": [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get"]}]}}  # fmt: skip
    bindings = [
        {
            "metadata": {"name": "b"},
            "roleRef": {"kind": "Role", "name": "reader"},
            "subjects": [{"kind": "ServiceAccount", "name": "sa"}],  # namespace: the binding's
        },
        {
            "metadata": {"name": "gone"},
            "roleRef": {"kind": "ClusterRole", "name": "gone"},
            "subjects": [{"kind": "Group", "name": "system:serviceaccounts"}],
        },
    ]
    resolver = rbac.RuleResolver(
        get_role=lambda ns, name: roles.get((ns, name)),
        get_cluster_role=lambda _, name: None,
        list_role_bindings=lambda ns: bindings if ns == "ns" else [],
        list_cluster_role_bindings=lambda _: [],
    )
    allowed, reason = resolver.authorize(attrs("get", "pods", name="p"))
    assert allowed and reason == (
        'RBAC: allowed by RoleBinding "b/ns" of Role "reader" to ServiceAccount "sa/ns"'
    )
    allowed, reason = resolver.authorize(attrs("list", "pods"))
    assert not allowed
    assert reason == 'RBAC: clusterrole.rbac.authorization.k8s.io "gone" not found'
    other = auth.service_account_user("ns", "other", "uid-2")
    assert not resolver.authorize(rbac.Attributes(other, "get", True, resource="pods", namespace="ns"))[0]  # fmt: skip
    assert resolver.authorize(rbac.Attributes(auth.ADMIN, "delete", True, resource="nodes"))[0]


def test_tokens_verify_only_unchanged_unexpired_and_for_existing_accounts() -> None:
    authority = auth.TokenAuthority("key")
    sa = {"metadata": {"name": "sa", "namespace": "ns", "uid": "uid-1"}}
    token, exp = authority.issue(sa, auth.API_AUDIENCES, 600, now=1000)
    assert exp == 1600
    claims = authority.verify(token, now=1100)
    assert claims is not None and claims["sub"] == "system:serviceaccount:ns:sa"
    assert authority.verify(token, now=1600) is None  # expired
    assert auth.TokenAuthority("other key").verify(token, now=1100) is None
    header, body, signature = token.split(".")
    assert authority.verify(f"{header}.{body}x.{signature}", now=1100) is None
    found = {("ns", "sa"): sa}
    user = auth.user_from_claims(claims, lambda ns, n: found.get((ns, n)), lambda ns, n: None)
    assert user is not None and user.groups == (
        "system:serviceaccounts",
        "system:serviceaccounts:ns",
        "system:authenticated",
    )
    recreated = {("ns", "sa"): {"metadata": {**sa["metadata"], "uid": "uid-2"}}}
    assert auth.user_from_claims(claims, lambda ns, n: recreated.get((ns, n)), lambda ns, n: None) is None  # fmt: skip
    aud = authority.issue(sa, ["vault"], 600, now=1000)[0]
    assert authority.verify(aud, now=1100) is None  # not meant for this API


def test_authenticate_anonymous_admin_and_unknown() -> None:
    authority = auth.TokenAuthority("key")

    def no(ns: str, n: str) -> None:
        return None

    assert auth.authenticate(None, "adm", authority, no, no) == auth.ANONYMOUS
    assert auth.authenticate("Bearer adm", "adm", authority, no, no) == auth.ADMIN
    for header in ("Bearer nope", "Basic YWRtOmFkbQ==", "Bearer "):
        with pytest.raises(ApiError) as exc:
            auth.authenticate(header, "adm", authority, no, no)
        assert exc.value.code == 401 and exc.value.message == "Unauthorized"


def test_transport_checks_host_and_origin() -> None:
    hosts = allowed_hosts("127.0.0.1", 8765)
    assert hosts == {"127.0.0.1:8765", "localhost:8765"}
    check_transport({"Host": "127.0.0.1:8765"}, hosts)
    for headers in (
        {"Host": "evil.example:8765"},
        {"Host": "127.0.0.1:8766"},
        {"Host": "127.0.0.1:8765", "Origin": "http://127.0.0.1:8765"},
    ):
        with pytest.raises(ApiError) as exc:
            check_transport(headers, hosts)
        assert exc.value.code == 403
