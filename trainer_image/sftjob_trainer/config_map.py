"""Resolved config -> SFTConfig keyword arguments.

Pure apart from reading SFTConfig's field names, so the mapping is tested without
training. Renames worth knowing (measured on transformers 5 / TRL 1.16):
`warmup_ratio` was removed, and `warmup_steps` takes a float ratio < 1 instead
(converted as ceil(total x ratio), exactly what the plan computes); TRL's
`max_seq_length` is now `max_length`; `logging_dir` is gone (reporting is off).
"""

from __future__ import annotations

import dataclasses
import difflib
from pathlib import Path
from typing import Any

from .failures import ConfigError
from .settings import TrainerConfig

CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"


def sft_config_fields() -> list[str]:
    from trl import SFTConfig

    return [f.name for f in dataclasses.fields(SFTConfig) if f.init]


def check_extra_args(extra: dict[str, Any], valid: list[str]) -> None:
    """Unknown SFTConfig keys fail before any model is loaded, with the closest names."""
    problems = []
    for key in extra:
        if key in valid:
            continue
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else " (no similar SFTConfig field)"
        problems.append(f"{key!r}{hint}")
    if problems:
        raise ConfigError(
            "spec.training.extraArgs has keys SFTConfig does not know: " + "; ".join(problems)
        )


def sft_kwargs(
    config: TrainerConfig,
    *,
    dataset_format: str | None = None,
    valid_fields: list[str] | None = None,
) -> dict[str, Any]:
    """The SFTConfig arguments for `config`; extraArgs go last and are checked first."""
    spec = config.spec
    training = spec.training
    resolved = config.resolved
    output = Path(resolved["outputPath"])
    extra = dict(training.extraArgs)
    valid = valid_fields if valid_fields is not None else sft_config_fields()
    check_extra_args(extra, valid)
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing (the old
    # name warns); use whichever this SFTConfig has.
    checkpointing = (
        "activation_checkpointing"
        if "activation_checkpointing" in valid
        else "gradient_checkpointing"
    )

    # transformers: warmup_steps >= 1 is a step count, a float < 1 a ratio of the total.
    warmup: float | int = (
        training.warmupSteps if training.warmupSteps is not None else float(training.warmupRatio)
    )
    kwargs: dict[str, Any] = {
        "output_dir": str(output / CHECKPOINT_DIR),
        "per_device_train_batch_size": int(resolved["perDeviceTrainBatchSize"]),
        "gradient_accumulation_steps": int(resolved["gradientAccumulationSteps"]),
        "num_train_epochs": float(training.numTrainEpochs),
        "max_steps": training.maxSteps if training.maxSteps is not None else -1,
        "learning_rate": float(resolved["learningRate"]),
        "lr_scheduler_type": training.lrSchedulerType,
        "warmup_steps": warmup,
        "max_length": training.maxLength,
        "packing": training.packing,
        "packing_strategy": training.packingStrategy,
        checkpointing: training.gradientCheckpointing,
        "bf16": bool(resolved["bf16"]),
        "use_cpu": bool(resolved["useCpu"]),
        "logging_steps": training.loggingSteps,
        "save_strategy": "steps",
        "save_steps": training.saveSteps,
        "save_total_limit": training.saveTotalLimit,
        "seed": training.seed,
        "dataloader_drop_last": training.dataloaderDropLast,
        "report_to": "none",
        # The progress reporter draws its own line; tqdm's would interleave with it in pod logs.
        "disable_tqdm": True,
    }
    if dataset_format == "text" and spec.dataset.textField != "text":
        kwargs["dataset_text_field"] = spec.dataset.textField
    if spec.distributed == "fsdp":
        # FSDP checkpoints activations itself (the launcher's accelerate config); transformers
        # refuses both at once.
        kwargs[checkpointing] = False
    elif training.gradientCheckpointing:
        # Reentrant checkpointing warns and breaks with frozen (LoRA) base weights.
        kwargs[f"{checkpointing}_kwargs"] = {"use_reentrant": False}
    kwargs.update(extra)
    return kwargs


def build_sft_config(
    config: TrainerConfig, *, dataset_format: str | None = None, speed: Any = None
) -> Any:
    from trl import SFTConfig

    kwargs = sft_kwargs(config, dataset_format=dataset_format)
    if speed is not None:  # speed.SpeedPlan: its levers never touch keys set in extraArgs
        kwargs.update(speed.sft_kwargs(sft_config_fields()))
    try:
        return SFTConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"SFTConfig rejected the settings: {exc}") from None
