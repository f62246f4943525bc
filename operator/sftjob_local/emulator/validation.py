"""Admission validation of built-in objects, as the apiserver's validation does it (pure, no I/O).

The rules, field paths, error types and messages follow the real sources:

- ``k8s.io/apimachinery/pkg/util/validation`` (IsDNS1123Label/Subdomain, IsDNS1035Label,
  IsQualifiedName, IsValidLabelValue, IsConfigMapKey, IsValidPortName, env var names),
- ``k8s.io/apimachinery/pkg/api/validation/objectmeta.go`` (ValidateObjectMeta,
  ValidateObjectMetaUpdate, annotations size, owner references, finalizers),
- ``k8s.io/apimachinery/pkg/util/validation/field/errors.go`` (how an error renders),
- ``pkg/apis/core/validation/validation.go`` (ValidatePodCreate/Update, ValidateService(Update),
  ValidateConfigMap(Update), ValidateSecret(Update), ValidatePersistentVolumeClaim(Update),
  ValidateNamespace, ValidateServiceAccount, ValidateEvent),
- ``pkg/apis/rbac/validation/validation.go`` (roles, bindings).

Objects here are what the emulator stores: the v1 JSON form, without most of the defaults a real
server writes at decode time (``imagePullPolicy``, ``dnsPolicy``, ...). A field that the real server
would have defaulted is therefore taken as its default, never reported as missing.

Public API:

``validate_create(kind, group, obj) -> list[FieldError]`` and
``validate_update(kind, group, new, old) -> list[FieldError]``: empty when the object is valid.
``decode_error(kind, obj) -> str | None``: what a real server refuses while *decoding* the body
(a 400 ``"<Kind> in version "v1" cannot be handled as a <Kind>: ..."``): bad quantities and
non-base64 Secret data. ``secret_string_data(obj)``: folds ``stringData`` into ``data`` as the v1
conversion does. ``causes(errors)``: the ``details.causes`` entries (duplicates dropped, as
``ErrorList.ToAggregate`` drops them).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

Obj = dict[str, Any]

REQUIRED = "FieldValueRequired"
INVALID = "FieldValueInvalid"
DUPLICATE = "FieldValueDuplicate"
NOT_FOUND = "FieldValueNotFound"
NOT_SUPPORTED = "FieldValueNotSupported"
FORBIDDEN = "FieldValueForbidden"
TOO_LONG = "FieldValueTooLong"

_TITLES = {
    REQUIRED: "Required value",
    INVALID: "Invalid value",
    DUPLICATE: "Duplicate value",
    NOT_FOUND: "Not found",
    NOT_SUPPORTED: "Unsupported value",
    FORBIDDEN: "Forbidden",
    TOO_LONG: "Too long",
}
_NO_VALUE = (REQUIRED, FORBIDDEN, TOO_LONG)


class GoValue(str):
    """A bad value that the Go server prints with ``%#v`` (a struct or a slice), kept verbatim."""


@dataclass(frozen=True)
class FieldError:
    reason: str
    field: str
    value: Any = ""
    detail: str = ""

    @property
    def body(self) -> str:
        """``field.Error.ErrorBody()``: the type, the value (as Go prints it), the detail."""
        text = _TITLES[self.reason]
        if self.reason not in _NO_VALUE:
            text += ": " + _go_repr(self.value)
        if self.detail:
            text += ": " + self.detail
        return text

    def cause(self) -> dict[str, str]:
        cause = {"reason": self.reason, "message": self.body}
        if self.field:
            cause["field"] = self.field
        return cause


def _go_repr(value: Any) -> str:
    if isinstance(value, GoValue):
        return str(value)
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)  # Go's %q for the common cases
    return GoValue(repr(value))


def causes(errors: list[FieldError]) -> list[dict[str, str]]:
    seen: set[str] = set()
    out = []
    for err in errors:
        text = f"{err.field}: {err.body}"
        if text not in seen:
            seen.add(text)
            out.append(err.cause())
    return out


def required(path: str, detail: str = "") -> FieldError:
    return FieldError(REQUIRED, path, "", detail)


def invalid(path: str, value: Any, detail: str) -> FieldError:
    return FieldError(INVALID, path, value, detail)


def not_supported(path: str, value: Any, supported: list[str]) -> FieldError:
    detail = "supported values: " + ", ".join(json.dumps(s) for s in supported)
    return FieldError(NOT_SUPPORTED, path, value, detail)


def forbidden(path: str, detail: str) -> FieldError:
    return FieldError(FORBIDDEN, path, "", detail)


def too_long(path: str, limit: int) -> FieldError:
    return FieldError(TOO_LONG, path, "", f"must have at most {limit} bytes")


def key(path: str, k: str) -> str:
    """``field.Path.Key``: ``metadata.labels[app]``."""
    return f"{path}[{k}]"


# ---------------------------------------------------------------------------- name formats
def _regex_error(msg: str, fmt: str, *examples: str) -> str:
    """``validation.RegexError``: the message, examples, and the regex used for validation."""
    if not examples:
        return f"{msg} (regex used for validation is '{fmt}')"
    shown = " or ".join(f"'{e}', " for e in examples)
    return f"{msg} (e.g. {shown}regex used for validation is '{fmt}')"


def _max_len_error(n: int) -> str:
    return f"must be no more than {n} bytes"


DNS1123_LABEL_FMT = "[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN_FMT = DNS1123_LABEL_FMT + "(\\." + DNS1123_LABEL_FMT + ")*"
DNS1035_LABEL_FMT = "[a-z]([-a-z0-9]*[a-z0-9])?"
LABEL_KEY_FMT = "([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
LABEL_VALUE_FMT = "(" + LABEL_KEY_FMT + ")?"
CONFIG_MAP_KEY_FMT = "[-._a-zA-Z0-9]+"
_DNS1123_LABEL = re.compile(f"^{DNS1123_LABEL_FMT}$")
_DNS1123_SUBDOMAIN = re.compile(f"^{DNS1123_SUBDOMAIN_FMT}$")
_DNS1035_LABEL = re.compile(f"^{DNS1035_LABEL_FMT}$")
_LABEL_KEY = re.compile(f"^{LABEL_KEY_FMT}$")
_LABEL_VALUE = re.compile(f"^{LABEL_VALUE_FMT}$")
_CONFIG_MAP_KEY = re.compile(f"^{CONFIG_MAP_KEY_FMT}$")
_PORT_NAME_CHARS = re.compile("^[-a-z0-9]+$")


def is_dns1123_label(value: str) -> list[str]:
    errs = []
    if len(value) > 63:
        errs.append(_max_len_error(63))
    if not _DNS1123_LABEL.match(value):
        if _DNS1123_SUBDOMAIN.match(value):
            errs.append("must not contain dots")
        else:
            errs.append(
                _regex_error(
                    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and end with an alphanumeric character",
                    DNS1123_LABEL_FMT,
                    "my-name",
                    "123-abc",
                )
            )
    return errs


def is_dns1123_subdomain(value: str) -> list[str]:
    errs = []
    if len(value) > 253:
        errs.append(_max_len_error(253))
    if not _DNS1123_SUBDOMAIN.match(value):
        errs.append(
            _regex_error(
                "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must start and end with an alphanumeric character",
                DNS1123_SUBDOMAIN_FMT,
                "example.com",
            )
        )
    return errs


def is_dns1035_label(value: str) -> list[str]:
    errs = []
    if len(value) > 63:
        errs.append(_max_len_error(63))
    if not _DNS1035_LABEL.match(value):
        errs.append(
            _regex_error(
                "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic character, and end with an alphanumeric character",
                DNS1035_LABEL_FMT,
                "my-name",
                "abc-123",
            )
        )
    return errs


def is_path_segment_name(value: str) -> list[str]:
    """``path.IsValidPathSegmentName``: what RBAC objects need of a name."""
    if value in (".", ".."):
        return [f"may not be '{value}'"]
    return [f"may not contain '{c}'" for c in ("/", "%") if c in value]


def is_qualified_name(value: str) -> list[str]:
    label_key_msg = "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character"
    errs: list[str] = []
    parts = value.split("/")
    if len(parts) == 1:
        name = parts[0]
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            errs.append("prefix part must be non-empty")
        else:
            errs.extend("prefix part " + m for m in is_dns1123_subdomain(prefix))
    else:
        return [
            "a valid label key "
            + _regex_error(label_key_msg, LABEL_KEY_FMT, "MyName", "my.name", "123-abc")
            + " with an optional DNS subdomain prefix and '/' (e.g. 'example.com/MyName')"
        ]
    if not name:
        errs.append("name part must be non-empty")
    elif len(name) > 63:
        errs.append("name part " + _max_len_error(63))
    if not _LABEL_KEY.match(name):
        errs.append(
            "name part "
            + _regex_error(label_key_msg, LABEL_KEY_FMT, "MyName", "my.name", "123-abc")
        )
    return errs


def is_label_value(value: str) -> list[str]:
    errs = []
    if len(value) > 63:
        errs.append(_max_len_error(63))
    if not _LABEL_VALUE.match(value):
        errs.append(
            _regex_error(
                "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                LABEL_VALUE_FMT,
                "MyValue",
                "my_value",
                "12345",
            )
        )
    return errs


def _chdir_prefix(value: str) -> list[str]:
    if value in (".", ".."):
        return [f"must not be '{value}'"]
    if value.startswith(".."):
        return ["must not start with '..'"]
    return []


def is_config_map_key(value: str) -> list[str]:
    errs = []
    if len(value) > 253:
        errs.append(_max_len_error(253))
    if not _CONFIG_MAP_KEY.match(value):
        errs.append(
            _regex_error(
                "a valid config key must consist of alphanumeric characters, '-', '_' or '.'",
                CONFIG_MAP_KEY_FMT,
                "key.name",
                "KEY_NAME",
                "key-name",
            )
        )
    return errs + _chdir_prefix(value)


def is_relaxed_env_var_name(value: str) -> list[str]:
    """RelaxedEnvironmentVariableValidation (on by default since 1.32): printable ASCII but '='."""
    if not value:
        return ["environment variable name must be non-empty"]
    if any(ord(c) > 126 or ord(c) < 32 or c == "=" for c in value):
        return [
            "a valid environment variable name must consist only of printable ASCII characters other than '='"
        ]
    return []


def is_valid_port_name(port: str) -> list[str]:
    errs = []
    if len(port) > 15:
        errs.append(_max_len_error(15))
    if not _PORT_NAME_CHARS.match(port):
        errs.append("must contain only alpha-numeric characters (a-z, 0-9), and hyphens (-)")
    if not re.search("[a-z]", port):
        errs.append("must contain at least one letter (a-z)")
    if "--" in port:
        errs.append("must not contain consecutive hyphens")
    if port and (port[0] == "-" or port[-1] == "-"):
        errs.append("must not begin or end with a hyphen")
    return errs


def _range_error(lo: int, hi: int) -> str:
    return f"must be between {lo} and {hi}, inclusive"


def is_valid_port_num(port: Any) -> list[str]:
    if isinstance(port, int) and not isinstance(port, bool) and 1 <= port <= 65535:
        return []
    return [_range_error(1, 65535)]


def _mask_trailing_dash(name: str) -> str:
    # generateName prefixes may end in '-': the random suffix follows (NameIsDNSSubdomain prefix=true).
    return name[:-1] + "a" if len(name) > 1 and name.endswith("-") else name


# Name rules per kind (ValidateXName in the real validation).
def _name_rule(kind: str, group: str) -> Any:
    if group == "" and kind == "Event":
        # v1 Events get no name rule of their own, only the common path-segment check
        # (rest.BeforeCreate → ValidateObjectMetaAccessor with path.ValidatePathSegmentName).
        return is_path_segment_name
    if group == "" and kind == "Service":
        return is_dns1035_label
    if group == "" and kind == "Namespace":
        return is_dns1123_label
    if group == "rbac.authorization.k8s.io":
        return is_path_segment_name
    return is_dns1123_subdomain


# ---------------------------------------------------------------------------- quantities
QUANTITY_RE = re.compile(
    r"^([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E|[eE][+-]?[0-9]+)?$"
)
QUANTITY_DECODE_ERROR = (
    "quantities must match the regular expression '^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
)
_SUFFIX = {
    "Ki": Decimal(2**10), "Mi": Decimal(2**20), "Gi": Decimal(2**30), "Ti": Decimal(2**40),
    "Pi": Decimal(2**50), "Ei": Decimal(2**60), "n": Decimal("1e-9"), "u": Decimal("1e-6"),
    "m": Decimal("1e-3"), "": Decimal(1), "k": Decimal(10**3), "M": Decimal(10**6),
    "G": Decimal(10**9), "T": Decimal(10**12), "P": Decimal(10**15), "E": Decimal(10**18),
}  # fmt: skip


def parse_quantity(qty: Any) -> Decimal | None:
    """A resource.Quantity as the apiserver decodes it (string or JSON number); None if invalid."""
    if isinstance(qty, bool):
        return None
    if isinstance(qty, int | float):
        try:
            return Decimal(str(qty))
        except InvalidOperation:
            return None
    if not isinstance(qty, str):
        return None
    match = QUANTITY_RE.match(qty.strip())
    if not match:
        return None
    number, suffix = match.group(1), match.group(2) or ""
    if suffix[:1] in ("e", "E"):
        return Decimal(number) * (Decimal(10) ** int(suffix[1:]))
    return Decimal(number) * _SUFFIX[suffix]


def _qty_text(qty: Any) -> str:
    return qty.strip() if isinstance(qty, str) else str(qty)


def _quantities(obj: Obj, kind: str) -> list[Any]:
    """Every quantity a body of this kind carries (for the decode step)."""
    found: list[Any] = []
    if kind == "Pod":
        spec = obj.get("spec") or {}
        for c in _all_containers(spec):
            res = c.get("resources") or {}
            for section in ("limits", "requests"):
                found.extend((res.get(section) or {}).values())
        for vol in spec.get("volumes") or []:
            empty_dir = vol.get("emptyDir") if isinstance(vol, dict) else None
            if isinstance(empty_dir, dict) and "sizeLimit" in empty_dir:
                found.append(vol["emptyDir"]["sizeLimit"])
    elif kind == "PersistentVolumeClaim":
        res = (obj.get("spec") or {}).get("resources") or {}
        for section in ("limits", "requests"):
            found.extend((res.get(section) or {}).values())
    return found


def _b64_error_offset(text: str) -> int | None:
    """Where Go's base64.StdEncoding stops on this text (None when it decodes)."""
    stripped = text.replace("\r", "").replace("\n", "")
    try:
        base64.b64decode(stripped, validate=True)
        return None
    except (binascii.Error, ValueError):
        pass
    alphabet = set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")
    for i, ch in enumerate(stripped):
        if ch == "=":
            return i if i % 4 < 2 else min(i, len(stripped) - 1)
        if ch not in alphabet:
            return i
    return len(stripped) - len(stripped) % 4


def decode_error(kind: str, group: str, obj: Obj) -> str | None:
    """The 400 a real server answers while decoding the body, or None."""
    if group != "":
        return None
    for qty in _quantities(obj, kind):
        if parse_quantity(qty) is None:
            return f'{kind} in version "v1" cannot be handled as a {kind}: {QUANTITY_DECODE_ERROR}'
    if kind == "Secret":
        for value in (obj.get("data") or {}).values():
            if not isinstance(value, str):
                continue
            offset = _b64_error_offset(value)
            if offset is not None:
                return f'Secret in version "v1" cannot be handled as a Secret: illegal base64 data at input byte {offset}'
    return None


def secret_string_data(obj: Obj) -> None:
    """v1 → internal conversion: ``stringData`` entries overwrite ``data`` (base64) and disappear."""
    string_data = obj.pop("stringData", None)
    if isinstance(string_data, dict) and string_data:
        data = obj.get("data") or {}
        for k, v in string_data.items():
            data[k] = base64.b64encode(str(v).encode()).decode()
        obj["data"] = data


# ---------------------------------------------------------------------------- metadata
STANDARD_FINALIZERS = ("kubernetes", "orphan", "foregroundDeletion")
ANNOTATIONS_LIMIT = 256 * 1024


def validate_labels(labels: Any, path: str) -> list[FieldError]:
    errs: list[FieldError] = []
    for k, v in (labels or {}).items():
        errs += [invalid(path, k, m) for m in is_qualified_name(k)]
        errs += [invalid(path, v, m) for m in is_label_value(v if isinstance(v, str) else str(v))]
    return errs


def validate_annotations(annotations: Any, path: str) -> list[FieldError]:
    errs: list[FieldError] = []
    total = 0
    for k, v in (annotations or {}).items():
        errs += [invalid(path, k, m) for m in is_qualified_name(k.lower())]
        total += len(k.encode()) + len(str(v).encode())
    if total > ANNOTATIONS_LIMIT:
        errs.append(too_long(path, ANNOTATIONS_LIMIT))
    return errs


def _validate_owner_references(refs: Any, path: str) -> list[FieldError]:
    errs: list[FieldError] = []
    controller = ""
    for ref in refs or []:
        api_version = ref.get("apiVersion", "")
        version = api_version.split("/")[-1] if api_version else ""
        if not version:
            errs.append(invalid(f"{path}.apiVersion", api_version, "version must not be empty"))
        for fld in ("kind", "name", "uid"):
            if not ref.get(fld):
                errs.append(invalid(f"{path}.{fld}", ref.get(fld, ""), "must not be empty"))
        if api_version == "v1" and ref.get("kind") == "Event":
            errs.append(
                invalid(
                    path, GoValue(repr(ref)), "/v1, Kind=Event is disallowed from being an owner"
                )
            )
        if ref.get("controller"):
            name = f"{ref.get('kind', '')}/{ref.get('name', '')}"
            if controller:
                errs.append(
                    invalid(
                        path,
                        GoValue("[]v1.OwnerReference{...}"),
                        f'Only one reference can have Controller set to true. Found "true" in references for {controller} and {name}',
                    )
                )
            else:
                controller = name
    return errs


def _validate_finalizers(finalizers: Any, path: str, core_kind: bool) -> list[FieldError]:
    errs: list[FieldError] = []
    for i, name in enumerate(finalizers or []):
        errs += [invalid(path, name, m) for m in is_qualified_name(name)]
        if core_kind and "/" not in name and name not in STANDARD_FINALIZERS:
            errs.append(
                invalid(
                    f"{path}[{i}]",
                    name,
                    "name is neither a standard finalizer name nor is it fully qualified",
                )
            )
    names = set(finalizers or [])
    if "orphan" in names and "foregroundDeletion" in names:
        errs.append(
            invalid(
                path,
                GoValue("[]string{" + ", ".join(json.dumps(f) for f in finalizers) + "}"),
                "finalizer orphan and foregroundDeletion cannot be both set",
            )
        )
    return errs


def validate_object_meta(kind: str, group: str, meta: Obj, namespaced: bool) -> list[FieldError]:
    """ValidateObjectMeta with the kind's name rule (names already generated)."""
    rule = _name_rule(kind, group)
    errs: list[FieldError] = []
    if meta.get("generateName"):
        prefix = _mask_trailing_dash(meta["generateName"])
        errs += [invalid("metadata.generateName", meta["generateName"], m) for m in rule(prefix)]
    name = meta.get("name") or ""
    if not name:
        errs.append(required("metadata.name", "name or generateName is required"))
    else:
        errs += [invalid("metadata.name", name, m) for m in rule(name)]
    if namespaced:
        ns = meta.get("namespace") or ""
        if not ns:
            errs.append(required("metadata.namespace"))
        else:
            errs += [invalid("metadata.namespace", ns, m) for m in is_dns1123_label(ns)]
    errs += validate_labels(meta.get("labels"), "metadata.labels")
    errs += validate_annotations(meta.get("annotations"), "metadata.annotations")
    errs += _validate_owner_references(meta.get("ownerReferences"), "metadata.ownerReferences")
    errs += _validate_finalizers(meta.get("finalizers"), "metadata.finalizers", group == "")
    return errs


def validate_object_meta_update(new: Obj, old: Obj) -> list[FieldError]:
    """ValidateObjectMetaUpdate: what an update may not change (uid, name, namespace)."""
    errs: list[FieldError] = []
    nm, om = new.get("metadata") or {}, old.get("metadata") or {}
    for fld in ("name", "namespace", "uid"):
        if (nm.get(fld) or "") != (om.get(fld) or ""):
            errs.append(invalid(f"metadata.{fld}", nm.get(fld) or "", "field is immutable"))
    return errs


# ---------------------------------------------------------------------------- pods
def _all_containers(spec: Obj) -> list[Obj]:
    return [
        c
        for c in [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
        if isinstance(c, dict)
    ]


VOLUME_SOURCES = (
    "hostPath", "emptyDir", "gcePersistentDisk", "awsElasticBlockStore", "gitRepo", "secret",
    "nfs", "iscsi", "glusterfs", "persistentVolumeClaim", "rbd", "flexVolume", "cinder", "cephfs",
    "flocker", "downwardAPI", "fc", "azureFile", "configMap", "vsphereVolume", "quobyte",
    "azureDisk", "photonPersistentDisk", "projected", "portworxVolume", "scaleIO", "storageos",
    "csi", "ephemeral", "image",
)  # fmt: skip
_SOURCE_REQUIRED = {
    "secret": "secretName",
    "configMap": "name",
    "persistentVolumeClaim": "claimName",
    "hostPath": "path",
}


def _validate_volumes(volumes: list[Obj], path: str) -> tuple[set[str], list[FieldError]]:
    errs: list[FieldError] = []
    names: set[str] = set()
    for i, vol in enumerate(volumes):
        vpath = f"{path}[{i}]"
        el: list[FieldError] = []
        sources = [s for s in VOLUME_SOURCES if vol.get(s) is not None]
        if not sources:
            el.append(required(vpath, "must specify a volume type"))
        for extra in sources[1:]:
            el.append(forbidden(f"{vpath}.{extra}", "may not specify more than 1 volume type"))
        if sources and sources[0] in _SOURCE_REQUIRED:
            need = _SOURCE_REQUIRED[sources[0]]
            if not (vol.get(sources[0]) or {}).get(need):
                el.append(required(f"{vpath}.{sources[0]}.{need}"))
        name = vol.get("name") or ""
        if not name:
            el.append(required(f"{vpath}.name"))
        else:
            el += [invalid(f"{vpath}.name", name, m) for m in is_dns1123_label(name)]
        if name in names:
            el.append(FieldError(DUPLICATE, f"{vpath}.name", name))
        if el:
            errs += el
        else:
            names.add(name)
    return names, errs


def _validate_local_descending_path(value: str, path: str) -> list[FieldError]:
    errs = []
    if value.startswith("/"):
        errs.append(invalid(path, value, "must be a relative path"))
    if ".." in value.replace("\\", "/").split("/"):
        errs.append(invalid(path, value, "must not contain '..'"))
    return errs


def _validate_mounts(mounts: list[Obj], volumes: set[str], path: str) -> list[FieldError]:
    errs: list[FieldError] = []
    seen: set[str] = set()
    for i, mnt in enumerate(mounts):
        mpath = f"{path}[{i}]"
        name, mount_path = mnt.get("name") or "", mnt.get("mountPath") or ""
        if not name:
            errs.append(required(f"{mpath}.name"))
        if name not in volumes:
            errs.append(FieldError(NOT_FOUND, f"{mpath}.name", name))
        if not mount_path:
            errs.append(required(f"{mpath}.mountPath"))
        if mount_path in seen:
            errs.append(invalid(f"{mpath}.mountPath", mount_path, "must be unique"))
        seen.add(mount_path)
        # The real code reports subPath problems at the list's path, not the item's.
        if mnt.get("subPath"):
            errs += _validate_local_descending_path(mnt["subPath"], f"{path}.subPath")
        if mnt.get("subPathExpr"):
            if mnt.get("subPath"):
                errs.append(
                    invalid(
                        f"{mpath}.subPathExpr",
                        mnt["subPathExpr"],
                        "subPathExpr and subPath are mutually exclusive",
                    )
                )
            errs += _validate_local_descending_path(mnt["subPathExpr"], f"{path}.subPathExpr")
    return errs


PROTOCOLS = ["SCTP", "TCP", "UDP"]


def _validate_container_ports(ports: list[Obj], path: str) -> list[FieldError]:
    errs: list[FieldError] = []
    names: set[str] = set()
    for i, port in enumerate(ports):
        ppath = f"{path}[{i}]"
        name = port.get("name") or ""
        if name:
            msgs = is_valid_port_name(name)
            if msgs:
                errs += [invalid(f"{ppath}.name", name, m) for m in msgs]
            elif name in names:
                errs.append(FieldError(DUPLICATE, f"{ppath}.name", name))
            else:
                names.add(name)
        cport = port.get("containerPort") or 0
        if cport == 0:
            errs.append(required(f"{ppath}.containerPort"))
        else:
            errs += [invalid(f"{ppath}.containerPort", cport, m) for m in is_valid_port_num(cport)]
        if port.get("hostPort"):
            hp = port["hostPort"]
            errs += [invalid(f"{ppath}.hostPort", hp, m) for m in is_valid_port_num(hp)]
        protocol = port.get("protocol") or "TCP"
        if protocol not in PROTOCOLS:
            errs.append(not_supported(f"{ppath}.protocol", protocol, PROTOCOLS))
    return errs


def _validate_env(env: list[Obj], path: str) -> list[FieldError]:
    errs: list[FieldError] = []
    for i, var in enumerate(env):
        epath = f"{path}[{i}]"
        name = var.get("name") or ""
        if not name:
            errs.append(required(f"{epath}.name"))
        else:
            errs += [invalid(f"{epath}.name", name, m) for m in is_relaxed_env_var_name(name)]
        source = var.get("valueFrom")
        if source is not None:
            kinds = [
                k
                for k in ("fieldRef", "resourceFieldRef", "configMapKeyRef", "secretKeyRef")
                if source.get(k) is not None
            ]
            vpath = f"{epath}.valueFrom"
            if not kinds:
                errs.append(
                    invalid(
                        vpath,
                        "",
                        "must specify one of: `fieldRef`, `resourceFieldRef`, `configMapKeyRef` or `secretKeyRef`",
                    )
                )
            elif var.get("value"):
                errs.append(invalid(vpath, "", "may not be specified when `value` is not empty"))
            elif len(kinds) > 1:
                errs.append(
                    invalid(vpath, "", "may not have more than one field specified at a time")
                )
            for ref_kind in ("configMapKeyRef", "secretKeyRef"):
                ref = source.get(ref_kind)
                if isinstance(ref, dict):
                    rpath = f"{vpath}.{ref_kind}"
                    rname = ref.get("name") or ""
                    errs += [
                        invalid(f"{rpath}.name", rname, m) for m in is_dns1123_subdomain(rname)
                    ]
                    if not ref.get("key"):
                        errs.append(required(f"{rpath}.key"))
                    else:
                        errs += [
                            invalid(f"{rpath}.key", ref["key"], m)
                            for m in is_config_map_key(ref["key"])
                        ]
    return errs


STANDARD_CONTAINER_RESOURCES = ("cpu", "memory", "ephemeral-storage")


def _is_native(name: str) -> bool:
    return "/" not in name or "kubernetes.io/" in name


def _is_hugepages(name: str) -> bool:
    return name.startswith("hugepages-")


def _is_extended(name: str) -> bool:
    return (
        not _is_native(name)
        and not name.startswith("requests.")
        and not is_qualified_name("requests." + name)
    )


def _overcommit_allowed(name: str) -> bool:
    return _is_native(name) and not _is_hugepages(name)


def _validate_resources(res: Obj, path: str) -> list[FieldError]:
    errs: list[FieldError] = []
    limits, requests = res.get("limits") or {}, res.get("requests") or {}
    lim_path, req_path = f"{path}.limits", f"{path}.requests"

    def name_and_value(name: str, qty: Any, fpath: str) -> list[FieldError]:
        out = [invalid(fpath, name, m) for m in is_qualified_name(name)]
        if not out:
            if "/" not in name:
                if name not in STANDARD_CONTAINER_RESOURCES and not _is_hugepages(name):
                    out.append(invalid(fpath, name, "must be a standard resource for containers"))
            elif not _is_native(name) and not _is_extended(name):
                out.append(invalid(fpath, name, "doesn't follow extended resource name standard"))
        value = parse_quantity(qty)
        if value is not None:
            if value < 0:
                out.append(invalid(fpath, _qty_text(qty), "must be greater than or equal to 0"))
            if _is_extended(name) and value != value.to_integral_value():
                out.append(invalid(fpath, GoValue(_qty_text(qty)), "must be an integer"))
        return out

    for name, qty in limits.items():
        errs += name_and_value(name, qty, key(lim_path, name))
    for name, qty in requests.items():
        errs += name_and_value(name, qty, key(req_path, name))
        value = parse_quantity(qty)
        if name in limits:
            limit = parse_quantity(limits[name])
            if value is None or limit is None:
                continue
            if value != limit and not _overcommit_allowed(name):
                errs.append(
                    invalid(
                        req_path,
                        _qty_text(qty),
                        f"must be equal to {name} limit of {_qty_text(limits[name])}",
                    )
                )
            elif value > limit:
                errs.append(
                    invalid(
                        req_path,
                        _qty_text(qty),
                        f"must be less than or equal to {name} limit of {_qty_text(limits[name])}",
                    )
                )
        elif not _overcommit_allowed(name):
            errs.append(required(lim_path, "Limit must be set for non overcommitable resources"))
    has_hugepages = any(_is_hugepages(n) for n in [*limits, *requests])
    has_cpu_mem = any(n in ("cpu", "memory") for n in [*limits, *requests])
    if has_hugepages and not has_cpu_mem:
        errs.append(forbidden(path, "HugePages require cpu or memory"))
    return errs


PULL_POLICIES = ["Always", "IfNotPresent", "Never"]
TERMINATION_MESSAGE_POLICIES = ["File", "FallbackToLogsOnError"]


def _validate_container(c: Obj, volumes: set[str], path: str) -> list[FieldError]:
    errs: list[FieldError] = []
    name = c.get("name") or ""
    if not name:
        errs.append(required(f"{path}.name"))
    else:
        errs += [invalid(f"{path}.name", name, m) for m in is_dns1123_label(name)]
    image = c.get("image") or ""
    if not image:
        errs.append(required(f"{path}.image"))
    policy = c.get("terminationMessagePolicy") or "File"
    if policy not in TERMINATION_MESSAGE_POLICIES:
        errs.append(
            not_supported(f"{path}.terminationMessagePolicy", policy, TERMINATION_MESSAGE_POLICIES)
        )
    errs += _validate_container_ports(c.get("ports") or [], f"{path}.ports")
    errs += _validate_env(c.get("env") or [], f"{path}.env")
    errs += _validate_mounts(c.get("volumeMounts") or [], volumes, f"{path}.volumeMounts")
    pull = c.get("imagePullPolicy") or "IfNotPresent"
    if pull not in PULL_POLICIES:
        errs.append(not_supported(f"{path}.imagePullPolicy", pull, PULL_POLICIES))
    errs += _validate_resources(c.get("resources") or {}, f"{path}.resources")
    return errs


RESTART_POLICIES = ["Always", "OnFailure", "Never"]
DNS_POLICIES = ["ClusterFirstWithHostNet", "ClusterFirst", "Default", "None"]
TAINT_EFFECTS = ["NoSchedule", "PreferNoSchedule", "NoExecute"]
INT32_MAX = 2**31 - 1


def validate_tolerations(tolerations: list[Obj], path: str) -> list[FieldError]:
    errs: list[FieldError] = []
    for i, tol in enumerate(tolerations):
        tpath = f"{path}[{i}]"
        tkey, op = tol.get("key") or "", tol.get("operator") or ""
        value, effect = tol.get("value") or "", tol.get("effect") or ""
        if tkey:
            errs += [invalid(f"{tpath}.key", tkey, m) for m in is_qualified_name(tkey)]
        if not tkey and op != "Exists":
            errs.append(
                invalid(
                    f"{tpath}.operator",
                    op,
                    'operator must be Exists when `key` is empty, which means "match all values and all keys"',
                )
            )
        if tol.get("tolerationSeconds") is not None and effect != "NoExecute":
            errs.append(
                invalid(
                    f"{tpath}.effect",
                    effect,
                    "effect must be 'NoExecute' when `tolerationSeconds` is set",
                )
            )
        if op in ("Equal", ""):
            msgs = is_label_value(value)
            if msgs:
                errs.append(invalid(f"{tpath}.operator", value, ";".join(msgs)))
        elif op == "Exists":
            if value:
                errs.append(
                    invalid(
                        f"{tpath}.operator",
                        value,
                        "value must be empty when `operator` is 'Exists'",
                    )
                )
        else:
            errs.append(not_supported(f"{tpath}.operator", op, ["Equal", "Exists"]))
        if effect and effect not in TAINT_EFFECTS:
            errs.append(not_supported(f"{tpath}.effect", effect, TAINT_EFFECTS))
    return errs


def validate_pod_spec(spec: Obj, path: str = "spec") -> list[FieldError]:
    """ValidatePodSpec and the pod-only container checks (validateContainersOnlyForPod)."""
    errs: list[FieldError] = []
    volumes, vol_errs = _validate_volumes(spec.get("volumes") or [], f"{path}.volumes")
    errs += vol_errs
    containers = spec.get("containers") or []
    init_containers = spec.get("initContainers") or []
    if not containers:
        errs.append(required(f"{path}.containers"))
    names: set[str] = set()
    for i, c in enumerate(containers):
        cpath = f"{path}.containers[{i}]"
        errs += _validate_container(c, volumes, cpath)
        if c.get("name") in names:
            errs.append(FieldError(DUPLICATE, f"{cpath}.name", c.get("name")))
        else:
            names.add(c.get("name"))
        if c.get("restartPolicy") is not None:
            errs.append(
                forbidden(f"{cpath}.restartPolicy", "may not be set for non-init containers")
            )
    for i, c in enumerate(init_containers):
        cpath = f"{path}.initContainers[{i}]"
        errs += _validate_container(c, volumes, cpath)
        if c.get("name") in names:
            errs.append(FieldError(DUPLICATE, f"{cpath}.name", c.get("name")))
        elif c.get("name"):
            names.add(c["name"])
    restart = spec.get("restartPolicy") or "Always"
    if restart not in RESTART_POLICIES:
        errs.append(not_supported(f"{path}.restartPolicy", restart, RESTART_POLICIES))
    dns = spec.get("dnsPolicy") or "ClusterFirst"
    if dns not in DNS_POLICIES:
        errs.append(not_supported(f"{path}.dnsPolicy", dns, DNS_POLICIES))
    errs += validate_labels(spec.get("nodeSelector"), f"{path}.nodeSelector")
    sa = spec.get("serviceAccountName") or ""
    if sa:
        errs += [invalid(f"{path}.serviceAccountName", sa, m) for m in is_dns1123_subdomain(sa)]
    node = spec.get("nodeName") or ""
    if node:
        errs += [invalid(f"{path}.nodeName", node, m) for m in is_dns1123_subdomain(node)]
    deadline = spec.get("activeDeadlineSeconds")
    if deadline is not None and not (1 <= deadline <= INT32_MAX):
        errs.append(invalid(f"{path}.activeDeadlineSeconds", deadline, _range_error(1, INT32_MAX)))
    for fld in ("hostname", "subdomain"):
        if spec.get(fld):
            errs += [invalid(f"{path}.{fld}", spec[fld], m) for m in is_dns1123_label(spec[fld])]
    errs += validate_tolerations(spec.get("tolerations") or [], f"{path}.tolerations")
    for group_name, items in (("containers", containers), ("initContainers", init_containers)):
        for i, c in enumerate(items):
            image = c.get("image") or ""
            if image != image.strip():
                errs.append(
                    invalid(
                        f"{path}.{group_name}[{i}].image",
                        image,
                        "must not have leading or trailing whitespace",
                    )
                )
    if not spec.get("serviceAccountName"):
        for vi, vol in enumerate(spec.get("volumes") or []):
            for si, src in enumerate((vol.get("projected") or {}).get("sources") or []):
                if src.get("serviceAccountToken") is not None:
                    errs.append(
                        forbidden(
                            f"{path}.volumes[{vi}].projected.sources[{si}].serviceAccountToken",
                            "must not be specified when serviceAccountName is not set",
                        )
                    )
    return errs


UPDATABLE_POD_SPEC_FIELDS = [
    "`spec.containers[*].image`",
    "`spec.initContainers[*].image`",
    "`spec.activeDeadlineSeconds`",
    "`spec.tolerations` (only additions to existing tolerations)",
    "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
]


def _go_field(name: str) -> str:
    return name[:1].upper() + name[1:]


def spec_diff(kind_type: str, old: Obj, new: Obj) -> str:
    """A diff in the spirit of ``cmp.Diff(old, new)`` the real server appends (top-level fields).

    The real text is go-cmp's rendering of the internal Go struct; this keeps its frame
    (``  core.PodSpec{``, ``- `` old, ``+ `` new lines) for the fields that changed.
    """
    lines = [f"  {kind_type}{{"]
    for fld in sorted(set(old) | set(new), key=_go_field):
        if old.get(fld) == new.get(fld):
            continue
        if fld in old:
            lines.append(f"- \t{_go_field(fld)}: {json.dumps(old[fld], sort_keys=True)},")
        if fld in new:
            lines.append(f"+ \t{_go_field(fld)}: {json.dumps(new[fld], sort_keys=True)},")
    lines.append("  }")
    return "\n".join(lines) + "\n"


def _with_pod_defaults(spec: Obj) -> Obj:
    """The spec as a real server holds it: the v1 defaults (SetDefaults_PodSpec/_Container) that
    the emulator does not write, so a client leaving them out changes nothing."""
    spec = json.loads(json.dumps(spec))
    for fld, default in (
        ("restartPolicy", "Always"),
        ("terminationGracePeriodSeconds", 30),
        ("dnsPolicy", "ClusterFirst"),
        ("schedulerName", "default-scheduler"),
        ("securityContext", {}),
    ):
        if spec.get(fld) in (None, ""):
            spec[fld] = default
    for c in _all_containers(spec):
        c.setdefault("terminationMessagePath", "/dev/termination-log")
        c.setdefault("terminationMessagePolicy", "File")
        c.setdefault("resources", {})
        for port in c.get("ports") or []:
            port.setdefault("protocol", "TCP")
    return spec


def _validate_tolerations_only_added(new: list[Obj], old: list[Obj]) -> list[FieldError]:
    for tol in old:
        probe = {k: v for k, v in tol.items() if k != "tolerationSeconds"}
        if not any({k: v for k, v in n.items() if k != "tolerationSeconds"} == probe for n in new):
            return [
                forbidden(
                    "spec.tolerations",
                    "existing toleration can not be modified except its tolerationSeconds",
                )
            ]
    return validate_tolerations(new, "spec.tolerations")


def validate_pod_update(new: Obj, old: Obj) -> list[FieldError]:
    """ValidatePodUpdate: only images, activeDeadlineSeconds, added tolerations may change."""
    errs: list[FieldError] = []
    ns, os_ = new.get("spec") or {}, old.get("spec") or {}
    for group_name in ("containers", "initContainers"):
        nc, oc = ns.get(group_name) or [], os_.get(group_name) or []
        if len(nc) != len(oc):
            return errs + [
                forbidden(f"spec.{group_name}", "pod updates may not add or remove containers")
            ]
        for i, c in enumerate(nc):
            if not c.get("image"):
                errs.append(required(f"spec.{group_name}[{i}].image"))
    new_deadline, old_deadline = ns.get("activeDeadlineSeconds"), os_.get("activeDeadlineSeconds")
    if new_deadline is not None:
        if not 0 <= new_deadline <= INT32_MAX:
            return errs + [
                invalid("spec.activeDeadlineSeconds", new_deadline, _range_error(0, INT32_MAX))
            ]
        if old_deadline is not None and old_deadline < new_deadline:
            return errs + [
                invalid(
                    "spec.activeDeadlineSeconds",
                    new_deadline,
                    "must be less than or equal to previous value",
                )
            ]
    elif old_deadline is not None:
        errs.append(
            invalid(
                "spec.activeDeadlineSeconds",
                None,
                "must not update from a positive integer to nil value",
            )
        )
    errs += _validate_tolerations_only_added(
        ns.get("tolerations") or [], os_.get("tolerations") or []
    )
    ns, os_ = _with_pod_defaults(ns), _with_pod_defaults(os_)
    if ns == os_:
        return errs
    munged = json.loads(json.dumps(ns))
    for group_name in ("containers", "initContainers"):
        for c, o in zip(munged.get(group_name) or [], os_.get(group_name) or [], strict=False):
            if "image" in o:
                c["image"] = o["image"]
            else:
                c.pop("image", None)
    for fld in ("activeDeadlineSeconds", "tolerations", "schedulingGates"):
        if fld in os_:
            munged[fld] = os_[fld]
        else:
            munged.pop(fld, None)
    old_grace = os_.get("terminationGracePeriodSeconds")
    if old_grace is not None and old_grace < 0 and munged.get("terminationGracePeriodSeconds") == 1:
        munged["terminationGracePeriodSeconds"] = old_grace
    if munged != os_:
        message = "pod updates may not change fields other than " + ",".join(
            UPDATABLE_POD_SPEC_FIELDS
        )
        errs.append(forbidden("spec", message + "\n" + spec_diff("core.PodSpec", os_, munged)))
    return errs


# ---------------------------------------------------------------------------- services
SERVICE_TYPES = ["ClusterIP", "ExternalName", "LoadBalancer", "NodePort"]


def _service_port_repr(port: Obj) -> GoValue:
    return GoValue(
        f'core.ServicePort{{Name:"", Protocol:"{port.get("protocol") or "TCP"}", AppProtocol:(*string)(nil), '
        f'Port:{port.get("port")}, TargetPort:intstr.IntOrString{{Type:0, IntVal:0, StrVal:""}}, NodePort:0}}'
    )


def validate_service(obj: Obj) -> list[FieldError]:
    errs: list[FieldError] = []
    spec = obj.get("spec") or {}
    stype = spec.get("type") or "ClusterIP"
    ports = spec.get("ports") or []
    headless = spec.get("clusterIP") == "None"
    if not ports and not headless and stype != "ExternalName":
        errs.append(required("spec.ports"))
    if stype in ("LoadBalancer", "NodePort") and headless:
        errs.append(
            invalid("spec.clusterIPs[0]", "None", f"may not be set to 'None' for {stype} services")
        )
    if stype == "ExternalName":
        if spec.get("clusterIPs") or (spec.get("clusterIP") and not headless):
            errs.append(forbidden("spec.clusterIPs", "may not be set for ExternalName services"))
        cname = (spec.get("externalName") or "").removesuffix(".")
        if cname:
            errs += [invalid("spec.externalName", cname, m) for m in is_dns1123_subdomain(cname)]
        else:
            errs.append(required("spec.externalName"))
    names: set[str] = set()
    for i, port in enumerate(ports):
        ppath = f"spec.ports[{i}]"
        name = port.get("name") or ""
        if len(ports) > 1 and not name:
            errs.append(required(f"{ppath}.name"))
        elif name:
            errs += [invalid(f"{ppath}.name", name, m) for m in is_dns1123_label(name)]
            if name in names:
                errs.append(FieldError(DUPLICATE, f"{ppath}.name", name))
            else:
                names.add(name)
        errs += [
            invalid(f"{ppath}.port", port.get("port", 0), m)
            for m in is_valid_port_num(port.get("port", 0))
        ]
        protocol = port.get("protocol") or "TCP"
        if protocol not in PROTOCOLS:
            errs.append(not_supported(f"{ppath}.protocol", protocol, PROTOCOLS))
        target = port.get("targetPort")
        if isinstance(target, str):
            errs += [invalid(f"{ppath}.targetPort", target, m) for m in is_valid_port_name(target)]
        elif target is not None and target != 0:
            errs += [invalid(f"{ppath}.targetPort", target, m) for m in is_valid_port_num(target)]
        if stype == "ClusterIP" and port.get("nodePort"):
            errs.append(
                forbidden(f"{ppath}.nodePort", "may not be used when `type` is 'ClusterIP'")
            )
    errs += validate_labels(spec.get("selector"), "spec.selector")
    affinity = spec.get("sessionAffinity") or "None"
    if affinity not in ("ClientIP", "None"):
        errs.append(not_supported("spec.sessionAffinity", affinity, ["ClientIP", "None"]))
    if stype not in SERVICE_TYPES:
        errs.append(not_supported("spec.type", stype, SERVICE_TYPES))
    seen: set[tuple[str, Any]] = set()
    for i, port in enumerate(ports):
        pair = (port.get("protocol") or "TCP", port.get("port"))
        if pair in seen:
            errs.append(FieldError(DUPLICATE, f"spec.ports[{i}]", _service_port_repr(port)))
        seen.add(pair)
    return errs


def validate_service_update(new: Obj, old: Obj) -> list[FieldError]:
    ns, os_ = new.get("spec") or {}, old.get("spec") or {}
    if "ExternalName" in (ns.get("type"), os_.get("type")):
        return []
    new_ips, old_ips = ns.get("clusterIPs") or [], os_.get("clusterIPs") or []
    if new_ips and old_ips and new_ips[0] != old_ips[0]:
        shown = GoValue("[]string{" + ", ".join(json.dumps(ip) for ip in new_ips) + "}")
        return [invalid("spec.clusterIPs[0]", shown, "may not change once set")]
    return []


def prepare_service_update(new: Obj, old: Obj) -> None:
    """The service REST update keeps allocated IPs a client left out (patchAllocatedValues)
    and follows a changed ``clusterIP`` into ``clusterIPs`` (normalizeClusterIPs)."""
    ns, os_ = new.setdefault("spec", {}), old.get("spec") or {}
    if "ExternalName" in (ns.get("type"), os_.get("type")):
        return
    if not ns.get("clusterIP") and os_.get("clusterIP"):
        ns["clusterIP"] = os_["clusterIP"]
        if not ns.get("clusterIPs") and os_.get("clusterIPs"):
            ns["clusterIPs"] = list(os_["clusterIPs"])
    if (
        ns.get("clusterIP")
        and ns.get("clusterIP") != os_.get("clusterIP")
        and ns.get("clusterIPs") == os_.get("clusterIPs")
    ):
        ns["clusterIPs"] = [ns["clusterIP"]]
    if not ns.get("clusterIPs") and ns.get("clusterIP"):
        ns["clusterIPs"] = [ns["clusterIP"]]


# ---------------------------------------------------------------------------- config
MAX_SECRET_SIZE = 1024 * 1024


def validate_config_map(obj: Obj) -> list[FieldError]:
    errs: list[FieldError] = []
    data, binary = obj.get("data") or {}, obj.get("binaryData") or {}
    total = 0
    for k, v in data.items():
        errs += [invalid(key("data", k), k, m) for m in is_config_map_key(k)]
        if k in binary:
            errs.append(invalid(key("data", k), k, "duplicate of key present in binaryData"))
        total += len(str(v).encode())
    for k, v in binary.items():
        errs += [invalid(key("binaryData", k), k, m) for m in is_config_map_key(k)]
        total += len(_b64_decode(v))
    if total > MAX_SECRET_SIZE:
        errs.append(too_long("[]", MAX_SECRET_SIZE))
    return errs


def _b64_decode(value: Any) -> bytes:
    try:
        return base64.b64decode(str(value))
    except (binascii.Error, ValueError):
        return str(value).encode()


SECRET_TYPE_KEYS = {
    "kubernetes.io/dockercfg": (".dockercfg",),
    "kubernetes.io/dockerconfigjson": (".dockerconfigjson",),
    "kubernetes.io/ssh-auth": ("ssh-privatekey",),
    "kubernetes.io/tls": ("tls.crt", "tls.key"),
}


def validate_secret(obj: Obj) -> list[FieldError]:
    errs: list[FieldError] = []
    data = obj.get("data") or {}
    total = 0
    for k, v in data.items():
        errs += [invalid(key("data", k), k, m) for m in is_config_map_key(k)]
        total += len(_b64_decode(v))
    if total > MAX_SECRET_SIZE:
        errs.append(too_long("data", MAX_SECRET_SIZE))
    stype = obj.get("type") or "Opaque"
    if stype == "kubernetes.io/service-account-token":
        annotations = (obj.get("metadata") or {}).get("annotations") or {}
        if not annotations.get("kubernetes.io/service-account.name"):
            errs.append(required(key("metadata.annotations", "kubernetes.io/service-account.name")))
    elif stype == "kubernetes.io/basic-auth":
        if "username" not in data and "password" not in data:
            errs += [required(key("data", "username")), required(key("data", "password"))]
    elif stype in SECRET_TYPE_KEYS:
        for k in SECRET_TYPE_KEYS[stype]:
            if k not in data:
                errs.append(required(key("data", k)))
                if stype != "kubernetes.io/tls":
                    break
    return errs


def _immutable_data(new: Obj, old: Obj, fields: tuple[str, ...]) -> list[FieldError]:
    if not old.get("immutable"):
        return []
    errs = []
    if not new.get("immutable"):
        errs.append(forbidden("immutable", "field is immutable when `immutable` is set"))
    for fld in fields:
        if (new.get(fld) or {}) != (old.get(fld) or {}):
            errs.append(forbidden(fld, "field is immutable when `immutable` is set"))
    return errs


def validate_secret_update(new: Obj, old: Obj) -> list[FieldError]:
    errs = []
    new_type, old_type = new.get("type") or "Opaque", old.get("type") or "Opaque"
    if new_type != old_type:
        errs.append(invalid("type", new_type, "field is immutable"))
    return errs + _immutable_data(new, old, ("data",))


# ---------------------------------------------------------------------------- claims
ACCESS_MODES = ["ReadOnlyMany", "ReadWriteMany", "ReadWriteOnce", "ReadWriteOncePod"]


def validate_pvc(obj: Obj) -> list[FieldError]:
    errs: list[FieldError] = []
    spec = obj.get("spec") or {}
    modes = spec.get("accessModes") or []
    if not modes:
        errs.append(required("spec.accessModes", "at least 1 access mode is required"))
    for mode in modes:
        if mode not in ACCESS_MODES:
            errs.append(not_supported("spec.accessModes", mode, ACCESS_MODES))
    if "ReadWriteOncePod" in modes and any(
        m != "ReadWriteOncePod" and m in ACCESS_MODES for m in modes
    ):
        errs.append(
            forbidden("spec.accessModes", "may not use ReadWriteOncePod with other access modes")
        )
    storage_path = key("spec.resources", "storage")
    requests = (spec.get("resources") or {}).get("requests") or {}
    if "storage" not in requests:
        errs.append(required(storage_path))
    else:
        value = parse_quantity(requests["storage"])
        if value is not None and value <= 0:
            errs.append(
                invalid(storage_path, _qty_text(requests["storage"]), "must be greater than zero")
            )
    sc = spec.get("storageClassName")
    if sc:
        errs += [invalid("spec.storageClassName", sc, m) for m in is_dns1123_subdomain(sc)]
    mode = spec.get("volumeMode")
    if mode is not None and mode not in ("Block", "Filesystem"):
        errs.append(not_supported("spec.volumeMode", mode, ["Block", "Filesystem"]))
    return errs


def _storage(spec: Obj) -> Decimal | None:
    return parse_quantity(((spec.get("resources") or {}).get("requests") or {}).get("storage", 0))


def validate_pvc_update(new: Obj, old: Obj) -> list[FieldError]:
    errs: list[FieldError] = []
    ns, os_ = json.loads(json.dumps(new.get("spec") or {})), old.get("spec") or {}
    old_clone = json.loads(json.dumps(os_))
    if not os_.get("volumeName"):
        if "volumeName" in ns:
            old_clone["volumeName"] = ns["volumeName"]
        else:
            old_clone.pop("volumeName", None)
    if not os_.get("storageClassName") and ns.get("storageClassName"):
        old_clone["storageClassName"] = ns["storageClassName"]  # set once from nil
    bound = (new.get("status") or {}).get("phase") == "Bound"
    if bound and (ns.get("resources") or {}).get("requests"):
        old_storage = ((os_.get("resources") or {}).get("requests") or {}).get("storage")
        ns["resources"]["requests"]["storage"] = old_storage
    if ns != old_clone:
        errs.append(
            forbidden(
                "spec",
                "spec is immutable after creation except resources.requests and volumeAttributesClassName for bound claims\n"
                + spec_diff("core.PersistentVolumeClaimSpec", old_clone, ns),
            )
        )
    new_size, old_size = _storage(new.get("spec") or {}), _storage(os_)
    capacity = parse_quantity(((old.get("status") or {}).get("capacity") or {}).get("storage", 0))
    shrunk = new_size is not None and old_size is not None and new_size < old_size
    if shrunk and capacity is not None and new_size is not None and new_size <= capacity:
        errs.append(
            forbidden(
                "spec.resources.requests.storage", "field can not be less than status.capacity"
            )
        )
    return errs


# ---------------------------------------------------------------------------- rbac
RBAC_GROUP = "rbac.authorization.k8s.io"


def _validate_rules(rules: list[Obj], namespaced: bool) -> list[FieldError]:
    errs: list[FieldError] = []
    for i, rule in enumerate(rules):
        rpath = f"rules[{i}]"
        if not rule.get("verbs"):
            errs.append(required(f"{rpath}.verbs", "verbs must contain at least one value"))
        urls = rule.get("nonResourceURLs") or []
        if urls:
            shown = GoValue("[]string{" + ", ".join(json.dumps(u) for u in urls) + "}")
            if namespaced:
                errs.append(
                    invalid(
                        f"{rpath}.nonResourceURLs",
                        shown,
                        "namespaced rules cannot apply to non-resource URLs",
                    )
                )
            if rule.get("apiGroups") or rule.get("resources") or rule.get("resourceNames"):
                errs.append(
                    invalid(
                        f"{rpath}.nonResourceURLs",
                        shown,
                        "rules cannot apply to both regular resources and non-resource URLs",
                    )
                )
            continue
        if not rule.get("apiGroups"):
            errs.append(
                required(f"{rpath}.apiGroups", "resource rules must supply at least one api group")
            )
        if not rule.get("resources"):
            errs.append(
                required(f"{rpath}.resources", "resource rules must supply at least one resource")
            )
        if rule.get("resourceNames") and len(rule.get("resources") or []) > 1:
            errs.append(
                required(
                    f"{rpath}.resourceNames", "resource names cannot apply to multiple resources"
                )
            )
    return errs


def _role_ref_repr(ref: Obj) -> GoValue:
    return GoValue(
        f'rbac.RoleRef{{APIGroup:"{ref.get("apiGroup", "")}", Kind:"{ref.get("kind", "")}", Name:"{ref.get("name", "")}"}}'
    )


def _validate_binding(obj: Obj, namespaced: bool) -> list[FieldError]:
    errs: list[FieldError] = []
    ref = obj.get("roleRef") or {}
    if ref.get("apiGroup", "") != RBAC_GROUP:
        errs.append(not_supported("roleRef.apiGroup", ref.get("apiGroup", ""), [RBAC_GROUP]))
    kinds = ["Role", "ClusterRole"] if namespaced else ["ClusterRole"]
    if ref.get("kind", "") not in kinds:
        errs.append(not_supported("roleRef.kind", ref.get("kind", ""), kinds))
    if not ref.get("name"):
        errs.append(required("roleRef.name"))
    else:
        errs += [invalid("roleRef.name", ref["name"], m) for m in is_path_segment_name(ref["name"])]
    for i, subject in enumerate(obj.get("subjects") or []):
        spath = f"subjects[{i}]"
        name, kind = subject.get("name") or "", subject.get("kind") or ""
        api_group = subject.get("apiGroup")
        if not name:
            errs.append(required(f"{spath}.name"))
        if kind == "ServiceAccount":
            if name:
                errs += [invalid(f"{spath}.name", name, m) for m in is_dns1123_subdomain(name)]
            if api_group:
                errs.append(not_supported(f"{spath}.apiGroup", api_group, [""]))
            if not namespaced and not subject.get("namespace"):
                errs.append(required(f"{spath}.namespace"))
        elif kind in ("User", "Group"):
            if not name:
                errs.append(invalid(f"{spath}.name", name, f"{kind.lower()} name cannot be empty"))
            # v1 defaulting fills an empty apiGroup of User/Group subjects with the RBAC group.
            if (api_group or RBAC_GROUP) != RBAC_GROUP:
                errs.append(not_supported(f"{spath}.apiGroup", api_group, [RBAC_GROUP]))
        else:
            errs.append(not_supported(f"{spath}.kind", kind, ["ServiceAccount", "User", "Group"]))
    return errs


def _default_role_ref(ref: Obj) -> Obj:
    return {
        "apiGroup": ref.get("apiGroup", ""),
        "kind": ref.get("kind", ""),
        "name": ref.get("name", ""),
    }


# ---------------------------------------------------------------------------- events
EVENT_LIMITS = (("reportingInstance", 128), ("action", 128), ("reason", 128), ("message", 1024))


def validate_event(obj: Obj) -> list[FieldError]:
    """legacyValidateEvent (events.go), which every Event passes, in either API.

    The emulator stores events.k8s.io Events in the v1 form: ``reportingComponent`` there is
    the internal ``ReportingController`` the real messages name.
    """
    errs: list[FieldError] = []
    namespace = (obj.get("metadata") or {}).get("namespace") or ""
    involved = obj.get("involvedObject") or {}
    inv_ns = involved.get("namespace") or ""
    mismatch = invalid("involvedObject.namespace", inv_ns, "does not match event.namespace")
    if not obj.get("eventTime"):
        if not inv_ns:
            if namespace not in ("", "default"):
                errs.append(mismatch)
        elif namespace != inv_ns:
            errs.append(mismatch)
    else:
        if not inv_ns and namespace not in ("default", "kube-system"):
            errs.append(mismatch)
        controller = obj.get("reportingComponent") or ""
        if not controller:
            errs.append(required("reportingController"))
        errs += [
            invalid("reportingController", controller, m) for m in is_qualified_name(controller)
        ]
        for fld, limit in EVENT_LIMITS:
            value = obj.get(fld) or ""
            if not value and fld != "message":
                errs.append(required(fld))
            if len(value) > limit:
                errs.append(invalid(fld, "", f"can have at most {limit} characters"))
    errs += [invalid("namespace", namespace, m) for m in is_dns1123_subdomain(namespace)]
    return errs


def validate_events_v1(obj: Obj) -> list[FieldError]:
    """ValidateEventCreate's strict part for events.k8s.io/v1: eventTime and type.

    (Its "needs to be unset" checks on the deprecated fields are not made: the emulator keeps
    only the v1 form, in which they cannot be told apart from the conversion's.)
    """
    errs: list[FieldError] = []
    if not obj.get("eventTime"):
        errs.append(required("eventTime"))
    event_type = obj.get("type") or ""
    if event_type not in ("Normal", "Warning"):
        errs.append(invalid("type", "", f"has invalid value: {event_type}"))
    return errs


# ---------------------------------------------------------------------------- entry points
def _kind_rules(kind: str, group: str, obj: Obj) -> list[FieldError]:
    if group == "":
        if kind == "Pod":
            return validate_pod_spec(obj.get("spec") or {})
        if kind == "Service":
            return validate_service(obj)
        if kind == "ConfigMap":
            return validate_config_map(obj)
        if kind == "Secret":
            return validate_secret(obj)
        if kind == "PersistentVolumeClaim":
            return validate_pvc(obj)
        if kind == "Event":
            return validate_event(obj)
    if group == "events.k8s.io" and kind == "Event":
        return validate_event(obj) + validate_events_v1(obj)
    if group == RBAC_GROUP:
        if kind in ("Role", "ClusterRole"):
            return _validate_rules(obj.get("rules") or [], kind == "Role")
        if kind in ("RoleBinding", "ClusterRoleBinding"):
            return _validate_binding(obj, kind == "RoleBinding")
    return []


def validate_create(kind: str, group: str, obj: Obj, namespaced: bool = True) -> list[FieldError]:
    """What the kind's Validate (strategy) returns for a new object."""
    meta = obj.get("metadata") or {}
    errs = validate_object_meta(kind, group, meta, namespaced)
    return errs + _kind_rules(kind, group, obj)


def validate_update(
    kind: str, group: str, new: Obj, old: Obj, namespaced: bool = True
) -> list[FieldError]:
    """What the kind's ValidateUpdate returns (metadata immutables, then the kind's rules)."""
    errs = validate_object_meta_update(new, old)
    errs += validate_create(kind, group, new, namespaced)
    if group == "":
        if kind == "Pod":
            errs += validate_pod_update(new, old)
        elif kind == "Service":
            errs += validate_service_update(new, old)
        elif kind == "Secret":
            errs += validate_secret_update(new, old)
        elif kind == "ConfigMap":
            errs += _immutable_data(new, old, ("data", "binaryData"))
        elif kind == "PersistentVolumeClaim":
            errs += validate_pvc_update(new, old)
    elif group == RBAC_GROUP and kind in ("RoleBinding", "ClusterRoleBinding"):
        new_ref, old_ref = new.get("roleRef") or {}, old.get("roleRef") or {}
        if _default_role_ref(new_ref) != _default_role_ref(old_ref):
            errs.append(invalid("roleRef", _role_ref_repr(new_ref), "cannot change roleRef"))
    return errs
