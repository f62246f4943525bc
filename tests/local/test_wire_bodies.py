"""Pure tests of the emulator's request-body reading (protobuf, YAML, Content-Type) and of the
event table cells; no server. The protobuf vectors are bodies kubectl v1.32 sent, compared with
the JSON kubectl itself writes for the same objects."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
from protobuf_kit import k8s_body, map_entry, message, secret_body
from sftjob_local.emulator import bodies, protobuf, tables
from sftjob_local.emulator.errors import ApiError

pytestmark = pytest.mark.local

VECTORS = {
    name: case
    for name, case in json.loads(
        (Path(__file__).parent / "data" / "kubectl_protobuf_bodies.json").read_text()
    ).items()
    if not name.startswith("_")
}


@pytest.mark.parametrize("name", sorted(VECTORS))
def test_kubectl_protobuf_body_decodes_to_kubectls_json(name):
    case = VECTORS[name]
    assert protobuf.decode(bytes.fromhex(case["body_hex"])) == case["json"], case["command"]


def test_secret_from_test_encoder_keeps_binary_data_labels_and_pointer_zero():
    body = secret_body("s", {"bin": b"\x00\xff", "empty": b""}, {"app": "x"})
    assert protobuf.decode(body) == {
        "kind": "Secret",
        "apiVersion": "v1",
        "metadata": {"name": "s", "labels": {"app": "x"}},
        "data": {"bin": base64.b64encode(b"\x00\xff").decode(), "empty": ""},
        "type": "Opaque",
        "immutable": False,  # a pointer: set on the wire, so kept even when false
    }


def test_non_pointer_zero_scalars_left_out_and_no_omitempty_kept():
    # ServicePort (core/v1 generated.proto): 1 name, 2 protocol, 3 port, 4 targetPort, 5 nodePort.
    port = message((1, ""), (2, "TCP"), (3, 0), (4, message((1, 1), (2, 0), (3, "http"))), (5, 0))
    spec = message((1, port), (4, "ClusterIP"), (13, False))
    body = k8s_body("v1", "Service", message((1, message((1, "s"))), (2, spec)))
    assert protobuf.decode(body)["spec"] == {
        # port has no omitempty (written as 0 like Go's JSON), nodePort/name do (left out);
        # int-or-string type 1 is the string form.
        "ports": [{"protocol": "TCP", "port": 0, "targetPort": "http"}],
        "type": "ClusterIP",
    }


def test_negative_int_time_unknown_fields_and_inlined_struct():
    # ObjectMeta 8 creationTimestamp {1 seconds, 2 nanos}, 10 deletionGracePeriodSeconds (pointer);
    # field 99 does not exist: skipped as the generated unmarshallers skip it.
    metadata = message((1, "n"), (8, message((1, 1_700_000_000), (2, 5))), (10, -1), (99, "future"))
    # Volume {1 name, 2 volumeSource (inlined in JSON)}; VolumeSource 2 emptyDir {1 medium}.
    volume = message((1, "scratch"), (2, message((2, message((1, "Memory"))))))
    pod_spec = message((1, volume))
    template = message((1, message((1, ""))), (2, pod_spec))
    deployment_spec = message((3, template))
    body = k8s_body("apps/v1", "Deployment", message((1, metadata), (2, deployment_spec)))
    decoded = protobuf.decode(body)
    assert decoded["metadata"] == {
        "name": "n",
        "creationTimestamp": "2023-11-14T22:13:20Z",
        "deletionGracePeriodSeconds": -1,
    }
    assert decoded["spec"]["template"]["spec"]["volumes"] == [
        {"name": "scratch", "emptyDir": {"medium": "Memory"}}
    ]


def test_quantities_and_repeated_strings():
    # ResourceQuota 2 spec {1 hard map<string, Quantity{1 string}>, 2 scopes []string}.
    spec = message(
        (1, map_entry("cpu", message((1, "500m")))), (2, "BestEffort"), (2, "Terminating")
    )
    body = k8s_body("v1", "ResourceQuota", message((1, message((1, "q"))), (2, spec)))
    assert protobuf.decode(body)["spec"] == {
        "hard": {"cpu": "500m"},
        "scopes": ["BestEffort", "Terminating"],
    }


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (
            b'{"kind": "Secret"}',
            "provided data does not appear to be a protobuf message, expected prefix [107 56 115 0]",
        ),
        (b"k8s\x00", "empty body"),
        (b"k8s\x00\x0a\x10\x0a", "unexpected EOF"),
    ],
)
def test_malformed_protobuf_is_an_error_with_the_serializers_message(body, problem):
    with pytest.raises(protobuf.ProtobufError, match=problem.replace("[", r"\[")):
        protobuf.decode(body)


def test_kind_without_a_table_is_unsupported():
    with pytest.raises(protobuf.UnsupportedKind):
        protobuf.decode(k8s_body("apps/v1", "StatefulSet", message((1, message((1, "s"))))))
    with pytest.raises(ApiError) as err:
        bodies.decode_body(k8s_body("apps/v1", "StatefulSet", b""), protobuf.MEDIA_TYPE, "")
    assert err.value.code == 415 and err.value.reason == "UnsupportedMediaType"


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("application/json", "application/json"),
        ("Application/JSON; charset=utf-8", "application/json"),
        ("", ""),
        ("application/vnd.kubernetes.protobuf", "application/vnd.kubernetes.protobuf"),
        ("text/plain", "text/plain"),
        ("application/json;;", None),
        ("application/json;", "application/json"),
        ("json", None),
        ("application/json; charset", None),
    ],
)
def test_media_type_parses_like_go_mime(header, expected):
    assert bodies.media_type(header) == expected


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "application/json;;", "*/*"]
)
def test_other_content_types_are_415_listing_the_accepted_ones(content_type):
    with pytest.raises(ApiError) as err:
        bodies.decode_body(b"{}", content_type, "ConfigMap")
    assert (err.value.code, err.value.reason) == (415, "UnsupportedMediaType")
    assert err.value.message == (
        "the body of the request was in an unknown format - accepted media types include: "
        "application/json, application/yaml, application/vnd.kubernetes.protobuf"
    )


def test_missing_content_type_reads_json():
    assert bodies.decode_body(b'{"a": 1}', "", "ConfigMap") == {"a": 1}


def test_yaml_reads_like_sigs_k8s_yaml():
    text = b"a: 2024-01-01\nb: yes\n1: one\nc: '007'\nd: 2.0\ne: 2.5\nf: n\n---\nsecond: document\n"
    assert bodies.decode_body(text, "application/yaml", "ConfigMap") == {
        "a": "2024-01-01",  # timestamps stay strings
        "b": True,  # YAML 1.1 boolean
        "1": "one",  # keys become strings
        "c": "007",
        "d": 2,  # Go's JSON text of the float64 2.0 is 2
        "e": 2.5,
        "f": False,  # go-yaml v2's one-letter boolean
    }


def test_bad_yaml_is_400_bad_request_naming_the_kind():
    with pytest.raises(ApiError) as err:
        bodies.decode_body(b"a: [1, 2", "application/yaml", "ConfigMap")
    assert err.value.code == 400 and err.value.reason == "BadRequest"
    assert err.value.message.startswith(
        "the object provided is unrecognized (must be of type ConfigMap): error converting YAML to JSON: yaml:"
    )


def test_event_table_cells_follow_print_event():
    event = {
        "metadata": {"name": "p.1"},
        "involvedObject": {"kind": "Pod", "name": "p", "fieldPath": "spec.containers{main}"},
        "reason": "Started",
        "message": " Started container main \n",
        "type": "Normal",
        "source": {"component": "kubelet", "host": "node-1"},
        "firstTimestamp": "2020-01-01T00:00:00Z",
        "lastTimestamp": "2020-01-01T00:00:00Z",
    }
    cells = tables.event_cells(event)
    assert cells[1:7] == [
        "Normal",
        "Started",
        "pod/p",
        "spec.containers{main}",
        "kubelet, node-1",
        "Started container main",
    ]
    assert cells[8:] == [1, "p.1"]  # no count: a singleton, printed as 1
    assert [c["name"] for c in tables.EVENT_COLUMNS] == [
        "Last Seen",
        "Type",
        "Reason",
        "Object",
        "Subobject",
        "Source",
        "Message",
        "First Seen",
        "Count",
        "Name",
    ]
    assert [c["priority"] for c in tables.EVENT_COLUMNS] == [0, 0, 0, 0, 1, 1, 0, 1, 1, 1]
    # An event without timestamps (events.k8s.io, series) shows <unknown> rather than failing.
    assert tables.event_cells({"metadata": {"name": "e"}})[0] == "<unknown>"


def test_delete_options_decode_under_any_group_version():
    # meta/v1 DeleteOptions: 1 gracePeriodSeconds, 4 propagationPolicy, 5 dryRun (all pointers or
    # repeated, so a zero grace period is kept).
    body = k8s_body("apps/v1", "DeleteOptions", message((1, 0), (4, "Foreground"), (5, "All")))
    assert protobuf.decode(body) == {
        "kind": "DeleteOptions",
        "apiVersion": "apps/v1",
        "gracePeriodSeconds": 0,
        "propagationPolicy": "Foreground",
        "dryRun": ["All"],
    }


def test_field_tables_are_closed():
    """Every message a field names has its own table entry (the closure was extracted whole)."""
    from sftjob_local.emulator.protobuf_messages import MESSAGES, ROOT_KINDS

    named = set(ROOT_KINDS)
    for fields_ in MESSAGES.values():
        for spec in fields_.split(";"):
            type_ = spec.split()[2].lstrip("*=")
            for prefix in ("[]", "map:", "wrap[]"):
                type_ = type_.removeprefix(prefix)
            if "." in type_:
                named.add(type_)
    assert named <= set(MESSAGES)


def test_pod_with_status_and_eviction_and_micro_time():
    # Pod: 1 metadata, 2 spec {2 containers [{1 name, 2 image}]}, 3 status {1 phase,
    # 8 containerStatuses [{1 name, 2 state {3 terminated {1 exitCode, 3 reason}}, 5 restartCount}]}.
    terminated = message((1, 137), (3, "OOMKilled"))
    container_status = message((1, "main"), (2, message((3, terminated))), (4, False), (5, 2))
    status = message((1, "Failed"), (8, container_status))
    spec = message((2, message((1, "main"), (2, "busybox"))))
    pod = protobuf.decode(
        k8s_body("v1", "Pod", message((1, message((1, "p"))), (2, spec), (3, status)))
    )
    assert pod["spec"] == {"containers": [{"name": "main", "image": "busybox"}]}
    assert pod["status"]["phase"] == "Failed"
    statuses = pod["status"]["containerStatuses"]
    assert statuses[0]["state"] == {"terminated": {"exitCode": 137, "reason": "OOMKilled"}}
    assert (statuses[0]["ready"], statuses[0]["restartCount"]) == (False, 2)  # no omitempty
    # policy/v1 Eviction: 1 metadata, 2 deleteOptions {1 gracePeriodSeconds}.
    eviction = k8s_body(
        "policy/v1", "Eviction", message((1, message((1, "p"))), (2, message((1, 30))))
    )
    assert protobuf.decode(eviction)["deleteOptions"] == {"gracePeriodSeconds": 30}
    # events.k8s.io/v1 Event: 2 eventTime, a MicroTime (microseconds kept).
    event = k8s_body(
        "events.k8s.io/v1",
        "Event",
        message((1, message((1, "e"))), (2, message((1, 1_700_000_000), (2, 123_456_789)))),
    )
    assert protobuf.decode(event)["eventTime"] == "2023-11-14T22:13:20.123456Z"
