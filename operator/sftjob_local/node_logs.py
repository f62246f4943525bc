"""Container logs of the local node, as the kubelet keeps and serves them (pure helpers).

Layout, like the kubelet's /var/log/pods (pkg/kubelet/kuberuntime/helpers.go
BuildPodLogsDirectory / BuildContainerLogsDirectory):

    <log_dir>/<namespace>_<pod>_<uid>/<container>/<instance>.log

`instance` is the container's restart count at that run, so a re-created pod
(same name, new uid) never sees its predecessor's output and each restart
keeps its own file. The container ID the node reports
(`local://<uid>/<container>/<instance>`) names the file, as a CRI container ID
names the kubelet's log file.

Files are in the CRI log format (`<RFC3339Nano> <stream> <F|P> <text>`, written
by node_supervisor); a line in another format is served verbatim.

Which instance `pods/<name>/log` reads follows the kubelet's
validateContainerLogStatus (pkg/kubelet/kubelet_pods.go): `previous` → the
`lastState.terminated` instance, else the running/terminated one, and a waiting
container with a previous instance serves that one; the error messages are the
kubelet's. Options follow ReadLogs (pkg/kubelet/kuberuntime/logs): `tailLines`
counts records from the end, then `sinceSeconds`/`sinceTime` drop older
records, `timestamps` prefixes each record with its timestamp, `limitBytes`
caps the bytes sent; PodLogOptions validation (pkg/apis/core/validation
ValidatePodLogOptions) gives 422.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

Obj = dict[str, Any]

CONTAINER_ID_SCHEME = "local://"


def pod_log_dir(log_dir: Path, namespace: str, pod: str, uid: str) -> Path:
    return log_dir / f"{namespace}_{pod}_{uid}"


def container_log_path(
    log_dir: Path, namespace: str, pod: str, uid: str, container: str, instance: int
) -> Path:
    return pod_log_dir(log_dir, namespace, pod, uid) / container / f"{instance}.log"


def container_id(uid: str, container: str, instance: int) -> str:
    return f"{CONTAINER_ID_SCHEME}{uid}/{container}/{instance}"


def instance_of(cid: str | None) -> int | None:
    """The run number inside a container ID of this node (None for others)."""
    if not cid or not cid.startswith(CONTAINER_ID_SCHEME):
        return None
    tail = cid.rsplit("/", 1)[-1]
    return int(tail) if tail.isdigit() else None


# ---------------------------------------------------------------------------- options
@dataclass
class LogOptions:
    container: str | None = None
    previous: bool = False
    follow: bool = False
    timestamps: bool = False
    tail_lines: int | None = None
    limit_bytes: int | None = None
    since: float | None = None  # epoch seconds


def _truthy(value: str | None) -> bool:
    return (value or "").lower() in ("true", "1", "yes")


def parse_time(text: str) -> float:
    """RFC 3339 (with or without fraction) → epoch seconds."""
    match = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(\.\d+)?(Z|[+-]\d\d:\d\d)", text)
    if not match:
        raise ValueError(text)
    base, frac, zone = match.groups()
    stamp = datetime.fromisoformat(base + ("+00:00" if zone == "Z" else zone))
    return stamp.timestamp() + (float("0" + frac) if frac else 0.0)


def parse_options(query: Mapping[str, str], now: float) -> tuple[LogOptions, list[Obj]]:
    """Query → options, plus the validation causes (field, message) a real
    apiserver returns 422 for (ValidatePodLogOptions)."""
    causes: list[Obj] = []
    opts = LogOptions(
        container=query.get("container") or None,
        previous=_truthy(query.get("previous")),
        follow=_truthy(query.get("follow")),
        timestamps=_truthy(query.get("timestamps")),
    )

    def integer(key: str) -> int | None:
        if query.get(key) in (None, ""):
            return None
        try:
            return int(query[key])
        except ValueError:
            causes.append({"reason": "FieldValueInvalid", "field": key, "message": f"Invalid value: {query[key]!r}: must be an integer"})  # fmt: skip
            return None

    opts.tail_lines = integer("tailLines")
    if opts.tail_lines is not None and opts.tail_lines < 0:
        causes.append({"reason": "FieldValueInvalid", "field": "tailLines", "message": f"Invalid value: {opts.tail_lines}: must be greater than or equal to 0"})  # fmt: skip
    opts.limit_bytes = integer("limitBytes")
    if opts.limit_bytes is not None and opts.limit_bytes < 1:
        causes.append({"reason": "FieldValueInvalid", "field": "limitBytes", "message": f"Invalid value: {opts.limit_bytes}: must be greater than 0"})  # fmt: skip
    since_seconds = integer("sinceSeconds")
    since_time = query.get("sinceTime") or None
    if since_seconds is not None and since_time is not None:
        causes.append({"reason": "FieldValueForbidden", "field": "", "message": "at most one of `sinceTime` or `sinceSeconds` may be specified"})  # fmt: skip
    if since_seconds is not None:
        if since_seconds < 1:
            causes.append({"reason": "FieldValueInvalid", "field": "sinceSeconds", "message": f"Invalid value: {since_seconds}: must be greater than 0"})  # fmt: skip
        opts.since = now - since_seconds
    elif since_time is not None:
        try:
            opts.since = parse_time(since_time)
        except ValueError:
            causes.append({"reason": "FieldValueInvalid", "field": "sinceTime", "message": f"Invalid value: {since_time!r}: must be an RFC3339 time"})  # fmt: skip
    return opts, causes


# ---------------------------------------------------------------------------- which file
def choose_instance(pod: Obj, container: str, previous: bool) -> tuple[int | None, str | None]:
    """(instance, None) to read, or (None, the kubelet's error message)."""
    name = pod["metadata"]["name"]
    status = pod.get("status") or {}
    found: Obj | None = None
    for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
        for st in status.get(key) or []:
            if st.get("name") == container:
                found = st
    waiting = f'container "{container}" in pod "{name}" is waiting to start: '
    if found is None:
        return None, waiting + "ContainerCreating"
    state = found.get("state") or {}
    last_terminated = (found.get("lastState") or {}).get("terminated")
    if previous:
        if not last_terminated or instance_of(last_terminated.get("containerID")) is None:
            return None, f'previous terminated container "{container}" in pod "{name}" not found'
        return instance_of(last_terminated.get("containerID")), None
    if "running" in state:
        cid = found.get("containerID")
    elif "terminated" in state:
        cid = found.get("containerID") or state["terminated"].get("containerID")
        if not cid:
            return None, f'container "{container}" in pod "{name}" is terminated'
    elif last_terminated:
        cid = last_terminated.get("containerID")
    else:
        reason = (state.get("waiting") or {}).get("reason") or "ContainerCreating"
        return None, waiting + reason
    instance = instance_of(cid)
    if instance is None:
        return None, waiting + "ContainerCreating"
    return instance, None


def instance_running(pod: Obj | None, uid: str, container: str, instance: int) -> bool:
    """Whether that run of the container is still going (ends a follow)."""
    if pod is None or pod["metadata"].get("uid") != uid:
        return False
    status = pod.get("status") or {}
    for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses"):
        for st in status.get(key) or []:
            if st.get("name") == container:
                return (
                    "running" in (st.get("state") or {})
                    and instance_of(st.get("containerID")) == instance
                )
    return False


# ---------------------------------------------------------------------------- records
_RECORD = re.compile(rb"(\S+) (stdout|stderr) (F|P) (.*)", re.DOTALL)


def parse_record(line: bytes) -> tuple[bytes | None, float | None, bytes]:
    """One file line (without its newline) → (timestamp text, epoch, output bytes).

    A CRI record gives its content plus a newline unless it is partial; any other
    line is its own output (no timestamp)."""
    match = _RECORD.fullmatch(line)
    if not match:
        return None, None, line + b"\n"
    ts, _stream, tag, text = match.groups()
    try:
        epoch = parse_time(ts.decode())
    except ValueError:
        return None, None, line + b"\n"
    return ts, epoch, text if tag == b"P" else text + b"\n"


def render(data: bytes, opts: LogOptions, *, tail: bool = True) -> bytes:
    """Whole lines of a log file → what `kubectl logs` receives (before limitBytes)."""
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if tail and opts.tail_lines is not None:
        lines = lines[len(lines) - opts.tail_lines :] if opts.tail_lines else []
    out = []
    for line in lines:
        ts, epoch, text = parse_record(line)
        if opts.since is not None and epoch is not None and epoch < opts.since:
            continue
        if opts.timestamps and ts is not None:
            out.append(ts + b" " + text)
        else:
            out.append(text)
    return b"".join(out)


def complete_part(data: bytes) -> tuple[bytes, bytes]:
    """Split read bytes into whole lines and an unfinished rest."""
    cut = data.rfind(b"\n") + 1
    return data[:cut], data[cut:]
