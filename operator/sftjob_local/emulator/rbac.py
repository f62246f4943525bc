"""RBAC authorization as kube-apiserver's RBAC authorizer evaluates it (pure functions + a resolver).

Request attributes come from the URL as ``RequestInfoFactory`` derives them
(staging/src/k8s.io/apiserver/pkg/endpoints/request/requestinfo.go); rules match as in
staging/src/k8s.io/component-helpers/auth/rbac/validation (``VerbMatches``, ``APIGroupMatches``,
``ResourceMatches`` with ``*`` and ``*/subresource``, ``ResourceNameMatches``,
``NonResourceURLMatches`` with a trailing ``*``); bindings resolve as
pkg/registry/rbac/validation/rule.go (``VisitRulesFor``, ``appliesToUser``). A denial is 403 with
the message of responsewriters.forbiddenMessage wrapped by ``apierrors.NewForbidden``.

Escalation prevention (pkg/registry/rbac/validation/rule.go ``ConfirmNoEscalation``,
``Covers``/``BreakdownRule``, policy_compact.go ``CompactRules``, pkg/apis/rbac/v1
``CompactString``) and the bootstrap roles a fresh cluster has
(plugin/pkg/auth/authorizer/rbac/bootstrappolicy/policy.go) are here too. Aggregated ClusterRoles
(admin, edit, view) are not served.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable
from typing import Any

from . import errors
from .auth import MASTERS, UserInfo
from .errors import ApiError

RBAC_GROUP = "rbac.authorization.k8s.io"
Rule = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Attributes:
    user: UserInfo
    verb: str
    resource_request: bool
    path: str = ""
    api_group: str = ""
    api_version: str = ""
    resource: str = ""
    subresource: str = ""
    name: str = ""
    namespace: str = ""


def _split(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def _field_selector_name(selector: str | None) -> str:
    """metadata.name=X (or ==) in a field selector: RequestInfo takes it as the request's name."""
    for term in (selector or "").split(","):
        for op in ("==", "="):
            key, sep, value = term.partition(op)
            if sep and key.strip() == "metadata.name" and "!" not in key:
                value = value.strip()
                return value if value not in (".", "..") and "/" not in value else ""
    return ""


def request_attributes(method: str, path: str, query: dict[str, str], user: UserInfo) -> Attributes:
    """What RBAC is asked about a request, as requestinfo.go's NewRequestInfo derives it."""
    parts = _split(path)
    prefix_len = 2 if parts[:1] == ["api"] else 3 if parts[:1] == ["apis"] else 0
    if prefix_len == 0 or len(parts) <= prefix_len:
        # Non-resource URL (incl. discovery /api, /apis, /apis/<group>[/<version>]).
        return Attributes(user, method.lower(), False, path=path or "/")
    group = "" if parts[0] == "api" else parts[1]
    version = parts[prefix_len - 1]
    rest = parts[prefix_len:]
    verb = {
        "POST": "create",
        "GET": "get",
        "HEAD": "get",
        "PUT": "update",
        "PATCH": "patch",
        "DELETE": "delete",
    }.get(method.upper(), method.lower())
    namespace = ""
    if rest[0] == "namespaces" and len(rest) > 1:
        namespace = rest[1]
        # namespaces/<ns>/<resource>...: the resource is what follows, unless it is one of
        # the namespace's own subresources (status, finalize).
        if len(rest) > 2 and rest[2] not in ("status", "finalize"):
            rest = rest[2:]
    resource = rest[0]
    name = rest[1] if len(rest) > 1 else ""
    subresource = rest[2] if len(rest) > 2 else ""
    if not name and verb == "get":
        verb = "watch" if query.get("watch") in ("true", "1", "True") else "list"
        name = _field_selector_name(query.get("fieldSelector"))
    if not name and verb == "delete":
        verb = "deletecollection"
    return Attributes(
        user,
        verb,
        True,
        path=path,
        api_group=group,
        api_version=version,
        resource=resource,
        subresource=subresource,
        name=name,
        namespace=namespace,
    )


# ---------------------------------------------------------------- rule matching


def verb_matches(rule: Rule, verb: str) -> bool:
    return any(v in ("*", verb) for v in rule.get("verbs") or [])


def api_group_matches(rule: Rule, group: str) -> bool:
    return any(g in ("*", group) for g in rule.get("apiGroups") or [])


def resource_matches(rule: Rule, combined: str, subresource: str) -> bool:
    for res in rule.get("resources") or []:
        if res in ("*", combined):
            return True
        if subresource and res == f"*/{subresource}":
            return True
    return False


def resource_name_matches(rule: Rule, name: str) -> bool:
    names = rule.get("resourceNames") or []
    return not names or name in names


def non_resource_url_matches(rule: Rule, path: str) -> bool:
    for url in rule.get("nonResourceURLs") or []:
        if url in ("*", path):
            return True
        if url.endswith("*") and path.startswith(url.rstrip("*")):
            return True
    return False


def rule_allows(attrs: Attributes, rule: Rule) -> bool:
    if attrs.resource_request:
        combined = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
        return (
            verb_matches(rule, attrs.verb)
            and api_group_matches(rule, attrs.api_group)
            and resource_matches(rule, combined, attrs.subresource)
            and resource_name_matches(rule, attrs.name)
        )
    return verb_matches(rule, attrs.verb) and non_resource_url_matches(rule, attrs.path)


# ---------------------------------------------------------------- resolving bindings


def subject_applies(user: UserInfo, subject: dict[str, Any], binding_namespace: str) -> bool:
    kind, name = subject.get("kind"), subject.get("name")
    if kind == "User":
        return user.name == name
    if kind == "Group":
        return name in user.groups
    if kind == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return bool(namespace) and user.name == f"system:serviceaccount:{namespace}:{name}"
    return False


def _first_applying(
    user: UserInfo, binding: dict[str, Any], namespace: str
) -> dict[str, Any] | None:
    return next(
        (s for s in binding.get("subjects") or [] if subject_applies(user, s, namespace)), None
    )


def describe_subject(subject: dict[str, Any], binding_namespace: str) -> str:
    """rule.go describeSubject."""
    if subject.get("kind") == "ServiceAccount":
        namespace = subject.get("namespace") or binding_namespace
        return f"ServiceAccount {go_quote(subject.get('name', '') + '/' + namespace)}"
    return f"{subject.get('kind')} {go_quote(subject.get('name', ''))}"


# (namespace, name) → stored object or None; (namespace or None) → stored objects
Getter = Callable[[str, str], dict[str, Any] | None]
Lister = Callable[[str | None], list[dict[str, Any]]]


@dataclasses.dataclass
class RuleResolver:
    """DefaultRuleResolver over the emulator's stored RBAC objects."""

    get_role: Getter
    get_cluster_role: Getter
    list_role_bindings: Lister
    list_cluster_role_bindings: Lister

    def role_reference_rules(
        self, role_ref: dict[str, Any], binding_namespace: str
    ) -> tuple[list[Rule], str | None]:
        """(rules, error) of a roleRef, the error worded as the role getter's NotFound."""
        kind, name = role_ref.get("kind"), role_ref.get("name", "")
        if kind == "Role":
            role = self.get_role(binding_namespace, name)
            if role is None:
                return [], f'role.{RBAC_GROUP} "{name}" not found'
        elif kind == "ClusterRole":
            role = self.get_cluster_role("", name)
            if role is None:
                return [], f'clusterrole.{RBAC_GROUP} "{name}" not found'
        else:
            return [], f'unsupported role reference kind: "{kind}"'
        return list(role.get("rules") or []), None

    def visit(
        self, user: UserInfo, namespace: str
    ) -> Iterable[tuple[Rule | None, str | None, str]]:
        """(rule, resolution error, source) for every rule that applies to the user there."""
        for binding in self.list_cluster_role_bindings(None):
            subject = _first_applying(user, binding, "")
            if subject is None:
                continue
            role_ref = binding.get("roleRef") or {}
            rules, error = self.role_reference_rules(role_ref, "")
            if error:
                yield None, error, ""
            source = (
                f"ClusterRoleBinding {go_quote(binding['metadata']['name'])} of "
                f"{role_ref.get('kind')} {go_quote(role_ref.get('name', ''))} to "
                f"{describe_subject(subject, '')}"
            )
            for rule in rules:
                yield rule, None, source
        if namespace:
            for binding in self.list_role_bindings(namespace):
                subject = _first_applying(user, binding, namespace)
                if subject is None:
                    continue
                role_ref = binding.get("roleRef") or {}
                rules, error = self.role_reference_rules(role_ref, namespace)
                if error:
                    yield None, error, ""
                source = (
                    f"RoleBinding {go_quote(binding['metadata']['name'] + '/' + namespace)} of "
                    f"{role_ref.get('kind')} {go_quote(role_ref.get('name', ''))} to "
                    f"{describe_subject(subject, namespace)}"
                )
                for rule in rules:
                    yield rule, None, source

    def rules_for(self, user: UserInfo, namespace: str) -> tuple[list[Rule], list[str]]:
        rules: list[Rule] = []
        failures: list[str] = []
        for rule, error, _ in self.visit(user, namespace):
            if rule is not None:
                rules.append(rule)
            if error:
                failures.append(error)
        return rules, failures

    def authorize(self, attrs: Attributes) -> tuple[bool, str]:
        """(allowed, reason) as the RBAC authorizer (behind the system:masters authorizer)."""
        if MASTERS in attrs.user.groups:
            return True, ""
        failures: list[str] = []
        for rule, error, source in self.visit(attrs.user, attrs.namespace):
            if rule is not None and rule_allows(attrs, rule):
                return True, f"RBAC: allowed by {source}"
            if error:
                failures.append(error)
        return False, f"RBAC: {aggregate(failures)}" if failures else ""


def aggregate(messages: list[str]) -> str:
    """utilerrors.NewAggregate(...).Error(): one message as is, several in brackets."""
    unique = list(dict.fromkeys(messages))
    return unique[0] if len(unique) == 1 else "[" + ", ".join(unique) + "]"


def forbidden_message(attrs: Attributes) -> str:
    """responsewriters.forbiddenMessage."""
    user = attrs.user.name
    if not attrs.resource_request:
        return f"User {go_quote(user)} cannot {attrs.verb} path {go_quote(attrs.path)}"
    resource = f"{attrs.resource}/{attrs.subresource}" if attrs.subresource else attrs.resource
    where = (
        f"in the namespace {go_quote(attrs.namespace)}"
        if attrs.namespace
        else "at the cluster scope"
    )
    return (
        f"User {go_quote(user)} cannot {attrs.verb} resource {go_quote(resource)} "
        f"in API group {go_quote(attrs.api_group)} {where}"
    )


def forbidden(resource: str, group: str, name: str, message: str) -> ApiError:
    """apierrors.NewForbidden(GroupResource{group, resource}, name, err)."""
    qualified = f"{resource}.{group}" if group and resource else resource
    if not qualified:
        text = f"forbidden: {message}"
    elif not name:
        text = f"{qualified} is forbidden: {message}"
    else:
        text = f'{qualified} "{name}" is forbidden: {message}'
    details = {"name": name, "group": group, "kind": resource}
    return ApiError(403, text, "Forbidden", {k: v for k, v in details.items() if v})


def request_forbidden(attrs: Attributes, reason: str) -> ApiError:
    """responsewriters.Forbidden: the denial of an authorized request."""
    message = forbidden_message(attrs)
    if reason:
        message = f"{message}: {reason}"
    return forbidden(attrs.resource, attrs.api_group, attrs.name, message)


def go_quote(text: str) -> str:
    """Go's %q for the plain strings of names and paths (JSON string escaping matches it)."""
    return json.dumps(text, ensure_ascii=False)


def go_quote_list(items: Iterable[str]) -> str:
    """Go's %q of a []string: ["a" "b"]."""
    return "[" + " ".join(go_quote(i) for i in items) + "]"


# ---------------------------------------------------------------- escalation prevention


def breakdown_rule(rule: Rule) -> list[Rule]:
    """BreakdownRule: one rule per group x resource x verb (x resourceName), then URLs x verbs."""
    out: list[Rule] = []
    verbs = rule.get("verbs") or []
    names = rule.get("resourceNames") or []
    for group in rule.get("apiGroups") or []:
        for resource in rule.get("resources") or []:
            for verb in verbs:
                base = {"apiGroups": [group], "resources": [resource], "verbs": [verb]}
                if names:
                    out.extend({**base, "resourceNames": [n]} for n in names)
                else:
                    out.append(base)
    for url in rule.get("nonResourceURLs") or []:
        out.extend({"nonResourceURLs": [url], "verbs": [verb]} for verb in verbs)
    return out


def _has_all(owned: list[str], requested: list[str]) -> bool:
    return "*" in owned or all(r in owned for r in requested)


def _resource_covers(owned: list[str], requested: list[str]) -> bool:
    if "*" in owned:
        return True
    for res in requested:
        if res in owned:
            continue
        _, slash, sub = res.partition("/")
        if slash and f"*/{sub}" in owned:
            continue
        return False
    return True


def _url_covers(owned: list[str], requested: list[str]) -> bool:
    return all(
        any(o in ("*", r) or (o.endswith("*") and r.startswith(o.rstrip("*"))) for o in owned)
        for r in requested
    )


def rule_covers(owner: Rule, requested: Rule) -> bool:
    """validation.ruleCovers."""
    owner_names = owner.get("resourceNames") or []
    requested_names = requested.get("resourceNames") or []
    return (
        _has_all(owner.get("verbs") or [], requested.get("verbs") or [])
        and _has_all(owner.get("apiGroups") or [], requested.get("apiGroups") or [])
        and _resource_covers(owner.get("resources") or [], requested.get("resources") or [])
        and _url_covers(owner.get("nonResourceURLs") or [], requested.get("nonResourceURLs") or [])
        and (
            not owner_names
            or (bool(requested_names) and all(n in owner_names for n in requested_names))
        )
    )


def missing_rules(owner_rules: list[Rule], requested_rules: list[Rule]) -> list[Rule]:
    """validation.Covers: the broken-down requested rules no owner rule covers."""
    return [
        sub
        for rule in requested_rules
        for sub in breakdown_rule(rule)
        if not any(rule_covers(owner, sub) for owner in owner_rules)
    ]


def compact_rules(rules: list[Rule]) -> list[Rule]:
    """CompactRules: simple single group/resource rules differing only by verb are merged."""
    compacted: list[Rule] = []
    simple: dict[tuple[str, str], Rule] = {}
    for rule in rules:
        groups, resources = rule.get("apiGroups") or [], rule.get("resources") or []
        if set(rule) <= {"apiGroups", "resources", "verbs"} and len(groups) == len(resources) == 1:
            key = (groups[0], resources[0])
            if key in simple:
                simple[key]["verbs"] = [*simple[key].get("verbs", []), *rule.get("verbs", [])]
            else:
                simple[key] = {**rule, "verbs": list(rule.get("verbs") or [])}
        else:
            compacted.append(rule)
    return compacted + list(simple.values())


def compact_string(rule: Rule) -> str:
    """rbacv1helpers.CompactString."""
    parts = []
    for field, label in (
        ("apiGroups", "APIGroups"),
        ("resources", "Resources"),
        ("nonResourceURLs", "NonResourceURLs"),
        ("resourceNames", "ResourceNames"),
        ("verbs", "Verbs"),
    ):
        if rule.get(field):
            parts.append(f"{label}:{go_quote_list(rule[field])}")
    return "{" + ", ".join(parts) + "}"


def escalation_error(user: UserInfo, missing: list[Rule], resolution_errors: list[str]) -> str:
    """ConfirmNoEscalation's message for the rules the user lacks."""
    descriptions = sorted({compact_string(r) for r in compact_rules(missing)})
    message = (
        f"user {go_quote(user.name)} (groups={go_quote_list(user.groups)}) is attempting to "
        f"grant RBAC permissions not currently held:\n" + "\n".join(descriptions)
    )
    if resolution_errors:
        message += f"; resolution errors: [{aggregate(resolution_errors)}]"
    return message


def check_escalation(
    resolver: RuleResolver,
    user: UserInfo,
    kind: str,
    obj: dict[str, Any],
) -> None:
    """The RBAC storage's create/update check for a (Cluster)Role or (Cluster)RoleBinding.

    pkg/registry/rbac/{role,clusterrole}/policybased: allowed for system:masters, with the
    ``escalate`` verb on the role, or when the user already holds every rule it grants;
    pkg/registry/rbac/{rolebinding,clusterrolebinding}/policybased: allowed for system:masters,
    with the ``bind`` verb on the referenced role, or when the user holds all its rules.
    """
    if MASTERS in user.groups:
        return
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace", "") if kind in ("Role", "RoleBinding") else ""
    name = meta.get("name", "")
    plural = kind.lower() + "s"
    if kind in ("Role", "ClusterRole"):
        check = Attributes(
            user,
            "escalate",
            True,
            api_group=RBAC_GROUP,
            api_version="*",
            resource=plural,
            name=name,
            namespace=namespace,
        )
        if resolver.authorize(check)[0]:
            return
        requested = list(obj.get("rules") or [])
    else:
        role_ref = obj.get("roleRef") or {}
        check = Attributes(
            user,
            "bind",
            True,
            api_group=RBAC_GROUP,
            api_version="*",
            resource="roles" if role_ref.get("kind") == "Role" else "clusterroles",
            name=role_ref.get("name", ""),
            namespace=namespace,
        )
        if resolver.authorize(check)[0]:
            return
        requested, error = resolver.role_reference_rules(role_ref, namespace)
        if error:
            # The RBAC storage resolves the roleRef through the role registry: its NotFound.
            missing = "roles" if role_ref.get("kind") == "Role" else "clusterroles"
            raise errors.not_found(missing, RBAC_GROUP, role_ref.get("name", ""))
    owned, resolution_errors = resolver.rules_for(user, namespace)
    missing = missing_rules(owned, requested)
    if missing:
        raise forbidden(
            plural, RBAC_GROUP, name, escalation_error(user, missing, resolution_errors)
        )


def only_gc_fields_changed(new: dict[str, Any], old: dict[str, Any]) -> bool:
    """rbacregistry.IsOnlyMutatingGCFields: ownerReferences/finalizers edits skip the check."""

    def strip(obj: dict[str, Any]) -> dict[str, Any]:
        meta = {
            k: v
            for k, v in (obj.get("metadata") or {}).items()
            if k
            not in (
                "ownerReferences",
                "finalizers",
                "resourceVersion",
                "generation",
                "managedFields",
                "uid",
                "creationTimestamp",
            )
        }
        return {**{k: v for k, v in obj.items() if k != "metadata"}, "metadata": meta}

    return strip(new) == strip(old)


# ---------------------------------------------------------------- bootstrap policy

_BOOTSTRAP_LABELS = {"kubernetes.io/bootstrapping": "rbac-defaults"}
_AUTOUPDATE = {"rbac.authorization.kubernetes.io/autoupdate": "true"}


def _cluster_role(name: str, rules: list[Rule]) -> dict[str, Any]:
    return {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "ClusterRole",
        "metadata": {"name": name, "labels": dict(_BOOTSTRAP_LABELS), "annotations": _AUTOUPDATE},
        "rules": rules,
    }


def _cluster_role_binding(name: str, role: str, groups: list[str]) -> dict[str, Any]:
    return {
        "apiVersion": f"{RBAC_GROUP}/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name, "labels": dict(_BOOTSTRAP_LABELS), "annotations": _AUTOUPDATE},
        "roleRef": {"apiGroup": RBAC_GROUP, "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": RBAC_GROUP, "kind": "Group", "name": g} for g in groups],
    }


def bootstrap_cluster_roles() -> list[dict[str, Any]]:
    """The default ClusterRoles of bootstrappolicy/policy.go that matter to clients here."""
    return [
        _cluster_role(
            "cluster-admin",
            [
                {"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]},
                {"nonResourceURLs": ["*"], "verbs": ["*"]},
            ],
        ),
        _cluster_role(
            "system:discovery",
            [
                {
                    "nonResourceURLs": [
                        "/api",
                        "/api/*",
                        "/apis",
                        "/apis/*",
                        "/healthz",
                        "/livez",
                        "/openapi",
                        "/openapi/*",
                        "/readyz",
                        "/version",
                        "/version/",
                    ],
                    "verbs": ["get"],
                }
            ],
        ),
        _cluster_role(
            "system:basic-user",
            [
                {
                    "apiGroups": ["authorization.k8s.io"],
                    "resources": ["selfsubjectaccessreviews", "selfsubjectrulesreviews"],
                    "verbs": ["create"],
                },
                {
                    "apiGroups": ["authentication.k8s.io"],
                    "resources": ["selfsubjectreviews"],
                    "verbs": ["create"],
                },
            ],
        ),
        _cluster_role(
            "system:public-info-viewer",
            [
                {
                    "nonResourceURLs": ["/healthz", "/livez", "/readyz", "/version", "/version/"],
                    "verbs": ["get"],
                }
            ],
        ),
    ]


def bootstrap_cluster_role_bindings() -> list[dict[str, Any]]:
    return [
        _cluster_role_binding("cluster-admin", "cluster-admin", ["system:masters"]),
        _cluster_role_binding("system:discovery", "system:discovery", ["system:authenticated"]),
        _cluster_role_binding("system:basic-user", "system:basic-user", ["system:authenticated"]),
        _cluster_role_binding(
            "system:public-info-viewer",
            "system:public-info-viewer",
            ["system:authenticated", "system:unauthenticated"],
        ),
    ]


__all__ = [
    "Attributes",
    "RuleResolver",
    "bootstrap_cluster_role_bindings",
    "bootstrap_cluster_roles",
    "check_escalation",
    "request_attributes",
    "request_forbidden",
    "rule_allows",
]
