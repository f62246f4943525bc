"""The lightMetrics lever: micro-steps without host syncs (lean_steps.py does the work).

TRL 1.16 folds entropy and top-1 accuracy into its chunked LM-head kernel on every
micro-step (no SFTConfig switch turns them off) and reads them, and the token count, back to
the host each micro-step, which stalls the GPU queue. This computes the log-probabilities
only, with no host sync (lean_steps.py), and drops the two metrics from the logs. On with
CUDA under "auto"; "off" keeps the metrics.
"""

from __future__ import annotations

from typing import Any

from .contract import Choice, Hardware, Job, Plan, SpeedOptions

SWITCH = "lightMetrics"


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
