"""Profiles applied to jobs: which profile, the effective spec, and what breaks the policy.

Pure: no API calls. The operator gives it the job's spec, its namespace's labels and the
SFTProfiles it has seen; `sftjob plan --profile` gives it the same from files, so both say
the same verdict.

Order: the profile is selected (the job's `spec.profile`, else the only profile selecting
the namespace), the profile's defaults are merged under the job's spec, and the limits are
checked against what the job itself asked for *and* the effective spec (an image the
profile fills in must be allowed too). Every violation names the rule
(`limits.allowedImages`) and the job field (`spec.image`) and says what to do. All
violations are reported, in the order of the job's fields, not only the first.

Built-in rules hold with or without a profile: a job may not set the env names of
`OPERATOR_ENV` nor other `SFTJOB_*` names (rule `protectedEnv`).

Rules: `profile` (selection, field `spec.profile`), `limits.<limit>` for each limit of
ProfileLimits (a nodeSelector key or a toleration the profile does not let the job change
is `limits.allowSchedulingOverrides`), `defaults.env` (a name the profile sets for every pod)
and `protectedEnv`. Fields are paths in the job as in api.SpecError (`spec.env[1].name`),
map keys in brackets as in Kubernetes field paths (`spec.resources.nodeSelector[pool]`,
`spec.training.extraArgs[report_to]`). Sources checked by allowedModelSources: model.name,
model.path, model.tokenizer, dataset.name, dataset.path and dataset.uri.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

from .api import DEFAULT_TRAINER_IMAGE, QUANTITY_PATTERN, EffectiveStatus, SFTJobSpec, Toleration
from .object_storage import ENDPOINT_ENV, TLS_ENV
from .profile_api import (
    OPERATOR_SET_ENV,
    LabelSelector,
    LabelSelectorRequirement,
    ModelCacheSpec,
    SFTProfile,
)

# Why each built-in protected name is protected; the reason is part of the refusal.
_SET_BY_OPERATOR = "the operator sets it in every trainer pod"
_TOKEN_DESTINATION = "it decides where the hub token is sent"
_TLS_TRUST = "it replaces the CAs that keep the hub token secret from a proxy"
_S3_DESTINATION = "it decides where the S3 credentials are sent"
_S3_TLS_TRUST = "it replaces the CAs that keep the S3 credentials secret from a proxy"
_API_IDENTITY = "it redirects the pod's Kubernetes API calls and its ServiceAccount token"
_CODE = "it loads code from outside the image, bypassing the allowed images"
_REMOTE_CODE = "it turns on remote dataset code, which model.trustRemoteCode governs"
_RENDEZVOUS = "the launcher derives it from the operator's rendezvous address"

PROTECTED_ENV_REASONS: dict[str, str] = {
    **{name: _SET_BY_OPERATOR for name in sorted(OPERATOR_SET_ENV)},
    "HF_ENDPOINT": _TOKEN_DESTINATION,
    "HUGGING_FACE_HUB_TOKEN": _TOKEN_DESTINATION,  # the old name of HF_TOKEN, still read
    "HF_TOKEN_PATH": _TOKEN_DESTINATION,
    "REQUESTS_CA_BUNDLE": _TLS_TRUST,
    "CURL_CA_BUNDLE": _TLS_TRUST,
    "SSL_CERT_FILE": _TLS_TRUST,
    "SSL_CERT_DIR": _TLS_TRUST,
    "KUBERNETES_SERVICE_HOST": _API_IDENTITY,
    "KUBERNETES_SERVICE_PORT": _API_IDENTITY,
    "KUBECONFIG": _API_IDENTITY,
    "PATH": _CODE,
    "PYTHONPATH": _CODE,
    "PYTHONHOME": _CODE,
    "PYTHONSTARTUP": _CODE,
    "PYTHONUSERBASE": _CODE,  # its site-packages (and .pth files) are imported at start
    "PYTHONBREAKPOINT": _CODE,
    "LD_PRELOAD": _CODE,
    "LD_LIBRARY_PATH": _CODE,
    "LD_AUDIT": _CODE,
    "BASH_ENV": _CODE,
    "ENV": _CODE,
    "TORCHINDUCTOR_CACHE_DIR": _CODE,  # compiled kernels are code
    "TRITON_CACHE_DIR": _CODE,
    "NCCL_NET_PLUGIN": _CODE,  # NCCL dlopens these by name
    "NCCL_TUNER_PLUGIN": _CODE,
    "NCCL_PROFILER_PLUGIN": _CODE,
    "HF_DATASETS_TRUST_REMOTE_CODE": _REMOTE_CODE,
    "MASTER_ADDR": _RENDEZVOUS,
    "MASTER_PORT": _RENDEZVOUS,
    "RANK": _RENDEZVOUS,
    "LOCAL_RANK": _RENDEZVOUS,
    "WORLD_SIZE": _RENDEZVOUS,
    "NODE_RANK": _RENDEZVOUS,
    **{name: _S3_DESTINATION for name in ENDPOINT_ENV},
    **{name: _S3_TLS_TRUST for name in TLS_ENV},
}
# Env names no tenant may set, with or without a profile. Not here on purpose: NCCL_* tuning
# (NCCL_DEBUG, NCCL_SOCKET_IFNAME, ... only shape the job's own traffic; the plugin names that
# load libraries are above), proxies (a profile protects them with limits.protectedEnv or sets
# them in defaults.env), HF_HUB_OFFLINE and the cache locations (they only change the job's own
# downloads).
OPERATOR_ENV: frozenset[str] = frozenset(PROTECTED_ENV_REASONS)
# The operator and the trainer read SFTJOB_* (SFTJOB_REPORT, SFTJOB_SPEED, ...), new ones
# included. The trainer's fault-injection hooks SFTJOB_TEST_* stay open: they only slow down or
# fail the tenant's own run (the e2e tests set them on jobs).
OPERATOR_ENV_PREFIX = "SFTJOB_"
TRAINER_TEST_HOOK_PREFIX = "SFTJOB_TEST_"

# Where the operator's own name for the image comes from, for messages.
_IMAGE_SOURCES = ("the job's", "the profile's default", "the operator's default")


def protected_env_reason(name: str) -> str | None:
    """Why a tenant may not set env `name` whatever the profile says, or None."""
    if name in PROTECTED_ENV_REASONS:
        return PROTECTED_ENV_REASONS[name]
    if name.startswith(OPERATOR_ENV_PREFIX) and not name.startswith(TRAINER_TEST_HOOK_PREFIX):
        return "the operator and the trainer reserve SFTJOB_* names"
    return None


@dataclass(frozen=True)
class PolicyViolation:
    rule: str  # the profile rule, e.g. "limits.allowedImages", or "protectedEnv" (built in)
    field: str  # the job field, e.g. "spec.image", "spec.env[2].name"
    message: str  # what is wrong and what to do

    def __str__(self) -> str:
        return f"{self.field}: {self.message} (rule {self.rule})"

    def to_json(self) -> dict[str, str]:
        return {"rule": self.rule, "field": self.field, "message": self.message}


@dataclass(frozen=True)
class PodDefaults:
    """Pod settings only a profile gives (tenants have no field for them)."""

    affinity: Mapping[str, Any] = field(default_factory=dict)
    priorityClassName: str | None = None
    queueName: str | None = None
    ephemeralStorage: str | None = None  # per pod: request, and the scratch emptyDirs' limit
    modelCache: ModelCacheSpec | None = None
    runAsUser: int | None = None
    runAsGroup: int | None = None
    fsGroup: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The settings that are set, as JSON (the operator keeps them in the job's ConfigMap)."""
        out: dict[str, Any] = {}
        if self.affinity:
            out["affinity"] = json.loads(json.dumps(self.affinity))
        for name in ("priorityClassName", "queueName", "ephemeralStorage"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        if self.modelCache is not None:
            out["modelCache"] = self.modelCache.model_dump(mode="json")
        for name in ("runAsUser", "runAsGroup", "fsGroup"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> PodDefaults:
        data = dict(data or {})
        cache = data.get("modelCache")
        return cls(
            affinity=dict(data.get("affinity") or {}),
            priorityClassName=data.get("priorityClassName"),
            queueName=data.get("queueName"),
            ephemeralStorage=data.get("ephemeralStorage"),
            modelCache=None if cache is None else ModelCacheSpec.model_validate(cache),
            runAsUser=data.get("runAsUser"),
            runAsGroup=data.get("runAsGroup"),
            fsGroup=data.get("fsGroup"),
        )


@dataclass(frozen=True)
class Resolution:
    profile: SFTProfile | None
    spec: SFTJobSpec  # the effective spec: what runs
    pod: PodDefaults
    from_profile: list[tuple[str, Any]]  # (job field path, value) the profile filled in
    violations: list[PolicyViolation]

    def effective_status(self) -> dict[str, Any] | None:
        """status.effective (api.EffectiveStatus as JSON), None when no profile applies."""
        if self.profile is None:
            return None
        status = EffectiveStatus.model_validate(
            {
                "profile": self.profile.metadata.name,
                "profileGeneration": self.profile.metadata.generation,
                "fromProfile": [
                    {"field": path, "value": json.dumps(value, sort_keys=True)}
                    for path, value in self.from_profile
                ],
            }
        )
        return status.model_dump(mode="json", exclude_none=True)


# --------------------------------------------------------------------------- selection


def _requirement_matches(requirement: LabelSelectorRequirement, labels: Mapping[str, str]) -> bool:
    # As k8s.io/apimachinery/pkg/labels Requirement.Matches: NotIn holds when the key is absent.
    present = requirement.key in labels
    if requirement.operator == "In":
        return present and labels[requirement.key] in requirement.values
    if requirement.operator == "NotIn":
        return not present or labels[requirement.key] not in requirement.values
    if requirement.operator == "Exists":
        return present
    return not present  # DoesNotExist


def selector_matches(selector: LabelSelector, labels: Mapping[str, str]) -> bool:
    """Kubernetes label-selector semantics; every term must hold, an empty selector matches all."""
    return all(labels.get(key) == value for key, value in selector.matchLabels.items()) and all(
        _requirement_matches(requirement, labels) for requirement in selector.matchExpressions
    )


def profiles_selecting(
    namespace_labels: Mapping[str, str], profiles: Iterable[SFTProfile]
) -> list[SFTProfile]:
    """The profiles whose namespaceSelector selects a namespace with these labels, by name."""
    chosen = [p for p in profiles if selector_matches(p.spec.namespaceSelector, namespace_labels)]
    return sorted(chosen, key=lambda p: p.metadata.name)


def _names(profiles: Iterable[SFTProfile]) -> str:
    return ", ".join(p.metadata.name for p in profiles) or "none"


def select_profile(
    wanted: str | None,
    namespace: str,
    namespace_labels: Mapping[str, str],
    profiles: Sequence[SFTProfile],
    require_profile: bool = False,
) -> tuple[SFTProfile | None, list[PolicyViolation]]:
    """The profile a job runs under: the one it names, else the only one selecting its namespace."""
    usable = profiles_selecting(namespace_labels, profiles)
    if wanted is not None:
        if any(p.metadata.name == wanted for p in usable):
            return next(p for p in usable if p.metadata.name == wanted), []
        exists = any(p.metadata.name == wanted for p in profiles)
        problem = (
            f"SFTProfile {wanted} does not select namespace {namespace}"
            if exists
            else f"SFTProfile {wanted} does not exist"
        )
        if not usable:
            fix = f"no SFTProfile selects namespace {namespace}: remove spec.profile or ask your "
            fix += "platform team"
        else:
            fix = f"profiles this namespace may use: {_names(usable)}. Set spec.profile to one of "
            fix += "them" + (" or remove it" if len(usable) == 1 else "")
        return None, [PolicyViolation("profile", "spec.profile", f"{problem}; {fix}")]
    if len(usable) == 1:
        return usable[0], []
    if len(usable) > 1:
        return None, [
            PolicyViolation(
                "profile",
                "spec.profile",
                f"several SFTProfiles select namespace {namespace} ({_names(usable)}): "
                "set spec.profile to one of them",
            )
        ]
    if require_profile:
        return None, [
            PolicyViolation(
                "profile",
                "spec.profile",
                f"no SFTProfile selects namespace {namespace}; ask your platform team",
            )
        ]
    return None, []


# --------------------------------------------------------------------------- quantities

_QUANTITY = re.compile(QUANTITY_PATTERN)


def multiply_quantity(quantity: str, factor: int) -> str:
    """A Kubernetes quantity times a whole number, in the same unit: 500m x 3 = 1500m."""
    match = _QUANTITY.match(quantity)
    if match is None or factor < 0:
        raise ValueError(f"cannot multiply {quantity!r} by {factor}")
    number = quantity[: match.start(2)] if match.group(2) else quantity
    suffix = match.group(2) or ""
    product = Decimal(number) * factor
    text = format(product.normalize(), "f") if product else "0"
    return f"{text}{suffix}"


# --------------------------------------------------------------------------- matching


def prefix_allows(entry: str, value: str) -> bool:
    """Whether allowlist `entry` allows `value`: equal, or a prefix ending at / : or @."""
    if value == entry:
        return True
    if not entry or not value.startswith(entry):
        return False
    return entry[-1] in "/:@" or value[len(entry)] in "/:@"


def image_allowed(entry: str, image: str) -> bool:
    """A digest entry allows exactly itself; any other entry is a prefix (prefix_allows)."""
    if "@sha256:" in entry:
        return image == entry
    return prefix_allows(entry, image)


def source_allowed(entries: Sequence[str], source: str) -> bool:
    if ".." in source.split("/"):
        return False
    return any(prefix_allows(entry, source) for entry in entries)


def _path_normal(source: str) -> str:
    return posixpath.normpath(source) if source.startswith("/") else source


# --------------------------------------------------------------------------- merge


@dataclass
class _Merge:
    """The effective spec built up from the job's, and what the profile added on the way."""

    profile: SFTProfile
    spec: SFTJobSpec
    from_profile: list[tuple[str, Any]] = field(default_factory=list)
    violations: list[PolicyViolation] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.profile.metadata.name

    def refuse(self, rule: str, path: str, message: str) -> None:
        self.violations.append(PolicyViolation(rule, path, message))


def _toleration_json(toleration: Toleration) -> dict[str, Any]:
    return toleration.model_dump(mode="json", exclude_none=True)


def _merge_scheduling(merge: _Merge) -> dict[str, Any]:
    defaults, limits = merge.profile.spec.defaults, merge.profile.spec.limits
    resources = merge.spec.resources
    node_selector = dict(defaults.nodeSelector)
    for key, value in resources.nodeSelector.items():
        pinned = defaults.nodeSelector.get(key)
        if pinned is not None and pinned != value and not limits.allowSchedulingOverrides:
            merge.refuse(
                "limits.allowSchedulingOverrides",
                f"spec.resources.nodeSelector[{key}]",
                f"SFTProfile {merge.name} pins {key}={pinned} (its node pool) and lets no job "
                f"change it: remove {key} from spec.resources.nodeSelector",
            )
            continue
        node_selector[key] = value
    added_selector = {
        k: v for k, v in defaults.nodeSelector.items() if k not in resources.nodeSelector
    }
    if added_selector:
        merge.from_profile.append(("spec.resources.nodeSelector", added_selector))

    tolerations = list(resources.tolerations)
    for index, toleration in enumerate(resources.tolerations):
        if toleration not in defaults.tolerations and not limits.allowSchedulingOverrides:
            merge.refuse(
                "limits.allowSchedulingOverrides",
                f"spec.resources.tolerations[{index}]",
                f"SFTProfile {merge.name} lets no job add tolerations (it adds its node pool's "
                "own): remove it from spec.resources.tolerations",
            )
    added_tolerations = [t for t in defaults.tolerations if t not in resources.tolerations]
    tolerations += added_tolerations
    if added_tolerations:
        merge.from_profile.append(
            ("spec.resources.tolerations", [_toleration_json(t) for t in added_tolerations])
        )
    return {"nodeSelector": node_selector, "tolerations": tolerations}


def _merge_resources(merge: _Merge) -> None:
    defaults = merge.profile.spec.defaults
    resources = merge.spec.resources
    update = _merge_scheduling(merge)
    gpus = resources.processes_per_node  # at least one, so a CPU job gets one GPU's share
    for name, per_gpu in (("cpu", defaults.cpuPerGpu), ("memory", defaults.memoryPerGpu)):
        if getattr(resources, name) is None and per_gpu is not None:
            update[name] = multiply_quantity(per_gpu, gpus)
            merge.from_profile.append((f"spec.resources.{name}", update[name]))
    merge.spec = merge.spec.model_copy(update={"resources": resources.model_copy(update=update)})


def _merge_spec(merge: _Merge) -> None:
    defaults, limits = merge.profile.spec.defaults, merge.profile.spec.limits
    spec = merge.spec
    update: dict[str, Any] = {}
    if spec.image is None and defaults.image is not None:
        update["image"] = defaults.image
        merge.from_profile.append(("spec.image", defaults.image))
    _merge_resources(merge)
    spec = merge.spec
    if spec.output.claimName is None and defaults.output.claimName is not None:
        update["output"] = spec.output.model_copy(update={"claimName": defaults.output.claimName})
        merge.from_profile.append(("spec.output.claimName", defaults.output.claimName))
    if defaults.env:
        update["env"] = list(spec.env) + list(defaults.env)
        merge.from_profile.append(("spec.env", [v.model_dump(mode="json") for v in defaults.env]))
    if spec.activeDeadlineSeconds is None:
        deadline = defaults.activeDeadlineSeconds or limits.maxActiveDeadlineSeconds
        if deadline is not None:
            update["activeDeadlineSeconds"] = deadline
            merge.from_profile.append(("spec.activeDeadlineSeconds", deadline))
    merge.spec = spec.model_copy(update=update)


def _pod_defaults(profile: SFTProfile, spec: SFTJobSpec) -> PodDefaults:
    defaults = profile.spec.defaults
    storage = defaults.ephemeralStoragePerGpu
    return PodDefaults(
        affinity=dict(defaults.affinity),
        priorityClassName=defaults.priorityClassName,
        queueName=defaults.queueName,
        ephemeralStorage=None
        if storage is None
        else multiply_quantity(storage, spec.resources.processes_per_node),
        modelCache=defaults.modelCache,
        runAsUser=defaults.runAsUser,
        runAsGroup=defaults.runAsGroup,
        fsGroup=defaults.fsGroup,
    )


# --------------------------------------------------------------------------- limits


def _check_image(
    job: SFTJobSpec, effective: SFTJobSpec, profile: SFTProfile, default_image: str
) -> list[PolicyViolation]:
    allowed = profile.spec.limits.allowedImages
    image = effective.image or default_image
    if not allowed or any(image_allowed(entry, image) for entry in allowed):
        return []
    source = _IMAGE_SOURCES[0 if job.image else 1 if effective.image else 2]
    return [
        PolicyViolation(
            "limits.allowedImages",
            "spec.image",
            f"{source} image {image} is not allowed by SFTProfile {profile.metadata.name}: "
            f"set spec.image to an image starting with one of {', '.join(allowed)}",
        )
    ]


def _check_method(job: SFTJobSpec, profile: SFTProfile) -> list[PolicyViolation]:
    allowed = profile.spec.limits.allowedMethods
    if not allowed or job.method in allowed:
        return []
    return [
        PolicyViolation(
            "limits.allowedMethods",
            "spec.method",
            f"method {job.method} is not allowed by SFTProfile {profile.metadata.name}: "
            f"use one of {', '.join(allowed)}",
        )
    ]


def _job_sources(job: SFTJobSpec) -> list[tuple[str, str]]:
    """(field, source) of everything the job loads a model, tokenizer or data from."""
    candidates = [
        ("spec.model.name", job.model.name),
        ("spec.model.path", job.model.path),
        ("spec.model.tokenizer", job.model.tokenizer),
        ("spec.dataset.name", job.dataset.name),
        ("spec.dataset.path", job.dataset.path),
        ("spec.dataset.uri", job.dataset.uri),
    ]
    return [(path, value) for path, value in candidates if value is not None]


def _check_sources(job: SFTJobSpec, profile: SFTProfile) -> list[PolicyViolation]:
    limits = profile.spec.limits
    violations = []
    if limits.allowedModelSources:
        for path, source in _job_sources(job):
            if not source_allowed(limits.allowedModelSources, _path_normal(source)):
                violations.append(
                    PolicyViolation(
                        "limits.allowedModelSources",
                        path,
                        f"{source} is not a source SFTProfile {profile.metadata.name} allows: "
                        f"load from one starting with {', '.join(limits.allowedModelSources)}"
                        + (" (without '..')" if ".." in source.split("/") else ""),
                    )
                )
    if job.model.trustRemoteCode and not limits.allowRemoteCode:
        violations.append(
            PolicyViolation(
                "limits.allowRemoteCode",
                "spec.model.trustRemoteCode",
                f"SFTProfile {profile.metadata.name} does not allow model code from the hub: "
                "set spec.model.trustRemoteCode to false",
            )
        )
    return violations


def _check_size(job: SFTJobSpec, profile: SFTProfile) -> list[PolicyViolation]:
    limits, name = profile.spec.limits, profile.metadata.name
    resources = job.resources
    violations = []
    if limits.maxNodes is not None and resources.nodes > limits.maxNodes:
        violations.append(
            PolicyViolation(
                "limits.maxNodes",
                "spec.resources.nodes",
                f"{resources.nodes} nodes is more than SFTProfile {name} allows "
                f"({limits.maxNodes}): set spec.resources.nodes to at most {limits.maxNodes}",
            )
        )
    gpus = resources.nodes * resources.gpusPerNode
    if limits.maxGpusPerJob is not None and gpus > limits.maxGpusPerJob:
        violations.append(
            PolicyViolation(
                "limits.maxGpusPerJob",
                "spec.resources.gpusPerNode",
                f"{resources.nodes} nodes x {resources.gpusPerNode} GPUs = {gpus} GPUs is more "
                f"than SFTProfile {name} allows ({limits.maxGpusPerJob}): lower "
                "spec.resources.gpusPerNode or spec.resources.nodes",
            )
        )
    return violations


def _check_secrets(job: SFTJobSpec, profile: SFTProfile) -> list[PolicyViolation]:
    allowed = profile.spec.limits.allowedSecretNames
    if allowed is None:
        return []
    references = [("hfToken", job.secrets.hfToken), ("s3", job.secrets.s3)]
    violations = []
    for field_name, ref in references:
        if ref is None or ref.name in allowed:
            continue
        fix = f"use one of {', '.join(allowed)}" if allowed else f"remove spec.secrets.{field_name}"
        violations.append(
            PolicyViolation(
                "limits.allowedSecretNames",
                f"spec.secrets.{field_name}.name",
                f"Secret {ref.name} is not one SFTProfile {profile.metadata.name} lets jobs "
                "read: " + fix,
            )
        )
    return violations


def _check_env(job: SFTJobSpec, profile: SFTProfile | None) -> list[PolicyViolation]:
    limits = profile.spec.limits if profile else None
    profile_env = {v.name: v.value for v in profile.spec.defaults.env} if profile else {}
    name = profile.metadata.name if profile else ""
    violations = []
    for index, var in enumerate(job.env):
        path = f"spec.env[{index}].name"
        reason = protected_env_reason(var.name)
        if reason is not None:
            violations.append(
                PolicyViolation(
                    "protectedEnv",
                    path,
                    f"{var.name} is protected ({reason}): remove it from spec.env",
                )
            )
        elif limits is not None and var.name in limits.protectedEnv:
            violations.append(
                PolicyViolation(
                    "limits.protectedEnv",
                    path,
                    f"SFTProfile {name} protects {var.name}: remove it from spec.env",
                )
            )
        elif var.name in profile_env:
            violations.append(
                PolicyViolation(
                    "defaults.env",
                    path,
                    f"SFTProfile {name} sets {var.name}={profile_env[var.name]} for every pod and "
                    "jobs may not override it: remove it from spec.env",
                )
            )
    return violations


def _check_training(job: SFTJobSpec, profile: SFTProfile) -> list[PolicyViolation]:
    allowed = profile.spec.limits.allowedExtraArgs
    if allowed is None:
        return []
    hint = f"allowed: {', '.join(allowed)}" if allowed else "it allows none"
    return [
        PolicyViolation(
            "limits.allowedExtraArgs",
            f"spec.training.extraArgs[{key}]",
            f"SFTProfile {profile.metadata.name} does not allow training argument {key} "
            f"({hint}): remove it from spec.training.extraArgs",
        )
        for key in job.training.extraArgs
        if key not in allowed
    ]


def _check_deadline(job: SFTJobSpec, profile: SFTProfile) -> list[PolicyViolation]:
    cap = profile.spec.limits.maxActiveDeadlineSeconds
    asked = job.activeDeadlineSeconds
    if cap is None or asked is None or asked <= cap:
        return []
    return [
        PolicyViolation(
            "limits.maxActiveDeadlineSeconds",
            "spec.activeDeadlineSeconds",
            f"{asked}s is longer than SFTProfile {profile.metadata.name} allows ({cap}s): set "
            f"spec.activeDeadlineSeconds to at most {cap}, or leave it empty for the profile's "
            "default",
        )
    ]


# --------------------------------------------------------------------------- resolve


def resolve(
    spec: SFTJobSpec,
    namespace: str,
    namespace_labels: Mapping[str, str],
    profiles: Sequence[SFTProfile],
    require_profile: bool = False,
    *,
    default_image: str = DEFAULT_TRAINER_IMAGE,
) -> Resolution:
    """The effective spec of a job and every way it breaks its profile (or the built-ins).

    `default_image` is the image the operator runs for a job that names none (its --image);
    a profile's allowedImages must allow it too when neither job nor profile sets one.
    """
    profile, violations = select_profile(
        spec.profile, namespace, namespace_labels, profiles, require_profile
    )
    if profile is None:
        return Resolution(None, spec, PodDefaults(), [], violations + _check_env(spec, None))
    merge = _Merge(profile, spec)
    _merge_spec(merge)
    effective = merge.spec
    violations += _check_image(spec, effective, profile, default_image)
    violations += _check_method(spec, profile)
    violations += _check_sources(spec, profile)
    violations += _check_size(spec, profile)
    violations += merge.violations  # nodeSelector, tolerations
    violations += _check_secrets(spec, profile)
    violations += _check_env(spec, profile)
    violations += _check_training(spec, profile)
    violations += _check_deadline(spec, profile)
    pod = _pod_defaults(profile, effective)
    from_profile = merge.from_profile + [
        (f"pod.{name}", value) for name, value in pod.to_json().items()
    ]
    return Resolution(profile, effective, pod, from_profile, violations)
