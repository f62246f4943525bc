"""The bf16ResidualStream lever: hidden states between layers in bf16 (residual_stream.py).

The input embedding's output is cast to bf16, so the hidden states between layers and the
residual additions are bf16 rather than fp32 (residual_stream.py; weights, gradients and
optimizer stay fp32). It rounds the residual additions to bf16: losses within 1.3e-4 of the
fp32 stream's on the bench; 1.5-2.3% faster there. On with CUDA and bf16 for full fine-tunes
under "auto" (no gain measured for LoRA).
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

SWITCH = "bf16ResidualStream"

EXACT = False
NUMERICS = "the residual additions between layers round to bf16 (losses within 1.3e-4)"


CONTRACT = Contract(
    versions=verified("torch", "transformers"),
    signatures=(
        Signature("transformers:PreTrainedModel.get_input_embeddings"),
        Signature(
            "transformers:TrainerCallback.on_train_begin",
            ("self", "args", "state", "control", "kwargs"),
        ),
    ),
    probe=deferred_probe(".residual_stream", "probe_bf16_stream"),
)


def decide(opt: SpeedOptions, hw: Hardware, job: Job) -> Choice:
    name = SWITCH
    if opt.bf16ResidualStream == "off":
        return Choice(name, False, "turned off: hidden states between layers stay fp32")
    if not job.bf16:
        return Choice(name, False, "bf16 is off: the model computes in fp32")
    if opt.bf16ResidualStream == "auto":
        if not hw.cuda:
            return Choice(name, False, "no CUDA device: its gain is measured on GPUs only")
        if job.method != "full":
            # Measured on the LoRA case: no gain (50,014 against 49,974 tokens/s), and the
            # loss after the first update moved from 0.9% to 1.2% off the reference's.
            return Choice(
                name, False, f"{job.method}: no gain measured for adapters; stream kept fp32"
            )
    return Choice(
        name,
        True,
        "the embedding's output is cast to bf16: hidden states and residual additions "
        "between layers in bf16 (half their memory traffic; weights and optimizer stay fp32)",
    )


def apply(trainer: Any, plan: Plan) -> str:
    """The cast on the input embedding (residual_stream.py), while training runs."""
    from .residual_stream import use_bf16_residual_stream

    return use_bf16_residual_stream(trainer)
