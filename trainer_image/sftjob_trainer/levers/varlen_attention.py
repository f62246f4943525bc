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


def decide(opt: SpeedOptions, hw: Hardware, job: Job) -> Choice:
    name = SWITCH
    if opt.varlenAttention == "off":
        return Choice(name, False, "turned off")
    if opt.varlenAttention == "auto":
        return Choice(
            name,
            False,
            "not measured on a GPU yet (on: torch's FlashAttention-2 kernel for packed "
            "documents, nothing compiled)",
        )
    if job.attn_set:
        return Choice(name, False, "model.attnImplementation is set: kept as given")
    if not job.padding_free:
        return Choice(name, False, "batches are padded, not packed padding-free")
    if not job.bf16:
        return Choice(name, False, "bf16 is off: the flash kernel computes in bf16 or fp16 only")
    if opt.compile == "on":
        return Choice(
            name,
            False,
            "compile: on pads every micro-batch to one shape, which hides the document "
            "boundaries this kernel reads",
        )
    from .packed_flash import IMPLEMENTATION

    return Choice(
        name,
        True,
        "turned on: torch's FlashAttention-2 kernel attends within each packed document",
        model={"attnImplementation": IMPLEMENTATION},
    )
