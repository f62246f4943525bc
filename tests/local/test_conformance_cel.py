"""Conformance probes: CRD validation rules (``x-kubernetes-validations``, CEL).

Expected answers are the apiextensions apiserver's: the rule evaluation, message, reason and
field path in k8s.io/apiextensions-apiserver/pkg/apiserver/schema/cel/validation.go
(``validateExpressions``, ``fieldErrorForReason``, ``ruleMessageOrDefault``), the CRD checks
in pkg/apis/apiextensions/validation/validation.go, and the documented semantics in
https://kubernetes.io/docs/tasks/extend-kubernetes/custom-resources/custom-resource-definitions/#validation-rules
(transition rules, optionalOldSelf, messageExpression, reason, fieldPath, ratcheting).
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Iterator
from typing import Any

import pytest

pytestmark = [pytest.mark.local, pytest.mark.timeout(60)]

CRDS = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions"

SPEC_RULES = [
    {
        "rule": "self.minReplicas <= self.maxReplicas",
        "message": "minReplicas must not exceed maxReplicas",
    },
    {
        # A transition rule: only evaluated on update, against the stored value.
        "rule": "self.mode == oldSelf.mode",
        "message": "mode is immutable",
        "fieldPath": ".mode",
    },
    {
        "rule": "!has(self.tier) || self.tier != 'gold' || has(self.owner)",
        "messageExpression": "'tier ' + self.tier + ' needs an owner'",
        "reason": "FieldValueRequired",
        "fieldPath": ".owner",
    },
    {
        # Property names that are not CEL identifiers are escaped: max-surge → max__dash__surge.
        "rule": "!has(self.max__dash__surge) || self.max__dash__surge <= 5",
        "message": "max-surge is at most 5",
    },
    {
        # optionalOldSelf: also evaluated on create, where oldSelf has no value.
        "rule": "oldSelf.hasValue() || self.minReplicas >= 1",
        "optionalOldSelf": True,
        "message": "new gizmos start with at least one replica",
        "reason": "FieldValueForbidden",
    },
]


def gizmo_crd(group: str) -> dict[str, Any]:
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"gizmos.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "gizmos", "singular": "gizmo", "kind": "Gizmo"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "x-kubernetes-validations": [
                                {
                                    "rule": "!self.metadata.name.startsWith('forbidden-')",
                                    "message": "names must not start with forbidden-",
                                }
                            ],
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "x-kubernetes-validations": SPEC_RULES,
                                    "properties": {
                                        "minReplicas": {"type": "integer"},
                                        "maxReplicas": {"type": "integer", "default": 10},
                                        "mode": {"type": "string"},
                                        "max-surge": {"type": "integer"},
                                        "tier": {"type": "string", "maxLength": 16},
                                        "owner": {
                                            "type": "string",
                                            "maxLength": 63,
                                            "x-kubernetes-validations": [
                                                {
                                                    "rule": "self.findAll('[A-Z]').size() == 0",
                                                    "message": "owner is lowercase",
                                                }
                                            ],
                                        },
                                        "ratio": {
                                            "type": "number",
                                            "x-kubernetes-validations": [{"rule": "self < 1"}],
                                        },
                                        "ports": {
                                            "type": "array",
                                            "maxItems": 8,
                                            "x-kubernetes-validations": [
                                                {
                                                    "rule": "self.map(p, p.port).isSorted()",
                                                    "message": "ports are sorted",
                                                }
                                            ],
                                            "items": {
                                                "type": "object",
                                                "properties": {"port": {"type": "integer"}},
                                                "x-kubernetes-validations": [
                                                    {
                                                        "rule": "self.port > 1024",
                                                        "message": "use an unprivileged port",
                                                    }
                                                ],
                                            },
                                        },
                                        "containers": {
                                            "type": "array",
                                            "maxItems": 8,
                                            "x-kubernetes-list-type": "map",
                                            "x-kubernetes-list-map-keys": ["name"],
                                            "items": {
                                                "type": "object",
                                                "required": ["name"],
                                                "properties": {
                                                    "name": {"type": "string", "maxLength": 63},
                                                    "image": {"type": "string", "maxLength": 256},
                                                },
                                                "x-kubernetes-validations": [
                                                    {
                                                        "rule": "self.image == oldSelf.image",
                                                        "message": "image is immutable",
                                                    }
                                                ],
                                            },
                                        },
                                        "labels": {
                                            "type": "object",
                                            "maxProperties": 8,
                                            "additionalProperties": {
                                                "type": "string",
                                                "maxLength": 63,
                                                "x-kubernetes-validations": [
                                                    {"rule": "self.lowerAscii() == self"}
                                                ],
                                            },
                                        },
                                    },
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


class Gizmos:
    def __init__(self, cluster: Any, group: str) -> None:
        self.cluster, self.group = cluster, group

    def path(self, name: str = "") -> str:
        base = f"/apis/{self.group}/v1/namespaces/{self.cluster.namespace}/gizmos"
        return f"{base}/{name}" if name else base

    def body(self, name: str, **spec: Any) -> dict[str, Any]:
        return {
            "apiVersion": f"{self.group}/v1",
            "kind": "Gizmo",
            "metadata": {"name": name},
            "spec": {"minReplicas": 1, "mode": "fast", **spec},
        }


def _established(cluster: Any, name: str) -> bool:
    status, obj = cluster.request("GET", f"{CRDS}/{name}")
    conditions = (obj.get("status") or {}).get("conditions") or [] if status == 200 else []
    return any(c["type"] == "Established" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="module")
def gizmos(cluster: Any) -> Iterator[Gizmos]:
    group = f"c{secrets.token_hex(3)}.test.sftjob.dev"
    crd = cluster.ok("POST", CRDS, gizmo_crd(group))
    cluster.wait_for(lambda: _established(cluster, crd["metadata"]["name"]), timeout=30)
    cluster.wait_for(lambda: cluster.request("GET", f"/apis/{group}/v1")[0] == 200, timeout=30)
    try:
        yield Gizmos(cluster, group)
    finally:
        cluster.request("DELETE", f"{CRDS}/{crd['metadata']['name']}")


def causes_of(error: dict[str, Any]) -> dict[str, dict[str, str]]:
    return {c["field"]: c for c in error["details"]["causes"]}


def test_a_broken_rule_refuses_the_create_with_its_message_and_nothing_is_stored(
    cluster, gizmos, uniq
):
    """validation.go validateExpressions: a false rule is field.Invalid(path, <schema type>,
    message); the StatusError reads ``Kind.group "name" is invalid: spec: Invalid value:
    "object": <message>``."""
    name = f"minmax-{uniq}"
    status, error = cluster.request(
        "POST", gizmos.path(), gizmos.body(name, minReplicas=5, maxReplicas=2)
    )
    assert status == 422 and error["reason"] == "Invalid", error
    assert error["message"] == (
        f'Gizmo.{gizmos.group} "{name}" is invalid: spec: Invalid value: "object": '
        "minReplicas must not exceed maxReplicas"
    )
    assert causes_of(error)["spec"] == {
        "reason": "FieldValueInvalid",
        "message": 'Invalid value: "object": minReplicas must not exceed maxReplicas',
        "field": "spec",
    }
    assert cluster.request("GET", gizmos.path(name))[0] == 404


def test_a_rule_at_the_root_reads_metadata_name_and_reports_a_nil_path(cluster, gizmos, uniq):
    """At the resource root ``self.metadata`` holds name and generateName (WithTypeAndObjectMeta);
    the root is validated at a nil field.Path, printed ``<nil>``."""
    name = f"forbidden-{uniq}"
    status, error = cluster.request("POST", gizmos.path(), gizmos.body(name))
    assert status == 422, error
    assert error["message"] == (
        f'Gizmo.{gizmos.group} "{name}" is invalid: <nil>: Invalid value: "object": '
        "names must not start with forbidden-"
    )
    assert cluster.request("GET", gizmos.path(name))[0] == 404


def test_property_names_are_escaped_in_rules(cluster, gizmos, uniq):
    """apiserver/pkg/cel Escape: ``max-surge`` is ``self.max__dash__surge`` in a rule."""
    status, error = cluster.request(
        "POST", gizmos.path(), gizmos.body(f"surge-{uniq}", **{"max-surge": 9})
    )
    assert status == 422, error
    assert causes_of(error)["spec"]["message"] == 'Invalid value: "object": max-surge is at most 5'
    cluster.ok("POST", gizmos.path(), gizmos.body(f"surge-ok-{uniq}", **{"max-surge": 2}))


def test_rules_see_schema_defaults_and_pass(cluster, gizmos, uniq):
    """Rules run after defaulting (maxReplicas defaults to 10): minReplicas 3 passes."""
    created = cluster.ok("POST", gizmos.path(), gizmos.body(f"ok-{uniq}", minReplicas=3))
    assert created["spec"]["maxReplicas"] == 10


def test_rules_at_any_depth_report_their_own_path(cluster, gizmos, uniq):
    """Rules on a number, a list, list items, a string and additionalProperties values run
    with self bound to that node; without ``message`` the detail is ``failed rule: <rule>``
    (ruleMessageOrDefault); each cause carries the node's path and type. Kubernetes' lists
    and regex libraries (isSorted, findAll) are there."""
    body = gizmos.body(
        f"deep-{uniq}",
        ratio=1.5,
        ports=[{"port": 8080}, {"port": 80}],
        labels={"team": "ML"},
        owner="Bob",
    )
    status, error = cluster.request("POST", gizmos.path(), body)
    assert status == 422, error
    causes = causes_of(error)
    assert causes["spec.ratio"]["message"] == 'Invalid value: "number": failed rule: self < 1'
    assert causes["spec.ports[1]"]["message"] == 'Invalid value: "object": use an unprivileged port'
    assert "spec.ports[0]" not in causes
    assert causes["spec.ports"]["message"] == 'Invalid value: "array": ports are sorted'
    assert causes["spec.owner"]["message"] == 'Invalid value: "string": owner is lowercase'
    assert causes["spec.labels[team]"]["message"] == (
        'Invalid value: "string": failed rule: self.lowerAscii() == self'
    )
    assert all(c["reason"] == "FieldValueInvalid" for c in causes.values())


def test_message_expression_reason_and_field_path(cluster, gizmos, uniq):
    """fieldErrorForReason: FieldValueRequired gives ``Required value: <detail>`` at the path
    joined with fieldPath; the detail is the messageExpression's string."""
    status, error = cluster.request("POST", gizmos.path(), gizmos.body(f"tier-{uniq}", tier="gold"))
    assert status == 422, error
    assert causes_of(error)["spec.owner"] == {
        "reason": "FieldValueRequired",
        "message": "Required value: tier gold needs an owner",
        "field": "spec.owner",
    }


def test_optional_old_self_rule_runs_on_create(cluster, gizmos, uniq):
    """optionalOldSelf: the rule runs on create with oldSelf = optional.none();
    FieldValueForbidden gives ``Forbidden: <message>``."""
    status, error = cluster.request(
        "POST", gizmos.path(), gizmos.body(f"zero-{uniq}", minReplicas=0)
    )
    assert status == 422, error
    assert causes_of(error)["spec"] == {
        "reason": "FieldValueForbidden",
        "message": "Forbidden: new gizmos start with at least one replica",
        "field": "spec",
    }
    # On update oldSelf has a value: the same spec is accepted.
    name = f"zero-later-{uniq}"
    created = cluster.ok("POST", gizmos.path(), gizmos.body(name, minReplicas=1))
    created["spec"]["minReplicas"] = 0
    cluster.ok("PUT", gizmos.path(name), created)


def test_transition_rule_runs_only_on_update(cluster, gizmos, uniq):
    """Transition rules (using oldSelf) are skipped on create and compare with the stored
    object on update; the error is at the rule's fieldPath and nothing changes."""
    name = f"mode-{uniq}"
    created = cluster.ok("POST", gizmos.path(), gizmos.body(name, mode="fast"))
    changed = copy.deepcopy(created)
    changed["spec"]["mode"] = "slow"
    status, error = cluster.request("PUT", gizmos.path(name), changed)
    assert status == 422, error
    assert error["message"] == (
        f'Gizmo.{gizmos.group} "{name}" is invalid: spec.mode: Invalid value: "object": '
        "mode is immutable"
    )
    assert cluster.ok("GET", gizmos.path(name))["spec"]["mode"] == "fast"
    status, error = cluster.request(
        "PATCH",
        gizmos.path(name),
        {"spec": {"mode": "slow"}},
        content_type="application/merge-patch+json",
    )
    assert status == 422 and "mode is immutable" in error["message"]
    patched = cluster.ok(
        "PATCH",
        gizmos.path(name),
        {"spec": {"maxReplicas": 4}},
        content_type="application/merge-patch+json",
    )
    assert patched["spec"]["maxReplicas"] == 4 and patched["spec"]["mode"] == "fast"


def test_transition_rule_on_map_list_items_compares_items_by_key(cluster, gizmos, uniq):
    """Items of an ``x-kubernetes-list-type: map`` list correlate with the old item of the same
    key: a new item has no oldSelf (rule skipped), a changed one is compared, wherever it
    moved in the list."""
    name = f"ctr-{uniq}"
    created = cluster.ok(
        "POST", gizmos.path(), gizmos.body(name, containers=[{"name": "a", "image": "x"}])
    )
    grown = copy.deepcopy(created)
    grown["spec"]["containers"] = [{"name": "b", "image": "y"}, {"name": "a", "image": "x"}]
    grown = cluster.ok("PUT", gizmos.path(name), grown)
    changed = copy.deepcopy(grown)
    changed["spec"]["containers"] = [{"name": "b", "image": "y"}, {"name": "a", "image": "z"}]
    status, error = cluster.request("PUT", gizmos.path(name), changed)
    assert status == 422, error
    assert causes_of(error) == {
        "spec.containers[1]": {
            "reason": "FieldValueInvalid",
            "message": 'Invalid value: "object": image is immutable',
            "field": "spec.containers[1]",
        }
    }


def test_rules_are_not_run_after_blocking_schema_errors(cluster, gizmos, uniq):
    """customresource strategy: after a type error the rules are skipped and the server says so
    (hasBlockingErr)."""
    body = gizmos.body(f"typed-{uniq}", minReplicas="five", maxReplicas=2)
    status, error = cluster.request("POST", gizmos.path(), body)
    assert status == 422, error
    messages = [c["message"] for c in error["details"]["causes"]]
    assert any("some validation rules were not checked" in m for m in messages)
    assert not any("minReplicas must not exceed" in m for m in messages)


def test_unchanged_values_keep_passing_when_a_rule_is_added_later(cluster, gizmos, uniq, crd_body):
    """Validation ratcheting (CRDValidationRatcheting, on by default since 1.30): an update
    that leaves a failing value unchanged is accepted; changing it to another failing value
    is refused."""
    group = f"r{secrets.token_hex(3)}.test.sftjob.dev"
    crd = crd_body(group)
    cluster.ok("POST", CRDS, crd)
    name = crd["metadata"]["name"]
    widgets = f"/apis/{group}/v1/namespaces/{cluster.namespace}/widgets"
    try:
        cluster.wait_for(lambda: _established(cluster, name), timeout=30)
        cluster.wait_for(lambda: cluster.request("GET", f"/apis/{group}/v1")[0] == 200, timeout=30)
        body = {"apiVersion": f"{group}/v1", "kind": "Widget", "metadata": {"name": "w"}}
        cluster.ok("POST", widgets, {**body, "spec": {"size": 50}})
        stored = cluster.ok("GET", f"{CRDS}/{name}")
        size = stored["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
            "properties"
        ]["size"]
        size["x-kubernetes-validations"] = [{"rule": "self <= 10", "message": "at most 10"}]
        cluster.ok("PUT", f"{CRDS}/{name}", stored)

        def refused() -> bool:
            status, _ = cluster.request(
                "POST",
                widgets,
                {**body, "metadata": {"name": "probe"}, "spec": {"size": 11}},
                query={"dryRun": "All"},
            )
            return status == 422

        cluster.wait_for(refused, timeout=30)
        cluster.ok(
            "PATCH",
            f"{widgets}/w",
            {"spec": {"color": "red"}},
            content_type="application/merge-patch+json",
        )
        status, error = cluster.request(
            "PATCH",
            f"{widgets}/w",
            {"spec": {"size": 60}},
            content_type="application/merge-patch+json",
        )
        assert status == 422 and causes_of(error)["spec.size"]["message"] == (
            'Invalid value: "integer": at most 10'
        )
    finally:
        cluster.request("DELETE", f"{CRDS}/{name}")


@pytest.mark.parametrize(
    ("rule", "field", "words"),
    [
        ({"rule": "self.minReplicas <"}, "rule", "compilation failed: ERROR: <input>:1:"),
        ({"rule": "self + 1 == 2"}, "rule", "found no matching overload for '_+_'"),
        ({"rule": "nosuchvar > 1"}, "rule", "undeclared reference to 'nosuchvar'"),
        ({"rule": "self.nosuchfield > 1"}, "rule", "undefined field 'nosuchfield'"),
        (
            {"rule": "self.mode + 1 == 2"},
            "rule",
            "found no matching overload for '_+_' applied to '(string, int)'",
        ),
        ({"rule": "'a' + 'b'"}, "rule", "cel expression must evaluate to a bool"),
        (
            {"rule": "true", "messageExpression": "1 + 2"},
            "messageExpression",
            "messageExpression must evaluate to a string",
        ),
        (
            {"rule": "true", "messageExpression": "'a' +"},
            "messageExpression",
            "messageExpression compilation failed",
        ),
        ({"rule": "true", "reason": "FieldValueWrong"}, "reason", "Unsupported value"),
        (
            {"rule": "true", "fieldPath": ".nosuchfield"},
            "fieldPath",
            'Invalid value: ".nosuchfield": fieldPath must be a valid path',
        ),
        (
            {"rule": "self.minReplicas > 0", "optionalOldSelf": True},
            "optionalOldSelf",
            "Invalid value: true: may not be set if oldSelf is not used in rule",
        ),
    ],
    ids=[
        "syntax",
        "type",
        "undeclared",
        "undefined-field",
        "field-type",
        "not-bool",
        "message-not-string",
        "message-expression",
        "reason",
        "field-path",
        "optional",
    ],
)
def test_a_crd_whose_rule_does_not_compile_is_refused(cluster, rule, field, words):
    """pkg/apis/apiextensions/validation: rules are compiled at CRD create/update; a
    compilation error is a 422 at ``spec.validation.openAPIV3Schema.properties[spec]
    .x-kubernetes-validations[i].<field>`` and the CRD is not created."""
    group = f"b{secrets.token_hex(3)}.test.sftjob.dev"
    body = gizmo_crd(group)
    spec_schema = body["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec_schema["x-kubernetes-validations"] = [{"rule": "true"}, rule]
    status, error = cluster.request("POST", CRDS, body)
    assert status == 422 and error["reason"] == "Invalid", error
    path = f"spec.validation.openAPIV3Schema.properties[spec].x-kubernetes-validations[1].{field}"
    causes = causes_of(error)
    assert path in causes, error
    assert words in causes[path]["message"]
    assert error["message"].startswith(
        f'CustomResourceDefinition.apiextensions.k8s.io "gizmos.{group}" is invalid: '
    )
    assert cluster.request("GET", f"{CRDS}/gizmos.{group}")[0] == 404


def test_old_self_is_refused_where_items_do_not_correlate(cluster):
    """Items of a list that is not a map-list have no old value to compare with: a transition
    rule there makes the CRD invalid (apiextensions validation, uncorrelatable oldSelf)."""
    group = f"u{secrets.token_hex(3)}.test.sftjob.dev"
    body = gizmo_crd(group)
    spec_schema = body["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec_schema["properties"]["ports"]["items"]["x-kubernetes-validations"] = [
        {"rule": "self.port == oldSelf.port"}
    ]
    status, error = cluster.request("POST", CRDS, body)
    assert status == 422, error
    field = (
        "spec.validation.openAPIV3Schema.properties[spec].properties[ports].items"
        ".x-kubernetes-validations[0].rule"
    )
    assert causes_of(error)[field]["message"] == (
        'Invalid value: "self.port == oldSelf.port": oldSelf cannot be used on the '
        "uncorrelatable portion of the schema within "
        "spec.validation.openAPIV3Schema.properties[spec].properties[ports].items"
    )
    assert cluster.request("GET", f"{CRDS}/gizmos.{group}")[0] == 404


def test_a_crd_update_with_a_rule_that_does_not_compile_is_refused(cluster, gizmos):
    """The same CRD validation runs on update: the stored CRD keeps its rules."""
    name = f"gizmos.{gizmos.group}"
    stored = cluster.ok("GET", f"{CRDS}/{name}")
    changed = copy.deepcopy(stored)
    spec_schema = changed["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
    spec_schema["x-kubernetes-validations"].append({"rule": "self.minReplicas >"})
    status, error = cluster.request("PUT", f"{CRDS}/{name}", changed)
    assert status == 422, error
    index = len(spec_schema["x-kubernetes-validations"]) - 1
    path = (
        f"spec.validation.openAPIV3Schema.properties[spec].x-kubernetes-validations[{index}].rule"
    )
    assert "compilation failed" in causes_of(error)[path]["message"]
    after = cluster.ok("GET", f"{CRDS}/{name}")
    rules = after["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"][
        "x-kubernetes-validations"
    ]
    assert rules == SPEC_RULES
