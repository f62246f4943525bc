"""The SFTJob API: typed spec and status, the single source of truth.

The CRD in ``crds/`` is generated from these models (``sftjob crd``), the operator
parses every SFTJob through them, and the trainer reads the resolved config they
produce. Field names are camelCase as in every Kubernetes API; numbers are numbers
(``learningRate: 2e-4``).

Parsing never raises pydantic's own errors to callers: ``parse_sftjob`` turns them
into ``SpecError`` with one ``FieldError`` per problem, each naming the field path
(``spec.training.maxLength``) and the fix.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic.alias_generators import to_camel

GROUP = "tuning.sftjob.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "SFTJob"
PLURAL = "sftjobs"
SINGULAR = "sftjob"
SHORT_NAMES = ["sft"]
CATEGORIES = ["all", "ml", "sftjob"]

DEFAULT_GPU_RESOURCE = "nvidia.com/gpu"
# The trainer image of a job that names none (and whose profile names none); the operator's
# --image / SFTJOB_TRAINER_IMAGE replaces it. Here, not in children.py, so the policy (which
# must allow the image a job will really run) reads it without importing the pod builders.
DEFAULT_TRAINER_IMAGE = "ghcr.io/sftjob/sftjob-trainer:0.1.0"
DEFAULT_OUTPUT_PATH = "/output"

# Learning rates the reference recommends, per method.
LORA_LEARNING_RATE = 2e-4
FULL_LEARNING_RATE = 2e-5

# Old or snake_case spellings users bring from TRL scripts and blog posts; each maps to
# the field they meant and the reason, so the error can say exactly what to write.
RENAMED_FIELDS: dict[str, tuple[str, str]] = {
    "maxSeqLength": ("maxLength", "TRL renamed max_seq_length to max_length"),
    "max_seq_length": ("maxLength", "TRL renamed max_seq_length to max_length"),
    "warmup_ratio": ("warmupRatio", "fields are camelCase"),
    "lr": ("learningRate", "the field is spelled out"),
    "epochs": ("numTrainEpochs", "the field is named after TRL's num_train_epochs"),
    "batchSize": ("perDeviceTrainBatchSize", "the micro-batch is per device"),
    "evaluationStrategy": ("extraArgs.eval_strategy", "transformers renamed it eval_strategy"),
}


class RuleViolation(ValueError):
    """A cross-field rule broken inside one spec object; `field` is relative to that object."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class CrossFieldRule:
    """A rule between fields of one spec object, stated once for both places that enforce it.

    The operator runs ``holds`` on the parsed model (a broken rule is a ``RuleViolation`` at
    ``field``); the CRD carries ``cel`` as an ``x-kubernetes-validations`` rule of the same
    object, so the API server refuses the object on ``kubectl apply`` with the same message at
    the same field. ``cel`` sees the object after the server applied the CRD's defaults, and
    null fields read as absent (``has()`` is false), as ``None`` does here. Fields in
    ``presence`` are ones whose being *set* the rule reads: the CRD gives them no default
    (the model's default still applies when the operator parses the spec).
    tests/local/test_sftjob_cross_field_rules.py runs both sides on the same cases.
    """

    field: str
    message: str
    cel: str
    holds: Callable[[Any], bool]
    presence: tuple[str, ...] = ()

    def check(self, model: Any) -> None:
        if not self.holds(model):
            raise RuleViolation(self.field, self.message)

    def x_kubernetes_validation(self) -> dict[str, str]:
        return {"rule": self.cel, "message": self.message, "fieldPath": f".{self.field}"}


def _declare_cross_field_rules(schema: dict[str, Any], model: type[Any]) -> None:
    """JSON Schema hook of every spec object: its rules as x-kubernetes-validations."""
    rules: tuple[CrossFieldRule, ...] = getattr(model, "cross_field_rules", ())
    if not rules:
        return
    schema["x-kubernetes-validations"] = [rule.x_kubernetes_validation() for rule in rules]
    for rule in rules:
        for name in rule.presence:
            prop = schema.get("properties", {}).get(name, {})
            if "default" in prop:
                default = prop.pop("default")
                prop["description"] = f"{prop.get('description', '')} Empty: {default}.".strip()


class SpecModel(BaseModel):
    """Base for every spec object: camelCase, no unknown fields, no coercion of strings."""

    model_config = ConfigDict(
        extra="forbid",
        frozen=True,
        # YAML already types numbers and booleans; a quoted "4" is a mistake worth naming.
        strict=True,
        json_schema_extra=_declare_cross_field_rules,
    )
    # Rules between this object's fields; checked in order, the first broken one is reported.
    cross_field_rules: ClassVar[tuple[CrossFieldRule, ...]] = ()

    @model_validator(mode="after")
    def _check_cross_field_rules(self) -> Any:
        for rule in self.cross_field_rules:
            rule.check(self)
        return self


class StatusModel(BaseModel):
    """Base for status objects: camelCase, tolerant of fields written by newer versions."""

    model_config = ConfigDict(
        extra="ignore",
    )


PositiveInt = Annotated[int, Field(ge=1)]


# --------------------------------------------------------------------------- spec


class ModelSource(SpecModel):
    name: str | None = Field(
        default=None,
        description="Hugging Face hub id of the base model, e.g. Qwen/Qwen2.5-1.5B-Instruct. "
        "Set exactly one of name or path.",
    )
    path: str | None = Field(
        default=None,
        description="Path of the base model inside the pod (a mounted volume). "
        "Set exactly one of name or path.",
    )
    revision: str | None = Field(
        default=None, description="Hub revision (branch, tag or commit) when name is set."
    )
    tokenizer: str | None = Field(
        default=None,
        description="Tokenizer hub id or path when it differs from the model's own.",
    )
    trustRemoteCode: bool = Field(
        default=False, description="Allow model code from the hub (transformers trust_remote_code)."
    )
    attnImplementation: str | None = Field(
        default=None,
        description="Attention kernel (transformers attn_implementation), e.g. sdpa, "
        "flash_attention_2, flex_attention. Empty lets the trainer choose.",
    )
    parametersBillions: float | None = Field(
        default=None,
        gt=0,
        description="Model size in billions of parameters, for advisories. Guessed from the "
        "name (e.g. 1.5B) when empty.",
    )

    cross_field_rules = (
        CrossFieldRule(
            field="name",
            message="set exactly one of model.name (a hub id) or model.path (a path in a volume)",
            cel="has(self.name) != has(self.path)",
            holds=lambda m: (m.name is None) != (m.path is None),
        ),
    )


DatasetFormat = Literal["auto", "messages", "prompt-completion", "text"]
# s3://bucket[/key]: a bucket name as S3 allows it (3-63 lowercase letters, digits, '.', '-').
S3_URI_PATTERN = r"^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"


class EvalSource(SpecModel):
    """Held-out data the trainer computes the eval loss on (set exactly one source)."""

    split: str | None = Field(
        default=None,
        description="A split of the same hub dataset (dataset.name), e.g. validation.",
    )
    path: str | None = Field(
        default=None,
        description="A JSON/JSONL/Parquet/CSV file or a folder of them inside the pod, in the "
        "training data's format.",
    )
    fraction: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Hold out this fraction of the training rows (after dataset.limit), as "
        "datasets' train_test_split: ceil(fraction x rows) rows, chosen with seed.",
    )
    seed: int = Field(default=42, ge=0, description="Seed of the held-out split (fraction).")

    cross_field_rules = (
        CrossFieldRule(
            field="split",
            message="set exactly one of dataset.eval.split (a split of dataset.name), "
            "dataset.eval.path (a file or folder) or dataset.eval.fraction (held-out rows)",
            cel="(has(self.split) ? 1 : 0) + (has(self.path) ? 1 : 0) "
            "+ (has(self.fraction) ? 1 : 0) == 1",
            holds=lambda e: sum(v is not None for v in (e.split, e.path, e.fraction)) == 1,
        ),
    )


class DatasetSource(SpecModel):
    name: str | None = Field(
        default=None,
        description="Hugging Face hub id of the dataset, e.g. trl-lib/Capybara. "
        "Set exactly one of name, path or uri.",
    )
    path: str | None = Field(
        default=None,
        description="A JSON/JSONL/Parquet/CSV file or a folder of them inside the pod.",
    )
    uri: str | None = Field(
        default=None,
        description="URI of a data file: https://..., or on S3-compatible storage "
        "s3://bucket/train.jsonl or s3://bucket/prefix/ for a folder of files (endpoint: "
        "objectStorage, credentials: secrets.s3).",
    )
    config: str | None = Field(default=None, description="Dataset configuration (subset) name.")
    split: str = Field(default="train", description="Split to train on.")
    format: DatasetFormat = Field(
        default="auto",
        description="Row format: messages (conversational), prompt-completion, text, or auto "
        "to detect it from the columns.",
    )
    limit: PositiveInt | None = Field(
        default=None,
        description="Train on the first N rows only (like dataset.select(range(N))).",
    )
    numSamples: PositiveInt | None = Field(
        default=None,
        description="Declared row count of the split, so the plan can be computed before the "
        "data is loaded. The trainer reports the measured count.",
    )
    textField: str = Field(default="text", description="Column holding the text for format text.")
    eval: EvalSource | None = Field(
        default=None,
        description="Evaluation data: a split, a file, or a held-out fraction of the training "
        "rows. The eval loss is logged every training.evalSteps and reported in the status.",
    )

    cross_field_rules = (
        CrossFieldRule(
            field="name",
            message="set exactly one of dataset.name (hub id), dataset.path (file or folder) "
            "or dataset.uri (fsspec URI)",
            cel="(has(self.name) ? 1 : 0) + (has(self.path) ? 1 : 0) + (has(self.uri) ? 1 : 0) == 1",
            holds=lambda d: sum(v is not None for v in (d.name, d.path, d.uri)) == 1,
        ),
        CrossFieldRule(
            field="eval.split",
            message="is a split of a hub dataset, but dataset.name is not set: use "
            "dataset.eval.path for a file or dataset.eval.fraction to hold out rows",
            cel="!has(self.eval) || !has(self.eval.split) || has(self.name)",
            holds=lambda d: d.eval is None or d.eval.split is None or d.name is not None,
        ),
    )

    def known_size(self) -> int | None:
        """Rows the trainer will see before preparation, when the spec tells."""
        sizes = [s for s in (self.limit, self.numSamples) if s is not None]
        return min(sizes) if sizes else None


Method = Literal["full", "lora", "qlora"]


class LoraSpec(SpecModel):
    r: PositiveInt = Field(default=16, description="LoRA rank.")
    alpha: PositiveInt = Field(default=32, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(default=0.05, ge=0, lt=1, description="LoRA dropout.")
    targetModules: list[str] = Field(
        default_factory=lambda: ["all-linear"],
        min_length=1,
        description='Modules to adapt; ["all-linear"] adapts every linear layer but the output.',
    )

    @field_validator("targetModules", mode="before")
    @classmethod
    def _single_string(cls, value: Any) -> Any:
        # peft accepts a string; users write `targetModules: all-linear`.
        return [value] if isinstance(value, str) else value


LrScheduler = Literal[
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
    "reduce_lr_on_plateau",
    "cosine_with_min_lr",
    "warmup_stable_decay",
]
PackingStrategy = Literal["bfd", "bfd_split", "wrapped"]

# SFTConfig arguments that have a first-class field: setting them in extraArgs would
# silently fight the plan, so the spec rejects them and names the field to use.
FIRST_CLASS_ARGS: dict[str, str] = {
    "per_device_train_batch_size": "training.perDeviceTrainBatchSize",
    "gradient_accumulation_steps": "training.gradientAccumulationSteps",
    "num_train_epochs": "training.numTrainEpochs",
    "max_steps": "training.maxSteps",
    "learning_rate": "training.learningRate",
    "lr_scheduler_type": "training.lrSchedulerType",
    "warmup_ratio": "training.warmupRatio",
    "warmup_steps": "training.warmupSteps",
    "max_length": "training.maxLength",
    "max_seq_length": "training.maxLength (TRL renamed max_seq_length to max_length)",
    "packing": "training.packing",
    "packing_strategy": "training.packingStrategy",
    "gradient_checkpointing": "training.gradientCheckpointing",
    "activation_checkpointing": "training.gradientCheckpointing",
    "activation_checkpointing_kwargs": "training.gradientCheckpointing",
    "bf16": "training.bf16",
    "logging_steps": "training.loggingSteps",
    "save_steps": "training.saveSteps",
    "seed": "training.seed",
    "dataloader_drop_last": "training.dataloaderDropLast",
    "output_dir": "output.path",
    "use_cpu": "resources.gpusPerNode (0 means CPU)",
    "resume_from_checkpoint": "(automatic: the trainer resumes from the newest checkpoint)",
    "eval_steps": "training.evalSteps",
    "load_best_model_at_end": "output.keepBest",
    "metric_for_best_model": "output.keepBest (the best checkpoint by eval loss)",
}


SpeedSwitch = Literal["auto", "on", "off"]
SpeedPreset = Literal["default", "exact"]
# The levers that change numbers (each lever module's EXACT is False; the trainer's tests
# check this list against them): `preset: exact` turns them off and refuses them turned on.
NOT_EXACT_LEVERS = (
    "flexAttention",
    "varlenAttention",
    "autoMicroBatch",
    "ligerKernel",
    "compile",
    "lightMetrics",
    "bf16ResidualStream",
    "fuseGradientAccumulation",
    "fp8Matmuls",
)


class SpeedSpec(SpecModel):
    """Speed levers of the trainer (docs/performance.md); each can be turned off."""

    flexAttention: SpeedSwitch = Field(
        default="auto",
        description="flex_attention with document masks for packed batches (auto: on with CUDA "
        "and packing bfd where varlenAttention does not take its place; ignored when "
        "model.attnImplementation is set).",
    )
    varlenAttention: SpeedSwitch = Field(
        default="auto",
        description="torch's FlashAttention-2 kernel for packed documents, from the document "
        "boundaries TRL computes: no mask and nothing compiled, where flex attention is "
        "compiled on its first calls (auto: on where the model is not compiled, with CUDA, "
        "bf16 and packing bfd, for a model whose attention is plain causal (no sliding "
        "window, soft-capping or attention dropout), in flexAttention's place unless "
        "flexAttention is on; it also attends inside compiled decoder layers, while a "
        "whole compiled model keeps flex attention).",
    )
    autoMicroBatch: SpeedSwitch = Field(
        default="auto",
        description="Largest micro-batch that fits, accumulation adjusted so the effective "
        "batch is unchanged; gradient checkpointing only when memory needs it.",
    )
    ligerKernel: SpeedSwitch = Field(
        default="auto",
        description="liger-kernel's RMSNorm/SwiGLU/RoPE kernels where the image has them "
        "(the project's trainer image does); under auto, not for a compiled model.",
    )
    compile: SpeedSwitch = Field(
        default="auto",
        description="torch.compile the model (auto: on with CUDA and flex attention, not for "
        "qlora or fsdp, nor for a short run whose compiled artifacts are not at hand; each "
        "micro-batch padded to one static shape so it compiles once). A full fine-tune or "
        "LoRA on one GPU that the varlen kernel serves compiles only its decoder layers "
        "(seconds) from ~3.9M tokens per GPU up to ~75M (LoRA: from ~1.0M up to ~178M); the "
        "whole model (minutes) beyond.",
    )
    lightMetrics: SpeedSwitch = Field(
        default="auto",
        description="Skip TRL's per-step entropy and token-accuracy metrics and the host syncs "
        "that read them back every micro-step; over compiled static batches that train on "
        "nearly every token, keep the LM head's logits for its backward when they fit in 5% "
        "of the GPU (auto: with CUDA; off keeps TRL's path and metrics).",
    )
    dataWorkers: SpeedSwitch = Field(
        default="auto",
        description="Collate and prefetch batches in 2 DataLoader worker processes, and "
        "tokenize a dataset of at least 1,000 rows in up to 8 processes (125 rows each at "
        "least; packed in one, so the same rows); same batches in the same order (auto: on "
        "with CUDA and at least 4 CPUs per GPU process; extraArgs dataloader_num_workers or "
        "dataset_num_proc are kept as given).",
    )
    castWeightsOncePerStep: SpeedSwitch = Field(
        default="auto",
        description="Linear layers compute with bf16 copies of their fp32 weights, made once "
        "per optimizer step instead of cast at every micro-step; the same arithmetic (auto: "
        "on with CUDA where the micro-batch estimate holds the copies without a smaller "
        "micro-batch, not for qlora; needs bf16 and one process, not fsdp).",
    )
    bf16ResidualStream: SpeedSwitch = Field(
        default="auto",
        description="Cast the input embedding's output to bf16, so hidden states and residual "
        "additions between layers are bf16 (weights and optimizer stay fp32); rounds the "
        "residual additions, losses within 1.3e-4 on the bench (auto: on with CUDA and bf16 "
        "for full fine-tunes, off for LoRA and QLoRA).",
    )
    fuseGradientAccumulation: SpeedSwitch = Field(
        default="auto",
        description="With castWeightsOncePerStep, each layer's weight gradient is added into "
        "the fp32 gradient inside the matmul that computes it (fp32 output, not rounded to "
        "bf16; no separate add kernel) (auto: on with CUDA for full fine-tunes wherever the "
        "copies are).",
    )
    fp8Matmuls: SpeedSwitch = Field(
        default="auto",
        description="With castWeightsOncePerStep, linear layers of 64+ features multiply in "
        "fp8 (torch._scaled_mm: e4m3 inputs and weights, e5m2 gradients, one scale per "
        "tensor; fp8 weight copies made once per optimizer step); the LM head and LoRA "
        "adapters stay bf16. Needs fp8 tensor cores (compute capability 8.9+: Ada, Hopper). "
        "Rounds every product to fp8's precision: compare the loss curve (auto: off; on to "
        "opt in: +5.8% full fine-tune, +2.8% LoRA on an H100 with the model compiled, the "
        "full fine-tune's losses up to 1.4% off plain TRL's; docs/performance.md).",
    )
    rotaryTablesOnce: SpeedSwitch = Field(
        default="auto",
        description="Compute the rotary embedding's cos/sin tables once per forward into one "
        "buffer, instead of letting the compiler recompute them inside every layer's "
        "query/key rotation; the same values, bf16 tables rounded as eager rounds them (auto: "
        "on wherever the model is compiled).",
    )
    parallelSave: SpeedSwitch = Field(
        default="auto",
        description="Write each checkpoint's weights with several threads: the same "
        "safetensors files, byte for byte, in about a quarter of the time for a 1.5B "
        "model's fp32 weights (auto: on with CUDA).",
    )
    preset: SpeedPreset = Field(
        default="default",
        description="default: every lever by its switch. exact: only the levers that change no "
        "number (dataWorkers, castWeightsOncePerStep, rotaryTablesOnce, parallelSave: bit for "
        "bit plain TRL "
        "on CPU); the others are turned off, and turning one on is refused. Much slower on a "
        "GPU (docs/performance.md, 'The exact preset').",
    )

    cross_field_rules = (
        CrossFieldRule(
            field="preset",
            message="speed.preset exact keeps only the levers that change no number: set "
            + ", ".join(NOT_EXACT_LEVERS)
            + " to auto or off (or use preset default)",
            cel="self.preset != 'exact' || ("
            + " && ".join(f"self.{name} != 'on'" for name in NOT_EXACT_LEVERS)
            + ")",
            holds=lambda s: (
                s.preset != "exact" or all(getattr(s, name) != "on" for name in NOT_EXACT_LEVERS)
            ),
        ),
    )


class TrainingSpec(SpecModel):
    perDeviceTrainBatchSize: PositiveInt = Field(
        default=2,
        description="Micro-batch: samples on ONE device at once. Decides GPU memory use.",
    )
    gradientAccumulationSteps: PositiveInt = Field(
        default=8, description="Micro-batches accumulated before one optimizer step."
    )
    numTrainEpochs: float = Field(
        default=3.0,
        gt=0,
        description="Passes over the data; fractional values stop mid-epoch. "
        "Ignored when maxSteps is set.",
    )
    maxSteps: PositiveInt | None = Field(
        default=None, description="Total optimizer steps; overrides numTrainEpochs when set."
    )
    learningRate: float | None = Field(
        default=None,
        gt=0,
        lt=1,
        description="Peak learning rate. Empty: 2e-4 for lora/qlora, 2e-5 for full.",
    )
    lrSchedulerType: LrScheduler = Field(default="cosine", description="Learning-rate schedule.")
    warmupRatio: float = Field(
        default=0.03,
        ge=0,
        lt=1,
        description="Fraction of total steps spent warming up (ceil(total x ratio) steps).",
    )
    warmupSteps: int | None = Field(
        default=None,
        ge=0,
        description="Warm-up steps, instead of warmupRatio (set one of the two).",
    )
    maxLength: PositiveInt = Field(
        default=2048, description="Maximum tokens per sequence (or per packed row)."
    )
    packing: bool = Field(
        default=False,
        description="Pack several samples into each maxLength row. Changes the row count, so "
        "the plan becomes an estimate until the trainer measures it.",
    )
    packingStrategy: PackingStrategy = Field(
        default="bfd", description="How packing fills rows: bfd, bfd_split or wrapped."
    )
    gradientCheckpointing: bool = Field(
        default=True,
        description="Recompute activations in the backward pass: about 20% slower, much less "
        "memory. Needed for large models.",
    )
    bf16: bool | None = Field(
        default=None,
        description="bfloat16 mixed precision (Ampere or newer GPUs). Empty: on for GPU jobs, "
        "off for CPU jobs.",
    )
    loggingSteps: PositiveInt = Field(default=10, description="Log loss every N steps.")
    saveSteps: PositiveInt = Field(
        default=100, description="Write a checkpoint every N steps (resume point after failures)."
    )
    saveTotalLimit: PositiveInt = Field(
        default=2, description="Checkpoints kept in the output folder."
    )
    seed: int = Field(default=42, description="Random seed.")
    dataloaderDropLast: bool = Field(
        default=False, description="Drop the last incomplete micro-batch of each epoch."
    )
    speed: SpeedSpec = Field(
        default_factory=SpeedSpec,
        description="Speed levers (flex attention, micro-batch sizing, liger, compile, "
        "metrics, data workers, weight copies, bf16 residual stream, gradient accumulation in "
        "the matmul); each can be turned off "
        "(see docs/performance.md).",
    )
    extraArgs: dict[str, Any] = Field(
        default_factory=dict,
        description="Further SFTConfig arguments, snake_case as in TRL (e.g. "
        "{assistant_only_loss: true}). Checked against SFTConfig by the trainer.",
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    )
    evalSteps: PositiveInt | None = Field(
        default=None,
        description="Compute the eval loss on dataset.eval every N optimizer steps. Empty with "
        "dataset.eval: every saveSteps, so each checkpoint has one.",
    )

    @field_validator("extraArgs")
    @classmethod
    def _no_first_class_args(cls, value: dict[str, Any]) -> dict[str, Any]:
        clashes = [
            f"{key}: use {FIRST_CLASS_ARGS[key]}" for key in value if key in FIRST_CLASS_ARGS
        ]
        if clashes:
            raise ValueError("has its own field, set it there instead: " + "; ".join(clashes))
        return value

    cross_field_rules = (
        CrossFieldRule(
            field="warmupSteps",
            message="set either training.warmupRatio or training.warmupSteps, not both: "
            "remove one of them",
            cel="!has(self.warmupSteps) || !has(self.warmupRatio)",
            holds=lambda t: t.warmupSteps is None or "warmupRatio" not in t.model_fields_set,
            # A server default for warmupRatio would make every warmupSteps job break the rule.
            presence=("warmupRatio",),
        ),
    )

    def learning_rate_for(self, method: Method) -> float:
        if self.learningRate is not None:
            return self.learningRate
        return FULL_LEARNING_RATE if method == "full" else LORA_LEARNING_RATE


class Toleration(SpecModel):
    key: str | None = Field(default=None, description="Taint key to tolerate.")
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal."
    )
    value: str | None = Field(default=None, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty means all."
    )
    tolerationSeconds: int | None = Field(
        default=None, description="How long a NoExecute taint is tolerated."
    )


QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei|e[0-9]+)?$"


class ResourcesSpec(SpecModel):
    nodes: PositiveInt = Field(default=1, description="Pods (machines) in the run, one rank each.")
    gpusPerNode: int = Field(
        default=1,
        ge=0,
        le=16,
        description="GPUs per pod; one training process per GPU. 0 runs a CPU job with one "
        "process per pod.",
    )
    gpuResourceName: str = Field(
        default=DEFAULT_GPU_RESOURCE, description="Extended resource that schedules GPUs."
    )
    gpuType: str | None = Field(
        default=None,
        description="GPU model (e.g. H100, A100, V100), used for advisories such as bf16 support.",
    )
    cpu: str | None = Field(
        default=None, pattern=QUANTITY_PATTERN, description="CPU request and limit per pod."
    )
    memory: str | None = Field(
        default=None, pattern=QUANTITY_PATTERN, description="Memory request and limit per pod."
    )
    sharedMemory: str | None = Field(
        default="8Gi",
        pattern=QUANTITY_PATTERN,
        description="Size of /dev/shm (memory-backed emptyDir) for data loader workers and NCCL.",
    )
    nodeSelector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods must match."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints the pods tolerate (e.g. GPU node taints)."
    )

    @property
    def processes_per_node(self) -> int:
        # A CPU job runs one process per pod: accelerate's --cpu ignores --num_processes.
        return max(self.gpusPerNode, 1)

    @property
    def world_size(self) -> int:
        return self.nodes * self.processes_per_node


class OutputSpec(SpecModel):
    path: str = Field(
        default=DEFAULT_OUTPUT_PATH,
        description="Folder in the pod for checkpoints, logs and the final model or adapter.",
    )
    claimName: str | None = Field(
        default=None,
        description="PersistentVolumeClaim mounted at path, so checkpoints survive pod "
        "restarts. Empty uses an emptyDir (lost with the pod).",
    )
    keepBest: bool = Field(
        default=False,
        description="Keep the checkpoint with the lowest eval loss (needs dataset.eval; "
        "evaluates at every saveSteps) and write it as the final model.",
    )
    uri: str | None = Field(
        default=None,
        pattern=S3_URI_PATTERN,
        description="s3://bucket/prefix/ on S3-compatible object storage: at the end, rank 0 "
        "uploads the final model (or adapter), its tokenizer and model card there, and writes "
        "the completion marker _SUCCESS (a manifest of every file's size and sha256) last. "
        "Only a prefix with _SUCCESS holds a complete model. Endpoint: objectStorage; "
        "credentials: secrets.s3. Checkpoints stay under path.",
    )
    resume: Literal["auto", "never"] = Field(
        default="auto",
        description="auto resumes from the newest checkpoint in the output when it was written "
        "by this job with the same training settings, and refuses any other; never starts from "
        "step 0 and moves what an earlier run left in the output to "
        "superseded/<time>/ (nothing is deleted).",
    )
    mergeAdapter: bool = Field(
        default=False,
        description="For method lora or qlora, also write the base model with the adapter "
        "merged in (a full transformers model) to <path>/merged.",
    )


class VolumeSpec(SpecModel):
    name: str = Field(
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        # The pod volume is named user-<name>, which must stay a 63-character DNS label.
        max_length=58,
        description="Volume name.",
    )
    claimName: str = Field(description="PersistentVolumeClaim to mount (models, datasets).")
    mountPath: str = Field(pattern=r"^/", description="Absolute path in the pod.")
    readOnly: bool = Field(default=True, description="Mount read-only.")


class SecretKeyRef(SpecModel):
    name: str = Field(description="Secret name in the SFTJob's namespace.")
    key: str = Field(default="token", description="Key inside the Secret.")


class S3CredentialsRef(SpecModel):
    name: str = Field(description="Secret name in the SFTJob's namespace.")
    accessKeyIdKey: str = Field(
        default="AWS_ACCESS_KEY_ID", description="Key of the access key id inside the Secret."
    )
    secretAccessKeyKey: str = Field(
        default="AWS_SECRET_ACCESS_KEY",
        description="Key of the secret access key inside the Secret.",
    )


class SecretsSpec(SpecModel):
    hfToken: SecretKeyRef | None = Field(
        default=None,
        description="Secret holding the Hugging Face token (HF_TOKEN). A reference, never a "
        "literal token.",
    )
    s3: S3CredentialsRef | None = Field(
        default=None,
        description="Secret holding the S3 access key pair for s3:// in dataset.uri and "
        "output.uri, given to the trainer as AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
        "(kubectl create secret generic s3-credentials --from-literal=AWS_ACCESS_KEY_ID=... "
        "--from-literal=AWS_SECRET_ACCESS_KEY=...). Empty: the pod's own AWS credentials "
        "(e.g. a ServiceAccount role).",
    )

    @field_validator("hfToken", mode="before")
    @classmethod
    def _no_literal_token(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError(
                "must be a Secret reference {name: <secret>, key: token}, never a literal "
                "token: kubectl create secret generic hf-token --from-literal=token=..."
            )
        return value


class ObjectStorageSpec(SpecModel):
    endpointUrl: str | None = Field(
        default=None,
        pattern=r"^https?://[^/\s]+/?$",
        description="Endpoint of S3-compatible storage (MinIO, Ceph, R2), e.g. "
        "http://minio.storage:9000. Empty: AWS S3.",
    )
    region: str | None = Field(
        default=None, description="Region of the buckets; empty: us-east-1 (or the endpoint's)."
    )


class EnvVar(SpecModel):
    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", description="Variable name.")
    value: str = Field(default="", description="Literal value.")


class RetrySpec(SpecModel):
    maxRestarts: int = Field(
        default=3, ge=0, description="Relaunches allowed after OOM, preemption or lost pods."
    )
    oomAutoShrink: bool = Field(
        default=True,
        description="On out-of-memory, halve perDeviceTrainBatchSize and double "
        "gradientAccumulationSteps (same effective batch and plan) and relaunch.",
    )
    # 600 s, the default of a Deployment's progressDeadlineSeconds: room for the kubelet's
    # image pull back-off (10 s doubling to its 300 s cap, so six pulls) and for a cluster
    # autoscaler to add a node, short enough that a typo in an image or Secret name is
    # reported as a failure within minutes.
    podStartTimeoutSeconds: PositiveInt = Field(
        default=600,
        description="How long a launch may wait for its pods to start while they cannot: "
        "unschedulable, an image that cannot be pulled, a missing Secret or ConfigMap "
        "(CreateContainerConfigError), or a create the API refuses for a reason only an "
        "admin can fix (RBAC, a quota smaller than one pod). Then the job fails with the "
        "kubelet's, scheduler's or API's reason. InvalidImageName and invalid objects "
        "fail at once.",
    )


Distributed = Literal["ddp", "fsdp"]


class SFTJobSpec(SpecModel):
    model: ModelSource = Field(description="Base model to fine-tune.")
    dataset: DatasetSource = Field(description="Training data.")
    method: Method = Field(
        default="lora", description="full fine-tune, lora (peft adapter) or qlora (4-bit base)."
    )
    lora: LoraSpec | None = Field(
        default=None, description="LoRA settings for method lora or qlora."
    )
    training: TrainingSpec = Field(
        default_factory=TrainingSpec, description="Trainer settings (TRL SFTConfig)."
    )
    resources: ResourcesSpec = Field(
        default_factory=ResourcesSpec, description="Pods, GPUs and scheduling."
    )
    distributed: Distributed = Field(
        default="ddp",
        description="ddp replicates the model on every GPU; fsdp shards it (full shard) for "
        "models whose full fine-tune does not fit one GPU.",
    )
    image: str | None = Field(
        default=None, description="Trainer image; empty uses the operator's default."
    )
    output: OutputSpec = Field(default_factory=OutputSpec, description="Where results go.")
    volumes: list[VolumeSpec] = Field(
        default_factory=list, description="Extra PVCs (models, datasets) mounted in every pod."
    )
    secrets: SecretsSpec = Field(default_factory=SecretsSpec, description="Secret references.")
    env: list[EnvVar] = Field(
        default_factory=list, description="Extra environment variables for the trainer."
    )
    retry: RetrySpec = Field(default_factory=RetrySpec, description="Failure handling.")
    suspend: bool = Field(
        default=False,
        description="true stops the pods and keeps the status; false resumes from the "
        "newest checkpoint.",
    )
    ttlSecondsAfterFinished: int | None = Field(
        default=None, ge=0, description="Delete the SFTJob this long after it finished."
    )
    activeDeadlineSeconds: PositiveInt | None = Field(
        default=None, description="Fail with DeadlineExceeded after this long running."
    )
    progressIntervalSeconds: PositiveInt = Field(
        default=10, description="Minimum seconds between progress reports in the status."
    )
    profile: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$",
        description="SFTProfile to run under; empty: the one profile whose namespaceSelector "
        "matches the job's namespace. It must select the namespace either way.",
    )
    objectStorage: ObjectStorageSpec | None = Field(
        default=None,
        description="Where s3:// URIs (dataset.uri, output.uri) are served: endpoint and region.",
    )

    cross_field_rules = (
        CrossFieldRule(
            field="lora",
            message="is set but method is full: remove the lora block or set method: lora",
            cel="self.method != 'full' || !has(self.lora)",
            holds=lambda s: s.method != "full" or s.lora is None,
        ),
        CrossFieldRule(
            field="resources.gpusPerNode",
            message="method qlora needs GPUs (4-bit bitsandbytes kernels): set "
            "resources.gpusPerNode >= 1 or use method: lora",
            cel="self.method != 'qlora' || self.resources.gpusPerNode >= 1",
            holds=lambda s: s.method != "qlora" or s.resources.gpusPerNode >= 1,
        ),
        CrossFieldRule(
            field="distributed",
            message="fsdp with method qlora is not supported: use distributed: ddp",
            cel="self.distributed != 'fsdp' || self.method != 'qlora'",
            holds=lambda s: s.distributed != "fsdp" or s.method != "qlora",
        ),
        CrossFieldRule(
            field="training.evalSteps",
            message="is set but dataset.eval is not: add dataset.eval (a split, a file or a "
            "held-out fraction) or remove training.evalSteps",
            cel="!has(self.training.evalSteps) || has(self.dataset.eval)",
            holds=lambda s: s.training.evalSteps is None or s.dataset.eval is not None,
        ),
        CrossFieldRule(
            field="output.keepBest",
            message="needs an eval loss to pick the best checkpoint by: add dataset.eval or "
            "set output.keepBest: false",
            cel="!self.output.keepBest || has(self.dataset.eval)",
            holds=lambda s: not s.output.keepBest or s.dataset.eval is not None,
        ),
        CrossFieldRule(
            field="training.evalSteps",
            message="must equal training.saveSteps with output.keepBest: the best checkpoint "
            "can only be kept where an evaluation has one (leave evalSteps empty to evaluate "
            "at every saveSteps)",
            cel="!self.output.keepBest || !has(self.training.evalSteps) "
            "|| self.training.saveSteps == self.training.evalSteps",
            holds=lambda s: (
                not s.output.keepBest
                or s.training.evalSteps is None
                or s.training.saveSteps == s.training.evalSteps
            ),
        ),
        CrossFieldRule(
            field="output.mergeAdapter",
            message="is true but method is full: the final model is already a full model; "
            "remove output.mergeAdapter or use method: lora",
            cel="self.method != 'full' || !has(self.output) || !has(self.output.mergeAdapter) "
            "|| !self.output.mergeAdapter",
            holds=lambda s: s.method != "full" or not s.output.mergeAdapter,
        ),
    )

    @property
    def lora_settings(self) -> LoraSpec | None:
        if self.method == "full":
            return None
        return self.lora or LoraSpec()

    @property
    def learning_rate(self) -> float:
        return self.training.learning_rate_for(self.method)

    @property
    def bf16(self) -> bool:
        if self.training.bf16 is not None:
            return self.training.bf16
        return self.resources.gpusPerNode > 0


class ObjectMeta(BaseModel):
    """The slice of metadata the operator reads; everything else passes through."""

    model_config = ConfigDict(extra="allow")
    name: str = Field(default="", max_length=253)
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _dns_label(cls, value: str) -> str:
        # Child names (pods, services) derive from the job name, so it must be a DNS label
        # short enough to leave room for suffixes like -rank-15 and -headless.
        if value and not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", value):
            raise ValueError(
                "must be lowercase letters, digits and '-', starting and ending with a letter "
                "or digit (it names the pods and services)"
            )
        if len(value) > 50:
            raise ValueError("must be at most 50 characters (child names add suffixes)")
        return value


# --------------------------------------------------------------------------- status


class Condition(StatusModel):
    type: str = Field(description="Condition type: Planned, Running, Succeeded, Failed, ...")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", description="One CamelCase word.")
    message: str = Field(default="", description="Human-readable details.")
    lastTransitionTime: str | None = Field(default=None, description="When status last changed.")
    observedGeneration: int | None = Field(
        default=None, description="metadata.generation the condition was computed from."
    )


class Advisory(StatusModel):
    code: str = Field(description="Stable machine-readable code, e.g. LearningRateOutOfRange.")
    severity: Literal["Info", "Warning"] = Field(description="Info or Warning.")
    field: str = Field(description="Spec field the advice is about.")
    message: str = Field(description="What the reference recommends and why.")
    suggested: str | None = Field(default=None, description="Suggested value, as text.")


class Plan(StatusModel):
    datasetSize: int | None = Field(
        default=None, description="Rows the plan is computed from (after preparation if measured)."
    )
    datasetSizeSource: str = Field(
        default="unknown",
        description="Where datasetSize comes from: limit, numSamples, override, measured, unknown.",
    )
    worldSize: int = Field(description="Training processes over all nodes.")
    effectiveBatchSize: int = Field(description="perDevice x accumulation x worldSize.")
    perDeviceTrainBatchSize: int = Field(description="Micro-batch per device.")
    gradientAccumulationSteps: int = Field(description="Accumulation steps.")
    stepsPerEpoch: int | None = Field(default=None, description="Optimizer steps per epoch.")
    totalSteps: int | None = Field(default=None, description="Optimizer steps of the whole run.")
    epochs: float | None = Field(default=None, description="Epochs the run covers.")
    warmupSteps: int | None = Field(default=None, description="Warm-up steps.")
    estimate: bool = Field(
        default=False,
        description="true when the figures may change once the trainer has prepared the data "
        "(packing, unknown size).",
    )
    measured: bool = Field(default=False, description="true when reported by the trainer.")
    notes: list[str] = Field(default_factory=list, description="How the figures were derived.")
    rowsTruncated: int | None = Field(
        default=None,
        description="Rows longer than maxLength tokens that were cut to it (measured or "
        "tokenized plans).",
    )
    rowsDropped: int | None = Field(
        default=None,
        description="Rows dropped by data preparation: nothing left to learn from after "
        "truncation (measured or tokenized plans).",
    )
    packedEstimate: str | None = Field(
        default=None,
        description="With packing, how the packed row count was found: rough (one sample per "
        "row, an upper bound) or tokenized (the model's tokenizer run over the data).",
    )


class ProgressPoint(StatusModel):
    step: int = Field(description="Optimizer step of this point.")
    loss: float | None = Field(default=None, description="Training loss (4 significant digits).")
    learningRate: float | None = Field(default=None, description="Learning rate.")
    gradNorm: float | None = Field(default=None, description="Gradient norm.")
    tokensPerSecond: float | None = Field(default=None, description="Training throughput.")
    evalLoss: float | None = Field(default=None, description="Eval loss, where there is one.")


class Progress(StatusModel):
    step: int = Field(default=0, description="Optimizer steps done.")
    totalSteps: int | None = Field(default=None, description="Optimizer steps planned.")
    epoch: float | None = Field(default=None, description="Epochs done (fractional).")
    percent: float | None = Field(default=None, description="step / totalSteps x 100.")
    loss: float | None = Field(default=None, description="Latest training loss.")
    learningRate: float | None = Field(default=None, description="Current learning rate.")
    gradNorm: float | None = Field(default=None, description="Latest gradient norm.")
    tokensPerSecond: float | None = Field(default=None, description="Training throughput.")
    etaSeconds: int | None = Field(default=None, description="Estimated seconds to finish.")
    eta: str | None = Field(default=None, description="etaSeconds as text, e.g. 3m20s.")
    summary: str | None = Field(
        default=None, description="step/total (percent), for kubectl get (the operator's)."
    )
    updateTime: str | None = Field(default=None, description="When this report was written.")
    evalLoss: float | None = Field(default=None, description="Latest eval loss (dataset.eval).")
    bestEvalLoss: float | None = Field(
        default=None, description="Lowest eval loss so far (output.keepBest keeps its checkpoint)."
    )
    lossDisplay: str | None = Field(
        default=None, description="loss to 4 significant digits, for kubectl get (the operator's)."
    )
    history: list[ProgressPoint] | None = Field(
        default=None,
        description=(
            "The operator's curve of the reports it saw: at most 50 points over the whole run "
            "(thinned evenly as it grows), values to 4 significant digits."
        ),
    )
    mfu: float | None = Field(
        default=None,
        ge=0,
        le=1,
        description=(
            "Model FLOPs utilisation, 0-1: 6 x parameters x tokens/s over the GPUs' dense "
            "bf16 peak (all parameters, also for LoRA/QLoRA). Absent on CPU and on cards "
            "whose peak the trainer does not know."
        ),
    )


class LeverChoice(StatusModel):
    name: str = Field(description="The lever: its spec.training.speed field.")
    on: bool = Field(description="Whether it ran.")
    reason: str = Field(default="", description="Why it is on or off.")


class SpeedPlanStatus(StatusModel):
    preset: str | None = Field(default=None, description="spec.training.speed.preset applied.")
    perDeviceTrainBatchSize: int | None = Field(
        default=None, description="Micro-batch per device the trainer runs."
    )
    gradientAccumulationSteps: int | None = Field(
        default=None, description="Accumulation steps the trainer runs."
    )
    gradientCheckpointing: bool | None = Field(
        default=None, description="Whether activations are recomputed in the backward."
    )
    attention: str | None = Field(
        default=None, description="The model's attention implementation (sdpa, flex_attention)."
    )
    compile: bool | None = Field(default=None, description="Whether torch.compile runs.")
    levers: list[LeverChoice] = Field(
        default_factory=list, description="Every speed lever, on or off, and why."
    )


class FailureInfo(StatusModel):
    reason: str = Field(description="OutOfMemory, DataError, ConfigError, ModelLoadError, ...")
    message: str = Field(default="", description="What went wrong.")
    step: int | None = Field(default=None, description="Last step reached.")
    time: str | None = Field(default=None, description="When it happened.")
    attempt: int | None = Field(default=None, description="Attempt that failed.")


class EffectiveTraining(StatusModel):
    perDeviceTrainBatchSize: int = Field(description="Micro-batch the current attempt runs.")
    gradientAccumulationSteps: int = Field(description="Accumulation the current attempt runs.")


class ProfileValue(StatusModel):
    field: str = Field(description="Spec field the profile filled, e.g. spec.image.")
    value: str = Field(description="The value it filled, as JSON.")


class EffectiveStatus(StatusModel):
    profile: str | None = Field(default=None, description="SFTProfile the job runs under.")
    profileGeneration: int | None = Field(
        default=None, description="Generation of the profile when the job was launched."
    )
    fromProfile: list[ProfileValue] = Field(
        default_factory=list, description="What the profile added to the job's own spec."
    )


class SFTJobStatus(StatusModel):
    phase: str | None = Field(
        default=None,
        description="Pending, Running, Suspended, Restarting, Succeeded or Failed.",
    )
    conditions: list[Condition] = Field(default_factory=list, description="Latest observations.")
    plan: Plan | None = Field(default=None, description="Step plan derived from the spec.")
    measuredPlan: Plan | None = Field(
        default=None, description="Step plan measured by the trainer after preparing the data."
    )
    advisories: list[Advisory] = Field(default_factory=list, description="Reference advice.")
    progress: Progress | None = Field(default=None, description="Training progress.")
    attempts: int = Field(
        default=0, description="Launches so far: the first run, relaunches and resumes."
    )
    restarts: int = Field(
        default=0, description="Relaunches after failures, counted against retry.maxRestarts."
    )
    launchedAttempt: int | None = Field(
        default=None,
        description=(
            "The attempt whose pods were all created; below attempts while a launch is under "
            "way (its pods wait for the previous attempt's to be gone, or for the retry backoff)."
        ),
    )
    nextAttemptTime: str | None = Field(
        default=None,
        description="Earliest time the current attempt's pods may be created (retry backoff).",
    )
    specHash: str | None = Field(
        default=None, description="Hash of the training spec the running pods were built from."
    )
    effectiveTraining: EffectiveTraining | None = Field(
        default=None, description="Batch settings in use after OOM auto-shrink."
    )
    lastFailure: FailureInfo | None = Field(default=None, description="Most recent failure.")
    effective: EffectiveStatus | None = Field(
        default=None,
        description="The profile the job runs under and what it added (job over profile).",
    )
    observedGeneration: int | None = Field(default=None, description="Generation last acted on.")
    startTime: str | None = Field(
        default=None, description="When the current run's first pod started (reset on resume)."
    )
    completionTime: str | None = Field(default=None, description="When the job finished.")
    outputPath: str | None = Field(default=None, description="Where the result was written.")
    speedPlan: SpeedPlanStatus | None = Field(
        default=None,
        description="What the trainer runs, as decided in the pod: micro-batch, checkpointing, "
        "attention, compile and every speed lever (on or off, and why).",
    )


class SFTJob(BaseModel):
    model_config = ConfigDict(extra="forbid")
    apiVersion: Literal["tuning.sftjob.dev/v1alpha1"] = "tuning.sftjob.dev/v1alpha1"
    kind: Literal["SFTJob"] = "SFTJob"
    metadata: ObjectMeta = Field(default_factory=ObjectMeta)
    spec: SFTJobSpec
    status: SFTJobStatus | None = None


# --------------------------------------------------------------------------- errors


class FieldError(BaseModel):
    model_config = ConfigDict(frozen=True)
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class SpecError(ValueError):
    """An SFTJob that cannot run; every problem names its field and the fix."""

    def __init__(self, errors: Iterable[FieldError]):
        self.errors = list(errors)
        super().__init__("; ".join(str(e) for e in self.errors))


def _fields_at(model: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """Names (as written in YAML) valid at `path` inside `model`, for 'did you mean'."""
    current: Any = model
    for part in path:
        if isinstance(part, int):
            continue
        if not (isinstance(current, type) and issubclass(current, BaseModel)):
            return []
        field = current.model_fields.get(str(part))
        if field is None:
            return []
        current = _model_in(field.annotation)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return list(current.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    """The BaseModel class inside Optional[...] / list[...] annotations, if any."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _camel(name: str) -> str:
    return to_camel(name) if "_" in name else name


def _unknown_field_message(model: type[BaseModel], loc: tuple[str | int, ...]) -> str:
    name = str(loc[-1])
    if name in RENAMED_FIELDS:
        target, why = RENAMED_FIELDS[name]
        return f"unknown field: renamed to {target} ({why})"
    valid = _fields_at(model, loc[:-1])
    if _camel(name) in valid and _camel(name) != name:
        return f"unknown field: fields are camelCase, write {_camel(name)}"
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
    if not close:
        close = [v for v in valid if v.lower() == name.lower()]
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"unknown field{hint}" + (f" Valid fields: {', '.join(valid)}." if not close else "")


def _path(loc: tuple[str | int, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _clean_loc(loc: tuple[str | int, ...]) -> tuple[str | int, ...]:
    # pydantic adds pseudo-locations for tagged unions and function validators; drop them.
    return tuple(
        p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))
    )


def _message(err: Mapping[str, Any]) -> str:
    kind = err["type"]
    msg = str(err["msg"])
    # pydantic capitalises its sentences; ours follow "field: message".
    msg = msg[:1].lower() + msg[1:]
    ctx = err.get("ctx") or {}
    if kind == "value_error":
        return str(ctx.get("error", msg.removeprefix("Value error, ")))
    if kind == "missing":
        return "required field is missing"
    if kind in ("greater_than_equal", "greater_than", "less_than", "less_than_equal"):
        return f"{msg} (got {err.get('input')!r})"
    if kind == "literal_error":
        return f"{msg}, got {err.get('input')!r}"
    if kind == "string_pattern_mismatch" and "Ki|Mi" in str(ctx.get("pattern", "")):
        return f"must be a Kubernetes quantity such as 4, 500m or 16Gi (got {err.get('input')!r})"
    if kind == "string_pattern_mismatch":
        return f"got {err.get('input')!r}, which does not match {ctx.get('pattern')}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return f"{msg}, got {type(err.get('input')).__name__} {err.get('input')!r}"
    return msg


def errors_from_validation(exc: ValidationError, root: type[BaseModel]) -> list[FieldError]:
    errors: list[FieldError] = []
    for err in exc.errors():
        loc = _clean_loc(tuple(err["loc"]))
        cause = (err.get("ctx") or {}).get("error")
        if isinstance(cause, RuleViolation):
            loc = loc + tuple(cause.field.split("."))
            message = str(cause)
        elif err["type"] == "extra_forbidden":
            message = _unknown_field_message(root, loc)
        else:
            message = _message(err)
        errors.append(FieldError(path=_path(loc), message=message))
    return errors


def parse_spec(spec: Any) -> SFTJobSpec:
    """Validate a bare spec mapping (as Kopf hands it over)."""
    if not isinstance(spec, Mapping):
        raise SpecError([FieldError(path="spec", message="must be a mapping")])
    try:
        return SFTJobSpec.model_validate(dict(spec))
    except ValidationError as exc:
        errs = errors_from_validation(exc, SFTJobSpec)
        raise SpecError(
            FieldError(path="spec" + ("." + e.path if e.path else ""), message=e.message)
            for e in errs
        ) from None


def parse_sftjob(document: Any) -> SFTJob:
    """Validate a whole SFTJob document (apiVersion, kind, metadata, spec)."""
    if not isinstance(document, Mapping):
        raise SpecError([FieldError(path="", message="an SFTJob document must be a mapping")])
    doc = dict(document)
    # status is written by the operator; a manifest copied from `kubectl get -o yaml`
    # may carry one, which is not the user's to set.
    doc.pop("status", None)
    try:
        job = SFTJob.model_validate(doc)
    except ValidationError as exc:
        raise SpecError(errors_from_validation(exc, SFTJob)) from None
    if job.spec.resources.nodes > 1 and job.metadata.name[:1].isdigit():
        # The rendezvous Service is named after the job, and a real API server takes only
        # DNS-1035 labels (starting with a letter) as Service names.
        message = (
            "must start with a letter for a multi-node job (its rendezvous Service "
            "is named after it, and Service names must start with a letter)"
        )
        raise SpecError([FieldError(path="metadata.name", message=message)])
    return job
