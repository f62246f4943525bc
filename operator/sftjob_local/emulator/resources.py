"""The served resource types: built-in kinds plus those registered through CRDs, and discovery."""

from __future__ import annotations

import dataclasses
from typing import Any

VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]


@dataclasses.dataclass
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool = True
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    status_subresource: bool = False
    # Only pods have logs; only custom resources carry a schema and printer columns.
    log_subresource: bool = False
    custom: bool = False
    schema: dict[str, Any] | None = None
    printer_columns: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    # Nodes (registered by kubelets) may carry status on create; pods/CRs/others may not.
    keep_status_on_create: bool = False
    # Create-only APIs (access reviews) are served by access.py, never stored.
    verbs: tuple[str, ...] = tuple(VERBS)
    # serviceaccounts/token (TokenRequest), served by access.py.
    token_subresource: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def singular(self) -> str:
        return self.kind.lower()

    @property
    def storage_key(self) -> tuple[str, str]:
        # All versions of one group/plural share one storage, as in etcd.
        return (self.group, self.plural)

    def discovery_entries(self) -> list[dict[str, Any]]:
        entry: dict[str, Any] = {
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": list(self.verbs),
        }
        if self.short_names:
            entry["shortNames"] = list(self.short_names)
        if self.categories:
            entry["categories"] = list(self.categories)
        entries = [entry]
        if self.status_subresource:
            entries.append(
                {
                    "name": f"{self.plural}/status",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": self.kind,
                    "verbs": ["get", "patch", "update"],
                }
            )
        if self.log_subresource:
            entries.append(
                {
                    "name": f"{self.plural}/log",
                    "singularName": "",
                    "namespaced": True,
                    "kind": "Pod",
                    "verbs": ["get"],
                }
            )
            # pods also have binding (scheduler) and eviction (policy/v1 Eviction) subresources
            entries.append(
                {
                    "name": f"{self.plural}/binding",
                    "singularName": "",
                    "namespaced": True,
                    "kind": "Binding",
                    "verbs": ["create"],
                }
            )
            entries.append(
                {
                    "name": f"{self.plural}/eviction",
                    "singularName": "",
                    "namespaced": True,
                    "group": "policy",
                    "version": "v1",
                    "kind": "Eviction",
                    "verbs": ["create"],
                }
            )
        if self.token_subresource:
            entries.append(
                {
                    "name": f"{self.plural}/token",
                    "singularName": "",
                    "namespaced": True,
                    "group": "authentication.k8s.io",
                    "version": "v1",
                    "kind": "TokenRequest",
                    "verbs": ["create"],
                }
            )
        return entries


def _rt(gv: str, plural: str, kind: str, **kwargs: Any) -> ResourceType:
    group, _, version = gv.rpartition("/")
    return ResourceType(group=group, version=version, plural=plural, kind=kind, **kwargs)


def builtin_types() -> list[ResourceType]:
    return [
        _rt(
            "v1",
            "pods",
            "Pod",
            short_names=("po",),
            categories=("all",),
            status_subresource=True,
            log_subresource=True,
        ),
        _rt(
            "v1",
            "services",
            "Service",
            short_names=("svc",),
            categories=("all",),
            status_subresource=True,
        ),
        _rt("v1", "configmaps", "ConfigMap", short_names=("cm",)),
        _rt("v1", "secrets", "Secret"),
        _rt(
            "v1",
            "serviceaccounts",
            "ServiceAccount",
            short_names=("sa",),
            token_subresource=True,
        ),
        _rt("v1", "events", "Event", short_names=("ev",)),
        _rt(
            "v1",
            "persistentvolumeclaims",
            "PersistentVolumeClaim",
            short_names=("pvc",),
            status_subresource=True,
        ),
        _rt(
            "v1",
            "nodes",
            "Node",
            namespaced=False,
            short_names=("no",),
            status_subresource=True,
            keep_status_on_create=True,
        ),
        _rt(
            "v1",
            "namespaces",
            "Namespace",
            namespaced=False,
            short_names=("ns",),
            status_subresource=True,
        ),
        _rt("rbac.authorization.k8s.io/v1", "roles", "Role"),
        _rt("rbac.authorization.k8s.io/v1", "rolebindings", "RoleBinding"),
        _rt("rbac.authorization.k8s.io/v1", "clusterroles", "ClusterRole", namespaced=False),
        _rt(
            "rbac.authorization.k8s.io/v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            namespaced=False,
        ),
        _rt(
            "apps/v1",
            "deployments",
            "Deployment",
            short_names=("deploy",),
            categories=("all",),
            status_subresource=True,
        ),
        _rt("coordination.k8s.io/v1", "leases", "Lease"),
        _rt(
            "authentication.k8s.io/v1",
            "selfsubjectreviews",
            "SelfSubjectReview",
            namespaced=False,
            verbs=("create",),
        ),
        _rt(
            "authorization.k8s.io/v1",
            "selfsubjectaccessreviews",
            "SelfSubjectAccessReview",
            namespaced=False,
            verbs=("create",),
        ),
        _rt(
            "authorization.k8s.io/v1",
            "selfsubjectrulesreviews",
            "SelfSubjectRulesReview",
            namespaced=False,
            verbs=("create",),
        ),
        _rt("events.k8s.io/v1", "events", "Event", short_names=("ev",)),
        _rt(
            "admissionregistration.k8s.io/v1",
            "validatingadmissionpolicies",
            "ValidatingAdmissionPolicy",
            namespaced=False,
            categories=("api-extensions",),
            status_subresource=True,
        ),
        _rt(
            "admissionregistration.k8s.io/v1",
            "validatingadmissionpolicybindings",
            "ValidatingAdmissionPolicyBinding",
            namespaced=False,
            categories=("api-extensions",),
        ),
        _rt(
            "apiextensions.k8s.io/v1",
            "customresourcedefinitions",
            "CustomResourceDefinition",
            namespaced=False,
            short_names=("crd", "crds"),
            categories=("api-extensions",),
            status_subresource=True,
        ),
    ]


class Registry:
    """Resource types by (group, version, plural); CRDs add and remove entries at runtime."""

    def __init__(self) -> None:
        self._types: dict[tuple[str, str, str], ResourceType] = {}
        for rt in builtin_types():
            self.add(rt)

    def add(self, rt: ResourceType) -> None:
        self._types[(rt.group, rt.version, rt.plural)] = rt

    def remove_group_plural(self, group: str, plural: str) -> None:
        for key in [k for k in self._types if (k[0], k[2]) == (group, plural)]:
            del self._types[key]

    def get(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._types.get((group, version, plural))

    def all(self) -> list[ResourceType]:
        return list(self._types.values())

    def group_versions(self) -> dict[str, list[str]]:
        """Non-core groups with their versions, the preferred (first registered) one first."""
        result: dict[str, list[str]] = {}
        for group, version, _ in self._types:
            if group and version not in result.setdefault(group, []):
                result[group].append(version)
        return result

    def api_versions(self) -> dict[str, Any]:
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": ""}],
        }

    def api_group(self, group: str) -> dict[str, Any] | None:
        versions = self.group_versions().get(group)
        if not versions:
            return None
        gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": group,
            "versions": gvs,
            "preferredVersion": gvs[0],
        }

    def api_group_list(self) -> dict[str, Any]:
        groups = [self.api_group(g) for g in self.group_versions()]
        for group in groups:
            assert group is not None
            del group["kind"], group["apiVersion"]
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    def resource_list(self, group: str, version: str) -> dict[str, Any] | None:
        types = [rt for (g, v, _), rt in self._types.items() if (g, v) == (group, version)]
        if not types:
            return None
        return {
            "kind": "APIResourceList",
            "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version,
            "resources": [entry for rt in types for entry in rt.discovery_entries()],
        }
