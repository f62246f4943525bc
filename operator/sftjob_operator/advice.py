"""Advisories: the reference's rules of thumb as machine-readable warnings.

Each rule looks at the spec and its plan and may return one Advisory with a stable
code, the field it is about, what the reference recommends and a suggested value.
Advisories never block a job; they are written to status.advisories and printed by
`sftjob plan`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from .api import (
    FULL_LEARNING_RATE,
    LORA_LEARNING_RATE,
    Advisory,
    Plan,
    SFTJobSpec,
)

SMALL_DATASET_ROWS = 10_000
LARGE_DATASET_ROWS = 50_000
RECOMMENDED_SMALL_EPOCHS = 3
LARGE_DATASET_STEPS = (1000, 2000)
LORA_LR_RANGE = (1e-4, 3e-4)
FULL_LR_RANGE = (1e-5, 2e-5)
RECOMMENDED_WARMUP_RATIO = 0.03
WARMUP_SCHEDULERS = ("cosine", "constant_with_warmup")
FEW_STEPS = 10
MANY_EPOCHS = 20
# Above this size a full fine-tune's activations rarely fit without checkpointing.
LARGE_MODEL_BILLIONS = 3.0
# The compile break-even, from measured figures (docs/performance.md, 1.5B shape, H100,
# per GPU). COMPILE_OVERHEAD_S: session 10's untimed first 5 steps took 153.6 s with the
# defaults, of which 5 steady steps are ~3 s: ~150 s compiling (a cold compile cache; the
# end-to-end calls 1 and 4 of 2026-12-05 agree: first steps of 166.8 and 138.2 s).
# Compiled, the defaults train at ~51k tokens/s (session 10; calls 1 and 4: 50.2k, 50.5k).
# Uncompiled they attend with the varlen kernel and, in the trainer image (its gpu extra),
# norm/activation/RoPE through liger's kernels: 44.1k (2026-12-06 call 1, the whole
# reference job). Without liger, 33.1k (call 7 of 2026-12-05; 32.6k in call 1). The plain
# TRL snippet: ~12.5k (sessions 1-8: 12.1k-15.3k; 14.3k in call 1).
COMPILE_OVERHEAD_S = 150.0
COMPILED_TOKENS_PER_S = 51_000.0
UNCOMPILED_TOKENS_PER_S = 44_079.0
UNCOMPILED_WITHOUT_LIGER_TOKENS_PER_S = 33_058.0
PLAIN_TRL_TOKENS_PER_S = 12_500.0
# Compiling the decoder layers alone (regional: one layer graph for all 28, the varlen
# kernel attending inside, the LM head eager): 48.3k tokens/s with about 7.7 s more before
# the first step than uncompiled, cold (session 17, call 1, 15-step stages); 45.4k against
# the defaults' 40.0k over the whole reference job, 1.3 s sooner to its end (session 18,
# call 2); 46.5k against the defaults' 37.5k over a job of 7.4M tokens, 32.5 s sooner to
# its end (session 19, call 2). The first of these, the dearest, sets the break-even.
REGIONAL_COMPILE_OVERHEAD_S = 7.7
REGIONAL_TOKENS_PER_S = 48_327.0
# Against the whole model compiled, in one call (session 19, call 1, the full case, 150.4 s
# compiling the whole model): 46,528 against 51,026 tokens/s.
REGIONAL_BESIDE_WHOLE_TOKENS_PER_S = 46_528.0
WHOLE_BESIDE_REGIONAL_TOKENS_PER_S = 51_026.0

# LoRA (rank 16 on every linear layer of the 1.5B shape, one H100, session 20): its decoder
# layers compiled with the varlen kernel inside trained at 46,669 tokens/s, against 29,346
# uncompiled (the varlen kernel and liger's kernels), 12.1 s more before the steady state
# (call 4, one machine). The whole model compiled with flex attention trained at 49,798
# against the layers' 47,452, after 176.3 s more compiling (call 3, one machine).
LORA_REGIONAL_COMPILE_OVERHEAD_S = 12.1
LORA_UNCOMPILED_TOKENS_PER_S = 29_346.0
LORA_REGIONAL_TOKENS_PER_S = 46_669.0
LORA_WHOLE_OVER_REGIONAL_OVERHEAD_S = 176.3
LORA_REGIONAL_BESIDE_WHOLE_TOKENS_PER_S = 47_452.0
LORA_WHOLE_BESIDE_REGIONAL_TOKENS_PER_S = 49_798.0


def break_even_tokens(overhead_s: float, slower: float, faster: float) -> float:
    """Tokens after which `faster` (paying `overhead_s` first) has caught up with `slower`."""
    return overhead_s / (1.0 / slower - 1.0 / faster)


# Compiled against the image's defaults uncompiled: ~48.7M tokens per GPU (~14.1M in an
# image without liger, which the trainer uses where liger_kernel is absent). Below it,
# compile: off finishes first. (Against the plain snippet the compiled run catches up after
# ~2.5M tokens, about 76 steps of 16 x 2048: issue 24's "64-75 steps".)
COMPILE_PAYBACK_TOKENS = round(
    break_even_tokens(COMPILE_OVERHEAD_S, UNCOMPILED_TOKENS_PER_S, COMPILED_TOKENS_PER_S)
)
COMPILE_PAYBACK_TOKENS_WITHOUT_LIGER = round(
    break_even_tokens(
        COMPILE_OVERHEAD_S, UNCOMPILED_WITHOUT_LIGER_TOKENS_PER_S, COMPILED_TOKENS_PER_S
    )
)


# The decoder layers compiled against the uncompiled defaults: ~3.9M tokens per GPU (~0.8M
# without liger). Over ~75M the whole model's compile (minutes) catches up with them.
REGIONAL_PAYBACK_TOKENS = round(
    break_even_tokens(REGIONAL_COMPILE_OVERHEAD_S, UNCOMPILED_TOKENS_PER_S, REGIONAL_TOKENS_PER_S)
)
REGIONAL_PAYBACK_TOKENS_WITHOUT_LIGER = round(
    break_even_tokens(
        REGIONAL_COMPILE_OVERHEAD_S, UNCOMPILED_WITHOUT_LIGER_TOKENS_PER_S, REGIONAL_TOKENS_PER_S
    )
)
WHOLE_OVER_REGIONAL_TOKENS = round(
    break_even_tokens(
        COMPILE_OVERHEAD_S - REGIONAL_COMPILE_OVERHEAD_S,
        REGIONAL_BESIDE_WHOLE_TOKENS_PER_S,
        WHOLE_BESIDE_REGIONAL_TOKENS_PER_S,
    )
)

# LoRA's decoder layers compiled against LoRA uncompiled: ~1.0M tokens per GPU (measured
# with liger; without it uncompiled is slower and the layers pay back sooner still, so the
# figure holds as a bound). Over ~178M the whole model's compile catches up with them.
LORA_REGIONAL_PAYBACK_TOKENS = round(
    break_even_tokens(
        LORA_REGIONAL_COMPILE_OVERHEAD_S, LORA_UNCOMPILED_TOKENS_PER_S, LORA_REGIONAL_TOKENS_PER_S
    )
)
LORA_WHOLE_OVER_REGIONAL_TOKENS = round(
    break_even_tokens(
        LORA_WHOLE_OVER_REGIONAL_OVERHEAD_S,
        LORA_REGIONAL_BESIDE_WHOLE_TOKENS_PER_S,
        LORA_WHOLE_BESIDE_REGIONAL_TOKENS_PER_S,
    )
)
# The methods whose decoder layers compile alone on one GPU (measured there: session 19 for
# full fine-tunes, session 20 for LoRA; QLoRA's 4-bit layers are not compiled under auto).
REGIONAL_METHODS = ("full", "lora")


def compile_payback_tokens(liger: bool, regional: bool = False, method: str = "full") -> int:
    """The break-even a compile must beat, by whether liger's kernels train uncompiled,
    whether only the decoder layers compile (`regional`) and, for those, the method."""
    if regional and method == "lora":
        return LORA_REGIONAL_PAYBACK_TOKENS
    if regional:
        return REGIONAL_PAYBACK_TOKENS if liger else REGIONAL_PAYBACK_TOKENS_WITHOUT_LIGER
    return COMPILE_PAYBACK_TOKENS if liger else COMPILE_PAYBACK_TOKENS_WITHOUT_LIGER


def whole_over_regional_tokens(method: str) -> int | None:
    """Tokens per GPU from which the whole model's compile finishes before its layers';
    None for a method whose layers are not compiled alone (the whole model, or nothing)."""
    if method not in REGIONAL_METHODS:
        return None
    return LORA_WHOLE_OVER_REGIONAL_TOKENS if method == "lora" else WHOLE_OVER_REGIONAL_TOKENS


def regional_compile_seconds(method: str) -> float:
    """About how long compiling the decoder layers costs before the first steps, cold."""
    return LORA_REGIONAL_COMPILE_OVERHEAD_S if method == "lora" else REGIONAL_COMPILE_OVERHEAD_S


PLAIN_TRL_BREAK_EVEN_TOKENS = round(
    break_even_tokens(COMPILE_OVERHEAD_S, PLAIN_TRL_TOKENS_PER_S, COMPILED_TOKENS_PER_S)
)
# GPUs before Ampere have no bfloat16 units: bf16 is emulated (slow) or refused.
PRE_AMPERE_GPUS = ("V100", "T4", "P100", "P40", "P4", "K80", "M60", "TITAN V", "QUADRO RTX")

Rule = Callable[[SFTJobSpec, Plan], Advisory | None]


def model_billions(spec: SFTJobSpec) -> float | None:
    """Declared size, else guessed from names like Qwen2.5-1.5B-Instruct or llama-7b."""
    if spec.model.parametersBillions is not None:
        return spec.model.parametersBillions
    source = spec.model.name or spec.model.path or ""
    match = re.search(r"(?<![0-9.])(\d+(?:\.\d+)?)\s*[bB](?![a-zA-Z])", source)
    return float(match.group(1)) if match else None


def _rows(plan: Plan) -> int | None:
    return plan.datasetSize


def small_dataset_epochs(spec: SFTJobSpec, plan: Plan) -> Advisory | None:
    rows = _rows(plan)
    if rows is None or rows >= SMALL_DATASET_ROWS:
        return None
    if spec.training.maxSteps is not None:
        return Advisory(
            code="SmallDatasetUseEpochs",
            severity="Info",
            field="spec.training.maxSteps",
            message=f"{rows} rows is a small dataset (< {SMALL_DATASET_ROWS}): the reference "
            f"trains small datasets for {RECOMMENDED_SMALL_EPOCHS} epochs instead of a step count",
            suggested=f"numTrainEpochs: {RECOMMENDED_SMALL_EPOCHS} (remove maxSteps)",
        )
    if spec.training.numTrainEpochs != RECOMMENDED_SMALL_EPOCHS:
        return Advisory(
            code="SmallDatasetUseEpochs",
            severity="Info",
            field="spec.training.numTrainEpochs",
            message=f"{rows} rows is a small dataset (< {SMALL_DATASET_ROWS}): the reference "
            f"uses {RECOMMENDED_SMALL_EPOCHS} epochs",
            suggested=str(RECOMMENDED_SMALL_EPOCHS),
        )
    return None


def large_dataset_max_steps(spec: SFTJobSpec, plan: Plan) -> Advisory | None:
    rows = _rows(plan)
    if rows is None or rows <= LARGE_DATASET_ROWS or spec.training.maxSteps is not None:
        return None
    low, high = LARGE_DATASET_STEPS
    return Advisory(
        code="LargeDatasetUseMaxSteps",
        severity="Warning",
        field="spec.training.maxSteps",
        message=f"{rows} rows is a large dataset (> {LARGE_DATASET_ROWS}): {plan.totalSteps} "
        f"steps of full epochs waste compute and risk catastrophic forgetting; {low}-{high} "
        "steps are usually enough for instruction following",
        suggested=str(low),
    )


def learning_rate_range(spec: SFTJobSpec, plan: Plan) -> Advisory | None:
    rate = spec.learning_rate
    if spec.method == "full":
        low, high = FULL_LR_RANGE
        suggested, label = FULL_LEARNING_RATE, "a full fine-tune"
    else:
        low, high = LORA_LR_RANGE
        suggested, label = LORA_LEARNING_RATE, f"{spec.method.upper()}"
    if low <= rate <= high:
        return None
    return Advisory(
        code="LearningRateOutOfRange",
        severity="Warning",
        field="spec.training.learningRate",
        message=f"learning rate {rate:g} is outside {low:g}-{high:g}, the reference range for "
        f"{label}" + (": too high a rate overwrites what the model knows" if rate > high else ""),
        suggested=f"{suggested:g}",
    )


def missing_warmup(spec: SFTJobSpec, plan: Plan) -> Advisory | None:
    training = spec.training
    no_warmup = (
        training.warmupSteps == 0 if training.warmupSteps is not None else training.warmupRatio == 0
    )
    if no_warmup:
        return Advisory(
            code="MissingWarmup",
            severity="Warning",
            field="spec.training.warmupRatio",
            message="no warm-up: starting at the peak learning rate gives the model a gradient "
            f"shock; the reference warms up over {RECOMMENDED_WARMUP_RATIO:.0%} of the steps",
            suggested=f"{RECOMMENDED_WARMUP_RATIO}",
        )
    if training.lrSchedulerType not in WARMUP_SCHEDULERS:
        return Advisory(
            code="SchedulerNotRecommended",
            severity="Info",
            field="spec.training.lrSchedulerType",
            message=f"{training.lrSchedulerType} schedule: the reference uses "
            f"{' or '.join(WARMUP_SCHEDULERS)}",
            suggested="cosine",
        )
    return None


def checkpointing_off_for_large_model(spec: SFTJobSpec, plan: Plan) -> Advisory | None:
    size = model_billions(spec)
    if spec.training.gradientCheckpointing or size is None or size < LARGE_MODEL_BILLIONS:
        return None
    return Advisory(
        code="GradientCheckpointingOff",
        severity="Warning",
        field="spec.training.gradientCheckpointing",
        message=f"gradient checkpointing is off for a {size:g}B model: activations will likely "
        "exhaust GPU memory; checkpointing costs about 20% speed and saves most of it",
        suggested="true",
    )


def bf16_on_old_gpu(spec: SFTJobSpec, plan: Plan) -> Advisory | None:
    gpu = _gpu_type(spec)
    if spec.resources.gpusPerNode == 0 or gpu is None:
        return None
    old = any(name in gpu.upper() for name in PRE_AMPERE_GPUS)
    if old and spec.bf16:
        return Advisory(
            code="Bf16UnsupportedGpu",
            severity="Warning",
            field="spec.training.bf16",
            message=f"bf16 needs an Ampere or newer GPU; {gpu} has no bfloat16 support. "
            "Turn bf16 off (and use fp16 via extraArgs if you need mixed precision)",
            suggested="false",
        )
    if not old and not spec.bf16:
        return Advisory(
            code="Bf16Recommended",
            severity="Info",
            field="spec.training.bf16",
            message=f"{gpu} supports bf16: faster and smaller than fp32, more stable than fp16",
            suggested="true",
        )
    return None


def _gpu_type(spec: SFTJobSpec) -> str | None:
    if spec.resources.gpuType:
        return spec.resources.gpuType
    # The GPU operator's feature discovery label is the usual way people pin a GPU model.
    for key, value in spec.resources.nodeSelector.items():
        if key.endswith("gpu.product") or key.endswith("accelerator"):
            return value
    return None


def too_few_steps(spec: SFTJobSpec, plan: Plan) -> Advisory | None:
    if plan.totalSteps is None or plan.totalSteps >= FEW_STEPS:
        return None
    return Advisory(
        code="TooFewSteps",
        severity="Warning",
        field="spec.training.gradientAccumulationSteps",
        message=f"the plan has only {plan.totalSteps} optimizer steps (effective batch "
        f"{plan.effectiveBatchSize}): warm-up, the schedule and logging barely apply. Lower the "
        "effective batch or add data",
        suggested=None,
    )


def too_many_epochs(spec: SFTJobSpec, plan: Plan) -> Advisory | None:
    if plan.epochs is None or plan.epochs <= MANY_EPOCHS:
        return None
    field = "spec.training.maxSteps" if spec.training.maxSteps else "spec.training.numTrainEpochs"
    return Advisory(
        code="TooManyEpochs",
        severity="Warning",
        field=field,
        message=f"the plan covers {plan.epochs:g} epochs: the model will memorise the data",
        suggested=str(RECOMMENDED_SMALL_EPOCHS),
    )


def short_run_compiles(spec: SFTJobSpec, plan: Plan) -> Advisory | None:
    training, speed = spec.training, spec.training.speed
    compiles_by_default = (
        spec.resources.gpusPerNode > 0
        and spec.method != "qlora"
        and training.packing
        and training.packingStrategy in ("bfd", "bfd_split")
        and speed.compile == "auto"
        and speed.flexAttention != "off"
        and not spec.model.attnImplementation
        and spec.distributed != "fsdp"
    )
    if not compiles_by_default or plan.totalSteps is None:
        return None
    # An upper bound: packed rows are at most maxLength tokens.
    tokens = (
        plan.totalSteps
        * training.perDeviceTrainBatchSize
        * training.gradientAccumulationSteps
        * training.maxLength
    )
    # A full fine-tune or LoRA on one GPU that attends with the varlen kernel compiles its
    # decoder layers alone (seconds) where the run is that short (the trainer's
    # compile_model.compile_form; a model whose attention the kernel cannot compute
    # compiles whole, which the spec does not say). With liger off, uncompiled trains
    # slower, so a compile pays back sooner (as the trainer decides:
    # sftjob_trainer.speed.compile_payback_tokens).
    regional = (
        spec.method in REGIONAL_METHODS
        and speed.varlenAttention != "off"
        and spec.resources.nodes * spec.resources.gpusPerNode == 1
    )
    payback = compile_payback_tokens(
        liger=speed.ligerKernel != "off", regional=regional, method=spec.method
    )
    if tokens >= payback:
        return None
    compiling = (
        "compiling its decoder layers takes about "
        f"{regional_compile_seconds(spec.method):.0f} seconds"
        if regional
        else f"torch.compile takes about {COMPILE_OVERHEAD_S / 60:.1f} minutes to compile"
    )
    return Advisory(
        code="ShortRunCompiles",
        severity="Info",
        field="spec.training.speed.compile",
        message=f"this run trains at most {tokens / 1e6:.1f}M tokens per GPU; {compiling} "
        f"without a warm compile cache and pays that back after about {millions(payback)} "
        "tokens per GPU, so "
        "compile: auto compiles this run only if the compiled artifacts of its shape are found "
        "(its output folder or the profile's model cache, from an earlier job of the same "
        "shape). Set speed.compile: on to compile anyway and keep the artifacts for the next "
        "job of this shape",
    )


def millions(tokens: int) -> str:
    """3.9M, 14M, 49M: a tenth where it is a real share of the figure."""
    return f"{tokens / 1e6:.1f}M" if tokens < 10_000_000 else f"{tokens / 1e6:.0f}M"


ROWS_OVER_MAX_LENGTH = "RowsOverMaxLength"


def over_length_advisory(plan: Plan, max_length: int | None = None) -> Advisory | None:
    """Rows a measured or tokenized plan found cut or dropped at maxLength, as a warning."""
    truncated, dropped = plan.rowsTruncated or 0, plan.rowsDropped or 0
    if not (truncated or dropped):
        return None
    limit = f" {max_length}" if max_length is not None else ""
    where = "the trainer measured" if plan.measured else "the tokenizer pass found"
    return Advisory(
        code=ROWS_OVER_MAX_LENGTH,
        severity="Warning",
        field="spec.training.maxLength",
        message=f"{where} {truncated + dropped} rows longer than maxLength{limit} tokens: "
        f"{truncated} truncated (their end is not trained on), {dropped} dropped (nothing "
        "left to learn from). Raise maxLength to keep them whole, or shorten the rows.",
    )


def rows_over_max_length(spec: SFTJobSpec, plan: Plan) -> Advisory | None:
    return over_length_advisory(plan, spec.training.maxLength)


RULES: tuple[Rule, ...] = (
    small_dataset_epochs,
    large_dataset_max_steps,
    learning_rate_range,
    missing_warmup,
    checkpointing_off_for_large_model,
    bf16_on_old_gpu,
    too_few_steps,
    too_many_epochs,
    short_run_compiles,
    rows_over_max_length,
)


def advise(spec: SFTJobSpec, plan: Plan) -> list[Advisory]:
    return [advisory for rule in RULES if (advisory := rule(spec, plan)) is not None]
