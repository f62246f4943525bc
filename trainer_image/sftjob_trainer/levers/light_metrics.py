"""The lightMetrics lever: micro-steps without host syncs (lean_steps.py does the work).

TRL 1.16 folds entropy and top-1 accuracy into its chunked LM-head kernel on every
micro-step (no SFTConfig switch turns them off) and reads them, and the token count, back to
the host each micro-step, which stalls the GPU queue. This computes the log-probabilities
only, with no host sync (lean_steps.py), and drops the two metrics from the logs. On with
CUDA under "auto"; "off" keeps the metrics.
"""

from __future__ import annotations

from typing import Any

from .contract import (
    Choice,
    Contract,
    Hardware,
    Job,
    Plan,
    Signature,
    SpeedOptions,
    deferred_probe,
    verified,
)

SWITCH = "lightMetrics"

EXACT = False
NUMERICS = (
    "its LM head computes the logits in one GEMM instead of TRL's tiles (log-probabilities "
    "within 1e-5 in fp32, tests/trainer/test_kept_logits.py) and drops two metrics"
)
# TRL's private kernels, called with these arguments by position (kept_logits.py).
_FOLD = (
    "targets",
    "running_max",
    "sum_exp",
    "x_sum_exp",
    "sq_sum_exp",
    "z_sum",
    "max_before_target",
    "target_logit",
    "vocab_start",
    "n_cols",
    "logit_scale",
    "softcap",
    "inv_t",
    "HAS_SOFTCAP",
    "HAS_ENTROPY",
    "HAS_LOG_SUM_SQ_PROBS",
    "HAS_MEAN_LOGITS",
    "HAS_IS_TOP1",
    "BLOCK_SIZE",
)
_TO_GRADIENT = (
    "targets",
    "log_z",
    "entropy",
    "grad_logprobs",
    "grad_entropy",
    "vocab_start",
    "n_cols",
    "logit_scale",
    "softcap",
    "inv_t",
    "HAS_SOFTCAP",
    "HAS_LOGPROB_GRAD",
    "HAS_ENTROPY_GRAD",
    "BLOCK_SIZE",
)
_KERNELS = "trl.kernels.chunked_logprob"


# The triton kernels' names for the same positions (pointers where the tiles take tensors).
_FOLD_POINTERS = (
    "targets_ptr",
    "max_ptr",
    "sum_exp_ptr",
    "x_sum_exp_ptr",
    "sq_sum_exp_ptr",
    "z_sum_ptr",
    "max_before_target_ptr",
    "target_logit_ptr",
)
_TO_GRADIENT_POINTERS = (
    "targets_ptr",
    "log_z_ptr",
    "entropy_ptr",
    "grad_logprobs_ptr",
    "grad_entropy_ptr",
)


CONTRACT = Contract(
    versions=verified("torch", "transformers", "trl"),
    signatures=(
        Signature(f"{_KERNELS}:_forward_tile", ("tile", "tile_stride", *_FOLD)),
        Signature(
            f"{_KERNELS}:_forward_kernel",
            ("mm_ptr", "mm_stride", *_FOLD_POINTERS, *_FOLD[8:]),
        ),
        Signature(f"{_KERNELS}:_backward_tile", ("tile", "tile_stride", *_TO_GRADIENT)),
        Signature(
            f"{_KERNELS}:_backward_kernel",
            ("mm_ptr", "mm_stride", *_TO_GRADIENT_POINTERS, *_TO_GRADIENT[5:]),
        ),
        Signature(f"{_KERNELS}:_use_triton", ("device",)),
        Signature(f"{_KERNELS}:_BLOCK_SIZE"),
        Signature(
            "trl.kernels:ChunkedLogProbFunction.forward",
            (
                "ctx",
                "hidden",
                "weight",
                "bias",
                "targets",
                "temperature",
                "chunk_size",
                "final_logit_softcapping",
                "logit_scale",
                "outputs",
            ),
        ),
        Signature(
            "trl.trainer.utils:add_fused_lm_head",
            ("model", "temperature", "cast_lm_head_to_fp32", "outputs"),
        ),
        Signature(
            "trl.trainer.utils:FusedCausalLMOutput",
            includes=("log_probs", "label_mask", "entropy", "is_top1"),
        ),
        Signature(
            "trl:SFTTrainer.compute_loss",
            ("self", "model", "inputs", "return_outputs", "num_items_in_batch"),
        ),
        Signature("transformers:Trainer.log", ("self", "logs", "start_time")),
        Signature("trl:SFTConfig", includes=("logging_nan_inf_filter",)),
    ),
    probe=deferred_probe(".kept_logits", "probe_kept_logits"),
)


def decide(opt: SpeedOptions, hw: Hardware, job: Job) -> Choice:
    name = SWITCH
    if opt.lightMetrics == "off":
        return Choice(name, False, "turned off: entropy and mean_token_accuracy are logged")
    if opt.lightMetrics == "auto" and not hw.cuda:
        return Choice(name, False, "no CUDA device: metrics kept (a test run wants them)")
    sft: dict[str, Any] = {}
    if "logging_nan_inf_filter" not in job.extra_args:
        # The filter reads each micro-step's loss on the host: a sync that idles the GPU.
        # Without it a NaN loss is logged as NaN rather than hidden in the average.
        sft["logging_nan_inf_filter"] = False
    return Choice(
        name,
        True,
        "no host sync per micro-step: LM head computes log-probabilities only, tokens "
        "counted on the host; entropy and mean_token_accuracy are not logged",
        sft=sft,
    )


def apply(trainer: Any, plan: Plan) -> str:
    """The sync-free micro-step; the LM head scores every position over static batches."""
    from .lean_steps import use_lean_steps

    return use_lean_steps(trainer, static_batches=plan.static_length is not None)
