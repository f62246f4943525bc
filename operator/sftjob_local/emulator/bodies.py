"""Request bodies by Content-Type, as the apiserver's input negotiation reads them.

``negotiation.NegotiateInputSerializerForMediaType`` (k8s.io/apiserver
``pkg/endpoints/handlers/negotiation/negotiate.go``): a missing Content-Type means the first
supported media type (``application/json``); the header is parsed with Go's
``mime.ParseMediaType`` (type and subtype lower-cased, parameters such as ``charset`` ignored);
a media type that does not parse or is not one of the serializers' (``application/json``,
``application/yaml``, ``application/vnd.kubernetes.protobuf``; apimachinery
``runtime/serializer/codec_factory.go``, the same three for custom resources in
apiextensions-apiserver's ``customresource_handler.go``) is refused with 415 UnsupportedMediaType,
"the body of the request was in an unknown format - accepted media types include: ..."
(``negotiation/errors.go``). PATCH bodies are negotiated against the patch types instead, in
server.py.

YAML is read as the JSON serializer's YAML mode reads it: ``sigs.k8s.io/yaml.YAMLToJSON`` (go-yaml
v2 semantics): the first document only, YAML 1.1 scalars (``yes``/``no`` are booleans), timestamps
kept as strings, mapping keys turned into strings. Decoding failures are 400 BadRequest worded as
``transformDecodeError`` in ``handlers/rest.go`` words them.
"""

from __future__ import annotations

import binascii
import json
import re
from typing import Any

import yaml

from . import protobuf
from .errors import ApiError

JSON = "application/json"
YAML = "application/yaml"
ACCEPTED_MEDIA_TYPES = (JSON, YAML, protobuf.MEDIA_TYPE)

_TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_MEDIA_TYPE_RE = re.compile(rf"^\s*({_TOKEN})/({_TOKEN})\s*$")
_PARAMETER_RE = re.compile(rf'^\s*{_TOKEN}\s*=\s*({_TOKEN}|"(?:[^"\\]|\\.)*")\s*$')


def media_type(header: str) -> str | None:
    """``type/subtype`` of a Content-Type header, lower-cased; "" when absent; None when it does
    not parse (Go's ``mime.ParseMediaType`` refuses it)."""
    if not header.strip():
        return ""
    essence, *parameters = header.split(";")
    match = _MEDIA_TYPE_RE.match(essence)
    if match is None:
        return None
    if parameters and not parameters[-1].strip():
        parameters.pop()  # Go ignores one trailing semicolon, nothing more
    if any(not _PARAMETER_RE.match(p) for p in parameters):
        return None
    return f"{match.group(1)}/{match.group(2)}".lower()


def unsupported_media_type(accepted: tuple[str, ...] | list[str]) -> ApiError:
    return ApiError(
        415,
        "the body of the request was in an unknown format - accepted media types include: "
        + ", ".join(accepted),
        "UnsupportedMediaType",
    )


def _summary(body: bytes, max_length: int = 30) -> str:
    """``summarizeData`` of handlers/rest.go: the start of the body, as text when it is JSON."""
    if not body:
        return "<empty>"
    if body[:1] == b"{":
        text = body[:max_length].decode("utf-8", "replace")
        return text + " ..." if len(body) > max_length else text
    hexed = binascii.hexlify(body[:max_length]).decode()
    return hexed + " ..." if len(body) > max_length else hexed


def undecodable(body: bytes, kind: str, problem: str) -> ApiError:
    """400 as ``transformDecodeError`` words it when the body's kind is not known."""
    expected = f" (must be of type {kind})" if kind else ""
    return ApiError(
        400,
        f"the object provided is unrecognized{expected}: {problem} ({_summary(body)})",
        "BadRequest",
    )


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 like go-yaml v2, except that timestamps stay strings (go-yaml v2 hands
    timestamp-looking scalars to an ``interface{}`` as strings)."""


_YamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# go-yaml v2 also reads the one-letter y/Y/n/N as booleans (its resolve table).
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:y|Y|n|N)$"), list("yYnN")
)
_YamlLoader.bool_values = {**yaml.SafeLoader.bool_values, "y": True, "n": False}


def _json_keys(value: Any) -> Any:
    """sigs.k8s.io/yaml's conversion to JSON: every mapping key becomes a string, and numbers read
    as they would from the JSON text Go writes."""
    if isinstance(value, dict):
        return {_key(k): _json_keys(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_keys(v) for v in value]
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e21:
        return int(value)  # Go's JSON writes a whole float64 without a fraction: 1.0 is 1
    return value


def _key(key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    return str(key)


def load_yaml(body: bytes) -> Any:
    """The first YAML document as JSON data (raises yaml.YAMLError)."""
    documents = yaml.load_all(body, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    return _json_keys(next(documents, None))


def decode_body(body: bytes, content_type: str, kind: str = "") -> Any:
    """A create/update body as JSON data, by its Content-Type header; ``kind`` is the endpoint's
    kind, for messages. Raises :class:`ApiError` (415 or 400)."""
    media = media_type(content_type)
    if media is None or media not in ("", *ACCEPTED_MEDIA_TYPES):
        raise unsupported_media_type(ACCEPTED_MEDIA_TYPES)
    if not body and media != protobuf.MEDIA_TYPE:
        raise ApiError(400, "the request body is empty", "BadRequest")
    if media == protobuf.MEDIA_TYPE:
        try:
            return protobuf.decode(body)
        except protobuf.UnsupportedKind:
            # Not a refusal a real server gives (it decodes every built-in kind): the emulator
            # has no field table for this kind, so it names what it can read for it.
            raise unsupported_media_type((JSON, YAML)) from None
        except protobuf.ProtobufError as exc:
            raise undecodable(body, kind, str(exc)) from exc
    if media == YAML:
        try:
            return load_yaml(body)
        except yaml.YAMLError as exc:
            problem = " ".join(str(exc).split())
            raise undecodable(
                body, kind, f"error converting YAML to JSON: yaml: {problem}"
            ) from exc
    try:
        return json.loads(body)
    except ValueError as exc:
        raise ApiError(
            400, f"the request body could not be decoded as JSON: {exc}", "BadRequest"
        ) from exc
