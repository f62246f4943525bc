"""The flexAttention lever: flex attention's sparse document mask for packed batches.

Packed (bfd, padding-free) batches are one concatenated row with position_ids resets. SDPA
needs a dense block-diagonal mask for that, whose cost grows with the square of the
micro-batch; flex_attention builds a sparse block mask from the same position_ids
(transformers' find_packed_sequence_indices), so documents stay isolated and larger
micro-batches pay off. CUDA only under "auto": on CPU it compiles through inductor (about 20
s) and gains nothing.

transformers compiles flex attention's kernels and its block mask on first use. When the
model itself is not compiled, this lever pads every packed micro-batch to one shape
(static_batches.py), so those compile once, not again for each new length (the compile
lever pads when it compiles).
"""

from __future__ import annotations

import dataclasses

from .contract import Choice, Contract, Hardware, Job, Signature, SpeedOptions, verified
from .static_batches import SIGNATURES as STATIC_BATCH_SIGNATURES
from .static_batches import static_length

SWITCH = "flexAttention"

EXACT = False
NUMERICS = (
    "flex attention's kernels instead of SDPA's: the same masking, other rounding "
    "(packed isolation within 2.4e-7 on the GPU)"
)
CONTRACT = Contract(
    versions=verified("torch", "transformers"),
    signatures=(
        Signature("torch.nn.attention.flex_attention:flex_attention"),
        Signature(
            "torch.nn.attention.flex_attention:create_block_mask",
            includes=("mask_mod", "B", "H", "Q_LEN", "KV_LEN", "device"),
        ),
        # transformers builds the document mask from position_ids resets with it.
        Signature("transformers.masking_utils:find_packed_sequence_indices", ("position_ids",)),
        *STATIC_BATCH_SIGNATURES,
    ),
)


def decide(opt: SpeedOptions, hw: Hardware, job: Job) -> Choice:
    name = SWITCH
    if opt.flexAttention == "off":
        return Choice(name, False, "turned off")
    if job.attn_set:
        return Choice(name, False, "model.attnImplementation is set: kept as given")
    if opt.flexAttention == "on":
        return Choice(name, True, "turned on", model={"attnImplementation": "flex_attention"})
    if not hw.cuda:
        return Choice(
            name,
            False,
            "no CUDA device: flex_attention would compile through "
            "inductor on CPU for no gain; SDPA's block-diagonal mask is exact",
        )
    if not job.padding_free:
        return Choice(name, False, "batches are padded, not packed padding-free: SDPA is fine")
    try:
        from torch.nn.attention.flex_attention import flex_attention as _  # noqa: F401
    except ImportError:
        return Choice(name, False, "this torch has no flex_attention")
    return Choice(
        name,
        True,
        "CUDA and packed padding-free batches: sparse document mask",
        model={"attnImplementation": "flex_attention"},
    )


def with_static_batches(flex: Choice, job: Job, per_device: int) -> Choice:
    """The flex choice padding every packed micro-batch to one shape, for an uncompiled
    model (the planner calls it when the compile lever does not pad).

    Uncompiled, transformers still compiles flex attention and its block mask, and TRL's
    batches change length every micro-step: compiled for the first length, then again with
    dynamic shapes, about 50 s before the reference job's first step on an H100. One
    shape compiles once, and lets the lean LM head (lightMetrics) skip its host sync.
    """
    length = static_length(job, per_device)
    if not flex.on or length is None:
        return flex
    return dataclasses.replace(
        flex,
        reason=f"{flex.reason}; micro-batches padded to {length} tokens (its kernels compile "
        "for one shape; padding masked, not trained on, not counted)",
        sft={**flex.sft, "pad_to_multiple_of": length},
    )
