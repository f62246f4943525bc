"""Kubernetes protobuf request bodies, decoded into the JSON dicts the rest of the emulator handles.

Why the emulator must read protobuf
===================================
kubectl's typed clients (``kubectl create namespace|secret|configmap|serviceaccount|role|...``,
``kubectl create token``, ``kubectl auth can-i``, ``kubectl auth whoami``) send their bodies as
``Content-Type: application/vnd.kubernetes.protobuf`` with ``Accept:
application/vnd.kubernetes.protobuf,application/json`` (seen with ``kubectl -v=9``): since v1.32,
client-go's generated typed clients for built-in kinds are built with ``gentype.PrefersProtobuf``
and their requests call ``Request.UseProtobufAsDefault`` (client-go ``rest/request.go``) when no
content type was configured. client-go does not fall back to JSON when
a server answers 415 to protobuf: ``rest.Request`` reports a 415 to
``requestClientContentConfigProvider.UnsupportedMediaType`` (client-go ``rest/client.go``), which
only remembers it for CBOR (KEP-4222, behind the ClientsAllowCBOR gate); for any other content type
the 415 reaches the user as an error. A real apiserver accepts protobuf for every built-in kind:
``negotiation.NegotiateInputSerializer`` picks the serializer by Content-Type among the codec
factory's ``application/json``, ``application/yaml``, ``application/vnd.kubernetes.protobuf``
(apimachinery ``runtime/serializer/codec_factory.go``). So the emulator decodes these bodies.

Responses stay JSON: kubectl asks for ``application/vnd.kubernetes.protobuf,application/json``, and
client-go decodes a response with the decoder of the response's own Content-Type
(``Request.transformResponse`` in client-go ``rest/request.go``), so a JSON answer is read even by
a client that accepts protobuf only (to which the emulator also answers JSON, where a real server
would answer protobuf).

Wire format
===========
A body is the 4-byte magic ``k8s\\x00`` followed by a ``runtime.Unknown`` message:
1 ``typeMeta`` {1 apiVersion, 2 kind}, 2 ``raw`` (the object's own message), 3 contentEncoding,
4 contentType (apimachinery ``runtime/generated.proto``). The object message is read with the
field tables of :mod:`.protobuf_messages`. The result is the dict Go's JSON encoder would give for
the decoded object, which is what kubectl sends when asked for JSON: ``kind`` and ``apiVersion``
first; non-pointer scalars with ``omitempty`` left out when zero (the Go marshaller writes every
non-pointer scalar, zero or not, so the wire cannot tell "unset" from zero and neither can Go);
pointer fields kept whenever present (``automountServiceAccountToken: false`` survives); empty
repeated fields and maps left out; nested structs kept (``{}`` when empty, as Go's JSON writes
them); ``metav1.Time`` as RFC 3339 seconds in UTC and left out when zero (Go writes ``null``);
quantities as their string; int-or-string as int or string; bytes as base64; unknown field numbers
skipped, as gogo-generated unmarshallers do.
"""

from __future__ import annotations

import base64
import datetime
import functools
import json
import struct
from collections.abc import Iterator
from typing import Any

from .protobuf_messages import ANY_VERSION_KINDS, API_VERSIONS, MESSAGES, ROOT_KINDS

MEDIA_TYPE = "application/vnd.kubernetes.protobuf"
MAGIC = b"k8s\x00"

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


class ProtobufError(ValueError):
    """The body is not a well-formed Kubernetes protobuf message (a real server answers 400)."""


class UnsupportedKind(ProtobufError):
    """A well-formed envelope for a kind this emulator has no field table for."""

    def __init__(self, api_version: str, kind: str) -> None:
        super().__init__(f"no protobuf decoding for {kind} in version {api_version!r}")
        self.api_version, self.kind = api_version, kind


# ------------------------------------------------------------------ wire reading
def encode_varint(value: int) -> bytes:
    """A protobuf varint; negative numbers as 64-bit two's complement, as Go writes them."""
    value &= (1 << 64) - 1
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= len(data):
            raise ProtobufError("unexpected EOF")
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, pos
        shift += 7
        if shift >= 70:
            raise ProtobufError("proto: integer overflow")


def fields(data: bytes) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) for each field: ints for varints and fixed-size
    values, bytes for length-delimited ones."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire_type = key >> 3, key & 7
        if number <= 0:
            raise ProtobufError(f"proto: illegal tag {number} (wire type {wire_type})")
        value: Any
        if wire_type == _VARINT:
            value, pos = _varint(data, pos)
        elif wire_type == _FIXED64:
            if pos + 8 > len(data):
                raise ProtobufError("unexpected EOF")
            value, pos = data[pos : pos + 8], pos + 8
        elif wire_type == _FIXED32:
            if pos + 4 > len(data):
                raise ProtobufError("unexpected EOF")
            value, pos = data[pos : pos + 4], pos + 4
        elif wire_type == _LENGTH:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ProtobufError("unexpected EOF")
            value, pos = data[pos : pos + length], pos + length
        else:
            raise ProtobufError(f"proto: illegal wireType {wire_type}")
        yield number, wire_type, value


def _signed(value: int) -> int:
    """Protobuf int32/int64 are two's complement in 64 bits (negative int32s are sign-extended)."""
    return value - (1 << 64) if value >= 1 << 63 else value


# ------------------------------------------------------------------ the field tables
@functools.cache
def _table(message: str) -> dict[int, tuple[str, str, str]]:
    """Field number -> (JSON name, presence, type) where presence is ``*`` (pointer), ``=`` (no
    omitempty) or ``""`` and type is the table's TYPE without that prefix."""
    result = {}
    for spec in MESSAGES[message].split(";"):
        number, name, type_ = spec.split()
        presence = type_[0] if type_[0] in "*=" else ""
        result[int(number)] = (name, presence, type_.lstrip("*="))
    return result


ROOTS: dict[tuple[str, str], str] = {
    (API_VERSIONS[name.split(".")[0]], name.split(".")[1]): name for name in ROOT_KINDS
}


def message_for(api_version: str, kind: str) -> str | None:
    """The table's message for a top-level kind, None when this module cannot decode it."""
    return ROOTS.get((api_version, kind)) or ANY_VERSION_KINDS.get(kind)


# ------------------------------------------------------------------ values
def _time(data: bytes, micro: bool = False) -> str | None:
    """meta/v1 Timestamp {1 seconds, 2 nanos} as metav1.Time (RFC 3339, seconds) or MicroTime
    (six fraction digits) writes it in JSON; empty is Go's zero time (JSON null)."""
    if not data:
        return None
    seconds = nanos = 0
    for number, wire_type, value in fields(data):
        if number == 1 and wire_type == _VARINT:
            seconds = _signed(value)
        elif number == 2 and wire_type == _VARINT:
            nanos = _signed(value)
    try:
        when = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(
            seconds=seconds, microseconds=nanos // 1000 if micro else 0
        )
    except OverflowError as exc:
        raise ProtobufError(f"timestamp out of range: {seconds}s") from exc
    if micro:
        return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _int_or_string(data: bytes) -> int | str:
    kind, int_val, str_val = 0, 0, ""
    for number, wire_type, value in fields(data):
        if number == 1 and wire_type == _VARINT:
            kind = _signed(value)
        elif number == 2 and wire_type == _VARINT:
            int_val = _signed(value)
        elif number == 3 and wire_type == _LENGTH:
            str_val = value.decode("utf-8", "replace")
    return str_val if kind == 1 else int_val


def _first_string(data: bytes) -> str:
    for number, wire_type, value in fields(data):
        if number == 1 and wire_type == _LENGTH:
            return value.decode("utf-8", "replace")
    return ""


def _scalar(type_: str, wire_type: int, value: Any) -> Any:
    if type_ == "string":
        _expect(wire_type, _LENGTH)
        return value.decode("utf-8", "replace")  # Go's JSON writes U+FFFD for invalid UTF-8
    if type_ == "bytes":
        _expect(wire_type, _LENGTH)
        return base64.b64encode(value).decode()
    if type_ == "bool":
        _expect(wire_type, _VARINT)
        return bool(value)
    if type_ == "int":
        _expect(wire_type, _VARINT)
        return _signed(value)
    if type_ == "double":
        _expect(wire_type, _FIXED64)
        return struct.unpack("<d", value)[0]
    raise AssertionError(f"not a scalar: {type_}")


def _expect(wire_type: int, wanted: int) -> None:
    if wire_type != wanted:
        raise ProtobufError(f"proto: wrong wireType = {wire_type} for field")


_SCALARS = {"string", "bytes", "bool", "int", "double"}
_ZERO = ("", 0, False, 0.0)


def _value(type_: str, wire_type: int, value: Any) -> Any:
    """One (non-repeated) value of the given table type."""
    if type_ in _SCALARS:
        return _scalar(type_, wire_type, value)
    _expect(wire_type, _LENGTH)
    if type_ in ("Time", "MicroTime"):
        return _time(value, micro=type_ == "MicroTime")
    if type_ == "Quantity":
        return _first_string(value)
    if type_ == "IntOrString":
        return _int_or_string(value)
    if type_ == "FieldsV1":
        raw = next((v for n, w, v in fields(value) if n == 1 and w == _LENGTH), b"")
        try:
            return json.loads(raw) if raw else {}
        except ValueError as exc:
            raise ProtobufError(f"invalid FieldsV1: {exc}") from exc
    if type_.startswith("wrap[]"):
        item = type_.removeprefix("wrap[]")
        return [_value(item, w, v) for n, w, v in fields(value) if n == 1]
    return decode_message(type_, value)


def decode_message(message: str, data: bytes) -> dict[str, Any]:
    """One message of the table as its JSON dict (see the module docstring for the rules)."""
    table = _table(message)
    result: dict[str, Any] = {}
    for number, wire_type, value in fields(data):
        if number not in table:
            continue  # unknown fields are skipped, as the generated unmarshallers do
        name, presence, type_ = table[number]
        if type_.startswith("map:"):
            key, item = "", None
            for n, w, v in fields(_checked(wire_type, value)):
                if n == 1:
                    key = _scalar("string", w, v)
                elif n == 2:
                    item = _value(type_.removeprefix("map:"), w, v)
            if item is None:  # an entry without a value holds the value type's zero
                item = _zero(type_.removeprefix("map:"))
            result.setdefault(name, {})[key] = item
        elif type_.startswith("[]"):
            item_type = type_.removeprefix("[]")
            items = result.setdefault(name, [])
            if item_type in ("int", "bool") and wire_type == _LENGTH:  # packed encoding
                for packed in _packed_varints(value):
                    items.append(_scalar(item_type, _VARINT, packed))
            else:
                items.append(_value(item_type, wire_type, value))
        elif name == "...":
            result.update(_value(type_, wire_type, value))
        else:
            decoded = _value(type_, wire_type, value)
            if decoded is None or (presence == "" and type_ in _SCALARS and decoded in _ZERO):
                result.pop(name, None)  # the last occurrence wins, as in protobuf
                continue
            result[name] = decoded
    return result


def _checked(wire_type: int, value: Any) -> bytes:
    _expect(wire_type, _LENGTH)
    return value


def _packed_varints(data: bytes) -> Iterator[int]:
    pos = 0
    while pos < len(data):
        value, pos = _varint(data, pos)
        yield value


def _zero(type_: str) -> Any:
    return {"string": "", "bytes": "", "bool": False, "int": 0, "double": 0.0}.get(
        type_, "0" if type_ == "Quantity" else {}
    )


# ------------------------------------------------------------------ the envelope
def envelope(body: bytes) -> tuple[str, str, bytes]:
    """(apiVersion, kind, raw object message) of a ``k8s\\x00`` + runtime.Unknown body, with the
    messages of apimachinery's protobuf serializer for what it refuses."""
    if not body:
        raise ProtobufError("empty data")
    if not body.startswith(MAGIC):
        raise ProtobufError(
            "provided data does not appear to be a protobuf message, expected prefix "
            f"[{' '.join(str(b) for b in MAGIC)}]"
        )
    if len(body) == len(MAGIC):
        raise ProtobufError("empty body")
    api_version = kind = ""
    raw = b""
    for number, wire_type, value in fields(body[len(MAGIC) :]):
        if number == 1:
            for n, w, v in fields(_checked(wire_type, value)):
                if n == 1:
                    api_version = _scalar("string", w, v)
                elif n == 2:
                    kind = _scalar("string", w, v)
        elif number == 2:
            raw = _checked(wire_type, value)
    if not kind:
        raise ProtobufError("Object 'Kind' is missing in the protobuf message")
    if not api_version:
        raise ProtobufError("Object 'apiVersion' is missing in the protobuf message")
    return api_version, kind, raw


def decode(body: bytes) -> dict[str, Any]:
    """A protobuf request body as the JSON dict of the same object.

    Raises :class:`UnsupportedKind` for a kind without a field table, :class:`ProtobufError`
    for a malformed body."""
    api_version, kind, raw = envelope(body)
    message = message_for(api_version, kind)
    if message is None:
        raise UnsupportedKind(api_version, kind)
    return {"kind": kind, "apiVersion": api_version, **decode_message(message, raw)}
