"""Resolved config -> SFTConfig keyword arguments.

Pure apart from reading SFTConfig's field names (and, once SFTConfig is built, making
torch's two precision APIs agree: agree_matmul_precision), so the mapping is tested
without training. Renames worth knowing (measured on transformers 5 / TRL 1.16):
`warmup_ratio` was removed, and `warmup_steps` takes a float ratio < 1 instead
(converted as ceil(total x ratio), exactly what the plan computes); TRL's
`max_seq_length` is now `max_length`; `logging_dir` is gone (reporting is off).
"""

from __future__ import annotations

import dataclasses
import difflib
import warnings
from pathlib import Path
from typing import Any

from .eval_data import eval_sft_kwargs
from .failures import ConfigError
from .settings import TrainerConfig

CHECKPOINT_DIR = "checkpoints"
FINAL_DIR = "final"

# SFTConfig fields the trainer cannot honour: TRL applies them only when it loads the model
# itself, and this trainer hands SFTTrainer a loaded model (TRL then warns and ignores
# them, so `torch_dtype: bogus` used to "work").
UNUSED_EXTRA_ARGS = {
    "model_init_kwargs": "the trainer loads the model itself, so SFTConfig.model_init_kwargs "
    "would be ignored: use model.attnImplementation, model.revision, model.trustRemoteCode and "
    "training.bf16 (weights load in float32 with bf16 autocast)",
}


def sft_config_fields() -> list[str]:
    from trl import SFTConfig

    return [f.name for f in dataclasses.fields(SFTConfig) if f.init]


NESTED_KWARGS = (
    "dataset_kwargs",
    "gradient_checkpointing_kwargs",
    "activation_checkpointing_kwargs",
)


def nested_kwargs_keys() -> dict[str, tuple[str, ...]]:
    """The keys each dict-valued SFTConfig argument is read for (others are never read)."""
    import inspect

    from torch.utils.checkpoint import checkpoint

    checkpoint_keys = tuple(
        name
        for name, parameter in inspect.signature(checkpoint).parameters.items()
        if parameter.kind is parameter.KEYWORD_ONLY
    )
    return {
        # TRL reads only this key (SFTConfig.dataset_kwargs' documentation).
        "dataset_kwargs": ("skip_prepare_dataset",),
        # Passed to torch.utils.checkpoint.checkpoint at the first forward, which refuses
        # other keys only then (after the model loaded, and at every relaunch).
        "gradient_checkpointing_kwargs": checkpoint_keys,
        "activation_checkpointing_kwargs": checkpoint_keys,
    }


def _check_nested_keys(key: str, value: Any) -> None:
    """A dict-valued extraArgs entry with keys nothing reads fails now, not at the first step."""
    if not isinstance(value, dict) or key not in NESTED_KWARGS:
        return
    known = nested_kwargs_keys()[key]
    unknown = sorted(set(value) - set(known))
    if unknown:
        close = [
            f"{name!r}: did you mean {hint[0]!r}?"
            for name in unknown
            if (hint := difflib.get_close_matches(name, known, n=1, cutoff=0.6))
        ]
        raise ConfigError(
            f"spec.training.extraArgs.{key} has keys nothing reads: "
            f"{', '.join(map(repr, unknown))} (known: {', '.join(known)})"
            + (f"; {'; '.join(close)}" if close else "")
        )


def check_extra_args(extra: dict[str, Any], valid: list[str]) -> None:
    """Unknown SFTConfig keys fail before any model is loaded, with the closest names."""
    problems = []
    for key in extra:
        if key in UNUSED_EXTRA_ARGS:
            raise ConfigError(
                f"spec.training.extraArgs.{key}: {UNUSED_EXTRA_ARGS[key]}"
                + _bad_dtypes(key, extra[key])
            )
        if key in valid:
            _check_nested_keys(key, extra[key])
            continue
        close = difflib.get_close_matches(key, valid, n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else " (no similar SFTConfig field)"
        problems.append(f"{key!r}{hint}")
    if problems:
        raise ConfigError(
            "spec.training.extraArgs has keys SFTConfig does not know: " + "; ".join(problems)
        )


DTYPE_KEYS = ("torch_dtype", "dtype")


def _bad_dtypes(key: str, value: Any) -> str:
    """What is wrong with a dtype given under `key` too (transformers reads "auto" or a name)."""
    import torch

    if not isinstance(value, dict):
        return ""
    bad = [
        f"{key}.{name} {value[name]!r} is not a torch dtype either (float32, bfloat16, float16)"
        for name in DTYPE_KEYS
        if name in value
        and value[name] != "auto"
        and not isinstance(getattr(torch, str(value[name]), None), torch.dtype)
    ]
    return f"; {'; '.join(bad)}" if bad else ""


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
    kwargs.update(eval_sft_kwargs(spec, kwargs["per_device_train_batch_size"]))
    kwargs.update(extra)
    if "gradient_checkpointing_kwargs" in extra and checkpointing != "gradient_checkpointing":
        # transformers keeps the old name only where the new one is unset, and the new one
        # is set above: the user's keys would be dropped without a word.
        kwargs[f"{checkpointing}_kwargs"] = kwargs.pop("gradient_checkpointing_kwargs")
    return kwargs


def build_sft_config(
    config: TrainerConfig, *, dataset_format: str | None = None, speed: Any = None
) -> Any:
    from trl import SFTConfig

    kwargs = sft_kwargs(config, dataset_format=dataset_format)
    levers: dict[str, str] = {}
    if speed is not None:  # speed.SpeedPlan: its levers never touch keys set in extraArgs
        lever_kwargs = speed.sft_kwargs(sft_config_fields())
        levers = {key: lever for key in lever_kwargs if (lever := speed.lever_of(key))}
        kwargs.update(lever_kwargs)
    try:
        args = SFTConfig(**kwargs)
    except (TypeError, ValueError) as exc:
        fields = [
            f"spec.training.speed.{levers[arg]}" if arg in levers else _field_name(arg)
            for arg in rejected_args(SFTConfig, kwargs)
        ]
        where = f"{', '.join(fields)}: " if fields else ""
        raise ConfigError(f"{where}SFTConfig rejected the settings: {exc}") from None
    agree_matmul_precision()
    check_sft_config(args, total_steps=int((config.plan or {}).get("totalSteps") or 10))
    return args


def agree_matmul_precision() -> str | None:
    """Write the TF32 choice SFTConfig made through torch's new per-backend API through the
    old one as well, so that readers of either agree; returns the precision written (None:
    nothing to do).

    With bf16 and torch.compile on an Ampere+ GPU, TrainingArguments asks for TF32 with
    `torch.backends.fp32_precision = "tf32"` (transformers 5, torch >= 2.9). Torch then
    refuses `torch.get_float32_matmul_precision()` as a mix of the two APIs, and inductor's
    GEMM autotuning reads it: `extraArgs.torch_compile_mode: max-autotune(-no-cudagraphs)`
    failed in the first step's compile, after the model had loaded (H100, torch 2.11,
    2026-12-06; pytorch/pytorch#189955). `set_float32_matmul_precision("high")` is the same
    TF32 choice in the old API's words: every backend's precision stays as it was.
    """
    import torch

    backends = torch.backends
    cuda, mkldnn = (
        getattr(getattr(backend, "matmul", None), "fp32_precision", None)
        for backend in (backends.cuda, backends.mkldnn)
    )
    # "none": the backend inherits the default, which "high" makes TF32 as it already is.
    if cuda != "tf32" or mkldnn not in ("tf32", "none"):
        # Nothing asked for TF32 through the new API (CPU, fp32, torch < 2.9), or a backend
        # was set apart: "high" would change that backend's precision.
        return None
    try:
        return torch.get_float32_matmul_precision()  # the two APIs already agree
    except RuntimeError:
        torch.set_float32_matmul_precision("high")
        return "high"


def rejected_args(config_class: Any, kwargs: dict[str, Any]) -> list[str]:
    """The arguments whose value `config_class` refuses: those without which it is built.

    SFTConfig's errors quote the value, not the argument ("bogus is not a valid
    OptimizerNames"); building it again with one argument left at its default says which
    argument it was (a fraction of a millisecond each, and only on this error path).
    """
    found = []
    for arg in kwargs:
        if arg == "output_dir":
            continue
        try:
            with warnings.catch_warnings():  # deprecation notices of the partial builds
                warnings.simplefilter("ignore")
                config_class(**{key: value for key, value in kwargs.items() if key != arg})
        except (TypeError, ValueError):
            continue
        found.append(arg)
    return found


def _field_name(arg: str) -> str:
    """Where the user set an SFTConfig argument: its first-class spec field or extraArgs."""
    from sftjob_operator.api import FIRST_CLASS_ARGS

    first_class = FIRST_CLASS_ARGS.get(arg)
    return f"spec.{first_class}" if first_class else f"spec.training.extraArgs.{arg}"


def check_sft_config(args: Any, *, total_steps: int) -> None:
    """What SFTConfig accepts but training would refuse later, checked before the model loads.

    Each check runs the code the Trainer itself runs, without its side effects, so a value
    that fails here would fail there (after the model download, and on every relaunch).
    """
    import numpy as np
    import torch

    for arg in ("seed", "data_seed"):
        seed = getattr(args, arg, None)
        if seed is None:
            continue
        try:
            # transformers.set_seed seeds numpy's global RandomState and torch: the same
            # range checks on private generators, leaving the global ones untouched.
            np.random.RandomState(seed)
            torch.Generator().manual_seed(seed)
        except (ValueError, TypeError, RuntimeError, OverflowError) as exc:
            raise ConfigError(f"{_field_name(arg)} is {seed!r}: {exc}") from None
    _check_report_to(args.report_to)
    _check_scheduler(args, total_steps)


def _check_report_to(report_to: Any) -> None:
    # Trainer.__init__ instantiates these callbacks; each raises when its package is missing.
    from transformers.integrations import get_reporting_integration_callbacks

    try:
        callbacks = get_reporting_integration_callbacks(report_to)
    except ValueError as exc:
        raise ConfigError(f"spec.training.extraArgs.report_to: {exc}") from None
    for callback in callbacks:
        try:
            callback()
        except (ImportError, RuntimeError) as exc:
            raise ConfigError(
                f"spec.training.extraArgs.report_to: {exc} This trainer image lacks the "
                "package: remove it from report_to or use an image that has it."
            ) from None


def _check_scheduler(args: Any, total_steps: int) -> None:
    # Trainer.create_scheduler's call, on a one-parameter optimizer: lr_scheduler_kwargs
    # of the wrong shape or missing a required key fail here instead of at the first step.
    import torch
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    try:
        get_scheduler(
            args.lr_scheduler_type,
            optimizer=optimizer,
            num_warmup_steps=args.get_warmup_steps(total_steps),
            num_training_steps=total_steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs,
        )
    except (TypeError, ValueError, KeyError) as exc:
        schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
        raise ConfigError(
            f"the learning-rate schedule {schedule} refuses "
            f"spec.training.extraArgs.lr_scheduler_kwargs={args.lr_scheduler_kwargs!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from None
