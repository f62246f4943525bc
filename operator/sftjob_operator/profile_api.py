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

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .api import GROUP, VERSION, EnvVar, Method, PositiveInt, SpecModel, StatusModel, Toleration

PROFILE_KIND = "SFTProfile"
PROFILE_PLURAL = "sftprofiles"
PROFILE_SINGULAR = "sftprofile"
PROFILE_SHORT_NAMES = ["sftp"]

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
        default=None, description="CPU request and limit per GPU when the job sets no cpu."
    )
    memoryPerGpu: str | None = Field(
        default=None, description="Memory request and limit per GPU when the job sets no memory."
    )
    ephemeralStoragePerGpu: str | None = Field(
        default=None,
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
        description="Environment for every pod (proxies, mirrors). A job may set a name listed "
        "here only if it is not protected.",
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


class ProfileLimits(SpecModel):
    """What a job may ask for. An empty list means no restriction, except where stated."""

    allowedImages: list[str] = Field(
        default_factory=list,
        description="Image prefixes (registry.example.com/ml/) or exact references with "
        "@sha256: digests the trainer may run; the effective image must match one.",
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
        description="Prefixes of model.name (hub org/, e.g. Qwen/), model.path (/models/) or "
        "dataset.uri the job may load from.",
    )
    allowedSecretNames: list[str] | None = Field(
        default=None,
        description="Secrets a job may name as its hub token; empty list: none; unset: any.",
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
