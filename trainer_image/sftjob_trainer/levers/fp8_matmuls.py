"""The fp8Matmuls lever: the decoder's linear layers multiply in fp8 (fp8_linear.py).

With the weight copies (cast_weights_once.py), each linear layer of 64 or more inputs and
outputs keeps fp8 copies of its weight, made once per optimizer step, and multiplies with
`torch._scaled_mm`: inputs and weights in e4m3, the gradients in e5m2, one scale per
tensor (torchao's "tensorwise" recipe). The LM head and LoRA's adapters stay bf16, and
evaluation during training multiplies in fp8 too (the layers are plain again after). Needs
fp8 tensor cores (compute capability 8.9 and up: Ada, Hopper, Blackwell). Not exact: the
claim is the loss curve against the plain run's, measured on the bench
(docs/performance.md).

Opt-in: "auto" leaves it off. Measured on one H100 (session 21, the whole model compiled,
each pair in one call): the full fine-tune 54,150 against 51,175 tokens/s (+5.8%), its
losses up to 1.4% off plain TRL's (the issue's bound is 1%; the bf16 run's: 0.06%), and
57 s more compile; LoRA 51,361 against 49,948 (+2.8%), losses within 0.42%, and 96 s
more compile. The matmuls alone gain less than their casts cost at this model's widths
(bench/fp8_matmul_probe.py: 0.66x for a layer's linear shapes, each compiled apart); the
whole compiled model fuses the casts into their neighbours.
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

SWITCH = "fp8Matmuls"

EXACT = False
NUMERICS = (
    "the linear layers' inputs, weights and gradients round to fp8 (e4m3/e5m2, one scale "
    "per tensor): about 5% of each product's norm, unbiased"
)
# Ada and Hopper are the first with fp8 tensor cores.
FP8_CAPABILITY = (8, 9)

CONTRACT = Contract(
    versions=verified("torch", "transformers"),
    signatures=(
        Signature("torch:_scaled_mm"),
        Signature("torch.library:custom_op"),
        Signature("transformers:TrainerCallback.on_optimizer_step"),
    ),
    probe=deferred_probe(".weight_copies", "probe_fp8_copies"),
)


def decide(opt: SpeedOptions, hw: Hardware, job: Job, weight_copies: Choice) -> Choice:
    name = SWITCH
    if opt.fp8Matmuls == "off":
        return Choice(name, False, "turned off: linear layers multiply in bf16")
    if opt.fp8Matmuls == "auto":
        return Choice(
            name,
            False,
            "opt-in: +5.8% full and +2.8% LoRA measured on an H100 (compiled), the full "
            "fine-tune's losses up to 1.4% off; on: fp8 tensor cores (compute capability 8.9+)",
        )
    if not job.bf16:
        return Choice(name, False, "bf16 is off: the model computes in fp32")
    if not weight_copies.on:
        # The fp8 copies are made, refreshed and removed with the bf16 ones.
        return Choice(
            name,
            False,
            f"castWeightsOncePerStep is off ({weight_copies.reason}): the fp8 weights are "
            "its copies",
        )
    if hw.cuda and hw.capability is not None and hw.capability < FP8_CAPABILITY:
        major, minor = hw.capability
        return Choice(
            name,
            False,
            f"{hw.name} (compute capability {major}.{minor}) has no fp8 tensor cores "
            "(8.9+: Ada, Hopper)",
        )
    return Choice(
        name,
        True,
        "linear layers of 64+ features multiply in fp8 (e4m3 inputs and weights, e5m2 "
        "gradients, one scale per tensor) with fp8 weight copies made once per optimizer "
        "step; the LM head and adapters stay bf16",
    )
