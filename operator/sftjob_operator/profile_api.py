"""The SFTProfile API: what a platform admin writes once for many tenants.

An SFTProfile is cluster-scoped. It names the namespaces that use it (a label selector),
the defaults merged *under* each job's own spec (the job's own value wins where it may set
one) and the limits a job must keep. The operator resolves a job's profile before the
first launch (`policy.py`), refuses a job that breaks it with Failed/PolicyViolation and
runs the effective spec: the job over the profile.

Tenants cannot set what is here but not in SFTJobSpec (affinity, priorityClassName, the
model-cache volume, the pods' user ids): those come from the profile alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .api import (
    API_VERSION,
    GROUP,
    QUANTITY_PATTERN,
    VERSION,
    CrossFieldRule,
    EnvVar,
    FieldError,
    Method,
    PositiveInt,
    SpecError,
    SpecModel,
    StatusModel,
    Toleration,
    errors_from_validation,
)
from .object_storage import CREDENTIAL_ENV
from .trainer_config import (
    ENV_CONFIG_PATH,
    ENV_MAIN_ADDR,
    ENV_MAIN_PORT,
    ENV_NODE_RANK,
    ENV_NUM_NODES,
    ENV_TERMINATION_LOG,
)

PROFILE_KIND = "SFTProfile"
PROFILE_PLURAL = "sftprofiles"
PROFILE_SINGULAR = "sftprofile"
PROFILE_SHORT_NAMES = ["sftp"]
# Not "sftjob": kubectl expands a category before a singular name, so `kubectl get sftjob X`
# would then name two kinds and fail.
PROFILE_CATEGORIES = ["ml"]

# Env names the operator itself sets in every trainer pod (children._env and the ENV_* of
# trainer_config): neither a tenant nor a profile may set them, or the pod gets a second value
# and the operator's contract with the trainer breaks. tests/unit/test_policy.py checks the
# list against the env of real pods built by children.build_pod.
OPERATOR_SET_ENV: frozenset[str] = frozenset(
    {
        ENV_CONFIG_PATH,
        ENV_NODE_RANK,
        ENV_NUM_NODES,
        ENV_MAIN_ADDR,
        ENV_MAIN_PORT,
        ENV_TERMINATION_LOG,
        "SFTJOB_OUTPUT_DIR",
        "SFTJOB_MODEL_PATH",
        "SFTJOB_DATASET_PATH",
        "HOME",
        "HF_HOME",  # the model cache's mount when the profile has one
        "PYTHONUNBUFFERED",
        "POD_NAME",
        "POD_NAMESPACE",
        "HF_TOKEN",  # from spec.secrets.hfToken, the one way a token gets in
        *CREDENTIAL_ENV,  # from spec.secrets.s3, the one way an S3 key pair gets in
    }
)

# Default mount of the shared model cache; HF_HOME points here when a profile sets one.
MODEL_CACHE_MOUNT = "/cache/huggingface"


class LabelSelectorRequirement(SpecModel):
    key: str = Field(description="Label key.")
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"] = Field(
        description="In, NotIn, Exists or DoesNotExist."
    )
    values: list[str] = Field(
        default_factory=list, description="Values for In and NotIn; empty otherwise."
    )

    # As the API server validates a metav1.LabelSelectorRequirement (ValidateLabelSelector).
    cross_field_rules = (
        CrossFieldRule(
            field="values",
            message="must be non-empty when operator is In or NotIn, and empty when it is "
            "Exists or DoesNotExist",
            cel="(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
            holds=lambda r: (r.operator in ("In", "NotIn")) == bool(r.values),
        ),
    )


class LabelSelector(SpecModel):
    """A Kubernetes label selector; an empty one selects every namespace."""

    matchLabels: dict[str, str] = Field(
        default_factory=dict, description="Labels a namespace must carry, all of them."
    )
    matchExpressions: list[LabelSelectorRequirement] = Field(
        default_factory=list, description="Set-based requirements, all of them."
    )


class ModelCacheSpec(SpecModel):
    claimName: str = Field(
        description="ReadWriteMany PersistentVolumeClaim mounted read-write as the Hugging Face "
        "cache (HF_HOME) in every pod, so a model is downloaded once per cluster."
    )
    mountPath: str = Field(
        default=MODEL_CACHE_MOUNT, pattern=r"^/", description="Where the cache is mounted."
    )


class ProfileOutput(SpecModel):
    claimName: str | None = Field(
        default=None,
        description="PersistentVolumeClaim for results when the job names none.",
    )


class ProfileDefaults(SpecModel):
    """Merged under each job: the job's own value wins where the limits let it set one."""

    image: str | None = Field(default=None, description="Trainer image when the job sets none.")
    nodeSelector: dict[str, str] = Field(
        default_factory=dict,
        description="Node labels every pod must match (the GPU pool). Merged with the job's; "
        "a job may not change a key set here unless limits.allowSchedulingOverrides.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Tolerations added to every pod (the pool's taints)."
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        description="Pod affinity (a core/v1 Affinity) for every pod; tenants cannot set one.",
    )
    priorityClassName: str | None = Field(
        default=None, description="PriorityClass of every pod; tenants cannot set one."
    )
    queueName: str | None = Field(
        default=None,
        description="Kueue LocalQueue (label kueue.x-k8s.io/queue-name) when the job has none.",
    )
    cpuPerGpu: str | None = Field(
        default=None,
        pattern=QUANTITY_PATTERN,
        description="CPU request and limit per GPU when the job sets no cpu (one GPU for a CPU job).",
    )
    memoryPerGpu: str | None = Field(
        default=None,
        pattern=QUANTITY_PATTERN,
        description="Memory request and limit per GPU when the job sets no memory (one GPU for a CPU job).",
    )
    ephemeralStoragePerGpu: str | None = Field(
        default=None,
        pattern=QUANTITY_PATTERN,
        description="Ephemeral storage per GPU (at least one): the pod's request and the size "
        "limit of its scratch emptyDirs, so a large download cannot fill a node.",
    )
    modelCache: ModelCacheSpec | None = Field(
        default=None, description="Shared model cache mounted as HF_HOME in every pod."
    )
    output: ProfileOutput = Field(
        default_factory=ProfileOutput, description="Where results go when the job says nothing."
    )
    env: list[EnvVar] = Field(
        default_factory=list,
        # Bounded, so the API server's cost estimate of the CEL rule over it stays small.
        max_length=64,
        description="Environment for every pod (proxies, mirrors such as HF_ENDPOINT). Tenants "
        "may not set a name listed here; names the operator sets itself (HOME, HF_HOME, "
        "HF_TOKEN, SFTJOB_*, ...) are refused.",
    )
    activeDeadlineSeconds: PositiveInt | None = Field(
        default=None, description="Deadline of a job that sets none."
    )
    runAsUser: int | None = Field(
        default=None,
        ge=1,
        description="User id of the trainer; empty leaves it to the image and the platform "
        "(OpenShift assigns one per namespace).",
    )
    runAsGroup: int | None = Field(default=None, ge=0, description="Group id of the trainer.")
    fsGroup: int | None = Field(default=None, ge=0, description="Group owning mounted volumes.")

    # Also a CEL rule of the CRD, so the API server refuses such a profile: a profile the
    # operator could not parse would otherwise leave its namespaces without their limits.
    cross_field_rules = (
        CrossFieldRule(
            field="env",
            message="sets a name the operator sets itself in every trainer pod ("
            + ", ".join(sorted(OPERATOR_SET_ENV))
            + "): remove it (modelCache gives the HF cache, a job's secrets.hfToken the token)",
            cel="!has(self.env) || self.env.all(e, !(e.name in ["
            + ", ".join(f"'{name}'" for name in sorted(OPERATOR_SET_ENV))
            + "]))",
            holds=lambda d: not any(var.name in OPERATOR_SET_ENV for var in d.env),
        ),
    )


class ProfileLimits(SpecModel):
    """What a job may ask for. An empty list means no restriction, except where stated."""

    allowedImages: list[str] = Field(
        default_factory=list,
        description="Image prefixes (registry.example.com/ml/) or exact references with "
        "@sha256: digests the trainer may run; the effective image (the job's, else the "
        "profile's, else the operator's default) must match one. A prefix matches only up to a "
        "'/', ':' or '@' (registry/ml allows registry/ml/x and registry/ml:1, not "
        "registry/ml-evil). References are compared as written.",
    )
    allowedMethods: list[Method] = Field(
        default_factory=list, description="full, lora, qlora; empty allows all three."
    )
    maxNodes: PositiveInt | None = Field(default=None, description="Most pods per job.")
    maxGpusPerJob: int | None = Field(
        default=None, ge=0, description="Most GPUs per job (nodes x gpusPerNode)."
    )
    maxActiveDeadlineSeconds: PositiveInt | None = Field(
        default=None,
        description="Longest deadline a job may set; a job with none gets "
        "defaults.activeDeadlineSeconds, else this.",
    )
    allowedModelSources: list[str] = Field(
        default_factory=list,
        description="Prefixes of the sources a job may load from: model.name and "
        "model.tokenizer (hub org/, e.g. Qwen/), model.path and dataset.path (/models/), "
        "dataset.name and dataset.uri (s3://bucket/). Matched like allowedImages; a source "
        "with a '..' segment never matches. Empty: any source.",
    )
    allowedSecretNames: list[str] | None = Field(
        default=None,
        description="Secrets a job may name as its hub token (secrets.hfToken) or S3 key pair "
        "(secrets.s3); empty list: none; unset: any.",
    )
    protectedEnv: list[str] = Field(
        default_factory=list,
        description="Env names tenants may not set, on top of the operator's own (always "
        "protected) and the names in defaults.env.",
    )
    allowRemoteCode: bool = Field(
        default=False, description="Whether model.trustRemoteCode may be true."
    )
    allowedExtraArgs: list[str] | None = Field(
        default=None,
        description="training.extraArgs keys a job may set; empty list: none; unset: any.",
    )
    allowSchedulingOverrides: bool = Field(
        default=False,
        description="Whether a job may add tolerations or change nodeSelector keys the "
        "profile sets.",
    )


class SFTProfileSpec(SpecModel):
    cross_field_rules = (
        CrossFieldRule(
            field="defaults.activeDeadlineSeconds",
            message="is longer than limits.maxActiveDeadlineSeconds: every job without its own "
            "deadline would break the profile",
            cel="!has(self.defaults) || !has(self.limits) || "
            "!has(self.defaults.activeDeadlineSeconds) || "
            "!has(self.limits.maxActiveDeadlineSeconds) || "
            "self.defaults.activeDeadlineSeconds <= self.limits.maxActiveDeadlineSeconds",
            holds=lambda s: (
                s.defaults.activeDeadlineSeconds is None
                or s.limits.maxActiveDeadlineSeconds is None
                or s.defaults.activeDeadlineSeconds <= s.limits.maxActiveDeadlineSeconds
            ),
        ),
    )

    namespaceSelector: LabelSelector = Field(
        default_factory=LabelSelector,
        description="Namespaces whose jobs use this profile; empty selects all.",
    )
    defaults: ProfileDefaults = Field(
        default_factory=ProfileDefaults, description="Merged under each job's spec."
    )
    limits: ProfileLimits = Field(
        default_factory=ProfileLimits, description="What a job may ask for."
    )


class SFTProfileStatus(StatusModel):
    observedGeneration: int | None = Field(default=None, description="Generation last read.")


class ProfileMeta(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = ""
    generation: int | None = None
    resourceVersion: str | None = None


class SFTProfile(BaseModel):
    model_config = ConfigDict(extra="allow")
    apiVersion: str = f"{GROUP}/{VERSION}"
    kind: str = PROFILE_KIND
    metadata: ProfileMeta = Field(default_factory=ProfileMeta)
    spec: SFTProfileSpec = Field(default_factory=SFTProfileSpec)


def parse_profile(document: Any) -> SFTProfile:
    """Validate a whole SFTProfile document; errors name their field (spec.limits.maxNodes)."""
    if not isinstance(document, Mapping):
        raise SpecError([FieldError(path="", message="an SFTProfile document must be a mapping")])
    doc = dict(document)
    doc.pop("status", None)  # written by the cluster, not the admin's to set
    errors: list[FieldError] = []
    if doc.get("apiVersion") != API_VERSION:
        errors.append(FieldError(path="apiVersion", message=f"must be {API_VERSION}"))
    if doc.get("kind") != PROFILE_KIND:
        errors.append(FieldError(path="kind", message=f"must be {PROFILE_KIND}"))
    if not (doc.get("metadata") or {}).get("name"):
        errors.append(FieldError(path="metadata.name", message="required field is missing"))
    try:
        profile = SFTProfile.model_validate(doc)
    except ValidationError as exc:
        errors += errors_from_validation(exc, SFTProfile)
    if errors:
        raise SpecError(errors)
    return profile
