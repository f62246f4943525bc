"""The autoMicroBatch lever: the largest micro-batch the device's memory holds.

With flex attention, the largest micro-batch that fits without activation checkpointing
(checkpointing only when memory needs it), accumulation adjusted so per_device x
accumulation stays EXACTLY the same (so the plan's steps and the optimizer batch do not
change).
"""

from __future__ import annotations

from typing import Any

from .contract import Choice, Contract, Hardware, Job, ModelShape, Signature, SpeedOptions, verified
from .device_memory import KEPT_LOGITS_SHARE

SWITCH = "autoMicroBatch"

EXACT = False
NUMERICS = (
    "another split of the same effective batch sums the gradients in another order "
    "(losses within 1e-3 on CPU, tests/trainer/test_bench.py)"
)
CONTRACT = Contract(
    versions=verified("transformers", "trl"),
    signatures=(
        Signature(
            "trl:SFTConfig",
            includes=(
                "per_device_train_batch_size",
                "gradient_accumulation_steps",
                "gradient_checkpointing",
            ),
        ),
    ),
)
# Fraction of device memory the estimate may fill; the rest absorbs allocator
# fragmentation, the CUDA context and the estimate's error.
MEMORY_HEADROOM = 0.80
# Past this many tokens per micro-batch the kernels are already large: no gain, more risk.
MAX_MICRO_BATCH_TOKENS = 16384
# Below this a micro-batch leaves the GPU under-used: then checkpoint and take more rows.
MIN_MICRO_BATCH_TOKENS = 4096


def activation_bytes_per_token(
    shape: ModelShape, *, checkpointing: bool, lora: bool, bf16: bool
) -> float:
    """Saved activations per token, all layers (calibrated on Qwen2.5-1.5B on an H100).

    Per layer under bf16 autocast: about 8 bytes per MLP unit (gate, up, act, product)
    and 24 per hidden unit (norms, q/k/v, attention output, fp32 residual). That gives
    3.0 MB/token for the 1.5B shape; measured 2.6-3.0 (47-50 GiB at 4 x 2048 tokens).
    With checkpointing only the fp32 layer inputs stay, plus one layer being recomputed.
    """
    scale = 1.0 if bf16 else 2.0
    layer = scale * (8 * shape.intermediate + 24 * shape.hidden)
    if lora:
        layer *= 1.15  # the adapters' inputs (dropout outputs) are kept too
    if checkpointing:
        return 4 * shape.hidden * shape.layers + layer
    return layer * shape.layers


def static_bytes(shape: ModelShape, method: str, weight_copies: bool = False) -> float:
    """Memory that does not grow with the micro-batch, calibrated on the H100 reference runs.

    Full: fp32 weights, gradients and AdamW state (16 B/param) plus buffers (the fused LM
    head's fp32 weight gradient, its tiles, the CUDA context): 26.7 GiB measured at 2 x 2048
    tokens with checkpointing. LoRA: frozen fp32 weights plus what peft and the head keep,
    about 7 B/param (12.4 GiB measured, same batch). QLoRA: 4-bit weights, a guess.
    With castWeightsOncePerStep, the linear layers' bf16 copies stay for the whole run:
    2 B for each parameter outside the embedding (an upper bound where autocast's own
    casts were kept for the backward anyway).
    """
    overhead = 2.5 * 2**30
    per_param = {"full": 16.0, "qlora": 1.5}.get(method, 7.0)
    copies = 2.0 * max(shape.params - shape.vocab * shape.hidden, 0) if weight_copies else 0.0
    return per_param * shape.params + overhead + copies


def kept_logits_bytes(shape: ModelShape, tokens: int, memory_gib: float, bf16: bool) -> float:
    """The logits the lean LM head keeps for a micro-batch, if within its share."""
    size = (2.0 if bf16 else 4.0) * tokens * shape.vocab
    return size if size <= KEPT_LOGITS_SHARE * memory_gib * 2**30 else 0.0


def decide(
    opt: SpeedOptions,
    hw: Hardware,
    job: Job,
    shape: ModelShape | None,
    attention_sparse: bool,
    lean_head: bool = False,
    weight_copies: bool = False,
) -> Choice:
    name = SWITCH
    effective = job.per_device * job.accumulation
    if opt.autoMicroBatch == "off":
        return Choice(name, False, "turned off")
    if job.shrunk:
        return Choice(name, False, "the operator shrank the batch after an OOM: kept")
    if opt.autoMicroBatch == "auto":
        if not hw.cuda:
            return Choice(name, False, "no CUDA device: nothing to size against")
        if not attention_sparse:
            return Choice(
                name,
                False,
                "dense-mask attention: a larger packed micro-batch costs "
                "quadratically more attention (measured slower under SDPA)",
            )
    if not job.padding_free:
        return Choice(name, False, "batches are padded: larger micro-batches pad more")
    if job.distributed == "fsdp":
        return Choice(name, False, "fsdp shards memory and checkpoints itself: batch kept")
    if shape is None:
        return Choice(name, False, "model shape unknown (config unreadable): batch kept")
    if hw.memory_gib is None:
        return Choice(name, False, "device memory unknown: batch kept")

    static = static_bytes(shape, job.method, weight_copies)
    budget = MEMORY_HEADROOM * hw.memory_gib * 2**30 - static
    lora = job.method != "full"

    memory_gib = hw.memory_gib

    def batch_bytes(per_device: int, ckpt: bool) -> float:
        tokens = per_device * job.max_length
        per_token = activation_bytes_per_token(shape, checkpointing=ckpt, lora=lora, bf16=job.bf16)
        logits = kept_logits_bytes(shape, tokens, memory_gib, job.bf16) if lean_head else 0.0
        return tokens * per_token + logits

    def fits(per_device: int, ckpt: bool) -> bool:
        return batch_bytes(per_device, ckpt) <= budget

    divisors = [d for d in range(1, effective + 1) if effective % d == 0]
    capped = [d for d in divisors if d * job.max_length <= MAX_MICRO_BATCH_TOKENS] or [1]
    pick: tuple[int, bool] | None = None
    no_ckpt = [d for d in capped if fits(d, False)]
    if no_ckpt and max(no_ckpt) * job.max_length >= min(
        MIN_MICRO_BATCH_TOKENS, max(capped) * job.max_length
    ):
        pick = (max(no_ckpt), False)
    elif job.checkpointing:
        with_ckpt = [d for d in capped if fits(d, True)]
        if with_ckpt:
            pick = (max(with_ckpt), True)
    elif no_ckpt:
        pick = (max(no_ckpt), False)
    if pick is None:
        return Choice(name, False, "no micro-batch fits the memory estimate: batch kept")
    per_device, ckpt = pick
    if not job.checkpointing and ckpt:  # never turn on what the spec turned off
        return Choice(name, False, "checkpointing is off in the spec and nothing fits without it")
    sft: dict[str, Any] = {
        "per_device_train_batch_size": per_device,
        "gradient_accumulation_steps": effective // per_device,
    }
    if ckpt != job.checkpointing:
        sft["gradient_checkpointing"] = ckpt
    estimate = static + batch_bytes(per_device, ckpt)
    # The job's effective batch, as the plan in the status states it (all processes).
    processes = f" x {job.world_size} processes" if job.world_size > 1 else ""
    return Choice(
        name,
        True,
        f"per_device {per_device} x accumulation {effective // per_device}{processes} "
        f"(effective {effective * job.world_size} kept), checkpointing "
        f"{'on' if ckpt else 'off'}; estimate "
        f"{estimate / 2**30:.1f} of {hw.memory_gib:.0f} GiB",
        sft=sft,
    )


def describe_batch(micro: Choice, job: Job) -> str:
    """'per_device 4, checkpointing off' as a micro-batch choice leaves the job."""
    per_device = micro.sft.get("per_device_train_batch_size", job.per_device)
    ckpt = micro.sft.get("gradient_checkpointing", job.checkpointing)
    return f"per_device {per_device}, checkpointing {'on' if ckpt else 'off'}"
