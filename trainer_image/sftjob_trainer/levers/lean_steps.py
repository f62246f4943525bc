"""Micro-steps without host syncs: the lightMetrics lever's work on a built SFTTrainer.

A CUDA step runs fast only while the host queues kernels ahead of the GPU. TRL 1.16 makes
the host wait for the GPU several times in every micro-step, for metrics only:
- `.item()` on entropy, token accuracy and the token count, and `if num_valid > 0`;
- its fused LM head scores `hidden_states[mask]`, a boolean index whose size the host must
  read back from the GPU (and which breaks the compiled graph on a data-dependent shape);
- transformers' `logging_nan_inf_filter` tests each micro-step's loss for NaN on the host
  (the lever turns that filter off in SFTConfig, see light_metrics.decide).

Here the loss is TRL's own (sum of -log p over the labelled tokens / their count) with
the LM head computing log-probabilities only; tokens are counted on the host (padding-free
rows: the row width, a Python int) and summed over ranks once per log, not once per
micro-step. With static packed batches whose labels are nearly all trained on, the head
scores every position (ignored labels zeroed), so nothing in the step depends on a value
on the GPU. Entropy and mean_token_accuracy are not logged.

Where TRL's loss is not the plain one (a compute_loss_func, label smoothing, the dft loss,
MoE aux loss, sequence parallelism) or the model scales or soft-caps its logits, TRL's path
is kept and only the two metrics are dropped.
"""

from __future__ import annotations

from typing import Any

from .token_tally import token_tally

# Vocabulary columns per tile of TRL's chunked log-probability kernel (TRL's own default).
VOCAB_CHUNK = 32768
METRICS_DROPPED = ("entropy", "mean_token_accuracy")
# Scoring every position wastes the LM head's work on the ignored ones (prompts under a
# completion-only or assistant-only loss, padding): past this share of ignored labels,
# TRL's head, which scores only labelled positions at the price of one sync, is kept.
IGNORED_SHARE_MAX = 0.10
LABEL_SAMPLE_ROWS = 256
# Config fields by which a model scales or caps its logits; the lean head supports none.
LOGIT_TRANSFORMS = (
    "final_logit_softcapping",
    "logit_scale",
    "output_multiplier",
    "lm_head_multiplier",
    "logits_scaling",
)


def base_model(trainer: Any) -> Any:
    # A peft wrapper exposes the base model; not every TRL build exports is_peft_model.
    get_base = getattr(trainer.model, "get_base_model", None)
    return get_base() if callable(get_base) else trainer.model


def plain_head(model: Any) -> bool:
    """Whether the model's logits are hidden @ lm_head.T, unscaled (what the lean head does)."""
    config = model.config
    text = config.get_text_config()
    if text is not config:  # a vision-language wrapper: TRL knows where its backbone is
        return False
    return all(getattr(text, name, None) is None for name in LOGIT_TRANSFORMS)


def plain_loss(trainer: Any) -> bool:
    """Whether TRL's compute_loss takes its plain path (-sum log p / tokens, nothing else)."""
    args = trainer.args
    parallelism = getattr(trainer.accelerator, "parallelism_config", None)
    return (
        trainer.compute_loss_func is None
        and trainer.label_smoother is None
        and getattr(args, "loss_type", "nll") == "nll"
        and not getattr(trainer, "aux_loss_enabled", False)
        and not (parallelism is not None and getattr(parallelism, "sp_enabled", False))
    )


def lean_lm_head(model: Any, kept_logits_budget: int | None = None) -> None:
    """Patch `model(..., fused_lm_head=True)` to score every position, log-probs only.

    TRL's head scores only `hidden_states[labels != -100]`, which costs a host sync and a
    graph break per micro-step. Scoring the ignored positions too (a packed static batch
    has few: each document's first token and the padding) keeps every shape static; their
    log-probabilities are zeroed, exactly as TRL returns them. Where the micro-batch's
    logits fit `kept_logits_budget` bytes (default: a share of the device), they are kept
    for the backward instead of computed twice (kept_logits.py).
    """
    import torch
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import FusedCausalLMOutput

    from .kept_logits import KeptLogitsLogProb, compute_dtype, fits
    from .kept_logits import kept_logits_budget as device_budget

    fused = model.forward  # TRL's forward: the plain forward when fused_lm_head is False

    # Eager, outside the compiled graph: dynamo would otherwise trace TRL's Triton launches
    # and recompile for each tile shape. The head is a few large GEMMs and fold kernels,
    # which compiling would not speed up.
    @torch.compiler.disable
    def target_log_probs(hidden: Any, targets: Any) -> Any:
        head = model.get_output_embeddings()
        budget = device_budget(hidden.device) if kept_logits_budget is None else kept_logits_budget
        if fits(hidden.size(0), head.weight.size(0), compute_dtype(hidden), budget):
            return KeptLogitsLogProb.apply(hidden, head.weight, head.bias, targets)
        return ChunkedLogProbFunction.apply(
            hidden, head.weight, head.bias, targets, 1.0, VOCAB_CHUNK, None, 1.0, ("log_probs",)
        )[0]

    def forward(*args: Any, fused_lm_head: bool = False, **kwargs: Any) -> Any:
        labels = kwargs.get("labels")
        if not fused_lm_head or labels is None or kwargs.get("shift_labels") is not None:
            return fused(*args, fused_lm_head=fused_lm_head, **kwargs)
        kwargs.pop("labels")
        # The loss is taken in compute_loss (as TRL does): its normaliser is not needed here.
        kwargs.pop("num_items_in_batch", None)
        kwargs["use_cache"] = False
        hidden = model.base_model(*args, **kwargs).last_hidden_state[:, :-1]
        targets = labels[:, 1:]
        mask = targets != -100
        log_probs = target_log_probs(
            hidden.reshape(-1, hidden.size(-1)), targets.clamp(min=0).reshape(-1)
        )
        log_probs = log_probs.view(mask.shape).masked_fill(~mask, 0)
        # TRL's own compute_loss (evaluation) reads entropy and is_top1: zero scalars, and
        # the two metrics are dropped from the logs (without_dropped_metrics).
        zero = log_probs.new_zeros(())
        return FusedCausalLMOutput(log_probs=log_probs, label_mask=mask, entropy=zero, is_top1=zero)

    model.forward = forward


def ignored_label_share(dataset: Any, rows: int = LABEL_SAMPLE_ROWS) -> float | None:
    """Share of -100 labels in the first rows of the prepared dataset; None if unknown."""
    try:
        sample = dataset.select(range(min(rows, len(dataset))))["labels"]
    except (AttributeError, KeyError, TypeError, ValueError):  # iterable, or no labels column
        return None
    total = sum(len(row) for row in sample)
    if not total:
        return None
    return sum(label == -100 for row in sample for label in row) / total


def use_lean_steps(trainer: Any, static_batches: bool) -> str:
    """Install the sync-free micro-step where TRL's path allows it; says what was done."""
    tally = token_tally(trainer)
    model = base_model(trainer)
    if not (plain_loss(trainer) and plain_head(model)):
        drop_metrics_only(trainer, model)
        return "TRL's loss path kept (custom loss or scaled logits): metrics dropped only"
    share = ignored_label_share(trainer.train_dataset)
    if static_batches and share is not None and share <= IGNORED_SHARE_MAX:
        lean_lm_head(model)
        head = f"every position scored ({share:.0%} of labels ignored), no host sync"
    else:
        log_probs_only_head(model)
        if not static_batches:
            why = "batches are not static"
        elif share is None:
            why = "labels could not be sampled"
        else:
            why = f"{share:.0%} of labels ignored"
        head = f"labelled positions only (TRL's head, one host sync per micro-step: {why})"
    trl_compute_loss = trainer.compute_loss

    def compute_loss(
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        if return_outputs or not model.training:  # evaluation: TRL's path, metrics and all
            return trl_compute_loss(model, inputs, return_outputs, num_items_in_batch)
        import torch

        inputs["use_cache"] = False
        outputs = model(**inputs, fused_lm_head=True)
        count = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(count).clamp(min=1)
        if trainer.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (trainer.accelerator.num_processes // trainer.get_tp_size())
        # What TRL counts: attention-mask tokens, else the padding-free row's width.
        if "attention_mask" in inputs:
            tally.add(inputs["attention_mask"].sum())
        else:
            tally.add(int(inputs["position_ids"].size(1)))
        return loss

    trainer.compute_loss = compute_loss
    trainer.log = without_dropped_metrics(trainer, trainer.log)
    return f"loss without metric reads; LM head: {head}"


def drop_metrics_only(trainer: Any, model: Any) -> None:
    """TRL's loss path, with the head computing log-probabilities only; the two metrics
    are removed before each log so no fake zeros appear."""
    log_probs_only_head(model)
    trainer.log = without_dropped_metrics(trainer, trainer.log)


def log_probs_only_head(model: Any) -> None:
    """TRL's fused head (labelled positions only) computing log-probabilities only.

    TRL's compute_loss still reads `entropy` and `is_top1`, so they come back as zero
    scalars.
    """
    from trl.trainer.utils import add_fused_lm_head

    add_fused_lm_head(model, outputs=("log_probs",))
    fused = model.forward

    def forward(*args: Any, **kwargs: Any) -> Any:
        out = fused(*args, **kwargs)
        if kwargs.get("fused_lm_head") and getattr(out, "entropy", 0) is None:
            zero = out.log_probs.new_zeros(())
            out.entropy = zero
            out.is_top1 = zero
        return out

    model.forward = forward


def without_dropped_metrics(trainer: Any, original_log: Any) -> Any:
    def log_without(logs: dict[str, float], start_time: float | None = None) -> None:
        for metrics in trainer._metrics.values():
            for name in METRICS_DROPPED:
                metrics.pop(name, None)
        original_log(logs, start_time)

    return log_without
