"""Request bodies by Content-Type, as a real apiserver reads them.

Sources: k8s.io/apiserver ``pkg/endpoints/handlers/negotiation/negotiate.go``
(``NegotiateInputSerializerForMediaType``: the serializer is chosen by the Content-Type's media
type; anything else is refused) and ``negotiation/errors.go`` (``errUnsupportedMediaType``: 415,
reason UnsupportedMediaType, "the body of the request was in an unknown format - accepted media
types include: ..."); the serializers of apimachinery ``runtime/serializer/codec_factory.go``
(``application/json``, ``application/yaml``, ``application/vnd.kubernetes.protobuf``); the
protobuf wire format of ``runtime/serializer/protobuf/protobuf.go`` (``k8s\\x00`` + runtime.Unknown)
and its "provided data does not appear to be a protobuf message" error, which
``handlers/rest.go`` ``transformDecodeError`` turns into a 400 BadRequest.
"""

from __future__ import annotations

import base64

import pytest
from protobuf_kit import secret_body

pytestmark = pytest.mark.local

ACCEPTED = "application/json, application/yaml, application/vnd.kubernetes.protobuf"


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
def test_unsupported_content_type_is_415_and_stores_nothing(cluster, ns, uniq, content_type):
    name = f"ct-{uniq}"
    body = f'{{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {{"name": "{name}"}}}}'
    status, data = cluster.request(
        "POST", f"/api/v1/namespaces/{ns}/configmaps", body, content_type=content_type
    )
    assert status == 415, data
    assert data["reason"] == "UnsupportedMediaType" and data["code"] == 415
    # CBORServingAndStorage (alpha, off by default) would append application/cbor.
    assert data["message"].startswith(
        f"the body of the request was in an unknown format - accepted media types include: {ACCEPTED}"
    )
    assert cluster.request("GET", f"/api/v1/namespaces/{ns}/configmaps/{name}")[0] == 404


def test_yaml_body_is_read_as_sigs_k8s_yaml(cluster, ns, uniq):
    """YAML goes through sigs.k8s.io/yaml's YAMLToJSON (go-yaml v2): a date-looking scalar stays
    the string it was written as, a comment is ignored."""
    name = f"yaml-{uniq}"
    body = (
        "apiVersion: v1\nkind: ConfigMap\n"
        f"metadata:\n  name: {name}\n  labels: {{app: yaml}}  # a comment\n"
        "data:\n  released: 2024-01-01\n  count: '3'\n"
    )
    status, created = cluster.request(
        "POST", f"/api/v1/namespaces/{ns}/configmaps", body, content_type="application/yaml"
    )
    assert status == 201, created
    stored = cluster.ok("GET", f"/api/v1/namespaces/{ns}/configmaps/{name}")
    assert stored["data"] == {"released": "2024-01-01", "count": "3"}
    assert stored["metadata"]["labels"] == {"app": "yaml"}


def test_protobuf_secret_is_accepted(cluster, ns, uniq):
    """What kubectl's typed clients send (``kubectl create secret generic``): the server decodes
    it and answers JSON, which the client accepted alongside protobuf."""
    name = f"pb-{uniq}"
    body = secret_body(name, {"token": b"\x00\x01binary", "empty": b""}, {"app": "pb"})
    status, created = cluster.request(
        "POST",
        f"/api/v1/namespaces/{ns}/secrets",
        body,
        content_type="application/vnd.kubernetes.protobuf",
        accept="application/json",
    )
    assert status == 201, created
    stored = cluster.ok("GET", f"/api/v1/namespaces/{ns}/secrets/{name}")
    assert stored["data"] == {"token": base64.b64encode(b"\x00\x01binary").decode(), "empty": ""}
    assert stored["type"] == "Opaque"
    assert stored["immutable"] is False
    assert stored["metadata"]["labels"] == {"app": "pb"}


def test_protobuf_content_type_with_a_json_body_is_400(cluster, ns, uniq):
    name = f"pbbad-{uniq}"
    body = f'{{"apiVersion": "v1", "kind": "Secret", "metadata": {{"name": "{name}"}}}}'
    status, data = cluster.request(
        "POST",
        f"/api/v1/namespaces/{ns}/secrets",
        body,
        content_type="application/vnd.kubernetes.protobuf",
    )
    assert status == 400, data
    assert data["reason"] == "BadRequest"
    assert data["message"].startswith(
        "the object provided is unrecognized (must be of type Secret): provided data does not "
        "appear to be a protobuf message, expected prefix [107 56 115 0]"
    )
    assert cluster.request("GET", f"/api/v1/namespaces/{ns}/secrets/{name}")[0] == 404
