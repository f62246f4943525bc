"""Pre-flight: everything a pod can know before it loads the model, checked in that order.

A model download takes minutes and a relaunch repeats it, so what the spec, the data,
the tokenizer and the device can tell is checked first, each failure in the class the
operator never retries (ConfigError, DataError), naming the spec field, the file and row,
or the template feature to change:

1. an s3:// output: the bucket takes our writes (object_store.check_output);
2. the data: every row of every file (data.prepare_dataset);
3. the speed plan (which reads how many rows there are), and levers or an attention that
   cannot train on this device;
4. SFTConfig built from the spec (config_map.build_sft_config: the argument it refuses,
   seeds, `report_to` packages, extraArgs values, the learning-rate schedule);
5. the tokenizer and its chat template: one row of each shape in the data (tool calls,
   system or tool messages...) rendered as TRL will render it, and, for assistant-only
   loss, the `{% generation %}` markers TRL needs.

Only then does train.build_trainer load the model.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .config_map import build_sft_config
from .data import RowLocator, data_files, is_conversational, prepare_dataset
from .eval_data import split_eval
from .failures import ConfigError
from .model import load_tokenizer, quantization_config
from .object_store import check_output, fetch_dataset, is_s3
from .settings import TrainerConfig
from .speed import ENV_SPEED, SpeedPlan, plan_speed

# Levers that cannot train without a CUDA device when forced on (under "auto" they turn
# themselves off there): why, in the user's terms.
CUDA_ONLY_LEVERS = {
    "flexAttention": "torch's flex_attention has no backward pass on CPU",
    "ligerKernel": "liger's kernels are Triton GPU kernels",
    "varlenAttention": "torch's FlashAttention-2 kernel runs on CUDA only",
}
CUDA_ONLY_ATTENTION = {"flex_attention": CUDA_ONLY_LEVERS["flexAttention"]}

# What a shape of conversation holds, as a template must render it.
FEATURE_WORDS = {
    "tool_calls": "assistant tool_calls",
    "tools": "a tools list (function schemas)",
    "role:system": "system messages",
    "role:tool": "tool messages (role tool)",
    "role:user": "user messages",
    "role:assistant": "assistant messages",
}
BASIC_FEATURES = frozenset({"role:user", "role:assistant"})


@dataclass(frozen=True)
class Prepared:
    """What the pre-flight built on the way: the model is all build_trainer still loads."""

    speed: SpeedPlan
    args: Any  # trl.SFTConfig
    dataset: Any
    fmt: str
    tokenizer: Any
    eval_dataset: Any = None  # dataset.eval's rows, checked like the training rows


def prepare(config: TrainerConfig) -> Prepared:
    """Run every check that needs no model; raises ConfigError or DataError."""
    spec = config.spec
    resolved = config.resolved
    if resolved["method"] == "qlora":
        quantization_config()  # raises ConfigError without a GPU or bitsandbytes
    if is_s3(spec.output.uri):
        check_output(spec)  # before hours of training: the bucket takes our writes
    # An s3:// dataset is copied to a local folder first; rows are then named by local file.
    source = fetch_dataset(spec) if is_s3(spec.dataset.uri) else spec.dataset
    dataset, fmt = prepare_dataset(source)
    dataset, eval_dataset = split_eval(dataset, spec.dataset, fmt)
    # Fast defaults, each lever switchable (docs/performance.md); the rows say how long the
    # run is at most, which decides whether compiling pays back.
    speed = plan_speed(config, dataset_rows=len(dataset))
    problems = device_problems(
        speed.summary(),
        spec.model.attnImplementation,
        cuda=training_device_is_cuda(bool(resolved["useCpu"])),
        speed_env=os.environ.get(ENV_SPEED, ""),
    )
    if problems:
        raise ConfigError("; ".join(problems))
    args = build_sft_config(
        config,
        dataset_format=spec.dataset.format if spec.dataset.format != "auto" else None,
        speed=speed,
    )
    if fmt == "text" and spec.dataset.textField != args.dataset_text_field:
        args.dataset_text_field = spec.dataset.textField
    check_loss_settings(args, fmt, dataset)
    tokenizer = load_tokenizer(spec.model)
    model_name = spec.model.tokenizer or spec.model.name or spec.model.path
    if is_conversational(dataset, fmt):
        check_chat_template(
            tokenizer,
            dataset,
            fmt,
            assistant_only_loss=bool(args.assistant_only_loss),
            model_name=str(model_name),
            where=RowLocator(data_files(source)),
        )
    return Prepared(speed, args, dataset, fmt, tokenizer, eval_dataset)


def training_device_is_cuda(use_cpu: bool) -> bool:
    """Whether the training processes will run on a CUDA device (as the Trainer picks it)."""
    import torch

    return not use_cpu and torch.cuda.is_available()


def device_problems(
    levers: dict[str, dict[str, Any]], attention: str | None, *, cuda: bool, speed_env: str = ""
) -> list[str]:
    """Levers on (and an attention set) that cannot train on this device, with the fix."""
    if cuda:
        return []
    problems = []
    for lever, why in CUDA_ONLY_LEVERS.items():
        if levers.get(lever, {}).get("on"):
            source = f"spec.training.speed.{lever}" + (
                f" (or ${ENV_SPEED})" if lever in speed_env else ""
            )
            problems.append(
                f"{source} is on, but this run has no CUDA device and {why}: set it to auto "
                "(on only where it can run) or off, or give the job GPUs "
                "(resources.gpusPerNode >= 1)"
            )
    if attention in CUDA_ONLY_ATTENTION:
        problems.append(
            f"spec.model.attnImplementation is {attention}, but this run has no CUDA device "
            f"and {CUDA_ONLY_ATTENTION[attention]}: use sdpa or eager, or give the job GPUs"
        )
    return problems


def check_loss_settings(args: Any, fmt: str, dataset: Any) -> None:
    """Loss masks the data cannot give: SFTTrainer refuses them only after the model loads."""
    if args.assistant_only_loss and not is_conversational(dataset, fmt):
        raise ConfigError(
            f"spec.training.extraArgs.assistant_only_loss is true but the dataset is not "
            f"conversational ({fmt} format): assistant-only loss needs messages with roles. "
            "Remove assistant_only_loss, or give the data as messages (for prompt-completion "
            "text, the loss is on the completion only by default)"
        )


# ------------------------------------------------------------------------- chat template


def conversation_features(row: dict[str, Any], fmt: str) -> frozenset[str]:
    """What a template must render for this row: its roles, tool calls, a tools list."""
    messages: list[Any] = []
    if fmt == "messages":
        messages = list(row.get("messages") or [])
    else:
        messages = list(row.get("prompt") or []) + list(row.get("completion") or [])
    features = {f"role:{m.get('role')}" for m in messages if isinstance(m, dict)}
    if any(isinstance(m, dict) and m.get("tool_calls") for m in messages):
        features.add("tool_calls")
    if row.get("tools"):
        features.add("tools")
    return frozenset(features)


def first_row_of_each_shape(dataset: Iterable[Any], fmt: str) -> dict[frozenset[str], int]:
    """The first row index of each distinct set of features (a few, whatever the size)."""
    columns = ["messages"] if fmt == "messages" else ["prompt", "completion"]
    shapes: dict[frozenset[str], int] = {}
    rows = dataset.select_columns([c for c in (*columns, "tools") if c in dataset.column_names])
    for index, row in enumerate(rows):
        shapes.setdefault(conversation_features(row, fmt), index)
    return shapes


def training_template(tokenizer: Any, model_name: str) -> str | None:
    """The template TRL trains assistant-only loss with (None: the tokenizer's own).

    TRL's rule (SFTTrainer.__init__): a template without `{% generation %}` markers is
    swapped for TRL's patched copy when TRL knows the template, else refused.
    """
    from trl.chat_template_utils import get_training_chat_template, has_generation_markers

    if has_generation_markers(tokenizer.chat_template):
        return None
    try:
        return get_training_chat_template(tokenizer)
    except ValueError:
        raise ConfigError(
            f"chat template of {model_name}: spec.training.extraArgs.assistant_only_loss needs "
            "`{% generation %}` ... `{% endgeneration %}` markers around the assistant's "
            "replies (they mark the tokens the loss is computed on), and this template has "
            "none, nor is it one TRL knows how to patch. Use a tokenizer whose template has "
            "them (spec.model.tokenizer), add the markers to the template, or remove "
            "assistant_only_loss to train on the whole conversation"
        ) from None


def _render(
    tokenizer: Any, row: dict[str, Any], fmt: str, template: str | None, assistant_only: bool
) -> list[int] | None:
    """Tokenize one row as TRL's SFTTrainer does; the assistant mask when asked for."""
    import json

    tools = row.get("tools")
    kwargs: dict[str, Any] = {
        "chat_template": template,
        "tools": json.loads(tools) if isinstance(tools, str) else tools,
        "tokenize": True,
        "return_dict": True,
        **(row.get("chat_template_kwargs") or {}),
    }
    if fmt == "messages":
        conversation = row["messages"]
    else:
        tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True, **kwargs)
        conversation = row["prompt"] + row["completion"]
    out = tokenizer.apply_chat_template(
        conversation, return_assistant_tokens_mask=assistant_only, **kwargs
    )
    mask = out.get("assistant_masks")
    return list(mask) if mask is not None else None


def check_chat_template(
    tokenizer: Any,
    dataset: Any,
    fmt: str,
    *,
    assistant_only_loss: bool,
    model_name: str,
    where: Any,
) -> None:
    """Render one row of each shape; a failure names the feature the template lacks."""
    if not tokenizer.chat_template:
        raise ConfigError(
            f"the dataset is conversational ({fmt}) but the tokenizer of {model_name} has no "
            "chat template: use an instruct/chat model, set spec.model.tokenizer to one with a "
            "template, or give the data as text"
        )
    template = training_template(tokenizer, model_name) if assistant_only_loss else None
    rendered: set[str] = set()
    shapes = first_row_of_each_shape(dataset, fmt)
    for features, index in sorted(shapes.items(), key=lambda item: (len(item[0]), item[1])):
        row = dataset[index]
        try:
            mask = _render(tokenizer, row, fmt, template, assistant_only_loss)
        except Exception as exc:  # noqa: BLE001 - jinja raises many types; all mean the same
            raise template_error(model_name, features, rendered, where(index), exc) from None
        rendered |= features
        if assistant_only_loss and mask is not None and 1 not in mask:
            raise ConfigError(
                f"chat template of {model_name}: {where(index)} has no assistant tokens inside "
                "the template's `{% generation %}` markers, so spec.training.extraArgs."
                "assistant_only_loss would train on nothing: put the assistant's replies "
                "between the markers, or remove assistant_only_loss"
            )


def template_error(
    model_name: str, features: frozenset[str], rendered: set[str], place: str, exc: BaseException
) -> ConfigError:
    """The template cannot render a row: which feature it lacks and how to fix it.

    The suspects are the row's features that no row rendered so far had (rows are tried
    simplest first); with no row rendered yet, the features beyond plain user and
    assistant turns.
    """
    from .failures import first_line

    cause = f"{type(exc).__name__}: {first_line(exc)}"
    suspects = features - rendered if rendered else features - BASIC_FEATURES
    if not suspects:
        return ConfigError(
            f"chat template of {model_name} cannot render {place} ({cause}): fix the row, or "
            "use a tokenizer whose template renders it (spec.model.tokenizer)"
        )
    words = ", ".join(FEATURE_WORDS[f] for f in FEATURE_WORDS if f in suspects)
    hint = (
        "a model or tokenizer whose template supports tool calling (spec.model.tokenizer)"
        if suspects & {"tool_calls", "tools", "role:tool"}
        else "a tokenizer whose template renders them (spec.model.tokenizer)"
    )
    seen = "; rows without them render" if rendered else ""
    return ConfigError(
        f"chat template of {model_name} cannot render {words} ({place}: {cause}{seen}): "
        f"use {hint}, or leave those rows out of the data"
    )
