"""The API semantics, independent of HTTP: create/update/patch/delete, status isolation,
generation, conflicts, finalizers, graceful pod deletion, garbage collection, CRDs."""

from __future__ import annotations

import contextlib
import copy
import datetime
import json
import random
import string
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from . import admission_policy_api, cel, errors, schema, validation
from .errors import ApiError
from .patching import PatchError, json_patch, merge_patch, strategic_merge
from .resources import Registry, ResourceType
from .selectors import Matcher
from .store import Key, Store

SERVER_META = (
    "uid",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "generation",
    "selfLink",
    "name",
    "namespace",
)
BOOT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
TERMINAL_PHASES = ("Succeeded", "Failed")


def now(offset: float = 0) -> str:
    moment = datetime.datetime.now(datetime.UTC) + datetime.timedelta(seconds=offset)
    return moment.strftime("%Y-%m-%dT%H:%M:%SZ")


def _content(obj: dict[str, Any], rt: ResourceType) -> dict[str, Any]:
    """What generation tracks: everything but metadata (and status when it is a subresource)."""
    skip = {"metadata", "apiVersion", "kind"} | ({"status"} if rt.status_subresource else set())
    return {k: v for k, v in obj.items() if k not in skip}


def _warn(warnings: list[str] | None, found: list[str] | None) -> None:
    """An admission plugin's warnings go to the response (when the caller collects them)."""
    if warnings is not None and found:
        warnings.extend(found)


def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
    def strip(o: dict[str, Any]) -> dict[str, Any]:
        meta = {
            k: v
            for k, v in o.get("metadata", {}).items()
            if k not in ("resourceVersion", "managedFields")
        }
        return {**{k: v for k, v in o.items() if k not in ("apiVersion", "kind")}, "metadata": meta}

    return json.dumps(strip(a), sort_keys=True) == json.dumps(strip(b), sort_keys=True)


# ---------------------------------------------------------------- events: core/v1 <-> events.k8s.io/v1
def core_event_to_new(ev: dict[str, Any]) -> dict[str, Any]:
    source = ev.get("source") or {}
    result = {
        "apiVersion": "events.k8s.io/v1",
        "kind": "Event",
        "metadata": ev.get("metadata", {}),
        "eventTime": ev.get("eventTime"),
        "reportingController": ev.get("reportingComponent") or source.get("component", ""),
        "reportingInstance": ev.get("reportingInstance") or source.get("host", ""),
        "action": ev.get("action", ""),
        "reason": ev.get("reason", ""),
        "regarding": ev.get("involvedObject", {}),
        "related": ev.get("related"),
        "note": ev.get("message", ""),
        "type": ev.get("type", ""),
        "deprecatedSource": source,
        "deprecatedFirstTimestamp": ev.get("firstTimestamp"),
        "deprecatedLastTimestamp": ev.get("lastTimestamp"),
        "deprecatedCount": ev.get("count", 0),
    }
    return {k: v for k, v in result.items() if v is not None}


def new_event_to_core(ev: dict[str, Any]) -> dict[str, Any]:
    result = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": ev.get("metadata", {}),
        "involvedObject": ev.get("regarding", {}),
        "related": ev.get("related"),
        "reason": ev.get("reason", ""),
        "message": ev.get("note", ""),
        "type": ev.get("type", ""),
        "action": ev.get("action", ""),
        "eventTime": ev.get("eventTime"),
        "reportingComponent": ev.get("reportingController", ""),
        "reportingInstance": ev.get("reportingInstance", ""),
        "source": ev.get("deprecatedSource") or {"component": ev.get("reportingController", "")},
        "firstTimestamp": ev.get("deprecatedFirstTimestamp"),
        "lastTimestamp": ev.get("deprecatedLastTimestamp"),
        "count": ev.get("deprecatedCount"),
    }
    return {k: v for k, v in result.items() if v is not None}


class ApiCore:
    def __init__(
        self,
        history_size: int = 10000,
        preinstalled: Iterable[dict[str, Any]] = (),
        state_path: str | Path | None = None,
    ) -> None:
        self.registry = Registry()
        self.store = Store(history_size, state_path)
        # Admission plugins (access.py: those that depend on the caller; pod_security.py):
        # called with (operation, rt, object, old object or None, subresource) before a write
        # is stored; each raises to refuse, and may return warnings for the response.
        self.admission: list[Callable[..., list[str] | None]] = []
        # Controllers that react at once to a created object (the default ServiceAccount).
        self.on_created: list[Callable[[ResourceType, dict[str, Any]], None]] = []
        self._service_ips = 10
        crds = self.rt("apiextensions.k8s.io", "v1", "customresourcedefinitions")
        # A restored cluster serves its custom resources again from the stored CRDs.
        for crd in self.store.list(crds.storage_key):
            self._register_crd(crd)
        # The system namespaces always exist, as the apiserver's bootstrap controller ensures.
        for name in BOOT_NAMESPACES:
            if self.store.get(("", "namespaces"), "", name) is None:
                self.create(self.rt("", "v1", "namespaces"), None, {"metadata": {"name": name}})
        # Preinstalled CRDs come with a new cluster only: one a user deleted stays deleted.
        if not self.store.restored:
            for crd in preinstalled:
                self.create(crds, None, crd)
        self.store.mark_bootstrapped()
        # History starts after bootstrap: watching from an older resourceVersion is 410 Gone.
        self.store.compact()

    # ------------------------------------------------------------ lookups
    def rt(self, group: str, version: str, plural: str) -> ResourceType:
        rt = self.registry.get(group, version, plural)
        if rt is None:
            raise ApiError(404, "the server could not find the requested resource", "NotFound", {})
        return rt

    def _rt_for_key(self, key: Key) -> ResourceType | None:
        return next((rt for rt in self.registry.all() if rt.storage_key == key), None)

    def present(self, rt: ResourceType, obj: dict[str, Any]) -> dict[str, Any]:
        """The stored object as the requested group/version shows it."""
        if rt.group == "events.k8s.io":
            return core_event_to_new(obj)
        if obj.get("apiVersion") != rt.api_version or obj.get("kind") != rt.kind:
            return {**obj, "apiVersion": rt.api_version, "kind": rt.kind}
        return obj

    def _storage_key(self, rt: ResourceType) -> Key:
        # Both Event APIs share the core storage, as they share one etcd prefix.
        return ("", "events") if rt.plural == "events" else rt.storage_key

    def get(self, rt: ResourceType, namespace: str | None, name: str) -> dict[str, Any]:
        obj = self.store.get(self._storage_key(rt), namespace or "", name)
        if obj is None:
            raise errors.not_found(rt.plural, rt.group, name)
        return self.present(rt, obj)

    def list(self, rt: ResourceType, namespace: str | None, match: Matcher) -> list[dict[str, Any]]:
        items = (self.present(rt, o) for o in self.store.list(self._storage_key(rt), namespace))
        return [o for o in items if match(o)]

    # ------------------------------------------------------------ create
    def create(
        self,
        rt: ResourceType,
        namespace: str | None,
        body: Any,
        *,
        dry_run: bool = False,
        strict: bool = False,
        warnings: list[str] | None = None,
    ) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise errors.bad_request("the body of the request must be a JSON object")
        obj = copy.deepcopy(body)
        self._check_type(rt, obj)
        meta = obj.setdefault("metadata", {})
        if rt.namespaced:
            if meta.get("namespace") and namespace and meta["namespace"] != namespace:
                raise errors.bad_request(
                    "the namespace of the provided object does not match the namespace sent on the request"
                )
            namespace = namespace or meta.get("namespace")
            if not namespace:
                raise errors.bad_request("a namespace is required for a namespaced resource")
            ns_obj = self.store.get(("", "namespaces"), "", namespace)
            if ns_obj is None:
                raise errors.not_found("namespaces", "", namespace)
            if ns_obj["metadata"].get("deletionTimestamp"):
                raise ApiError(
                    403,
                    f'{rt.plural} "{meta.get("name", "")}" is forbidden: unable to create new content in namespace {namespace} because it is being terminated',
                    "Forbidden",
                )
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
        if not meta.get("name"):
            if not meta.get("generateName"):
                raise errors.invalid(
                    rt.kind,
                    rt.group,
                    "",
                    [
                        {
                            "reason": "FieldValueRequired",
                            "message": "Required value: name or generateName is required",
                            "field": "metadata.name",
                        }
                    ],
                )
            suffix = "".join(random.choices(string.ascii_lowercase + string.digits, k=5))
            meta["name"] = meta["generateName"] + suffix
        key = self._storage_key(rt)
        for field in (
            "deletionTimestamp",
            "deletionGracePeriodSeconds",
            "resourceVersion",
            "selfLink",
        ):
            meta.pop(field, None)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        meta["generation"] = 1
        if rt.status_subresource and not rt.keep_status_on_create:
            obj.pop("status", None)
        self._prepare_create(rt, obj)
        self._admit(rt, obj)
        # Validation comes first, as on a real server; storage then finds the name taken.
        if self.store.get(key, meta.get("namespace", ""), meta["name"]) is not None:
            raise errors.already_exists(rt.plural, rt.group, meta["name"])
        if rt.custom:
            self._apply_schema(rt, obj, strict, warnings)
        if rt.group == "apiextensions.k8s.io":
            self._check_crd(obj)
        for admit in self.admission:
            _warn(warnings, admit("CREATE", rt, obj, None, None))
        if dry_run:
            return self.present(rt, obj)
        stored = self.store.put(key, obj, None)
        if rt.group == "apiextensions.k8s.io":
            stored = self._register_crd(stored)
        for react in self.on_created:
            react(rt, stored)
        created = self.present(rt, stored)
        self._collect_if_owners_gone(rt, stored)
        return created

    def _collect_if_owners_gone(self, rt: ResourceType, obj: dict[str, Any]) -> None:
        """The garbage collector's view of a new object whose owners no longer exist (made
        by a controller a moment after its owner was deleted): it is deleted, in the
        background, like the dependents of a deleted owner. pkg/controller/garbagecollector
        attemptToDeleteItem: no solid owner left (each one looked up by uid) → delete."""
        refs = obj["metadata"].get("ownerReferences") or []
        if refs and not any(r.get("uid") in self.store.uids for r in refs):
            with contextlib.suppress(ApiError):  # removed meanwhile: fine
                self.delete(
                    rt,
                    obj["metadata"].get("namespace"),
                    obj["metadata"]["name"],
                    {"propagationPolicy": "Background"},
                )

    def _check_type(self, rt: ResourceType, obj: dict[str, Any]) -> None:
        if obj.get("apiVersion", rt.api_version) != rt.api_version:
            raise errors.bad_request(
                f"the API version in the data ({obj['apiVersion']}) does not match the expected API version ({rt.api_version})"
            )
        if obj.get("kind", rt.kind) != rt.kind:
            raise errors.bad_request(
                f"the kind in the data ({obj['kind']}) does not match the expected kind ({rt.kind})"
            )
        if rt.group == "events.k8s.io":
            converted = new_event_to_core({**obj, "metadata": obj.get("metadata", {})})
            obj.clear()
            obj.update(converted)
        else:
            obj["apiVersion"], obj["kind"] = rt.api_version, rt.kind
        # What a real server refuses while decoding the body (400), e.g. a malformed quantity.
        message = validation.decode_error(rt.kind, rt.group, obj)
        if message:
            raise errors.bad_request(message)
        if rt.kind == "Secret" and not rt.group:
            validation.secret_string_data(obj)

    def _admit(
        self, rt: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None = None
    ) -> None:
        """Built-in validation (validation.py): a refusal is 422 Invalid and nothing is stored."""
        if old is None:
            errs = validation.validate_create(rt.kind, rt.group, obj, rt.namespaced)
        else:
            errs = validation.validate_update(rt.kind, rt.group, obj, old, rt.namespaced)
        if rt.group == admission_policy_api.GROUP:  # defaults and rules of policies, bindings
            errs += admission_policy_api.validate(rt.kind, obj)
        if errs:
            name = obj["metadata"].get("name", "")
            raise errors.invalid(rt.kind, rt.group, name, validation.causes(errs))

    def _prepare_create(self, rt: ResourceType, obj: dict[str, Any]) -> None:
        if rt.group != "":
            return
        spec = obj.setdefault("spec", {}) if rt.kind in ("Pod", "Service", "Namespace") else None
        if rt.kind == "Pod":
            assert spec is not None
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("terminationGracePeriodSeconds", 30)
            spec.setdefault("schedulerName", "default-scheduler")
            obj["status"] = {"phase": "Pending"}
            if spec.get("nodeName"):
                obj["status"]["conditions"] = [
                    {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()}
                ]
        elif rt.kind == "Namespace":
            assert spec is not None
            spec.setdefault("finalizers", ["kubernetes"])
            obj["status"] = {"phase": "Active"}
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj[
                "metadata"
            ]["name"]
        elif rt.kind == "Service":
            assert spec is not None
            spec.setdefault("type", "ClusterIP")
            if spec["type"] != "ExternalName":  # an ExternalName service gets no cluster IP
                if not spec.get("clusterIP"):
                    # Skip addresses in use: after a restart the counter starts over.
                    taken = {
                        (svc.get("spec") or {}).get("clusterIP")
                        for svc in self.store.list(("", "services"))
                    }
                    while True:
                        self._service_ips += 1
                        ip = f"10.96.{self._service_ips // 250}.{self._service_ips % 250 + 1}"
                        if ip not in taken:
                            break
                    spec["clusterIP"] = ip
                spec.setdefault("clusterIPs", [spec["clusterIP"]])
            for port in spec.get("ports") or []:
                port.setdefault("protocol", "TCP")
                port.setdefault("targetPort", port.get("port"))
        elif rt.kind == "Secret":
            obj.setdefault("type", "Opaque")

    def _apply_schema(
        self,
        rt: ResourceType,
        obj: dict[str, Any],
        strict: bool,
        warnings: list[str] | None,
        old: dict[str, Any] | None = None,
    ) -> None:
        if not rt.schema:
            return
        dropped: list[str] = []
        schema.prune(obj, rt.schema, "", dropped)
        if dropped and strict:
            fields = ", ".join(f'unknown field "{d}"' for d in dropped)
            raise errors.bad_request(
                f'{rt.kind} in version "{rt.version}" cannot be handled as a {rt.kind}: strict decoding error: {fields}'
            )
        if warnings is not None:
            warnings.extend(f'unknown field "{d}"' for d in dropped)
        schema.apply_defaults(obj, rt.schema)
        causes = schema.validate(obj, rt.schema)
        causes += cel.validate_after_schema(obj, old, rt.schema, causes)
        if causes:
            raise errors.invalid(rt.kind, rt.group, obj["metadata"].get("name", ""), causes)

    # ------------------------------------------------------------ update / patch
    def update(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        body: Any,
        *,
        subresource: str | None = None,
        is_put: bool = True,
        dry_run: bool = False,
        strict: bool = False,
        warnings: list[str] | None = None,
    ) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise errors.bad_request("the body of the request must be a JSON object")
        key = self._storage_key(rt)
        old = self.store.get(key, namespace or "", name)
        if old is None:
            raise errors.not_found(rt.plural, rt.group, name)
        new = copy.deepcopy(body)
        self._check_type(rt, new)
        meta = new.setdefault("metadata", {})
        if meta.get("name", name) != name:
            raise errors.bad_request(
                f"the name of the object ({meta['name']}) does not match the name on the URL ({name})"
            )
        rv = meta.get("resourceVersion")
        if rv and rv != old["metadata"]["resourceVersion"]:
            raise errors.conflict(rt.plural, rt.group, name)
        if not rv and is_put and rt.custom:
            raise errors.invalid(
                rt.kind,
                rt.group,
                name,
                [
                    {
                        "reason": "FieldValueInvalid",
                        "field": "metadata.resourceVersion",
                        "message": "Invalid value: 0x0: must be specified for an update",
                    }
                ],
            )
        if subresource == "status" and rt.kind in ("Pod", "Node") and not rt.group:
            # Pod/Node status strategies keep spec and ownerReferences, but let metadata through.
            result = new
            for field in (*SERVER_META, "ownerReferences"):
                if field in old["metadata"]:
                    meta[field] = old["metadata"][field]
                else:
                    meta.pop(field, None)
            if "spec" in old:
                result["spec"] = old["spec"]
        elif subresource == "status":
            # Status writes may change .status only (metav1.ResetObjectMetaForStatus).
            result = copy.deepcopy(old)
            if "status" in new:
                result["status"] = new["status"]
            else:
                result.pop("status", None)
        else:
            result = new
            self._check_uid(rt, old, meta, is_put)
            for field in SERVER_META:
                if field in old["metadata"]:
                    meta[field] = old["metadata"][field]
                else:
                    meta.pop(field, None)
            if rt.status_subresource:
                if "status" in old:
                    result["status"] = old["status"]
                else:
                    result.pop("status", None)
            if rt.kind == "Service" and not rt.group:
                validation.prepare_service_update(result, old)
            self._admit(rt, result, old)
            if old["metadata"].get("deletionTimestamp"):
                added = set(meta.get("finalizers") or []) - set(
                    old["metadata"].get("finalizers") or []
                )
                if added:
                    raise errors.invalid(
                        rt.kind,
                        rt.group,
                        name,
                        [
                            {
                                "reason": "FieldValueForbidden",
                                "field": "metadata.finalizers",
                                "message": f"Forbidden: no new finalizers can be added if the object is being deleted, found new finalizers {sorted(added)}",
                            }
                        ],
                    )
        if rt.custom:
            self._apply_schema(rt, result, strict, warnings, old)
        for admit in self.admission:
            _warn(warnings, admit("UPDATE", rt, result, old, subresource))
        if json.dumps(_content(result, rt), sort_keys=True) != json.dumps(
            _content(old, rt), sort_keys=True
        ):
            result["metadata"]["generation"] = int(old["metadata"].get("generation", 1)) + 1
        if rt.group == "apiextensions.k8s.io" and subresource != "status":
            self._check_crd(result)
            result["status"] = old.get("status", {})
        result["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if _same(result, old):
            return self.present(rt, old)  # a no-op write: no new resourceVersion, no watch event
        if dry_run:
            return self.present(rt, result)
        m = result["metadata"]
        if (
            m.get("deletionTimestamp")
            and not m.get("finalizers")
            and not m.get("deletionGracePeriodSeconds")
        ):
            # The last finalizer is gone: the write becomes the deletion (one DELETED event).
            return self.present(rt, self._remove(rt, result, "Background"))
        stored = self.store.put(key, result, old)
        if rt.group == "apiextensions.k8s.io":
            stored = self._register_crd(stored)
        return self.present(rt, stored)

    def _check_uid(
        self, rt: ResourceType, old: dict[str, Any], meta: dict[str, Any], is_put: bool
    ) -> None:
        """A uid in a PUT body is a precondition (409); a patch changing it fails validation."""
        uid, old_uid = meta.get("uid"), old["metadata"]["uid"]
        if not uid or uid == old_uid:
            return
        name = old["metadata"]["name"]
        if is_put:
            why = f"Precondition failed: UID in precondition: {uid}, UID in object meta: {old_uid}"
            raise errors.conflict(rt.plural, rt.group, name, why)
        error = validation.invalid("metadata.uid", uid, "field is immutable")
        raise errors.invalid(rt.kind, rt.group, name, validation.causes([error]))

    def patch(
        self,
        rt: ResourceType,
        namespace: str | None,
        name: str,
        body: Any,
        content_type: str,
        *,
        subresource: str | None = None,
        dry_run: bool = False,
        strict: bool = False,
        field_manager: str | None = None,
        warnings: list[str] | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Apply a patch; returns (object, created) — only apply-patches may create."""
        key = self._storage_key(rt)
        current = self.store.get(key, namespace or "", name)
        if content_type == "application/apply-patch+yaml":
            if not field_manager:
                raise errors.invalid(
                    "PatchOptions",
                    "meta.k8s.io",
                    "",
                    [
                        {
                            "reason": "FieldValueRequired",
                            "field": "fieldManager",
                            "message": "Required value: is required for apply patch",
                        }
                    ],
                )
            if not isinstance(body, dict):
                raise errors.bad_request("an apply patch must be an object")
            if current is None:
                body.setdefault("metadata", {}).setdefault("name", name)
                return self.create(
                    rt, namespace, body, dry_run=dry_run, strict=strict, warnings=warnings
                ), True
            merged = (merge_patch if rt.custom else strategic_merge)(
                self.present(rt, current), body
            )
            return self.update(
                rt,
                namespace,
                name,
                merged,
                subresource=subresource,
                is_put=False,
                dry_run=dry_run,
                strict=strict,
                warnings=warnings,
            ), False
        if current is None:
            raise errors.not_found(rt.plural, rt.group, name)
        base = self.present(rt, current)
        try:
            if content_type == "application/json-patch+json":
                result = json_patch(base, body)
            elif content_type == "application/merge-patch+json":
                result = merge_patch(base, body)
            elif content_type == "application/strategic-merge-patch+json" and not rt.custom:
                result = strategic_merge(base, body)
            else:
                raise ApiError(
                    415,
                    f"the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml{'' if rt.custom else ', application/strategic-merge-patch+json'}",
                    "UnsupportedMediaType",
                )
        except ValueError as exc:
            raise errors.bad_request(str(exc)) from exc
        except PatchError as exc:
            raise ApiError(
                422,
                f"the server rejected our request due to an error in our request: {exc}",
                "Invalid",
            ) from exc
        return self.update(
            rt,
            namespace,
            name,
            result,
            subresource=subresource,
            is_put=False,
            dry_run=dry_run,
            strict=strict,
            warnings=warnings,
        ), False

    def bind(self, namespace: str, name: str, binding: dict[str, Any]) -> None:
        """pods/{name}/binding, as the scheduler uses it: set spec.nodeName once."""
        pod = self.store.get(("", "pods"), namespace, name)
        if pod is None:
            raise errors.not_found("pods", "", name)
        node = (binding.get("target") or {}).get("name")
        if not node:
            raise errors.invalid(
                "Binding",
                "",
                name,
                [
                    {
                        "reason": "FieldValueRequired",
                        "field": "target.name",
                        "message": "Required value",
                    }
                ],
            )
        if (pod.get("spec") or {}).get("nodeName"):
            raise errors.conflict(
                "pods/binding",
                "",
                name,
                f'pod {name} is already assigned to node "{pod["spec"]["nodeName"]}"',
            )
        new = copy.deepcopy(pod)
        new["spec"]["nodeName"] = node
        conditions = [
            c for c in new["status"].get("conditions", []) if c.get("type") != "PodScheduled"
        ]
        new["status"]["conditions"] = [
            *conditions,
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()},
        ]
        self.store.put(("", "pods"), new, pod)

    # ------------------------------------------------------------ delete
    def delete(
        self, rt: ResourceType, namespace: str | None, name: str, options: dict[str, Any]
    ) -> dict[str, Any]:
        key = self._storage_key(rt)
        obj = self.store.get(key, namespace or "", name)
        if obj is None:
            raise errors.not_found(rt.plural, rt.group, name)
        meta = obj["metadata"]
        pre = options.get("preconditions") or {}
        if pre.get("uid") and pre["uid"] != meta["uid"]:
            raise errors.conflict(
                rt.plural,
                rt.group,
                name,
                f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {meta['uid']}",
            )
        if pre.get("resourceVersion") and pre["resourceVersion"] != meta["resourceVersion"]:
            raise errors.conflict(
                rt.plural,
                rt.group,
                name,
                f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, ResourceVersion in object meta: {meta['resourceVersion']}",
            )
        policy = options.get("propagationPolicy") or (
            "Orphan" if options.get("orphanDependents") else "Background"
        )
        if policy not in ("Orphan", "Background", "Foreground"):
            raise errors.bad_request(f"unknown propagationPolicy {policy!r}")
        if policy == "Orphan":
            self._orphan(meta["uid"])
        if rt.kind == "Namespace" and not rt.group:
            return self.present(rt, self._delete_namespace(obj))
        grace = 0
        phase = (obj.get("status") or {}).get("phase")
        if (
            rt.kind == "Pod"
            and not rt.group
            and (obj.get("spec") or {}).get("nodeName")
            and phase not in TERMINAL_PHASES
        ):
            # A bound, running pod is deleted gracefully: the node stops it, then deletes with grace 0.
            grace = options.get("gracePeriodSeconds")
            if grace is None:
                grace = (obj.get("spec") or {}).get("terminationGracePeriodSeconds", 30)
            grace = max(int(grace), 0)
        if meta.get("deletionTimestamp"):
            current = int(meta.get("deletionGracePeriodSeconds") or 0)
            if grace >= current:
                return self.present(rt, obj)  # already terminating; only a shorter grace changes it
        elif grace == 0 and not meta.get("finalizers"):
            return self.present(rt, self._remove(rt, obj, policy))
        new = copy.deepcopy(obj)
        new["metadata"]["deletionTimestamp"] = now(grace)
        new["metadata"]["deletionGracePeriodSeconds"] = grace
        if not meta.get("deletionTimestamp"):
            new["metadata"]["generation"] = int(meta.get("generation", 1)) + 1
        if grace == 0 and not meta.get("finalizers"):
            return self.present(rt, self._remove(rt, new, policy))
        return self.present(rt, self.store.put(key, new, obj))

    def delete_collection(
        self, rt: ResourceType, namespace: str | None, match: Matcher, options: dict[str, Any]
    ) -> list[dict[str, Any]]:
        deleted = []
        for obj in self.list(rt, namespace, match):
            try:
                deleted.append(
                    self.delete(
                        rt, obj["metadata"].get("namespace"), obj["metadata"]["name"], options
                    )
                )
            except ApiError as exc:
                if exc.code != 404:  # removed meanwhile by garbage collection: fine
                    raise
        return deleted

    def _remove(self, rt: ResourceType, obj: dict[str, Any], policy: str) -> dict[str, Any]:
        key = self._storage_key(rt)
        final = self.store.remove(key, obj)
        uid = obj["metadata"]["uid"]
        if rt.group == "apiextensions.k8s.io":
            self._unregister_crd(obj)
        if policy == "Orphan":
            self._orphan(uid)
        else:
            # "Foreground" is served like "Background": the owner goes first, dependents follow.
            self._collect_garbage(uid)
        namespace = obj["metadata"].get("namespace")
        if namespace:
            self._maybe_finalize_namespace(namespace)
        return final

    def _dependents(self, uid: str) -> list[tuple[Key, dict[str, Any]]]:
        return [
            (key, obj)
            for key, obj in self.store.all_objects()
            if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])
        ]

    def _orphan(self, uid: str) -> None:
        for key, obj in self._dependents(uid):
            new = copy.deepcopy(obj)
            new["metadata"]["ownerReferences"] = [
                r for r in obj["metadata"]["ownerReferences"] if r.get("uid") != uid
            ]
            if not new["metadata"]["ownerReferences"]:
                del new["metadata"]["ownerReferences"]
            self.store.put(key, new, obj)

    def _collect_garbage(self, uid: str) -> None:
        for key, obj in self._dependents(uid):
            rt = self._rt_for_key(key)
            current = self.store.get(
                key, obj["metadata"].get("namespace", ""), obj["metadata"]["name"]
            )
            if (
                rt is None
                or current is None
                or current["metadata"]["uid"] != obj["metadata"]["uid"]
            ):
                continue
            refs = current["metadata"].get("ownerReferences") or []
            alive = [r for r in refs if r.get("uid") in self.store.uids]
            if alive:
                # Other owners remain: only the references to vanished owners are dropped.
                new = copy.deepcopy(current)
                new["metadata"]["ownerReferences"] = alive
                self.store.put(key, new, current)
            else:
                self.delete(
                    rt,
                    current["metadata"].get("namespace"),
                    current["metadata"]["name"],
                    {"propagationPolicy": "Background"},
                )

    def _delete_namespace(self, ns_obj: dict[str, Any]) -> dict[str, Any]:
        name = ns_obj["metadata"]["name"]
        if not ns_obj["metadata"].get("deletionTimestamp"):
            new = copy.deepcopy(ns_obj)
            new["metadata"]["deletionTimestamp"] = now()
            new["metadata"]["deletionGracePeriodSeconds"] = 0
            new["status"] = {"phase": "Terminating"}
            ns_obj = self.store.put(("", "namespaces"), new, ns_obj)
        for key, obj in self.store.all_objects():
            rt = self._rt_for_key(key)
            if (
                rt is not None
                and rt.namespaced
                and obj["metadata"].get("namespace") == name
                and self.store.get(key, name, obj["metadata"]["name"]) is not None
            ):
                self.delete(rt, name, obj["metadata"]["name"], {"propagationPolicy": "Background"})
        self._maybe_finalize_namespace(name)
        return self.store.get(("", "namespaces"), "", name) or ns_obj

    def _maybe_finalize_namespace(self, name: str) -> None:
        ns_obj = self.store.get(("", "namespaces"), "", name)
        if ns_obj is None or not ns_obj["metadata"].get("deletionTimestamp"):
            return
        if any(obj["metadata"].get("namespace") == name for _, obj in self.store.all_objects()):
            return
        self.store.remove(("", "namespaces"), ns_obj)

    # ------------------------------------------------------------ CRDs
    def _check_crd(self, crd: dict[str, Any]) -> None:
        spec = crd.get("spec") or {}
        names = spec.get("names") or {}
        name = crd["metadata"]["name"]
        causes = []
        for field, value in (
            ("spec.group", spec.get("group")),
            ("spec.names.plural", names.get("plural")),
            ("spec.names.kind", names.get("kind")),
            ("spec.scope", spec.get("scope")),
        ):
            if not value:
                causes.append(
                    {"reason": "FieldValueRequired", "field": field, "message": "Required value"}
                )
        if not spec.get("versions"):
            causes.append(
                {
                    "reason": "FieldValueRequired",
                    "field": "spec.versions",
                    "message": "Required value: must have exactly one version marked as storage version",
                }
            )
        if (
            names.get("plural")
            and spec.get("group")
            and name != f"{names['plural']}.{spec['group']}"
        ):
            causes.append(
                {
                    "reason": "FieldValueInvalid",
                    "field": "metadata.name",
                    "message": f'Invalid value: "{name}": must be spec.names.plural+"."+spec.group',
                }
            )
        causes += cel.check_crd_rules(spec)
        if causes:
            raise errors.invalid("CustomResourceDefinition", "apiextensions.k8s.io", name, causes)
        if self.registry.get(
            spec["group"], spec["versions"][0].get("name", ""), names["plural"]
        ) is not None and not any(
            rt.custom
            for rt in self.registry.all()
            if rt.storage_key == (spec["group"], names["plural"])
        ):
            raise errors.invalid(
                "CustomResourceDefinition",
                "apiextensions.k8s.io",
                name,
                [
                    {
                        "reason": "FieldValueInvalid",
                        "field": "spec.names.plural",
                        "message": "Invalid value: it collides with a built-in resource",
                    }
                ],
            )

    def _register_crd(self, crd: dict[str, Any]) -> dict[str, Any]:
        spec = crd["spec"]
        names = spec["names"]
        self.registry.remove_group_plural(spec["group"], names["plural"])
        for version in spec["versions"]:
            if not version.get("served", True):
                continue
            self.registry.add(
                ResourceType(
                    group=spec["group"],
                    version=version["name"],
                    plural=names["plural"],
                    kind=names["kind"],
                    namespaced=spec.get("scope") == "Namespaced",
                    short_names=tuple(names.get("shortNames") or ()),
                    categories=tuple(names.get("categories") or ()),
                    status_subresource="status" in (version.get("subresources") or {}),
                    custom=True,
                    schema=(version.get("schema") or {}).get("openAPIV3Schema"),
                    printer_columns=list(version.get("additionalPrinterColumns") or []),
                )
            )
        # The apiextensions controller reports the CRD as accepted and established.
        status = {
            "conditions": [
                {
                    "type": "NamesAccepted",
                    "status": "True",
                    "reason": "NoConflicts",
                    "message": "no conflicts found",
                    "lastTransitionTime": now(),
                },
                {
                    "type": "Established",
                    "status": "True",
                    "reason": "InitialNamesAccepted",
                    "message": "the initial names have been accepted",
                    "lastTransitionTime": now(),
                },
            ],
            "acceptedNames": {"singular": names.get("singular", names["kind"].lower()), **names},
            "storedVersions": [v["name"] for v in spec["versions"] if v.get("storage")],
        }
        if crd.get("status", {}).get("acceptedNames") == status["acceptedNames"]:
            return crd
        new = {**crd, "status": status}
        return self.store.put(("apiextensions.k8s.io", "customresourcedefinitions"), new, crd)

    def _unregister_crd(self, crd: dict[str, Any]) -> None:
        group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
        for obj in self.store.list((group, plural)):
            self.store.remove((group, plural), obj)
        self.registry.remove_group_plural(group, plural)
