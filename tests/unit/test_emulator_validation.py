"""The emulator's admission validation as pure functions (sftjob_local.emulator.validation).

Expected texts come from k8s.io/apimachinery util/validation (RegexError, IsDNS1123Label, ...)
and pkg/apis/core/validation/validation.go; the conformance probes in
tests/local/test_conformance_validation.py check the same rules through HTTP.
"""

from __future__ import annotations

import base64
from decimal import Decimal
from typing import Any

import pytest
from sftjob_local.emulator import validation as v


def pod(*containers: dict[str, Any], **spec: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "namespace": "ns"},
        "spec": {"containers": list(containers) or [{"name": "c", "image": "busybox"}], **spec},
    }


def fields(errors: list[v.FieldError]) -> dict[str, str]:
    return {e.field: e.reason for e in errors}


def test_regex_error_keeps_the_real_double_space_between_examples():
    [msg] = v.is_dns1123_label("A")
    assert msg.endswith(
        "(e.g. 'my-name',  or '123-abc', regex used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
    )
    assert v.is_dns1123_label("a.b") == ["must not contain dots"]
    assert v.is_dns1123_label("a" * 64)[0] == "must be no more than 63 bytes"


@pytest.mark.parametrize(
    ("name", "ok"),
    [("a", True), ("a-b.c", True), ("-a", False), ("A", False), ("a_b", False), ("a" * 254, False)],
)
def test_dns_subdomain(name, ok):
    assert (v.is_dns1123_subdomain(name) == []) is ok


def test_qualified_names_and_label_values():
    assert v.is_qualified_name("example.com/My_Name") == []
    assert v.is_qualified_name("/x") == ["prefix part must be non-empty"]
    assert v.is_qualified_name("a/b/c")[0].startswith("a valid label key must consist of")
    assert v.is_qualified_name("Bad.Prefix/x")[0].startswith("prefix part a lowercase RFC 1123")
    assert v.is_label_value("") == []
    assert v.is_label_value("-x")[0].startswith("a valid label must be an empty string")


def test_generate_name_prefix_may_end_with_a_dash_only():
    meta = {"generateName": "job-", "name": "job-abcde", "namespace": "ns"}
    assert v.validate_object_meta("ConfigMap", "", meta, True) == []
    meta = {"generateName": "job.", "name": "job.abcde", "namespace": "ns"}
    assert fields(v.validate_object_meta("ConfigMap", "", meta, True)) == {
        "metadata.generateName": v.INVALID
    }
    # v1 Events only need path segments (the common check), so 'job.' is fine there.
    assert v.validate_object_meta("Event", "", meta, True) == []


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", Decimal("0.5")),
        ("2Gi", Decimal(2 * 2**30)),
        ("1e3", Decimal(1000)),
        (".5", Decimal("0.5")),
        ("1.", Decimal(1)),
        (4, Decimal(4)),
        (0.25, Decimal("0.25")),
        ("1x", None),
        ("1.5.5", None),
        ("Gi", None),
        ("1 Gi", None),
        (True, None),
    ],
)
def test_parse_quantity(text, value):
    assert v.parse_quantity(text) == value


def test_decode_errors_are_quantities_and_base64():
    bad_qty = pod({"name": "c", "image": "i", "resources": {"requests": {"cpu": "one"}}})
    assert "quantities must match the regular expression" in v.decode_error("Pod", "", bad_qty)
    secret = {"data": {"k": "YWJj", "bad": "ab$d"}}
    assert v.decode_error("Secret", "", secret).endswith("illegal base64 data at input byte 2")
    assert v.decode_error("Secret", "", {"data": {"k": base64.b64encode(b"x").decode()}}) is None


def test_string_data_folds_into_data():
    secret = {"data": {"a": "eA=="}, "stringData": {"a": "y", "b": "z"}}
    v.secret_string_data(secret)
    assert secret == {"data": {"a": "eQ==", "b": "eg=="}}


def test_resources_rules():
    def errs(res: dict[str, Any]) -> dict[str, str]:
        return fields(v._validate_resources(res, "r"))

    assert errs({"requests": {"cpu": "1"}, "limits": {"cpu": "2"}}) == {}
    assert errs({"requests": {"cpu": "3"}, "limits": {"cpu": "2"}}) == {"r.requests": v.INVALID}
    assert errs({"limits": {"nvidia.com/gpu": 2}}) == {}
    assert errs({"requests": {"nvidia.com/gpu": 2}}) == {"r.limits": v.REQUIRED}
    assert errs({"limits": {"hugepages-2Mi": "2Mi"}}) == {"r": v.FORBIDDEN}
    assert errs({"limits": {"memory": "-1"}}) == {"r.limits[memory]": v.INVALID}


def test_pod_update_allows_images_and_omitted_defaults():
    old = pod({"name": "c", "image": "a", "command": ["x"]})
    old["spec"]["restartPolicy"] = "Always"
    new = pod({"name": "c", "image": "b", "command": ["x"], "terminationMessagePolicy": "File"})
    assert v.validate_pod_update(new, old) == []
    changed = pod({"name": "c", "image": "b", "command": ["y"]})
    [err] = v.validate_pod_update(changed, old)
    assert err.field == "spec" and err.reason == v.FORBIDDEN
    assert err.body.startswith("Forbidden: pod updates may not change fields other than ")
    assert "  core.PodSpec{\n" in err.body and '"command": ["y"]' in err.body


def test_pod_update_tolerations_only_grow_and_deadline_only_shrinks():
    tol = {"key": "k", "operator": "Exists", "effect": "NoSchedule"}
    old = pod(tolerations=[tol], activeDeadlineSeconds=100)
    grown = pod(tolerations=[tol, {**tol, "key": "j"}], activeDeadlineSeconds=50)
    assert v.validate_pod_update(grown, old) == []
    dropped = pod(tolerations=[], activeDeadlineSeconds=50)
    assert fields(v.validate_pod_update(dropped, old)) == {"spec.tolerations": v.FORBIDDEN}
    longer = pod(tolerations=[tol], activeDeadlineSeconds=200)
    assert fields(v.validate_pod_update(longer, old)) == {"spec.activeDeadlineSeconds": v.INVALID}


def test_service_update_keeps_allocated_ips():
    old = {"spec": {"clusterIP": "10.96.0.5", "clusterIPs": ["10.96.0.5"], "ports": [{"port": 1}]}}
    new = {"spec": {"ports": [{"port": 2}]}}
    v.prepare_service_update(new, old)
    assert new["spec"]["clusterIPs"] == ["10.96.0.5"]
    moved = {"spec": {**old["spec"], "clusterIP": "10.96.0.9"}}
    v.prepare_service_update(moved, old)
    [err] = v.validate_service_update(moved, old)
    assert err.field == "spec.clusterIPs[0]"
    assert err.body == 'Invalid value: []string{"10.96.0.9"}: may not change once set'


def test_causes_drop_duplicates_like_to_aggregate():
    errors = [v.required("a"), v.required("a"), v.invalid("b", 1, "x")]
    assert v.causes(errors) == [
        {"reason": v.REQUIRED, "message": "Required value", "field": "a"},
        {"reason": v.INVALID, "message": "Invalid value: 1: x", "field": "b"},
    ]


def test_role_binding_subjects_default_their_api_group():
    binding = {
        "metadata": {"name": "b", "namespace": "ns"},
        "roleRef": {"apiGroup": v.RBAC_GROUP, "kind": "Role", "name": "r"},
        "subjects": [{"kind": "User", "name": "alice"}, {"kind": "ServiceAccount", "name": "sa"}],
    }
    assert v.validate_create("RoleBinding", v.RBAC_GROUP, binding) == []
    cluster_binding = {
        **binding,
        "metadata": {"name": "b"},
        "roleRef": {**binding["roleRef"], "kind": "ClusterRole"},
    }
    errs = v.validate_create("ClusterRoleBinding", v.RBAC_GROUP, cluster_binding, False)
    assert fields(errs) == {"subjects[1].namespace": v.REQUIRED}
