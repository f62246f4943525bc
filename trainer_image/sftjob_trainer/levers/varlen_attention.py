"""The varlenAttention lever: packed documents through torch's FlashAttention-2 kernel.

Attention within each document of a packed padding-free row, from the boundaries TRL's
collator computes on the host, by torch's own varlen FlashAttention-2 kernel
(packed_flash.py): no block mask and no compile, where flex attention, uncompiled, is
compiled by transformers on its first calls (50-59 s of the reference job's first step on
an H100). Under "auto" it stays off until a GPU run measures it against flex attention:
`on` takes it (CUDA, bf16, packed padding-free batches, the model not compiled).
"""

from __future__ import annotations

from .contract import (
    Choice,
    Contract,
    Hardware,
    Job,
    ModelShape,
    Signature,
    SpeedOptions,
    deferred_probe,
    verified,
)

SWITCH = "varlenAttention"

EXACT = False
NUMERICS = "FlashAttention-2's kernel instead of SDPA's: the same masking, other rounding"
CONTRACT = Contract(
    versions=verified("torch", "transformers", "trl"),
    signatures=(
        Signature(
            "torch.nn.attention.varlen:varlen_attn",
            includes=("query", "key", "value", "cu_seq_q", "cu_seq_k", "max_q", "max_k", "scale"),
        ),
        Signature("transformers:AttentionInterface.register"),
        Signature("transformers.masking_utils:AttentionMaskInterface.register"),
        Signature("transformers.masking_utils:flash_attention_mask"),
        Signature("transformers.integrations.sdpa_attention:repeat_kv", ("hidden_states", "n_rep")),
    ),
    probe=deferred_probe(".packed_flash", "probe_varlen"),
)


def decide(
    opt: SpeedOptions, hw: Hardware, job: Job, shape: ModelShape | None, compiled: bool = False
) -> Choice:
    """On under auto where it can serve and the model is not compiled: on the reference job
    (H100, session 15) the whole job took 117.0 s with it against 151.5 s with flex
    attention, both uncompiled (first step 1.5 s against 28.1 s: flex attention's kernels
    compile there), at a steady rate within 6% (33.1k against 35.0k tokens/s over flex
    attention's 2 timed steps), its loss at step 10 within 1.2e-4 of the snippet's. A
    compiled model keeps flex attention under auto: that pair is what the steady-state
    figures measured (4.0-4.15x the reference)."""
    name = SWITCH
    if opt.varlenAttention == "off":
        return Choice(name, False, "turned off")
    if job.attn_set:
        return Choice(name, False, "model.attnImplementation is set: kept as given")
    if opt.varlenAttention == "auto" and not hw.cuda:
        return Choice(name, False, "no CUDA device: the FlashAttention-2 kernel is CUDA only")
    if opt.varlenAttention == "auto" and compiled:
        return Choice(
            name,
            False,
            "the model is compiled: flex attention's kernels compile with it (the measured "
            "pair); on: this kernel inside the compiled model",
        )
    if not job.padding_free:
        return Choice(name, False, "batches are padded, not packed padding-free")
    if not job.bf16:
        return Choice(name, False, "bf16 is off: the flash kernel computes in bf16 or fp16 only")
    if shape is None:
        return Choice(
            name, False, "the model's config could not be read: its attention is not known"
        )
    if shape.attention_extras is not None:
        return Choice(
            name,
            False,
            f"the model's attention has {shape.attention_extras}, which this causal kernel "
            "does not compute",
        )
    from .packed_flash import IMPLEMENTATION

    return Choice(
        name,
        True,
        "torch's FlashAttention-2 kernel attends within each packed document (no mask, "
        "nothing to compile)",
        model={"attnImplementation": IMPLEMENTATION},
    )
