"""Pod Security Admission: the Pod Security Standards a namespace's labels ask for.

The built-in PodSecurity admission plugin of a v1.32 API server (k8s.io/pod-security-admission
v0.32: ``policy/check_*.go`` for the checks, ``admission/admission.go`` for when they run,
``api/helpers.go`` for the labels). A namespace labelled
``pod-security.kubernetes.io/enforce=<privileged|baseline|restricted>`` (and optionally
``enforce-version=<latest|v1.N>``) refuses a pod that breaks the level with 403 Forbidden::

    pods "x" is forbidden: violates PodSecurity "restricted:latest": allowPrivilegeEscalation != false
    (container "c" must set securityContext.allowPrivilegeEscalation=false), ...

``warn`` (defaulting to the enforce level when that is stricter, as the server does) adds a
``would violate PodSecurity ...`` warning to an admitted pod; ``audit`` writes audit-log
annotations, which the emulator has no audit log for, so it is parsed only. Pod creates and
updates that change a container image are checked (status, binding, eviction and the other
subresources are not); namespace labels are validated (422 on a bad level or version), and a
namespace update that tightens ``enforce`` warns about the existing pods it would refuse.
No exemptions (the server's default configuration); no pod controllers (Deployments' pod
templates are not checked, the emulator runs no ReplicaSets).

"latest" is the newest policy this server knows, v1.32; a later version is evaluated as
v1.32 and an older one with the checks of its time.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import errors, validation
from .errors import ApiError
from .rbac import forbidden
from .resources import ResourceType

LABEL_PREFIX = "pod-security.kubernetes.io/"
LEVELS = ("privileged", "baseline", "restricted")
MODES = ("enforce", "audit", "warn")
MAX_VERSION = (1, 32)  # the emulator serves v1.32 (server.VERSION)
IGNORED_POD_SUBRESOURCES = {
    "exec",
    "attach",
    "binding",
    "eviction",
    "log",
    "portforward",
    "proxy",
    "status",
}
_VERSION = re.compile(r"^v1\.([0-9]|[1-9][0-9]*)$")

Version = tuple[int, int] | None  # None: "latest"
Verdict = tuple[str, str] | None  # (forbidden reason, detail) or None when allowed
PodCheck = Callable[[Mapping[str, Any], Mapping[str, Any]], Verdict]


# ------------------------------------------------------------------ levels and versions
@dataclass(frozen=True)
class LevelVersion:
    level: str = "privileged"
    version: Version = None

    def __str__(self) -> str:
        version = "latest" if self.version is None else f"v{self.version[0]}.{self.version[1]}"
        return f"{self.level}:{version}"


def _parse_level(value: str) -> tuple[str, str | None]:
    if value in LEVELS:
        return value, None
    return "restricted", "must be one of " + ", ".join(LEVELS)


def _parse_version(value: str) -> tuple[Version, str | None]:
    if value == "latest":
        return None, None
    match = _VERSION.match(value)
    if not match:
        return None, 'must be "latest" or "v1.x"'
    return (1, int(match.group(1))), None


def _strictness(level: str) -> int:
    return LEVELS.index(level) if level in LEVELS else 0


def policy_of(labels: Mapping[str, str]) -> tuple[dict[str, LevelVersion], list[Any]]:
    """api.PolicyToEvaluate: each mode's level:version from the labels (default privileged:latest),
    and the label errors (field errors). A bad enforce level is evaluated as restricted; a bad
    warn or audit level as privileged (fail open)."""
    policy = {mode: LevelVersion() for mode in MODES}
    problems: list[Any] = []
    has: set[str] = set()
    for mode in MODES:
        level_label, version_label = LABEL_PREFIX + mode, f"{LABEL_PREFIX}{mode}-version"
        level, version = policy[mode].level, policy[mode].version
        if level_label in labels:
            level, problem = _parse_level(labels[level_label])
            if problem:
                problems.append(_label_error(level_label, labels[level_label], problem))
                if mode != "enforce":
                    level = "privileged"
            else:
                has.add(mode)
        if version_label in labels:
            version, problem = _parse_version(labels[version_label])
            if problem:
                problems.append(_label_error(version_label, labels[version_label], problem))
            has.add(f"{mode}-version")
        policy[mode] = LevelVersion(level, version)
    # The warn level defaults to the enforce level when that is set and stricter.
    enforce, warn = policy["enforce"], policy["warn"]
    if (
        "warn" not in has
        and "enforce" in has
        and _strictness(enforce.level) > _strictness(warn.level)
    ):
        policy["warn"] = LevelVersion(
            enforce.level, warn.version if "warn-version" in has else enforce.version
        )
    return policy, problems


def _label_error(label: str, value: str, detail: str) -> Any:
    return validation.invalid(f"metadata.labels[{label}]", value, detail)


# ------------------------------------------------------------------ helpers of the checks
def _join_quote(items: list[str]) -> str:
    return '"' + '", "'.join(items) + '"' if items else ""


def _plural(singular: str, plural: str, count: int) -> str:
    return singular if count == 1 else plural


def _containers(spec: Mapping[str, Any]) -> Iterator[Mapping[str, Any]]:
    """visitContainers: init containers, containers, then ephemeral containers."""
    for key in ("initContainers", "containers", "ephemeralContainers"):
        yield from spec.get(key) or []


def _context(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    return obj.get("securityContext") or {}


def _named(kind: str, names: list[str]) -> str:
    return f"{_plural(kind, kind + 's', len(names))} {_join_quote(names)}"


def _setters(pod_bad: bool, containers: list[str]) -> list[str]:
    """badSetters: "pod" and/or `container(s) "a", "b"`."""
    return (["pod"] if pod_bad else []) + ([_named("container", containers)] if containers else [])


def _windows(spec: Mapping[str, Any]) -> bool:
    return (spec.get("os") or {}).get("name") == "windows"


def _not_on_windows(check: PodCheck) -> PodCheck:
    """The 1.25 variants: a pod whose spec.os.name is windows is exempt."""

    def checked(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict:
        return None if _windows(spec) else check(meta, spec)

    return checked


# ------------------------------------------------------------------ baseline checks
def app_armor_profile(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict:
    allowed = ("RuntimeDefault", "Localhost")
    bad_values: set[str] = set()
    pod_profile = _context(spec).get("appArmorProfile")
    pod_bad = pod_profile is not None and pod_profile.get("type", "") not in allowed
    if pod_bad:
        bad_values.add(pod_profile.get("type", ""))
    containers = []
    for container in _containers(spec):
        profile = _context(container).get("appArmorProfile")
        if profile is not None and profile.get("type", "") not in allowed:
            containers.append(container["name"])
            bad_values.add(profile.get("type", ""))
    setters = _setters(pod_bad, containers)
    annotations = sorted(
        f"{key}={json.dumps(value, ensure_ascii=False)}"
        for key, value in (meta.get("annotations") or {}).items()
        if key.startswith("container.apparmor.security.beta.kubernetes.io/")
        and not (value in ("", "runtime/default") or value.startswith("localhost/"))
    )
    values = sorted(bad_values) + annotations
    if annotations:
        setters.append(_plural("annotation", "annotations", len(annotations)))
    if not setters:
        return None
    reason = _plural("forbidden AppArmor profile", "forbidden AppArmor profiles", len(values))
    return (
        reason,
        f"{' and '.join(setters)} must not set AppArmor profile type to {_join_quote(values)}",
    )


DEFAULT_CAPABILITIES = {
    "AUDIT_WRITE",
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "MKNOD",
    "NET_BIND_SERVICE",
    "SETFCAP",
    "SETGID",
    "SETPCAP",
    "SETUID",
    "SYS_CHROOT",
}


def capabilities_baseline(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict:
    containers, added = [], set()
    for container in _containers(spec):
        capabilities = _context(container).get("capabilities")
        if capabilities is None:
            continue
        extra = [c for c in capabilities.get("add") or [] if c not in DEFAULT_CAPABILITIES]
        if extra:
            containers.append(container["name"])
            added.update(extra)
    if not containers:
        return None
    return "non-default capabilities", (
        f"{_named('container', containers)} must not include "
        f"{_join_quote(sorted(added))} in securityContext.capabilities.add"
    )


def host_namespaces(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict:
    shared = [f"{key}=true" for key in ("hostNetwork", "hostPID", "hostIPC") if spec.get(key)]
    return ("host namespaces", ", ".join(shared)) if shared else None


def host_path_volumes(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict:
    names = [v["name"] for v in spec.get("volumes") or [] if v.get("hostPath") is not None]
    return ("hostPath volumes", _named("volume", names)) if names else None


def host_ports(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict:
    containers, ports = [], set()
    for container in _containers(spec):
        used = [str(p["hostPort"]) for p in container.get("ports") or [] if p.get("hostPort")]
        if used:
            containers.append(container["name"])
            ports.update(used)
    if not containers:
        return None
    # sets.String.List(): the port numbers sorted as strings.
    return "hostPort", (
        f"{_named('container', containers)} {_plural('uses', 'use', len(containers))} "
        f"{_plural('hostPort', 'hostPorts', len(ports))} {', '.join(sorted(ports))}"
    )


def privileged(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict:
    names = [c["name"] for c in _containers(spec) if _context(c).get("privileged") is True]
    if not names:
        return None
    return (
        "privileged",
        f"{_named('container', names)} must not set securityContext.privileged=true",
    )


def proc_mount(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict:
    containers, types = [], set()
    for container in _containers(spec):
        value = _context(container).get("procMount")
        if value is not None and value != "Default":
            containers.append(container["name"])
            types.add(value)
    if not containers:
        return None
    return "procMount", (
        f"{_named('container', containers)} must not set securityContext.procMount to "
        f"{_join_quote(sorted(types))}"
    )


def _se_linux_options(allowed_types: set[str]) -> PodCheck:
    def check(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict:
        bad_types: set[str] = set()
        set_user = set_role = False

        def valid(options: Mapping[str, Any]) -> bool:
            nonlocal set_user, set_role
            ok = True
            if options.get("type", "") not in allowed_types:
                ok = False
                bad_types.add(options.get("type", ""))
            if options.get("user"):
                ok, set_user = False, True
            if options.get("role"):
                ok, set_role = False, True
            return ok

        pod_options = _context(spec).get("seLinuxOptions")
        pod_bad = pod_options is not None and not valid(pod_options)
        containers = [
            c["name"]
            for c in _containers(spec)
            if _context(c).get("seLinuxOptions") is not None
            and not valid(_context(c)["seLinuxOptions"])
        ]
        setters = _setters(pod_bad, containers)
        if not setters:
            return None
        data = []
        if bad_types:
            data.append(
                f"{_plural('type', 'types', len(bad_types))} {_join_quote(sorted(bad_types))}"
            )
        if set_user:
            data.append("user may not be set")
        if set_role:
            data.append("role may not be set")
        return "seLinuxOptions", (
            f"{' and '.join(setters)} set forbidden securityContext.seLinuxOptions: "
            f"{'; '.join(data)}"
        )

    return check


SE_LINUX_TYPES_1_0 = {"", "container_t", "container_init_t", "container_kvm_t"}
SE_LINUX_TYPES_1_31 = SE_LINUX_TYPES_1_0 | {"container_engine_t"}
SECCOMP_TYPES = ("RuntimeDefault", "Localhost")


def seccomp_annotations(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict:
    """seccompProfile_baseline before 1.19: the alpha annotations."""
    annotations = meta.get("annotations") or {}
    keys = ["seccomp.security.alpha.kubernetes.io/pod"] + [
        "container.seccomp.security.alpha.kubernetes.io/" + c["name"] for c in _containers(spec)
    ]
    forbidden = sorted(
        {
            f"{key}={json.dumps(annotations[key], ensure_ascii=False)}"
            for key in keys
            if key in annotations
            and not (
                annotations[key] in ("runtime/default", "docker/default")
                or annotations[key].startswith("localhost/")
            )
        }
    )
    if not forbidden:
        return None
    plural = _plural("annotation", "annotations", len(forbidden))
    return "seccompProfile", f"forbidden {plural} {', '.join(forbidden)}"


def _seccomp(required: bool) -> PodCheck:
    """seccompProfile_baseline (1.19+): a type set must be allowed; restricted: one is required."""

    def check(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict:
        bad_values: set[str] = set()
        pod_profile = _context(spec).get("seccompProfile")
        pod_bad = pod_profile is not None and pod_profile.get("type") not in SECCOMP_TYPES
        if pod_bad:
            bad_values.add(pod_profile.get("type", ""))
        explicit, implicit = [], []
        for container in _containers(spec):
            profile = _context(container).get("seccompProfile")
            if profile is not None:
                if profile.get("type") not in SECCOMP_TYPES:
                    explicit.append(container["name"])
                    bad_values.add(profile.get("type", ""))
            elif pod_profile is None or pod_bad:
                implicit.append(container["name"])
        setters = _setters(pod_bad, explicit)
        if setters:
            return "seccompProfile", (
                f"{' and '.join(setters)} must not set securityContext.seccompProfile.type to "
                f"{_join_quote(sorted(bad_values))}"
            )
        if required and implicit:
            return "seccompProfile", (
                f"pod or {_named('container', implicit)} must set "
                'securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost"'
            )
        return None

    return check


SYSCTLS_1_0 = {
    "kernel.shm_rmid_forced",
    "net.ipv4.ip_local_port_range",
    "net.ipv4.tcp_syncookies",
    "net.ipv4.ping_group_range",
    "net.ipv4.ip_unprivileged_port_start",
}
SYSCTLS_1_27 = SYSCTLS_1_0 | {"net.ipv4.ip_local_reserved_ports"}
SYSCTLS_1_29 = SYSCTLS_1_27 | {
    "net.ipv4.tcp_keepalive_time",
    "net.ipv4.tcp_fin_timeout",
    "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}
SYSCTLS_1_32 = SYSCTLS_1_29 | {"net.ipv4.tcp_rmem", "net.ipv4.tcp_wmem"}


def _sysctls(allowed: set[str]) -> PodCheck:
    def check(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict:
        names = [s["name"] for s in _context(spec).get("sysctls") or [] if s["name"] not in allowed]
        return ("forbidden sysctls", ", ".join(names)) if names else None

    return check


def windows_host_process(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict:
    def host_process(context: Mapping[str, Any]) -> bool:
        return (context.get("windowsOptions") or {}).get("hostProcess") is True

    containers = [c["name"] for c in _containers(spec) if host_process(_context(c))]
    setters = _setters(host_process(_context(spec)), containers)
    if not setters:
        return None
    return "hostProcess", (
        f"{' and '.join(setters)} must not set securityContext.windowsOptions.hostProcess=true"
    )


# ------------------------------------------------------------------ restricted checks
def allow_privilege_escalation(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict:
    names = [
        c["name"]
        for c in _containers(spec)
        if _context(c).get("allowPrivilegeEscalation") is not False
    ]
    if not names:
        return None
    return "allowPrivilegeEscalation != false", (
        f"{_named('container', names)} must set securityContext.allowPrivilegeEscalation=false"
    )


def capabilities_restricted(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict:
    missing_drop_all, adding, forbidden = [], [], set()
    for container in _containers(spec):
        capabilities = _context(container).get("capabilities")
        if capabilities is None:
            missing_drop_all.append(container["name"])
            continue
        if "ALL" not in (capabilities.get("drop") or []):
            missing_drop_all.append(container["name"])
        extra = [c for c in capabilities.get("add") or [] if c != "NET_BIND_SERVICE"]
        if extra:
            adding.append(container["name"])
            forbidden.update(extra)
    details = []
    if missing_drop_all:
        details.append(
            f"{_named('container', missing_drop_all)} must set "
            'securityContext.capabilities.drop=["ALL"]'
        )
    if adding:
        details.append(
            f"{_named('container', adding)} must not include {_join_quote(sorted(forbidden))} "
            "in securityContext.capabilities.add"
        )
    return ("unrestricted capabilities", "; ".join(details)) if details else None


ALLOWED_VOLUME_SOURCES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}
# The restricted volume types in the order the check names them (the first source set wins).
RESTRICTED_VOLUME_SOURCES = (
    "hostPath",
    "gcePersistentDisk",
    "awsElasticBlockStore",
    "gitRepo",
    "nfs",
    "iscsi",
    "glusterfs",
    "rbd",
    "flexVolume",
    "cinder",
    "cephfs",
    "flocker",
    "fc",
    "azureFile",
    "vsphereVolume",
    "quobyte",
    "azureDisk",
    "photonPersistentDisk",
    "portworxVolume",
    "scaleIO",
    "storageos",
)


def restricted_volumes(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict:
    names, types = [], set()
    for volume in spec.get("volumes") or []:
        if any(volume.get(source) is not None for source in ALLOWED_VOLUME_SOURCES):
            continue
        names.append(volume["name"])
        types.add(
            next((s for s in RESTRICTED_VOLUME_SOURCES if volume.get(s) is not None), "unknown")
        )
    if not names:
        return None
    return "restricted volume types", (
        f"{_named('volume', names)} {_plural('uses', 'use', len(names))} "
        f"{_plural('restricted volume type', 'restricted volume types', len(types))} "
        f"{_join_quote(sorted(types))}"
    )


def run_as_non_root(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict:
    pod_value = _context(spec).get("runAsNonRoot")
    explicit, implicit = [], []
    for container in _containers(spec):
        value = _context(container).get("runAsNonRoot")
        if value is not None:
            if value is False:
                explicit.append(container["name"])
        elif pod_value is not True:
            implicit.append(container["name"])
    setters = _setters(pod_value is False, explicit)
    if setters:
        detail = f"{' and '.join(setters)} must not set securityContext.runAsNonRoot=false"
        return "runAsNonRoot != true", detail
    if implicit:
        detail = (
            f"pod or {_named('container', implicit)} must set securityContext.runAsNonRoot=true"
        )
        return "runAsNonRoot != true", detail
    return None


def run_as_user(meta: Mapping[str, Any], spec: Mapping[str, Any]) -> Verdict:
    containers = [c["name"] for c in _containers(spec) if _context(c).get("runAsUser") == 0]
    setters = _setters(_context(spec).get("runAsUser") == 0, containers)
    if not setters:
        return None
    return "runAsUser=0", f"{' and '.join(setters)} must not set runAsUser=0"


# ------------------------------------------------------------------ the registry
@dataclass(frozen=True)
class Check:
    id: str
    level: str  # baseline or restricted
    # (minimum version, check, baseline check ids it replaces at restricted), oldest first
    versions: tuple[tuple[tuple[int, int], PodCheck, tuple[str, ...]], ...] = field(default=())

    def at(self, version: tuple[int, int]) -> tuple[PodCheck, tuple[str, ...]] | None:
        applicable = [(check, over) for since, check, over in self.versions if since <= version]
        return applicable[-1] if applicable else None


CHECKS = (
    Check("appArmorProfile", "baseline", (((1, 0), app_armor_profile, ()),)),
    Check("capabilities_baseline", "baseline", (((1, 0), capabilities_baseline, ()),)),
    Check("hostNamespaces", "baseline", (((1, 0), host_namespaces, ()),)),
    Check("hostPathVolumes", "baseline", (((1, 0), host_path_volumes, ()),)),
    Check("hostPorts", "baseline", (((1, 0), host_ports, ()),)),
    Check("privileged", "baseline", (((1, 0), privileged, ()),)),
    Check("procMount", "baseline", (((1, 0), proc_mount, ()),)),
    Check(
        "seLinuxOptions",
        "baseline",
        (
            ((1, 0), _se_linux_options(SE_LINUX_TYPES_1_0), ()),
            ((1, 31), _se_linux_options(SE_LINUX_TYPES_1_31), ()),
        ),
    ),
    Check(
        "seccompProfile_baseline",
        "baseline",
        (((1, 0), seccomp_annotations, ()), ((1, 19), _seccomp(required=False), ())),
    ),
    Check(
        "sysctls",
        "baseline",
        (
            ((1, 0), _sysctls(SYSCTLS_1_0), ()),
            ((1, 27), _sysctls(SYSCTLS_1_27), ()),
            ((1, 29), _sysctls(SYSCTLS_1_29), ()),
            ((1, 32), _sysctls(SYSCTLS_1_32), ()),
        ),
    ),
    Check("windowsHostProcess", "baseline", (((1, 0), windows_host_process, ()),)),
    Check(
        "allowPrivilegeEscalation",
        "restricted",
        (
            ((1, 8), allow_privilege_escalation, ()),
            ((1, 25), _not_on_windows(allow_privilege_escalation), ()),
        ),
    ),
    Check(
        "capabilities_restricted",
        "restricted",
        (
            ((1, 22), capabilities_restricted, ("capabilities_baseline",)),
            ((1, 25), _not_on_windows(capabilities_restricted), ("capabilities_baseline",)),
        ),
    ),
    Check("restrictedVolumes", "restricted", (((1, 0), restricted_volumes, ("hostPathVolumes",)),)),
    Check("runAsNonRoot", "restricted", (((1, 0), run_as_non_root, ()),)),
    Check("runAsUser", "restricted", (((1, 23), run_as_user, ()),)),
    Check(
        "seccompProfile_restricted",
        "restricted",
        (
            ((1, 19), _seccomp(required=True), ("seccompProfile_baseline",)),
            ((1, 25), _not_on_windows(_seccomp(required=True)), ("seccompProfile_baseline",)),
        ),
    ),
)


def checks_for(level_version: LevelVersion) -> list[PodCheck]:
    """checkRegistry.EvaluatePod's list: baseline checks then restricted ones, each group by id
    (byte order); at restricted, the baseline checks a restricted one overrides are left out."""
    if level_version.level == "privileged":
        return []
    version = level_version.version
    if version is None or version > MAX_VERSION:
        version = MAX_VERSION
    chosen = {c.id: (c, c.at(version)) for c in CHECKS}
    applicable = {cid: (c, got) for cid, (c, got) in chosen.items() if got is not None}
    levels = ("baseline",) if level_version.level == "baseline" else ("baseline", "restricted")
    overridden = {
        over
        for c, (_, overrides) in applicable.values()
        if c.level == "restricted" and level_version.level == "restricted"
        for over in overrides
    }
    ordered = sorted(
        (c for c, _ in applicable.values() if c.level in levels and c.id not in overridden),
        key=lambda c: (LEVELS.index(c.level), c.id),
    )
    return [applicable[c.id][1][0] for c in ordered]


def evaluate(level_version: LevelVersion, pod: Mapping[str, Any]) -> list[tuple[str, str]]:
    """The (reason, detail) of each check the pod breaks, in the server's order."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    verdicts = (check(meta, spec) for check in checks_for(level_version))
    return [verdict for verdict in verdicts if verdict is not None]


def forbidden_detail(failures: list[tuple[str, str]]) -> str:
    """AggregateCheckResult.ForbiddenDetail: `reason (detail), reason, ...`."""
    return ", ".join(f"{reason} ({detail})" if detail else reason for reason, detail in failures)


# ------------------------------------------------------------------ admission
class PodSecurityAdmission:
    """The admission hook (ApiCore.admission): refuses, or returns warnings."""

    def __init__(
        self,
        get_namespace: Callable[[str], Mapping[str, Any] | None],
        list_pods: Callable[[str], list[Mapping[str, Any]]],
    ) -> None:
        self.get_namespace = get_namespace
        self.list_pods = list_pods

    def admit(
        self,
        operation: str,
        rt: ResourceType,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
        subresource: str | None,
    ) -> list[str]:
        if rt.group:
            return []
        if rt.kind == "Namespace" and not subresource:
            return self._admit_namespace(obj, old)
        if rt.kind == "Pod" and subresource not in IGNORED_POD_SUBRESOURCES:
            return self._admit_pod(operation, obj, old)
        return []

    def _admit_namespace(self, namespace: dict[str, Any], old: dict[str, Any] | None) -> list[str]:
        policy, problems = policy_of(namespace["metadata"].get("labels") or {})
        if old is None:
            if problems:
                raise _invalid_namespace(namespace, problems)
            return []
        old_policy, old_problems = policy_of(old["metadata"].get("labels") or {})
        if problems and (not old_problems or problems != old_problems):
            raise _invalid_namespace(namespace, problems)
        new, before = policy["enforce"], old_policy["enforce"]
        if new == before or new.level == "privileged":
            return []
        if new.version == before.version and _strictness(new.level) <= _strictness(before.level):
            return []
        return self._existing_pods_warnings(namespace["metadata"]["name"], new)

    def _existing_pods_warnings(self, namespace: str, enforce: LevelVersion) -> list[str]:
        """EvaluatePodsInNamespace: the pods the new enforce level would refuse, by reason."""
        first_pod: dict[str, str] = {}
        counts: dict[str, int] = {}
        for pod in self.list_pods(namespace):
            failures = evaluate(enforce, pod)
            if not failures:
                continue
            reason = ", ".join(r for r, _ in failures)
            name = pod["metadata"]["name"]
            first_pod[reason] = min(first_pod.get(reason, name), name)
            counts[reason] = counts.get(reason, 0) + 1
        if not counts:
            return []
        lines = []
        for reason, count in counts.items():
            others = {1: "", 2: " (and 1 other pod)"}.get(count, f" (and {count - 1} other pods)")
            lines.append(f"{first_pod[reason]}{others}: {reason}")
        header = (
            f'existing pods in namespace "{namespace}" violate the new PodSecurity enforce '
            f'level "{enforce}"'
        )
        return [header, *sorted(lines)]

    def _admit_pod(
        self, operation: str, pod: dict[str, Any], old: dict[str, Any] | None
    ) -> list[str]:
        namespace = self.get_namespace(pod["metadata"].get("namespace", ""))
        if namespace is None:
            return []
        policy, problems = policy_of(namespace["metadata"].get("labels") or {})
        if not problems and all(p.level == "privileged" for p in policy.values()):
            return []
        if operation == "UPDATE" and old is not None and not _significant_update(pod, old):
            return []
        failures = evaluate(policy["enforce"], pod)
        if failures:
            name = pod["metadata"].get("name", "")
            message = f'violates PodSecurity "{policy["enforce"]}": {forbidden_detail(failures)}'
            raise forbidden("pods", "", name, message)
        warn = policy["warn"]
        failures = evaluate(warn, pod)
        if failures:
            return [f'would violate PodSecurity "{warn}": {forbidden_detail(failures)}']
        return []


def _significant_update(pod: Mapping[str, Any], old: Mapping[str, Any]) -> bool:
    """isSignificantPodUpdate: a container added or removed, or an image changed."""
    spec, old_spec = pod.get("spec") or {}, old.get("spec") or {}
    for key in ("containers", "initContainers"):
        new, before = spec.get(key) or [], old_spec.get(key) or []
        if len(new) != len(before):
            return True
        if any(a.get("image") != b.get("image") for a, b in zip(new, before, strict=True)):
            return True
    old_ephemeral = {c["name"]: c for c in old_spec.get("ephemeralContainers") or []}
    for container in spec.get("ephemeralContainers") or []:
        before = old_ephemeral.get(container["name"])
        if before is None or before.get("image") != container.get("image"):
            return True
    return False


def _invalid_namespace(namespace: Mapping[str, Any], problems: list[Any]) -> ApiError:
    name = namespace["metadata"].get("name", "")
    return errors.invalid("Namespace", "", name, validation.causes(problems))
