"""Who may call the emulator and what they may do: the glue between HTTP, ``auth``, ``rbac`` and
the admission checks that depend on the caller.

Per request (``AccessControl.check_request``): Host/Origin (emulator-only protections, see
``check_transport``), authentication (``auth.authenticate``: 401), authorization
(``rbac.RuleResolver.authorize``: 403).

Served here (``AccessControl.serve``): TokenRequest (``serviceaccounts/<name>/token``),
SelfSubjectAccessReview, SelfSubjectReview.

Admission (``AccessControl.admit``, called by ``ApiCore`` before it stores a write made by a
request): ServiceAccount (pods get ``serviceAccountName: default`` when unset; a missing
ServiceAccount is refused), OwnerReferencesPermissionEnforcement (plugin/pkg/admission/gc),
RBAC escalation prevention (pkg/registry/rbac/*/policybased). The ServiceAccount controller's
part (a ``default`` ServiceAccount in every namespace) is ``ensure_default_service_account``.
"""

from __future__ import annotations

import copy
import datetime
import ipaddress
from collections.abc import Callable, Mapping
from typing import Any

from . import auth, errors, rbac
from .errors import ApiError
from .resources import ResourceType

TOKEN_REQUEST_API = "authentication.k8s.io/v1"
RBAC_KINDS = ("Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding")


def _rfc3339(epoch: float) -> str:
    return datetime.datetime.fromtimestamp(epoch, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def allowed_hosts(host: str, port: int) -> set[str]:
    """Host header values that name this server: its address (and localhost on loopback)."""
    names = {f"[{host}]:{port}" if ":" in host else f"{host}:{port}"}
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    if loopback:
        names.add(f"localhost:{port}")
    return names


def check_transport(headers: Mapping[str, str], hosts: set[str]) -> None:
    """Emulator-only: the local API is for the local user's tools, not for web pages.

    A web page can send requests to 127.0.0.1 (browsers attach an Origin header to
    cross-origin requests) or reach it through a DNS name it controls that resolves to
    127.0.0.1 (DNS rebinding: the Host header then carries that name). Neither is a kubectl or
    client library talking to the address in the kubeconfig, so both are refused.
    """
    if "Origin" in headers:
        raise ApiError(
            403,
            "requests from web pages are refused: this local API server does not serve requests "
            f"that carry an Origin header (Origin: {headers['Origin']!r})",
            "Forbidden",
        )
    host = headers.get("Host", "")
    if host not in hosts:
        raise ApiError(
            403,
            f"the Host header {host!r} does not name this local API server "
            f"({' or '.join(sorted(hosts))}); requests through other names are refused",
            "Forbidden",
        )


class AccessControl:
    """Authentication, authorization and caller-dependent admission for one emulator."""

    def __init__(self, core: Any, admin_token: str, signing_key: str) -> None:
        self.core = core
        self.admin_token = admin_token
        self.authority = auth.TokenAuthority(signing_key)
        self.resolver = rbac.RuleResolver(
            get_role=lambda ns, name: self._stored(rbac.RBAC_GROUP, "roles", ns, name),
            get_cluster_role=lambda _, name: self._stored(
                rbac.RBAC_GROUP, "clusterroles", "", name
            ),
            list_role_bindings=lambda ns: core.store.list((rbac.RBAC_GROUP, "rolebindings"), ns),
            list_cluster_role_bindings=lambda _: core.store.list(
                (rbac.RBAC_GROUP, "clusterrolebindings")
            ),
        )

    def _stored(self, group: str, plural: str, namespace: str, name: str) -> dict[str, Any] | None:
        return self.core.store.get((group, plural), namespace, name)

    # ------------------------------------------------------------ bootstrap
    def bootstrap(self) -> None:
        """The default RBAC policy and a ``default`` ServiceAccount in every namespace."""
        for obj in rbac.bootstrap_cluster_roles():
            self._create_if_missing("clusterroles", obj)
        for obj in rbac.bootstrap_cluster_role_bindings():
            self._create_if_missing("clusterrolebindings", obj)
        for ns in self.core.store.list(("", "namespaces")):
            self.ensure_default_service_account(ns)

    def _create_if_missing(self, plural: str, obj: dict[str, Any]) -> None:
        if self._stored(rbac.RBAC_GROUP, plural, "", obj["metadata"]["name"]) is None:
            self.core.create(self.core.rt(rbac.RBAC_GROUP, "v1", plural), None, obj)

    def ensure_default_service_account(self, namespace: dict[str, Any]) -> None:
        """The ServiceAccount controller: every active namespace has a ``default`` account."""
        name = namespace["metadata"]["name"]
        if namespace["metadata"].get("deletionTimestamp"):
            return
        if self._stored("", "serviceaccounts", name, "default") is None:
            self.core.create(
                self.core.rt("", "v1", "serviceaccounts"),
                name,
                {"metadata": {"name": "default", "namespace": name}},
            )

    # ------------------------------------------------------------ per request
    def check_request(
        self, method: str, path: str, query: Mapping[str, str], headers: Mapping[str, str]
    ) -> auth.UserInfo:
        user = auth.authenticate(
            headers.get("Authorization"),
            self.admin_token,
            self.authority,
            lambda ns, name: self._stored("", "serviceaccounts", ns, name),
            lambda ns, name: self._stored("", "pods", ns, name),
        )
        attrs = rbac.request_attributes(method, path, dict(query), user)
        allowed, reason = self.resolver.authorize(attrs)
        if not allowed:
            raise rbac.request_forbidden(attrs, reason)
        return user

    def serve(
        self,
        method: str,
        group: str,
        namespace: str | None,
        plural: str | None,
        name: str | None,
        subresource: str | None,
        body: Callable[[], Any],
        user: auth.UserInfo,
    ) -> tuple[dict[str, Any], int] | None:
        """The authentication/authorization APIs: (body, status), or None for other routes."""
        if group == "" and plural == "serviceaccounts" and subresource == "token":
            if method != "POST":
                raise ApiError(
                    405,
                    f"the server does not allow this method on the requested resource ({method})",
                    "MethodNotAllowed",
                )
            return self.token_request(namespace or "", name or "", _object(body())), 201
        reviews = {
            ("authorization.k8s.io", "selfsubjectaccessreviews"): self.self_subject_access_review,
            ("authorization.k8s.io", "selfsubjectrulesreviews"): self.self_subject_rules_review,
            ("authentication.k8s.io", "selfsubjectreviews"): self.self_subject_review,
        }
        handler = reviews.get((group, plural or ""))
        if handler is None:
            return None
        if method != "POST" or name:
            raise ApiError(
                405,
                f"the server does not allow this method on the requested resource ({method})",
                "MethodNotAllowed",
            )
        return handler(_object(body()), user), 201

    def token_request(self, namespace: str, name: str, request: dict[str, Any]) -> dict[str, Any]:
        """pkg/registry/core/serviceaccount/storage/token.go: a token for the ServiceAccount."""
        sa = self._stored("", "serviceaccounts", namespace, name)
        if sa is None:
            raise errors.not_found("serviceaccounts", "", name)
        spec = dict(request.get("spec") or {})
        pod = None
        bound = spec.get("boundObjectRef")
        if bound:
            if bound.get("kind") != "Pod" or bound.get("apiVersion", "v1") != "v1":
                raise errors.bad_request(
                    f'cannot bind token for serviceaccount "{name}" to object of type '
                    f"{bound.get('apiVersion')}, Kind={bound.get('kind')}"
                )
            pod = self._stored("", "pods", namespace, bound.get("name", ""))
            if pod is None:
                raise errors.not_found("pods", "", bound.get("name", ""))
            if bound.get("uid") and bound["uid"] != pod["metadata"]["uid"]:
                raise ApiError(
                    409,
                    f"the UID in the bound object reference ({bound['uid']}) does not match the "
                    "UID in record. The object might have been deleted and then recreated",
                    "Conflict",
                )
            bound = {**bound, "uid": pod["metadata"]["uid"]}
        requested, issued = auth.token_request_expiration(spec, pod is not None)
        audiences = list(spec.get("audiences") or auth.API_AUDIENCES)
        now = datetime.datetime.now(datetime.UTC).timestamp()
        token, _ = self.authority.issue(sa, audiences, issued, pod, now)
        out_spec: dict[str, Any] = {"audiences": audiences, "expirationSeconds": requested}
        if bound:
            out_spec["boundObjectRef"] = bound
        return {
            "kind": "TokenRequest",
            "apiVersion": TOKEN_REQUEST_API,
            "metadata": {
                "name": name,
                "namespace": namespace,
                "creationTimestamp": _rfc3339(now),
            },
            "spec": out_spec,
            "status": {"token": token, "expirationTimestamp": _rfc3339(now + requested)},
        }

    def self_subject_access_review(
        self, review: dict[str, Any], user: auth.UserInfo
    ) -> dict[str, Any]:
        """pkg/registry/authorization/selfsubjectaccessreview/rest.go."""
        spec = dict(review.get("spec") or {})
        resource = spec.get("resourceAttributes")
        non_resource = spec.get("nonResourceAttributes")
        if bool(resource) == bool(non_resource):
            raise errors.invalid(
                "SelfSubjectAccessReview",
                "authorization.k8s.io",
                "",
                [
                    {
                        "reason": "FieldValueInvalid",
                        "message": 'Invalid value: "null": exactly one of nonResourceAttributes or resourceAttributes must be specified',
                        "field": "spec.resourceAttributes",
                    }
                ],
            )
        if resource:
            attrs = rbac.Attributes(
                user,
                resource.get("verb", ""),
                True,
                api_group=resource.get("group", ""),
                api_version=resource.get("version", ""),
                resource=resource.get("resource", ""),
                subresource=resource.get("subresource", ""),
                name=resource.get("name", ""),
                namespace=resource.get("namespace", ""),
            )
        else:
            attrs = rbac.Attributes(
                user, non_resource.get("verb", ""), False, path=non_resource.get("path", "")
            )
        allowed, reason = self.resolver.authorize(attrs)
        status: dict[str, Any] = {"allowed": allowed}
        if reason:
            status["reason"] = reason
        return {
            "kind": "SelfSubjectAccessReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }

    def self_subject_rules_review(
        self, review: dict[str, Any], user: auth.UserInfo
    ) -> dict[str, Any]:
        """pkg/registry/authorization/selfsubjectrulesreview/rest.go (`kubectl auth can-i
        --list`): the caller's rules in a namespace, system:masters' `*` rules first as the
        privileged-group authorizer lists them."""
        spec = dict(review.get("spec") or {})
        namespace = spec.get("namespace", "")
        rules, failures = self.resolver.rules_for(user, namespace)
        if auth.MASTERS in user.groups:
            rules = [
                {"verbs": ["*"], "apiGroups": ["*"], "resources": ["*"]},
                {"verbs": ["*"], "nonResourceURLs": ["*"]},
                *rules,
            ]
        resource_rules = [
            {
                k: list(r[k])
                for k in ("verbs", "apiGroups", "resources", "resourceNames")
                if r.get(k)
            }
            for r in rules
            if r.get("resources")
        ]
        non_resource_rules = [
            {"verbs": list(r.get("verbs") or []), "nonResourceURLs": list(r["nonResourceURLs"])}
            for r in rules
            if r.get("nonResourceURLs")
        ]
        status: dict[str, Any] = {
            "resourceRules": resource_rules,
            "nonResourceRules": non_resource_rules,
            "incomplete": bool(failures),
        }
        if failures:
            status["evaluationError"] = rbac.aggregate(failures)
        return {
            "kind": "SelfSubjectRulesReview",
            "apiVersion": "authorization.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }

    def self_subject_review(self, review: dict[str, Any], user: auth.UserInfo) -> dict[str, Any]:
        """pkg/registry/authentication/selfsubjectreview/rest.go."""
        return {
            "kind": "SelfSubjectReview",
            "apiVersion": "authentication.k8s.io/v1",
            "metadata": {"creationTimestamp": None},
            "status": {"userInfo": user.as_status()},
        }

    # ------------------------------------------------------------ admission
    def admit(
        self,
        operation: str,
        rt: ResourceType,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
        subresource: str | None,
    ) -> None:
        """Caller-dependent admission of a write (nothing for the emulator's own writes)."""
        user = auth.current_user.get()
        if user is None:
            return
        if operation == "CREATE" and rt.kind == "Pod" and not rt.group:
            self._admit_pod_service_account(obj)
        if not (rt.kind == "Pod" and not rt.group and subresource == "status"):
            self._admit_owner_references(user, operation, rt, obj, old, subresource)
        is_rbac_object = rt.group == rbac.RBAC_GROUP and rt.kind in RBAC_KINDS
        if is_rbac_object and (old is None or not rbac.only_gc_fields_changed(obj, old)):
            rbac.check_escalation(self.resolver, user, rt.kind, obj)

    def _admit_pod_service_account(self, pod: dict[str, Any]) -> None:
        """plugin/pkg/admission/serviceaccount: default the account, refuse a missing one."""
        spec = pod.setdefault("spec", {})
        name = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
        spec["serviceAccountName"] = name
        spec["serviceAccount"] = name  # the deprecated alias, as v1 conversion fills it
        namespace = pod["metadata"].get("namespace", "")
        if self._stored("", "serviceaccounts", namespace, name) is None:
            raise rbac.forbidden(
                "pods",
                "",
                pod["metadata"].get("name", ""),
                f"error looking up service account {namespace}/{name}: "
                f'serviceaccount "{name}" not found',
            )

    def _admit_owner_references(
        self,
        user: auth.UserInfo,
        operation: str,
        rt: ResourceType,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
        subresource: str | None,
    ) -> None:
        """plugin/pkg/admission/gc (OwnerReferencesPermissionEnforcement)."""
        refs = list((obj.get("metadata") or {}).get("ownerReferences") or [])
        old_refs = list(((old or {}).get("metadata") or {}).get("ownerReferences") or [])
        changing = bool(refs) if old is None else refs != old_refs
        if not changing:
            return
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace", "")
        name = meta.get("name", "")
        if operation != "CREATE":
            # Changing the owners of an existing object needs the power to delete it.
            self._require(
                user,
                rt,
                name,
                "cannot set an ownerRef on a resource you can't delete",
                "delete",
                api_group=rt.group,
                api_version=rt.version,
                resource=rt.plural,
                subresource=subresource or "",
                name=name,
                namespace=namespace,
            )
        old_blocking = {r.get("uid") for r in old_refs if r.get("blockOwnerDeletion") is True}
        for ref in refs:
            if ref.get("blockOwnerDeletion") is not True or ref.get("uid") in old_blocking:
                continue
            api_version = ref.get("apiVersion", "")
            group, _, version = api_version.rpartition("/")
            owners = [
                t
                for t in self.core.registry.all()
                if t.group == group and t.kind == ref.get("kind") and t.version == version
            ]
            if not owners:
                raise rbac.forbidden(
                    rt.plural,
                    rt.group,
                    name,
                    "cannot set blockOwnerDeletion in this case because cannot find RESTMapping "
                    f"for APIVersion {api_version} Kind {ref.get('kind')}: no matches for kind "
                    f'"{ref.get("kind")}" in version "{api_version}"',
                )
            for owner in owners:
                self._require(
                    user,
                    rt,
                    name,
                    "cannot set blockOwnerDeletion if an ownerReference refers to a resource "
                    "you can't set finalizers on",
                    "update",
                    api_group=group,
                    api_version=version,
                    resource=owner.plural,
                    subresource="finalizers",
                    name=ref.get("name", ""),
                    namespace=namespace,
                )

    def _require(
        self, user: auth.UserInfo, rt: ResourceType, written: str, why: str, verb: str, **where: str
    ) -> None:
        """Forbid the write of `written` (of type `rt`) unless `user` may `verb`
        the resource `where` names: `why` opens the message, the authorizer's
        reason closes it."""
        allowed, reason = self.resolver.authorize(rbac.Attributes(user, verb, True, **where))
        if not allowed:
            raise rbac.forbidden(rt.plural, rt.group, written, f"{why}: {reason}, <nil>")


def _object(body: Any) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise errors.bad_request("the body of the request must be a JSON object")
    return copy.deepcopy(body)
