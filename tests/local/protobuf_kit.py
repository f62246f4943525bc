"""A tiny Kubernetes protobuf encoder for tests: bodies as client-go's protobuf serializer writes
them (``k8s\\x00`` + runtime.Unknown{typeMeta, raw}), with field numbers given by the caller
(taken from kubernetes' generated.proto files), so tests do not share the decoder's tables.
Only the varint encoder is the emulator's (its openapi output uses it); the decoder is separate."""

from __future__ import annotations

from typing import Any

from sftjob_local.emulator.protobuf import encode_varint as varint

MAGIC = b"k8s\x00"


def field(number: int, value: Any) -> bytes:
    """One field: bool/int as a varint, str/bytes (including nested messages) length-delimited."""
    if isinstance(value, bool | int):
        return varint(number << 3) + varint(int(value))
    data = value.encode() if isinstance(value, str) else bytes(value)
    return varint(number << 3 | 2) + varint(len(data)) + data


def message(*fields: tuple[int, Any]) -> bytes:
    return b"".join(field(number, value) for number, value in fields)


def map_entry(key: str, value: Any) -> bytes:
    return message((1, key), (2, value))


def k8s_body(api_version: str, kind: str, raw: bytes) -> bytes:
    """runtime.Unknown (runtime/generated.proto): 1 typeMeta {1 apiVersion, 2 kind}, 2 raw,
    3 contentEncoding, 4 contentType."""
    return MAGIC + message((1, message((1, api_version), (2, kind))), (2, raw), (3, ""), (4, ""))


def secret_body(name: str, data: dict[str, bytes], labels: dict[str, str]) -> bytes:
    """A v1 Secret (core/v1 generated.proto: Secret 1 metadata, 2 data, 3 type, 5 immutable;
    meta/v1 ObjectMeta 1 name, 11 labels)."""
    metadata = message((1, name), *((11, map_entry(k, v)) for k, v in labels.items()))
    raw = message(
        (1, metadata),
        *((2, map_entry(k, v)) for k, v in data.items()),
        (3, "Opaque"),
        (5, False),
    )
    return k8s_body("v1", "Secret", raw)
