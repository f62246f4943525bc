"""The emulator's CEL module, its pure parts: values as rules see them, field paths, and the
old-value correlation behind transition rules and ratcheting (schema/cel/validation.go,
apiserver/pkg/cel/common/values.go)."""

from __future__ import annotations

import pytest
from sftjob_local.emulator import cel
from sftjob_local.emulator.cel_types import escape

pytestmark = [pytest.mark.local]

SCHEMA = {
    "type": "object",
    "properties": {
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "properties": {
                "ratio": {"type": "number"},
                "count": {"type": "integer"},
                "owner": {"type": "string", "nullable": True},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "items": {
                    "type": "array",
                    "items": {
                        "type": "object",
                        "properties": {"n": {"type": "integer"}},
                        "x-kubernetes-validations": [{"rule": "self.n < 10"}],
                    },
                },
            },
        },
    },
}


def test_numbers_are_doubles_null_fields_are_absent_and_the_root_shows_name_only():
    obj = {
        "apiVersion": "v1",
        "kind": "Thing",
        "metadata": {"name": "x", "labels": {"a": "b"}, "uid": "u"},
        "spec": {"ratio": 1, "count": 1, "owner": None, "labels": {"k": "v"}},
    }
    seen = cel.to_cel_value(obj, SCHEMA, resource_root=True)
    assert seen["metadata"] == {"name": "x"}
    assert seen["spec"] == {"ratio": 1.0, "count": 1, "labels": {"k": "v"}}
    assert isinstance(seen["spec"]["ratio"], float) and isinstance(seen["spec"]["count"], int)


def test_field_paths_are_checked_against_the_schema_and_written_as_field_paths():
    spec = SCHEMA["properties"]["spec"]
    assert cel.normalize_field_path(".ratio", spec) == "ratio"
    assert cel.normalize_field_path(".labels['a.b']", spec) == "labels[a.b]"
    assert cel.normalize_field_path(".labels.team", spec) == "labels[team]"
    for bad in (".nosuch", ".ratio.deeper", "ratio"):
        with pytest.raises(ValueError):
            cel.normalize_field_path(bad, spec)


def test_items_of_a_plain_list_ratchet_with_their_list():
    """Items of a list that is not a map-list do not correlate: an unchanged list keeps its
    failing items (ratcheting through the nearest correlatable parent), a changed one not."""
    old = {"metadata": {"name": "x"}, "spec": {"items": [{"n": 50}], "count": 1}}
    touched_elsewhere = {"metadata": {"name": "x"}, "spec": {"items": [{"n": 50}], "count": 2}}
    assert cel.validate(touched_elsewhere, old, SCHEMA) == []
    changed = {"metadata": {"name": "x"}, "spec": {"items": [{"n": 50}, {"n": 1}], "count": 1}}
    assert [c["field"] for c in cel.validate(changed, old, SCHEMA)] == ["spec.items[0]"]
    assert [c["field"] for c in cel.validate(old, None, SCHEMA)] == ["spec.items[0]"]


def test_a_runtime_error_is_reported_as_the_apiserver_words_it():
    schema = {
        "type": "object",
        "properties": {
            "spec": {
                "type": "object",
                "properties": {"a": {"type": "integer"}},
                "x-kubernetes-validations": [{"rule": "self.a > 0", "message": "a is positive"}],
            }
        },
    }
    [cause] = cel.validate({"spec": {}}, None, schema)
    assert cause == {
        "reason": "FieldValueInvalid",
        "message": 'Invalid value: "object": no such key: a evaluating rule: a is positive',
        "field": "spec",
    }


def test_property_names_are_escaped_as_kubernetes_does():
    assert escape("replicas") == "replicas"
    assert escape("namespace") == "__namespace__"
    assert escape("max-surge") == "max__dash__surge"
    assert escape("a.b/c") == "a__dot__b__slash__c"
    assert escape("x__y") == "x__underscores__y"
    assert escape("1st") is None and escape("a b") is None
