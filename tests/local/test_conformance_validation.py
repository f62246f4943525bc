"""Conformance probes: admission validation of built-in objects (422 Invalid with field causes).

Every expected answer is the real apiserver's, from the sources named in each docstring:
``pkg/apis/core/validation/validation.go`` (k8s.io/kubernetes), ``pkg/apis/rbac/validation``,
``k8s.io/apimachinery/pkg/api/validation/objectmeta.go``, ``k8s.io/apimachinery/pkg/util/
validation/validation.go`` (name/label formats) and ``.../util/validation/field/errors.go``
(how a cause renders: ``<Type>: <value>: <detail>``). A refused write stores nothing.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

pytestmark = [pytest.mark.local, pytest.mark.timeout(60)]

DNS1123_SUBDOMAIN_MSG = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
DNS1123_LABEL_MSG = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
DNS1035_LABEL_MSG = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
    "alphabetic character, and end with an alphanumeric character (e.g. 'my-name',  or "
    "'abc-123', regex used for validation is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)
POD_UPDATE_MSG = (
    "spec: Forbidden: pod updates may not change fields other than `spec.containers[*].image`,"
    "`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,`spec.tolerations` (only "
    "additions to existing tolerations),`spec.terminationGracePeriodSeconds` (allow it to be set "
    "to 1 if it was previously negative)"
)


def api(ns: str, plural: str, name: str = "") -> str:
    return f"/api/v1/namespaces/{ns}/{plural}" + (f"/{name}" if name else "")


def rbac(ns: str | None, plural: str, name: str = "") -> str:
    base = "/apis/rbac.authorization.k8s.io/v1"
    base += f"/namespaces/{ns}/{plural}" if ns else f"/{plural}"
    return base + (f"/{name}" if name else "")


def pod(name: str, *containers: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": name},
        "spec": {"containers": list(containers) or [{"name": "c", "image": "busybox"}], **spec},
    }


def refused(cluster, method: str, path: str, body: Any, **kwargs: Any) -> dict[str, Any]:
    """Send a write the server must refuse: 422 Invalid with field causes; return the Status."""
    status, answer = cluster.request(method, path, body, **kwargs)
    assert status == 422, (status, answer)
    assert answer["kind"] == "Status" and answer["status"] == "Failure"
    assert answer["reason"] == "Invalid" and answer["code"] == 422
    assert answer["details"]["causes"], answer
    return answer


def cause(answer: dict[str, Any], field: str) -> dict[str, Any]:
    """The one cause for this field path (fails listing them all when absent)."""
    found = [c for c in answer["details"]["causes"] if c.get("field") == field]
    assert found, answer["details"]["causes"]
    return found[0]


def absent(cluster, path: str) -> None:
    status, body = cluster.request("GET", path)
    assert status == 404, body


# ---------------------------------------------------------------------------- names per kind
def test_service_name_must_be_a_dns1035_label(cluster, ns, uniq):
    """ValidateServiceName = NameIsDNS1035Label (core validation.go ValidateService)."""
    name = f"1svc-{uniq}"
    body = {"metadata": {"name": name}, "spec": {"ports": [{"port": 80}]}}
    answer = refused(cluster, "POST", api(ns, "services"), body)
    c = cause(answer, "metadata.name")
    assert c["reason"] == "FieldValueInvalid"
    assert c["message"] == f'Invalid value: "{name}": {DNS1035_LABEL_MSG}'
    assert answer["message"] == f'Service "{name}" is invalid: metadata.name: {c["message"]}'
    assert answer["details"]["name"] == name and answer["details"]["kind"] == "Service"
    absent(cluster, api(ns, "services", name))


def test_pod_name_must_be_a_dns1123_subdomain(cluster, ns, uniq):
    """ValidatePodName = NameIsDNSSubdomain (objectmeta.go ValidateObjectMetaAccessor)."""
    name = f"Pod_{uniq}"
    answer = refused(cluster, "POST", api(ns, "pods"), pod(name))
    c = cause(answer, "metadata.name")
    assert c["reason"] == "FieldValueInvalid"
    assert c["message"] == f'Invalid value: "{name}": {DNS1123_SUBDOMAIN_MSG}'
    absent(cluster, api(ns, "pods", name))


def test_namespace_name_must_be_a_dns1123_label(cluster, uniq):
    """ValidateNamespaceName = NameIsDNSLabel; a valid subdomain gets 'must not contain dots'
    (IsDNS1123Label in apimachinery util/validation)."""
    name = f"ns.{uniq}"
    answer = refused(cluster, "POST", "/api/v1/namespaces", {"metadata": {"name": name}})
    c = cause(answer, "metadata.name")
    assert c["message"] == f'Invalid value: "{name}": must not contain dots'
    absent(cluster, f"/api/v1/namespaces/{name}")
    bad = f"NS-{uniq}"
    answer = refused(cluster, "POST", "/api/v1/namespaces", {"metadata": {"name": bad}})
    assert (
        cause(answer, "metadata.name")["message"] == f'Invalid value: "{bad}": {DNS1123_LABEL_MSG}'
    )


def test_generate_name_is_validated_as_a_prefix(cluster, ns):
    """ValidateObjectMetaAccessor checks generateName with prefix=true (a trailing '-' is fine)."""
    answer = refused(
        cluster, "POST", api(ns, "configmaps"), {"metadata": {"generateName": "Bad_Prefix-"}}
    )
    c = cause(answer, "metadata.generateName")
    assert c["message"] == f'Invalid value: "Bad_Prefix-": {DNS1123_SUBDOMAIN_MSG}'
    status, _ = cluster.request(
        "POST", api(ns, "configmaps"), {"metadata": {"generateName": "ok-"}}
    )
    assert status == 201


def test_rbac_names_are_path_segments(cluster, ns, uniq):
    """minimalNameRequirements = path.IsValidPathSegmentName (rbac/validation ValidateRole):
    uppercase passes, '%' does not."""
    path = rbac(ns, "roles")
    ok = f"Role_Upper.{uniq}"
    status, _ = cluster.request("POST", path, {"metadata": {"name": ok}, "rules": []})
    assert status == 201
    bad = f"role%{uniq}"
    answer = refused(cluster, "POST", path, {"metadata": {"name": bad}, "rules": []})
    assert (
        cause(answer, "metadata.name")["message"]
        == f"Invalid value: \"{bad}\": may not contain '%'"
    )
    assert answer["message"].startswith(f'Role.rbac.authorization.k8s.io "{bad}" is invalid: ')
    names = [r["metadata"]["name"] for r in cluster.ok("GET", path)["items"]]
    assert bad not in names and ok in names


# ---------------------------------------------------------------------------- labels/annotations
def test_label_value_too_long_and_bad_key(cluster, ns, uniq):
    """ValidateLabels: keys IsQualifiedName, values IsValidLabelValue (<= 63, label syntax);
    several causes join as '[a, b]' (ErrorList.ToAggregate)."""
    name = f"cm-{uniq}"
    value = "v" * 64
    body = {"metadata": {"name": name, "labels": {"bad key": "x", "app": value}}}
    answer = refused(cluster, "POST", api(ns, "configmaps"), body)
    label_causes = [c for c in answer["details"]["causes"] if c["field"] == "metadata.labels"]
    messages = sorted(c["message"] for c in label_causes)
    assert len(messages) == 2
    assert messages[0].startswith('Invalid value: "bad key": name part must consist of')
    assert messages[1].startswith(f'Invalid value: "{value}": must be no more than 63 ')
    assert answer["message"].startswith(f'ConfigMap "{name}" is invalid: [metadata.labels: ')
    assert answer["message"].endswith("]")
    absent(cluster, api(ns, "configmaps", name))


def test_annotations_total_size_is_limited(cluster, ns, uniq):
    """ValidateAnnotations: keys are qualified names; the total size is at most 256 KiB
    (TotalAnnotationSizeLimitB, reported as TooLong on metadata.annotations)."""
    name = f"cm-{uniq}"
    body = {"metadata": {"name": name, "annotations": {"big": "x" * (256 * 1024)}}}
    answer = refused(cluster, "POST", api(ns, "configmaps"), body)
    c = cause(answer, "metadata.annotations")
    assert c["reason"] == "FieldValueTooLong" and c["message"].startswith("Too long: ")
    absent(cluster, api(ns, "configmaps", name))
    body = {"metadata": {"name": name, "annotations": {"a/b/c": "x"}}}
    assert cause(refused(cluster, "POST", api(ns, "configmaps"), body), "metadata.annotations")


# ---------------------------------------------------------------------------- pods
def test_duplicate_container_names(cluster, ns, uniq):
    """validateContainers: names unique; Duplicate on the second one's name."""
    name = f"p-{uniq}"
    body = pod(name, {"name": "a", "image": "busybox"}, {"name": "a", "image": "busybox"})
    answer = refused(cluster, "POST", api(ns, "pods"), body)
    c = cause(answer, "spec.containers[1].name")
    assert c["reason"] == "FieldValueDuplicate" and c["message"] == 'Duplicate value: "a"'
    assert (
        answer["message"]
        == f'Pod "{name}" is invalid: spec.containers[1].name: Duplicate value: "a"'
    )
    absent(cluster, api(ns, "pods", name))


def test_init_container_name_clashing_with_a_container(cluster, ns, uniq):
    """validateInitContainers: names unique across initContainers and containers."""
    body = pod(f"p-{uniq}", {"name": "a", "image": "busybox"})
    body["spec"]["initContainers"] = [{"name": "a", "image": "busybox"}]
    answer = refused(cluster, "POST", api(ns, "pods"), body)
    assert cause(answer, "spec.initContainers[0].name")["reason"] == "FieldValueDuplicate"


def test_pod_needs_a_container_and_an_image(cluster, ns, uniq):
    """validateContainers: Required on spec.containers; validateContainerCommon: image Required;
    container names are DNS-1123 labels."""
    body = {"metadata": {"name": f"p-{uniq}"}, "spec": {"containers": []}}
    answer = refused(cluster, "POST", api(ns, "pods"), body)
    assert cause(answer, "spec.containers")["message"] == "Required value"
    body = pod(f"p-{uniq}", {"name": "Main"})
    answer = refused(cluster, "POST", api(ns, "pods"), body)
    assert cause(answer, "spec.containers[0].image")["reason"] == "FieldValueRequired"
    assert (
        cause(answer, "spec.containers[0].name")["message"]
        == f'Invalid value: "Main": {DNS1123_LABEL_MSG}'
    )
    assert answer["message"].startswith(f'Pod "p-{uniq}" is invalid: [')


def test_image_with_surrounding_whitespace(cluster, ns, uniq):
    """validateContainerOnlyForPod: 'must not have leading or trailing whitespace' (an inner
    space passes the apiserver; the kubelet reports it)."""
    body = pod(f"p-{uniq}", {"name": "c", "image": "busybox "})
    answer = refused(cluster, "POST", api(ns, "pods"), body)
    c = cause(answer, "spec.containers[0].image")
    assert c["message"] == 'Invalid value: "busybox ": must not have leading or trailing whitespace'


def test_volume_mounts(cluster, ns, uniq):
    """ValidateVolumeMounts: unknown volume NotFound, mountPath unique ('must be unique'),
    subPath no '..' (reported at volumeMounts.subPath, as the real code builds the path)."""
    name = f"p-{uniq}"
    container = {
        "name": "c",
        "image": "busybox",
        "volumeMounts": [
            {"name": "data", "mountPath": "/data"},
            {"name": "data", "mountPath": "/data"},
            {"name": "nope", "mountPath": "/x"},
            {"name": "data", "mountPath": "/y", "subPath": "../up"},
        ],
    }
    body = pod(name, container, volumes=[{"name": "data", "emptyDir": {}}])
    answer = refused(cluster, "POST", api(ns, "pods"), body)
    c = cause(answer, "spec.containers[0].volumeMounts[1].mountPath")
    assert (
        c["reason"] == "FieldValueInvalid"
        and c["message"] == 'Invalid value: "/data": must be unique'
    )
    c = cause(answer, "spec.containers[0].volumeMounts[2].name")
    assert c["reason"] == "FieldValueNotFound" and c["message"] == 'Not found: "nope"'
    c = cause(answer, "spec.containers[0].volumeMounts.subPath")
    assert c["message"] == "Invalid value: \"../up\": must not contain '..'"
    absent(cluster, api(ns, "pods", name))


def test_volumes(cluster, ns, uniq):
    """ValidateVolumes/validateVolumeSource: names DNS-1123 labels and unique, exactly one
    source ('must specify a volume type', 'may not specify more than 1 volume type')."""
    volumes = [
        {"name": "a", "emptyDir": {}},
        {"name": "a", "emptyDir": {}},
        {"name": "b"},
        {"name": "c", "emptyDir": {}, "configMap": {"name": "x"}},
    ]
    answer = refused(cluster, "POST", api(ns, "pods"), pod(f"p-{uniq}", volumes=volumes))
    assert cause(answer, "spec.volumes[1].name")["message"] == 'Duplicate value: "a"'
    assert (
        cause(answer, "spec.volumes[2]")["message"] == "Required value: must specify a volume type"
    )
    c = cause(answer, "spec.volumes[3].configMap")
    assert c["reason"] == "FieldValueForbidden"
    assert c["message"] == "Forbidden: may not specify more than 1 volume type"


def test_container_ports_and_env(cluster, ns, uniq):
    """validateContainerPorts (port range, unique names, protocol enum) and ValidateEnv
    (relaxed names: printable ASCII except '=')."""
    container = {
        "name": "c",
        "image": "busybox",
        "ports": [
            {"name": "http", "containerPort": 80},
            {"name": "http", "containerPort": 81},
            {"containerPort": 70000},
            {"containerPort": 82, "protocol": "HTTP"},
        ],
        "env": [{"name": "A=B", "value": "1"}],
    }
    answer = refused(cluster, "POST", api(ns, "pods"), pod(f"p-{uniq}", container))
    assert cause(answer, "spec.containers[0].ports[1].name")["reason"] == "FieldValueDuplicate"
    c = cause(answer, "spec.containers[0].ports[2].containerPort")
    assert c["message"] == "Invalid value: 70000: must be between 1 and 65535, inclusive"
    c = cause(answer, "spec.containers[0].ports[3].protocol")
    assert c["message"] == 'Unsupported value: "HTTP": supported values: "SCTP", "TCP", "UDP"'
    c = cause(answer, "spec.containers[0].env[0].name")
    assert c["reason"] == "FieldValueInvalid" and c["message"].startswith('Invalid value: "A=B": ')


def test_resources_requests_above_limits(cluster, ns, uniq):
    """validateResourceRequirements: requests <= limits, reported on resources.requests."""
    container = {
        "name": "c",
        "image": "busybox",
        "resources": {"requests": {"cpu": "2"}, "limits": {"cpu": "1"}},
    }
    answer = refused(cluster, "POST", api(ns, "pods"), pod(f"p-{uniq}", container))
    c = cause(answer, "spec.containers[0].resources.requests")
    assert c["message"] == 'Invalid value: "2": must be less than or equal to cpu limit of 1'


def test_extended_resources(cluster, ns, uniq):
    """Extended resources (nvidia.com/gpu) are not overcommitable: a request needs a limit and
    must equal it; they are integers (ValidateResourceQuantityValue 'must be an integer')."""
    container = {"name": "c", "image": "busybox", "resources": {"requests": {"nvidia.com/gpu": 1}}}
    answer = refused(cluster, "POST", api(ns, "pods"), pod(f"p-{uniq}", container))
    c = cause(answer, "spec.containers[0].resources.limits")
    assert c["message"] == "Required value: Limit must be set for non overcommitable resources"
    container["resources"] = {"requests": {"nvidia.com/gpu": 1}, "limits": {"nvidia.com/gpu": 2}}
    answer = refused(cluster, "POST", api(ns, "pods"), pod(f"p-{uniq}", container))
    c = cause(answer, "spec.containers[0].resources.requests")
    assert c["message"] == 'Invalid value: "1": must be equal to nvidia.com/gpu limit of 2'
    container["resources"] = {"limits": {"nvidia.com/gpu": "1.5"}}
    answer = refused(cluster, "POST", api(ns, "pods"), pod(f"p-{uniq}", container))
    c = cause(answer, "spec.containers[0].resources.limits[nvidia.com/gpu]")
    assert c["message"].endswith(": must be an integer")
    container["resources"] = {"limits": {"gpu": "1"}}
    answer = refused(cluster, "POST", api(ns, "pods"), pod(f"p-{uniq}", container))
    c = cause(answer, "spec.containers[0].resources.limits[gpu]")
    assert c["message"] == 'Invalid value: "gpu": must be a standard resource for containers'


def test_malformed_quantity_is_a_decode_error(cluster, ns, uniq):
    """resource.Quantity's UnmarshalJSON fails while decoding: 400 BadRequest '<Kind> in version
    "v1" cannot be handled as a <Kind>: quantities must match the regular expression ...'."""
    container = {"name": "c", "image": "busybox", "resources": {"limits": {"memory": "1x"}}}
    status, answer = cluster.request("POST", api(ns, "pods"), pod(f"p-{uniq}", container))
    assert status == 400 and answer["reason"] == "BadRequest"
    assert answer["message"].startswith('Pod in version "v1" cannot be handled as a Pod: ')
    assert "quantities must match the regular expression" in answer["message"]
    absent(cluster, api(ns, "pods", f"p-{uniq}"))


def test_pod_spec_enums_and_ranges(cluster, ns, uniq):
    """validateRestartPolicy / validateDNSPolicy (NotSupported), activeDeadlineSeconds range,
    ValidateTolerations operator, nodeSelector labels, serviceAccountName subdomain."""
    spec = {
        "restartPolicy": "Sometimes",
        "dnsPolicy": "Google",
        "activeDeadlineSeconds": 0,
        "tolerations": [{"key": "k", "operator": "Maybe"}],
        "nodeSelector": {"gpu": "yes please"},
        "serviceAccountName": "Bad_SA",
    }
    answer = refused(cluster, "POST", api(ns, "pods"), pod(f"p-{uniq}", **spec))
    assert (
        cause(answer, "spec.restartPolicy")["message"]
        == 'Unsupported value: "Sometimes": supported values: "Always", "OnFailure", "Never"'
    )
    assert cause(answer, "spec.dnsPolicy")["reason"] == "FieldValueNotSupported"
    assert (
        cause(answer, "spec.activeDeadlineSeconds")["message"]
        == "Invalid value: 0: must be between 1 and 2147483647, inclusive"
    )
    assert (
        cause(answer, "spec.tolerations[0].operator")["message"]
        == 'Unsupported value: "Maybe": supported values: "Equal", "Exists"'
    )
    assert cause(answer, "spec.nodeSelector")["message"].startswith('Invalid value: "yes please": ')
    assert (
        cause(answer, "spec.serviceAccountName")["message"]
        == f'Invalid value: "Bad_SA": {DNS1123_SUBDOMAIN_MSG}'
    )


def test_dry_run_refusal_stores_nothing(cluster, ns, uniq):
    """dryRun=All runs the same validation; nothing is stored either way."""
    name = f"p-{uniq}"
    body = pod(name, {"name": "a", "image": "busybox"}, {"name": "a", "image": "busybox"})
    refused(cluster, "POST", api(ns, "pods"), body, query={"dryRun": "All"})
    absent(cluster, api(ns, "pods", name))


# ---------------------------------------------------------------------------- pod updates
def test_pod_spec_is_immutable_except_images(cluster, ns, uniq):
    """ValidatePodUpdate: only images, activeDeadlineSeconds, added tolerations may change;
    anything else is 'spec: Forbidden: pod updates may not change fields other than ...'."""
    name = f"p-{uniq}"
    cluster.ok(
        "POST", api(ns, "pods"), pod(name, {"name": "c", "image": "busybox", "command": ["a"]})
    )
    patch = {"spec": {"containers": [{"name": "c", "command": ["b"]}]}}
    answer = refused(
        cluster,
        "PATCH",
        api(ns, "pods", name),
        patch,
        content_type="application/strategic-merge-patch+json",
    )
    c = cause(answer, "spec")
    assert c["reason"] == "FieldValueForbidden"
    assert c["message"].startswith(POD_UPDATE_MSG.removeprefix("spec: "))
    assert answer["message"].startswith(f'Pod "{name}" is invalid: {POD_UPDATE_MSG}')
    current = cluster.ok("GET", api(ns, "pods", name))
    assert current["spec"]["containers"][0]["command"] == ["a"]
    patch = {"spec": {"containers": [{"name": "c", "image": "busybox:1.36"}]}}
    updated = cluster.ok(
        "PATCH",
        api(ns, "pods", name),
        patch,
        content_type="application/strategic-merge-patch+json",
    )
    assert updated["spec"]["containers"][0]["image"] == "busybox:1.36"


def test_pod_update_may_not_add_containers(cluster, ns, uniq):
    """ValidateContainerUpdates: 'pod updates may not add or remove containers'."""
    name = f"p-{uniq}"
    cluster.ok("POST", api(ns, "pods"), pod(name))
    current = cluster.ok("GET", api(ns, "pods", name))
    current["spec"]["containers"].append({"name": "d", "image": "busybox"})
    answer = refused(cluster, "PUT", api(ns, "pods", name), current)
    c = cause(answer, "spec.containers")
    assert c["message"] == "Forbidden: pod updates may not add or remove containers"


def test_uid_is_a_precondition_on_put_and_immutable_on_patch(cluster, ns, uniq):
    """A PUT body's uid is a precondition (rest.defaultUpdatedObjectInfo.Preconditions → 409
    'Precondition failed: UID in precondition'); a patch changing it fails
    ValidateObjectMetaUpdate ('metadata.uid: Invalid value: ...: field is immutable')."""
    name = f"cm-{uniq}"
    created = cluster.ok("POST", api(ns, "configmaps"), {"metadata": {"name": name}})
    uid = created["metadata"]["uid"]
    other = "00000000-0000-0000-0000-000000000000"
    body = {**created, "metadata": {**created["metadata"], "uid": other}}
    status, answer = cluster.request("PUT", api(ns, "configmaps", name), body)
    assert status == 409 and answer["reason"] == "Conflict"
    assert (
        f"Precondition failed: UID in precondition: {other}, UID in object meta: {uid}"
        in (answer["message"])
    )
    answer = refused(
        cluster,
        "PATCH",
        api(ns, "configmaps", name),
        {"metadata": {"uid": other}},
        content_type="application/merge-patch+json",
    )
    c = cause(answer, "metadata.uid")
    assert c["message"] == f'Invalid value: "{other}": field is immutable'
    assert cluster.ok("GET", api(ns, "configmaps", name))["metadata"]["uid"] == uid


# ---------------------------------------------------------------------------- services
def test_service_spec_rules(cluster, ns, uniq):
    """ValidateService: ports required unless headless/ExternalName, unique port names (names
    required when several), port range, protocol and type enums, selector labels."""
    name = f"svc-{uniq}"
    answer = refused(cluster, "POST", api(ns, "services"), {"metadata": {"name": name}, "spec": {}})
    assert cause(answer, "spec.ports")["message"] == "Required value"
    headless = {"metadata": {"name": f"hl-{uniq}"}, "spec": {"clusterIP": "None"}}
    assert cluster.request("POST", api(ns, "services"), headless)[0] == 201
    spec = {
        "type": "Weird",
        "selector": {"app": "a b"},
        "ports": [
            {"name": "web", "port": 80},
            {"name": "web", "port": 0, "protocol": "ICMP"},
            {"port": 82},
        ],
    }
    answer = refused(
        cluster, "POST", api(ns, "services"), {"metadata": {"name": name}, "spec": spec}
    )
    assert cause(answer, "spec.ports[1].name")["message"] == 'Duplicate value: "web"'
    assert (
        cause(answer, "spec.ports[1].port")["message"]
        == "Invalid value: 0: must be between 1 and 65535, inclusive"
    )
    assert cause(answer, "spec.ports[1].protocol")["reason"] == "FieldValueNotSupported"
    assert cause(answer, "spec.ports[2].name")["message"] == "Required value"
    assert (
        cause(answer, "spec.type")["message"]
        == 'Unsupported value: "Weird": supported values: "ClusterIP", "ExternalName", "LoadBalancer", "NodePort"'
    )
    assert cause(answer, "spec.selector")["message"].startswith('Invalid value: "a b": ')
    absent(cluster, api(ns, "services", name))


def test_service_cluster_ip_is_immutable(cluster, ns, uniq):
    """validateUpgradeDowngradeClusterIPs: 'spec.clusterIPs[0]: ... may not change once set';
    an update that leaves clusterIP out keeps the allocated one (patchAllocatedValues)."""
    name = f"svc-{uniq}"
    created = cluster.ok(
        "POST", api(ns, "services"), {"metadata": {"name": name}, "spec": {"ports": [{"port": 80}]}}
    )
    ip = created["spec"]["clusterIP"]
    answer = refused(
        cluster,
        "PATCH",
        api(ns, "services", name),
        {"spec": {"clusterIP": "10.96.250.250"}},
        content_type="application/merge-patch+json",
    )
    c = cause(answer, "spec.clusterIPs[0]")
    assert c["reason"] == "FieldValueInvalid" and c["message"].endswith(": may not change once set")
    kept = dict(created)
    kept["spec"] = {
        k: v for k, v in created["spec"].items() if k not in ("clusterIP", "clusterIPs")
    }
    updated = cluster.ok("PUT", api(ns, "services", name), kept)
    assert updated["spec"]["clusterIP"] == ip


# ---------------------------------------------------------------------------- configmaps/secrets
def test_config_map_keys(cluster, ns, uniq):
    """ValidateConfigMap: keys IsConfigMapKey ([-._a-zA-Z0-9]+, not '.'/'..'), no key in both
    data and binaryData."""
    name = f"cm-{uniq}"
    body = {
        "metadata": {"name": name},
        "data": {"a b": "1", "..": "2", "dup": "3"},
        "binaryData": {"dup": base64.b64encode(b"x").decode()},
    }
    answer = refused(cluster, "POST", api(ns, "configmaps"), body)
    assert cause(answer, "data[a b]")["message"].startswith(
        'Invalid value: "a b": a valid config key must consist of alphanumeric characters'
    )
    assert cause(answer, "data[..]")["message"] == "Invalid value: \"..\": must not be '..'"
    assert (
        cause(answer, "data[dup]")["message"]
        == 'Invalid value: "dup": duplicate of key present in binaryData'
    )
    absent(cluster, api(ns, "configmaps", name))


def test_config_map_size_limit(cluster, ns, uniq):
    """ValidateConfigMap: data+binaryData at most 1 MiB (core.MaxSecretSize), TooLong on the
    whole object (field path '[]')."""
    name = f"cm-{uniq}"
    body = {"metadata": {"name": name}, "data": {"big": "x" * (1024 * 1024 + 1)}}
    answer = refused(cluster, "POST", api(ns, "configmaps"), body)
    assert cause(answer, "[]")["reason"] == "FieldValueTooLong"
    absent(cluster, api(ns, "configmaps", name))


def test_immutable_config_map(cluster, ns, uniq):
    """ValidateConfigMapUpdate: with immutable=true, data and immutable may not change."""
    name = f"cm-{uniq}"
    cluster.ok(
        "POST",
        api(ns, "configmaps"),
        {"metadata": {"name": name}, "data": {"a": "1"}, "immutable": True},
    )
    answer = refused(
        cluster,
        "PATCH",
        api(ns, "configmaps", name),
        {"data": {"a": "2"}},
        content_type="application/merge-patch+json",
    )
    assert (
        cause(answer, "data")["message"] == "Forbidden: field is immutable when `immutable` is set"
    )
    assert cluster.ok("GET", api(ns, "configmaps", name))["data"] == {"a": "1"}


def test_secret_rules(cluster, ns, uniq):
    """ValidateSecret(Update): data keys, type immutable ('type: ... field is immutable'),
    typed secrets need their keys; stringData is folded into data (v1 conversion)."""
    name = f"s-{uniq}"
    answer = refused(
        cluster,
        "POST",
        api(ns, "secrets"),
        {"metadata": {"name": name}, "type": "kubernetes.io/tls", "data": {}},
    )
    assert cause(answer, "data[tls.crt]")["reason"] == "FieldValueRequired"
    assert cause(answer, "data[tls.key]")["reason"] == "FieldValueRequired"
    created = cluster.ok(
        "POST", api(ns, "secrets"), {"metadata": {"name": name}, "stringData": {"k": "v"}}
    )
    assert created["data"] == {"k": base64.b64encode(b"v").decode()}
    assert "stringData" not in created
    answer = refused(
        cluster,
        "PATCH",
        api(ns, "secrets", name),
        {"type": "kubernetes.io/basic-auth"},
        content_type="application/merge-patch+json",
    )
    assert (
        cause(answer, "type")["message"]
        == 'Invalid value: "kubernetes.io/basic-auth": field is immutable'
    )


def test_secret_data_must_be_base64(cluster, ns, uniq):
    """Secret data is []byte: a non-base64 value fails decoding (400 BadRequest,
    'illegal base64 data at input byte N'), before validation."""
    name = f"s-{uniq}"
    body = {"metadata": {"name": name}, "data": {"k": "not base64!"}}
    status, answer = cluster.request("POST", api(ns, "secrets"), body)
    assert status == 400 and answer["reason"] == "BadRequest"
    assert answer["message"].startswith('Secret in version "v1" cannot be handled as a Secret: ')
    assert "illegal base64 data at input byte" in answer["message"]
    absent(cluster, api(ns, "secrets", name))


# ---------------------------------------------------------------------------- claims
def test_pvc_rules(cluster, ns, uniq):
    """ValidatePersistentVolumeClaimSpec: access modes required ('at least 1 access mode is
    required'), storage request required (spec.resources[storage]); the spec is immutable
    after creation (ValidatePersistentVolumeClaimUpdate)."""
    name = f"pvc-{uniq}"
    answer = refused(
        cluster, "POST", api(ns, "persistentvolumeclaims"), {"metadata": {"name": name}, "spec": {}}
    )
    assert (
        cause(answer, "spec.accessModes")["message"]
        == "Required value: at least 1 access mode is required"
    )
    assert cause(answer, "spec.resources[storage]")["message"] == "Required value"
    absent(cluster, api(ns, "persistentvolumeclaims", name))
    spec = {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}}
    cluster.ok(
        "POST", api(ns, "persistentvolumeclaims"), {"metadata": {"name": name}, "spec": spec}
    )
    answer = refused(
        cluster,
        "PATCH",
        api(ns, "persistentvolumeclaims", name),
        {"spec": {"accessModes": ["ReadWriteMany"]}},
        content_type="application/merge-patch+json",
    )
    c = cause(answer, "spec")
    assert c["reason"] == "FieldValueForbidden"
    assert c["message"].startswith(
        "Forbidden: spec is immutable after creation except resources.requests and "
        "volumeAttributesClassName for bound claims"
    )


# ---------------------------------------------------------------------------- rbac / misc
def test_role_rules(cluster, ns, uniq):
    """validatePolicyRule: verbs required; resource rules need apiGroups and resources;
    namespaced rules cannot use nonResourceURLs."""
    name = f"r-{uniq}"
    rules = [{"resources": ["pods"]}, {"verbs": ["get"], "nonResourceURLs": ["/healthz"]}]
    answer = refused(
        cluster, "POST", rbac(ns, "roles"), {"metadata": {"name": name}, "rules": rules}
    )
    assert (
        cause(answer, "rules[0].verbs")["message"]
        == "Required value: verbs must contain at least one value"
    )
    assert (
        cause(answer, "rules[0].apiGroups")["message"]
        == "Required value: resource rules must supply at least one api group"
    )
    c = cause(answer, "rules[1].nonResourceURLs")
    assert c["message"].endswith(": namespaced rules cannot apply to non-resource URLs")
    absent(cluster, rbac(ns, "roles", name))


def test_role_binding_rules(cluster, ns, uniq):
    """ValidateRoleBinding(Update): roleRef kind enum, subject kind enum; roleRef immutable
    ('cannot change roleRef')."""
    name = f"rb-{uniq}"
    ref = {"apiGroup": "rbac.authorization.k8s.io", "kind": "Pod", "name": "x"}
    body = {
        "metadata": {"name": name},
        "roleRef": ref,
        "subjects": [{"kind": "Robot", "name": "r"}],
    }
    answer = refused(cluster, "POST", rbac(ns, "rolebindings"), body)
    assert (
        cause(answer, "roleRef.kind")["message"]
        == 'Unsupported value: "Pod": supported values: "Role", "ClusterRole"'
    )
    assert cause(answer, "subjects[0].kind")["reason"] == "FieldValueNotSupported"
    body["roleRef"] = {**ref, "kind": "Role"}
    body["subjects"] = [{"kind": "ServiceAccount", "name": "default", "namespace": ns}]
    cluster.ok("POST", rbac(ns, "rolebindings"), body)
    answer = refused(
        cluster,
        "PATCH",
        rbac(ns, "rolebindings", name),
        {"roleRef": {"name": "y"}},
        content_type="application/merge-patch+json",
    )
    c = cause(answer, "roleRef")
    assert c["reason"] == "FieldValueInvalid" and c["message"].endswith(": cannot change roleRef")


def test_service_account_name(cluster, ns, uniq):
    """ValidateServiceAccountName = NameIsDNSSubdomain."""
    name = f"SA-{uniq}"
    answer = refused(cluster, "POST", api(ns, "serviceaccounts"), {"metadata": {"name": name}})
    assert (
        cause(answer, "metadata.name")["message"]
        == f'Invalid value: "{name}": {DNS1123_SUBDOMAIN_MSG}'
    )


def test_event_involved_object_namespace(cluster, ns, uniq):
    """legacyValidateEvent: involvedObject.namespace must match the event's namespace."""
    name = f"ev-{uniq}"
    body = {
        "metadata": {"name": name},
        "involvedObject": {"kind": "Pod", "name": "p", "namespace": "elsewhere"},
        "reason": "Test",
        "message": "m",
    }
    answer = refused(cluster, "POST", api(ns, "events"), body)
    c = cause(answer, "involvedObject.namespace")
    assert c["message"] == 'Invalid value: "elsewhere": does not match event.namespace'
    absent(cluster, api(ns, "events", name))


def test_v1_event_names_are_only_path_segments(cluster, ns, uniq):
    """v1 Events have no name rule of their own (ValidateEventCreate skips ObjectMeta for v1);
    the common check (rest.BeforeCreate, path.ValidatePathSegmentName) lets 'job.' prefixes
    through, as the operator and client-go recorders use them."""
    body = {
        "metadata": {"generateName": f"Job_{uniq}."},
        "involvedObject": {"kind": "Pod", "name": "p", "namespace": ns},
        "reason": "Test",
        "message": "m",
    }
    status, created = cluster.request("POST", api(ns, "events"), body)
    assert status == 201, created
    assert created["metadata"]["name"].startswith(f"Job_{uniq}.")


def test_events_k8s_io_needs_event_time_and_type(cluster, ns, uniq):
    """ValidateEventCreate for events.k8s.io/v1: eventTime Required, type Normal or Warning."""
    name = f"ev-{uniq}"
    body = {
        "metadata": {"name": name},
        "regarding": {"kind": "Pod", "name": "p", "namespace": ns},
        "reason": "Test",
        "note": "n",
        "type": "Odd",
    }
    path = f"/apis/events.k8s.io/v1/namespaces/{ns}/events"
    answer = refused(cluster, "POST", path, body)
    assert cause(answer, "eventTime")["message"] == "Required value"
    assert cause(answer, "type")["message"] == 'Invalid value: "": has invalid value: Odd'
    absent(cluster, f"{path}/{name}")


def test_owner_references_and_finalizers(cluster, ns, uniq):
    """ValidateOwnerReferences ('must not be empty' per field) and, for core kinds,
    validateKubeFinalizerName ('name is neither a standard finalizer name nor is it fully
    qualified')."""
    name = f"cm-{uniq}"
    body = {
        "metadata": {
            "name": name,
            "ownerReferences": [{"apiVersion": "v1", "kind": "ConfigMap", "name": "o"}],
            "finalizers": ["cleanup"],
        }
    }
    answer = refused(cluster, "POST", api(ns, "configmaps"), body)
    assert (
        cause(answer, "metadata.ownerReferences.uid")["message"]
        == 'Invalid value: "": must not be empty'
    )
    c = cause(answer, "metadata.finalizers[0]")
    assert c["message"] == (
        'Invalid value: "cleanup": name is neither a standard finalizer name nor is it fully qualified'
    )
    absent(cluster, api(ns, "configmaps", name))


def test_dry_run_update_is_validated_too(cluster, ns, uniq):
    """An update with dryRun=All goes through the same ValidateUpdate (here the pod's
    immutable spec) and changes nothing."""
    name = f"p-{uniq}"
    cluster.ok("POST", api(ns, "pods"), pod(name, {"name": "c", "image": "busybox"}))
    patch = {"spec": {"restartPolicy": "Never"}}
    answer = refused(
        cluster,
        "PATCH",
        api(ns, "pods", name),
        patch,
        query={"dryRun": "All"},
        content_type="application/merge-patch+json",
    )
    assert cause(answer, "spec")["reason"] == "FieldValueForbidden"
    assert cluster.ok("GET", api(ns, "pods", name))["spec"]["restartPolicy"] == "Always"
