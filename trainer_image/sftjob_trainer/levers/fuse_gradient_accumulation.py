"""The fuseGradientAccumulation lever: weight gradients added into .grad inside the matmul.

With the weight copies, each trainable layer's backward adds its weight gradient into the
fp32 `.grad` inside the matmul that computes it (cuBLAS with fp32 output and beta 1),
instead of writing a bf16 gradient and adding it in a separate kernel. The product is no
longer rounded to bf16 before the add. +1.3% and +1.7% on the bench's full case (session 7,
each GPU both ways; +1.0% and +0.9% for the version after its reviews, session 8), none on
LoRA. On with CUDA for full fine-tunes wherever the copies are, under "auto".
"""

from __future__ import annotations

from .contract import (
    Choice,
    Contract,
    Hardware,
    Job,
    Signature,
    SpeedOptions,
    deferred_probe,
    verified,
)

SWITCH = "fuseGradientAccumulation"

EXACT = False
NUMERICS = (
    "on CUDA the weight gradient's product is added in fp32, not rounded to bf16 first "
    "(errors against float64 the same size as autocast's)"
)


CONTRACT = Contract(
    versions=verified("torch", "transformers"),
    signatures=(
        Signature("torch.library:custom_op"),
        Signature("transformers:TrainerCallback.on_step_end"),
    ),
    probe=deferred_probe(".weight_copies", "probe_weight_copies", accumulate_in_matmul=True),
)


def decide(opt: SpeedOptions, hw: Hardware, job: Job, weight_copies: Choice) -> Choice:
    name = SWITCH
    if opt.fuseGradientAccumulation == "off":
        return Choice(
            name, False, "turned off: each bf16 weight gradient is added into .grad by a hook"
        )
    if not weight_copies.on:
        # The copies' layers are the ones whose backward this replaces.
        return Choice(name, False, "castWeightsOncePerStep is off: there is no copy to fuse")
    if opt.fuseGradientAccumulation == "auto":
        if not hw.cuda:
            return Choice(name, False, "no CUDA device: the fp32-output matmul is a cuBLAS one")
        if job.method != "full":
            # Measured on the LoRA case (session 7): 52,412 tokens/s with it, 52,693
            # without (the other GPU); the adapters' gradients are too small to matter.
            return Choice(name, False, f"{job.method}: no gain measured for adapters; hook kept")
    return Choice(
        name,
        True,
        "each weight gradient is accumulated into the fp32 .grad inside the matmul that "
        "computes it (fp32 output, not rounded to bf16; no separate add)",
    )
