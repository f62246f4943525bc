"""Pure helpers of the local node: Pod spec → what to run (no I/O, no asyncio).

Kept apart from the process and HTTP code so the rules (GPU requests,
`$(VAR)` expansion, mount-path rewriting, downward API, quantities, the
termination message) read as one place and can be tested directly.
"""

from __future__ import annotations

import math
import re
import secrets
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

Obj = dict[str, Any]

TERMINAL_PHASES = ("Succeeded", "Failed")
MAX_TERMINATION_MESSAGE = 4096
FALLBACK_LOG_LINES = 80
FALLBACK_LOG_BYTES = 2048


# ---------------------------------------------------------------------------- GPUs
def gpu_requests(pod: Obj) -> dict[str, int]:
    """GPUs a pod asks for, by resource name (any `<vendor>/gpu`).

    Like the scheduler: per container max(request, limit) (extended resources
    must have request == limit anyway), summed over containers; init containers
    run one at a time, so the pod needs max(sum(containers), max(init)).
    """

    def of(containers: list[Obj]) -> list[dict[str, int]]:
        out = []
        for c in containers or []:
            res = c.get("resources") or {}
            asked: dict[str, int] = {}
            for section in ("limits", "requests"):
                for name, qty in (res.get(section) or {}).items():
                    if name.endswith("/gpu"):
                        asked[name] = max(asked.get(name, 0), int(parse_quantity(qty)))
            out.append(asked)
        return out

    spec = pod.get("spec") or {}
    total: dict[str, int] = {}
    for asked in of(spec.get("containers") or []):
        for name, n in asked.items():
            total[name] = total.get(name, 0) + n
    for asked in of(spec.get("initContainers") or []):
        for name, n in asked.items():
            total[name] = max(total.get(name, 0), n)
    return {k: v for k, v in total.items() if v > 0}


def gpu_count(pod: Obj) -> int:
    return sum(gpu_requests(pod).values())


def is_terminal(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") in TERMINAL_PHASES


# ---------------------------------------------------------------------------- quantities
_SUFFIX: dict[str, Any] = {
    "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60,
    "n": Decimal("1e-9"), "u": Decimal("1e-6"), "m": Decimal("1e-3"),
    "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18,
}  # fmt: skip


def parse_quantity(qty: Any) -> Decimal:
    """Kubernetes quantity ("500m", "2Gi", "1e3", 4) → Decimal."""
    if isinstance(qty, int | float):
        return Decimal(str(qty))
    text = str(qty).strip()
    match = re.fullmatch(r"([+-]?[0-9.]+(?:[eE][+-]?[0-9]+)?)([a-zA-Z]*)", text)
    if not match or (match.group(2) and match.group(2) not in _SUFFIX):
        raise ValueError(f"invalid quantity {qty!r}")
    number, suffix = match.groups()
    return Decimal(number) * Decimal(str(_SUFFIX[suffix]) if suffix else 1)


# ---------------------------------------------------------------------------- $(VAR)
def expand(text: str, env: dict[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined vars are replaced, `$$` escapes,
    unknown references stay verbatim (k8s.io/kubernetes third_party/forked/golang/expansion)."""
    out = []
    i = 0
    n = len(text)
    while i < n:
        ch = text[i]
        if ch == "$" and i + 1 < n:
            nxt = text[i + 1]
            if nxt == "$":
                out.append("$")
                i += 2
                continue
            if nxt == "(":
                end = text.find(")", i + 2)
                if end != -1:
                    name = text[i + 2 : end]
                    if name in env:
                        out.append(env[name])
                    else:
                        out.append(text[i : end + 1])
                    i = end + 1
                    continue
        out.append(ch)
        i += 1
    return "".join(out)


# ---------------------------------------------------------------------------- mounts
@dataclass
class MountMap:
    """Container paths (mountPath, terminationMessagePath, workingDir) → real host paths.

    Rule: an occurrence of a mapped container path inside a string is rewritten
    when it stands as a whole path prefix: preceded by the start or a non-path
    character (space, `=`, `:`, quotes, ...) and followed by the end, `/` or a
    non-path character. Longest prefixes win, so `/data/ckpt` mounted inside
    `/data` maps to its own folder.
    """

    paths: dict[str, str] = field(default_factory=dict)

    def add(self, container_path: str, real: str) -> None:
        container_path = container_path.rstrip("/") or "/"
        self.paths[container_path] = real

    def _pattern(self) -> re.Pattern[str] | None:
        keys = sorted((p for p in self.paths if p != "/"), key=len, reverse=True)
        if not keys:
            return None
        alt = "|".join(re.escape(k) for k in keys)
        return re.compile(rf"(?<![\w.\-/])({alt})(?![\w.\-])")

    def rewrite(self, text: str) -> str:
        pattern = self._pattern()
        if pattern is None or not text:
            return text
        return pattern.sub(lambda m: self.paths[m.group(1)], text)

    def resolve(self, path: str) -> str | None:
        """Real path of one container path (None when outside every mapping)."""
        path = path.rstrip("/") or "/"
        for key in sorted(self.paths, key=len, reverse=True):
            if path == key:
                return self.paths[key]
            if path.startswith(key + "/"):
                return self.paths[key] + path[len(key) :]
        return None


# ---------------------------------------------------------------------------- downward API
class FieldError(ValueError):
    pass


def field_ref(pod: Obj, path: str, node_name: str, pod_ip: str) -> str:
    meta = pod.get("metadata") or {}
    spec = pod.get("spec") or {}
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", "default"),
        "metadata.uid": meta.get("uid", ""),
        "spec.nodeName": spec.get("nodeName") or node_name,
        "spec.serviceAccountName": spec.get("serviceAccountName") or "default",
        "status.podIP": pod_ip,
        "status.podIPs": pod_ip,
        "status.hostIP": "127.0.0.1",
        "status.hostIPs": "127.0.0.1",
    }
    if path in simple:
        return str(simple[path])
    match = re.fullmatch(r"metadata\.(labels|annotations)\[['\"]?(.+?)['\"]?\]", path)
    if match:
        return str((meta.get(match.group(1)) or {}).get(match.group(2), ""))
    if path in ("metadata.labels", "metadata.annotations"):
        items = sorted((meta.get(path.split(".")[1]) or {}).items())
        return "\n".join(f'{k}="{v}"' for k, v in items)
    raise FieldError(f"unsupported fieldRef {path!r}")


def resource_field_ref(container: Obj | None, ref: Obj, node_allocatable: dict[str, str]) -> str:
    """`resourceFieldRef` value: the container's limit (or request), falling
    back to node allocatable for unset limits, divided by `divisor` and rounded up."""
    resource = ref.get("resource", "")
    section, _, name = resource.partition(".")
    res = (container or {}).get("resources") or {}
    qty = (res.get(section) or {}).get(name)
    if qty is None and section == "limits":
        qty = node_allocatable.get(name)
    if qty is None:
        qty = 0
    divisor = parse_quantity(ref.get("divisor") or 1)
    if divisor == 0:
        divisor = Decimal(1)
    return str(math.ceil(parse_quantity(qty) / divisor))


# ---------------------------------------------------------------------------- messages
def termination_message(
    file_bytes: bytes, log_tail: bytes, policy: str | None, exit_code: int
) -> str:
    """Message for `state.terminated.message` like the kubelet builds it."""
    msg = file_bytes[-MAX_TERMINATION_MESSAGE:] if file_bytes else b""
    if not msg.strip() and policy == "FallbackToLogsOnError" and exit_code != 0:
        lines = log_tail.splitlines(keepends=True)[-FALLBACK_LOG_LINES:]
        msg = b"".join(lines)[-FALLBACK_LOG_BYTES:]
    return msg.decode("utf-8", errors="replace")


def unschedulable_message(resource: str, nodes: int = 1) -> str:
    return f"0/{nodes} nodes are available: {nodes} Insufficient {resource}."


def container_path_default(container: Obj) -> str:
    return container.get("terminationMessagePath") or "/dev/termination-log"


# ---------------------------------------------------------------------------- images
# The docker reference grammar (github.com/distribution/reference, regexp.go),
# which the kubelet applies through ParseNormalizedNamed before pulling.
_ALNUM = r"[a-z0-9]+"
_SEPARATOR = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEPARATOR}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*|\[[a-fA-F0-9:]+\])"
_DOMAIN = rf"{_HOST}(?::[0-9]+)?"
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}"
_NAME = rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_REFERENCE = re.compile(rf"({_NAME})(?::{_TAG})?(?:@{_DIGEST})?")
NAME_TOTAL_LENGTH_MAX = 255


def _split_docker_domain(name: str) -> tuple[str, str]:
    """reference.splitDockerDomain: (domain, remainder) with docker.io/library defaults."""
    i = name.find("/")
    first = name[:i]
    if i == -1 or (
        not any(ch in first for ch in ".:") and first != "localhost" and first.lower() == first
    ):
        domain, remainder = "docker.io", name
    else:
        domain, remainder = first, name[i + 1 :]
    if domain == "index.docker.io":
        domain = "docker.io"
    if domain == "docker.io" and "/" not in remainder:
        remainder = "library/" + remainder
    return domain, remainder


def image_reference_problem(image: str) -> str | None:
    """Why the kubelet cannot parse `image`, in the words of the reference library
    (ParseNormalizedNamed: the lowercase check on the repository, then the grammar), or None."""
    if re.fullmatch(r"[a-f0-9]{64}", image):
        return f"invalid repository name ({image}), cannot specify 64-byte hexadecimal strings"
    domain, remainder = _split_docker_domain(image)
    remote = remainder.split(":", 1)[0]
    if remote.lower() != remote:
        return f"invalid reference format: repository name ({remote}) must be lowercase"
    match = _REFERENCE.fullmatch(f"{domain}/{remainder}")
    if match is None:
        return "invalid reference format"
    if len(match.group(1)) > NAME_TOTAL_LENGTH_MAX:
        return "invalid reference format: repository name must not be more than 255 characters"
    return None


def memory_limit_bytes(container: Obj) -> int:
    """The container's memory limit in bytes (0: none)."""
    qty = ((container.get("resources") or {}).get("limits") or {}).get("memory")
    if qty in (None, ""):
        return 0
    try:
        return max(int(parse_quantity(qty)), 0)
    except ValueError:
        return 0


def pod_event(
    pod: dict[str, Any],
    reason: str,
    message: str,
    type_: str,
    *,
    resource_version: bool = False,
    **fields: Any,
) -> dict[str, Any]:
    """A core/v1 Event about a pod, as the kubelet and the scheduler write it.

    The common part: a fresh `<pod>.<hex>` name in the pod's namespace, the pod
    as involvedObject (with its resourceVersion where `resource_version`),
    reason, message and type; `fields` adds the recorder's own keys after them
    (the kubelet's source/first/lastTimestamp/count, the scheduler's
    action/eventTime/reportingController form)."""
    meta = pod["metadata"]
    ns = meta.get("namespace", "default")
    involved = {
        "apiVersion": "v1",
        "kind": "Pod",
        "name": meta["name"],
        "namespace": ns,
        "uid": meta.get("uid"),
    }
    if resource_version:
        involved["resourceVersion"] = meta.get("resourceVersion")
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{meta['name']}.{secrets.token_hex(8)}", "namespace": ns},
        "involvedObject": involved,
        "reason": reason,
        "message": message,
        "type": type_,
        **fields,
    }


# ---------------------------------------------------------------------------- runAsNonRoot
MAX_USER_ID = 2**31 - 1


def image_user(user: str) -> tuple[int | None, str]:
    """The (uid, username) the runtime reports for an image's USER (`uid[:gid]`, `name[:group]`
    or empty): a numeric user is a uid, a name is a username, an empty USER is root
    (kuberuntime getImageUser: "if none of them is set, treat it as root")."""
    name = user.split(":", 1)[0]
    if not name:
        return 0, ""
    return (int(name), "") if name.isdigit() else (None, name)


def run_as_non_root_error(pod: Obj, container: Obj, user: str | None) -> str | None:
    """pkg/kubelet/kuberuntime/security_context_others.go verifyRunAsNonRoot: why the kubelet
    refuses to start `container` (CreateContainerConfigError), or None. `user` is the image's
    USER; None when the node cannot know it (the local node never pulls images): then only the
    pod's own runAsUser is checked."""
    pod_context = (pod.get("spec") or {}).get("securityContext") or {}
    context = container.get("securityContext") or {}
    # securitycontext.DetermineEffectiveSecurityContext: the container's field over the pod's.
    non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
    run_as = context.get("runAsUser", pod_context.get("runAsUser"))
    if not non_root:
        return None
    meta = pod.get("metadata") or {}
    # format.Pod: name_namespace(uid)
    where = (
        f'(pod: "{meta.get("name", "")}_{meta.get("namespace", "")}({meta.get("uid", "")})", '
        f"container: {container.get('name', '')})"
    )
    if run_as is not None:
        return f"container's runAsUser breaks non-root policy {where}" if run_as == 0 else None
    if user is None:
        return None
    uid, username = image_user(user)
    if uid is None:
        return (
            f"container has runAsNonRoot and image has non-numeric user ({username}), "
            f"cannot verify user is non-root {where}"
        )
    if uid == 0:
        return f"container has runAsNonRoot and image will run as root {where}"
    if uid > MAX_USER_ID:
        return (
            f"container has runAsNonRoot and image has an invalid user id ({uid}). "
            f"(Must be 1-({MAX_USER_ID})): must be between 0 and {MAX_USER_ID}, inclusive {where}"
        )
    return None
