"""The castWeightsOncePerStep lever: bf16 weight copies made once per optimizer step.

Linear layers compute with bf16 copies of their fp32 weights, made once per optimizer step
instead of cast at every micro-step, their gradients added into the fp32 parameters by a
hook (weight_copies.py; the same arithmetic). One process only. About 1% faster on an H200
(session 6); "auto" turns it on with CUDA where the micro-batch estimate holds the copies
without a smaller micro-batch or checkpointing (not for qlora).
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

SWITCH = "castWeightsOncePerStep"

EXACT = True
NUMERICS = (
    "autocast's arithmetic: the same bf16 rounding of each weight and the same matmuls "
    "(bit for bit autocast's gradients and weights, tests/trainer/test_weight_copies.py)"
)


CONTRACT = Contract(
    versions=verified("torch", "transformers"),
    signatures=(
        Signature("torch:Tensor.register_post_accumulate_grad_hook"),
        Signature("transformers:TrainerCallback.on_optimizer_step"),
        Signature("transformers:TrainerCallback.on_pre_optimizer_step"),
    ),
    probe=deferred_probe(".weight_copies", "probe_weight_copies", accumulate_in_matmul=False),
)
# The levers whose work the copies carry out too: their backward adds into .grad in the
# matmul; they are made in fp8 for the layers that take it.
FUSE_SWITCH = "fuseGradientAccumulation"
FP8_SWITCH = "fp8Matmuls"


def decide(opt: SpeedOptions, hw: Hardware, job: Job) -> Choice:
    name = SWITCH
    if opt.castWeightsOncePerStep == "off":
        return Choice(name, False, "turned off: autocast casts the weights at every micro-step")
    if not job.bf16:
        return Choice(name, False, "bf16 is off: there are no casts to save")
    # DDP and FSDP take the gradients autograd puts on the parameters themselves; the
    # copies' gradients reach the parameters through a hook instead.
    if job.distributed == "fsdp":
        return Choice(name, False, "fsdp shards the parameters and takes their own gradients")
    if job.world_size > 1:
        return Choice(
            name, False, f"{job.world_size} processes: DDP reduces the parameters' own gradients"
        )
    if opt.castWeightsOncePerStep == "auto":
        if not hw.cuda:
            return Choice(name, False, "no CUDA device: its gain is measured on GPUs only")
        if job.method == "qlora":
            return Choice(name, False, "qlora: the 4-bit layers are not copied; not measured")
    return Choice(
        name,
        True,
        "linear layers compute with bf16 copies of their fp32 weights, made once per "
        "optimizer step instead of at every micro-step (the same arithmetic)",
    )


def apply(trainer: Any, plan: Plan) -> str:
    """The copies (weight_copies.py), fusing the gradient's add and in fp8 where those
    levers are on."""
    from .weight_copies import use_weight_copies

    return use_weight_copies(trainer, plan.on(FUSE_SWITCH), fp8=plan.on(FP8_SWITCH))
