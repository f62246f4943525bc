"""Static batches: every packed micro-batch padded to one shape (per_device x maxLength).

TRL's padding-free batches change length with every micro-batch. Whatever torch compiles
then compiles again for new lengths: the whole model under the compile lever (about 200 s
of a 274 s run, measured), and, uncompiled, flex attention's own kernels and its block
mask, which transformers compiles on first use, first for one length and then again with
dynamic shapes (about 50 s before the first optimizer step of the seed's reference job on
an H100, session 13). Padding every micro-batch to per_device x maxLength gives one shape,
so each compiles once. The padding tokens sit at position 0 with label -100: under flex
attention (or SDPA's mask from position_ids) each is a document of its own, nothing
attends to it, it is not trained on, and it is not counted as a token.

The compile lever pads whenever it compiles packed batches; the flexAttention lever pads
when the model is not compiled (the planner asks `static_length` of both). BFD packs rows
nearly full, so the padding is a small share of a micro-batch (0.5% on the reference job).
"""

from __future__ import annotations

import logging
from typing import Any

from .contract import Job, Signature
from .token_tally import token_tally

# The planner's logger: the static-batch lines read as they did in speed.py.
log = logging.getLogger("sftjob_trainer.speed")

# Keys of TRL's padding-free batches that only varlen kernels (flash attention) read. Their
# lengths and values change with every micro-batch, so a compiled kernel would recompile.
VARLEN_KEYS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
# The collator's note of how many padding tokens a static batch carries; taken out of the
# batch before the model sees it and subtracted from TRL's token count.
PADDING_KEY = "sftjob_padding_tokens"

# What use_static_batches relies on, for the contract of each lever that pads.
SIGNATURES = (
    Signature("trl:SFTConfig", includes=("pad_to_multiple_of",)),
    # use_static_batches wraps it, passing the model and inputs by position.
    Signature(
        "trl:SFTTrainer.compute_loss",
        ("self", "model", "inputs", "return_outputs", "num_items_in_batch"),
    ),
)


def static_length(job: Job, per_device: int) -> int | None:
    """The one micro-batch width of a packed run, or None where batches are not padded.

    Padded (unpacked) batches keep their shapes (their padding is the collator's own), and
    so does a run whose extraArgs set pad_to_multiple_of (the user's padding is kept).
    """
    if not job.padding_free or "pad_to_multiple_of" in job.extra_args:
        return None
    return per_device * job.max_length


def use_static_batches(trainer: Any, length: int, document_bound: int | None = None) -> None:
    """Make every packed micro-batch one shape, and keep TRL's token count honest.

    TRL pads the padding-free row to `length` (pad_to_multiple_of, set by the lever that
    pads: position 0 and label -100 for each padding token). This drops the varlen keys,
    whose sizes change per batch and which flex attention does not read, and counts the
    padding; TRL counts `position_ids.size(1)` as tokens, so the padding is subtracted
    again (summed over ranks once per log, see token_tally.TokenTally).

    With `document_bound` (the varlen kernel reads the boundaries) the keys are kept, TRL
    having computed them after padding (each padding token a document of one), and the
    longest document is given as that bound (maxLength: no document is longer) rather than
    per batch: a compiled layer then sees one value there, not a new one per batch, and
    the boundaries' count is marked dynamic, so neither recompiles it.
    """
    tally = token_tally(trainer)
    collate = trainer.data_collator

    def static_collate(examples: list[dict[str, Any]]) -> dict[str, Any]:
        batch = collate(examples)
        if document_bound is None:
            for key in VARLEN_KEYS:
                batch.pop(key, None)
        else:
            batch["max_length_q"] = batch["max_length_k"] = document_bound
        width = int(batch["input_ids"].size(1))
        real = sum(len(example["input_ids"]) for example in examples)
        if width != length:  # a row longer than maxLength: TRL truncates, so never here
            log.warning("static batches: a micro-batch came out %d tokens, not %d", width, length)
        batch[PADDING_KEY] = width - real
        return batch

    trainer.data_collator = static_collate
    compute_loss = trainer.compute_loss

    def compute_loss_without_padding(model: Any, inputs: dict[str, Any], *a: Any, **kw: Any) -> Any:
        padding = int(inputs.pop(PADDING_KEY, 0))
        if document_bound is not None:
            mark_boundaries_dynamic(inputs)
        result = compute_loss(model, inputs, *a, **kw)
        if model.training:
            tally.add(-padding)  # summed over ranks at the next log, with no sync now
        return result

    trainer.compute_loss = compute_loss_without_padding


def mark_boundaries_dynamic(inputs: dict[str, Any]) -> None:
    """The document boundaries' count changes with every batch: say so to torch.compile
    before it first sees them (on the device copies the model gets), so it compiles one
    graph for any count instead of one for the first count and another after it."""
    import torch

    for key in ("cu_seq_lens_q", "cu_seq_lens_k"):
        if isinstance(inputs.get(key), torch.Tensor):
            torch._dynamo.maybe_mark_dynamic(inputs[key], 0)
