"""Model FLOPs utilisation (MFU): the share of the GPUs' dense bf16 peak that a run's
throughput stands for, as the trainer reports it (status.progress.mfu) and the bench
quotes it (sftjob_bench).

    MFU = 6 x parameters x tokens/s / (peak FLOP/s of one GPU x GPUs)

6 FLOPs per parameter per token: 2 in the forward, 4 in the backward (the gradients of
the activations and of the weights). What is counted, and what is not:
- parameters: ALL of the model's, frozen ones included, embeddings included (the bench's
  count). For LoRA and QLoRA the frozen base weights get no weight gradient, so the FLOPs
  really done are nearer 4 than 6 per parameter: their MFU overstates the work by up to
  a half, and is comparable with a full fine-tune's only as "tokens/s against the card".
  QLoRA's 4-bit weights count as the weights they stand for (two per packed byte, as
  transformers' and peft's parameter counts do), not as bytes.
- not counted: attention's own FLOPs (the scores, growing with the sequence length),
  and the forward that gradient checkpointing runs again (it is overhead, not model work).
- tokens/s: every rank's tokens (TRL gathers num_tokens over the processes), so the
  peak is multiplied by the number of GPUs (one per rank).
- peak: the card's dense (not sparse) bf16 tensor-core peak, whatever precision runs.
Pure: the device name and counts come from the caller.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

# Dense bf16 tensor-core peak FLOP/s of one GPU, from NVIDIA's datasheets (their "with
# sparsity" figure halved), keyed by a fragment of torch.cuda.get_device_name(). Most
# specific first: "NVIDIA H100 PCIe" must not read as the SXM part ("NVIDIA H100 80GB HBM3").
BF16_DENSE_PEAK_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM
    ("GH200", 989e12),  # the H100 of a Grace Hopper superchip
    ("H200 NVL", 835e12),
    ("H200", 989e12),  # SXM
    ("A100", 312e12),  # SXM and PCIe alike
)
# The bench's name for the table: fragment -> peak.
PEAK_FLOPS = dict(BF16_DENSE_PEAK_FLOPS)


def peak_flops(device_name: str | None) -> float | None:
    """The dense bf16 peak of the card named `device_name`; None for a CPU or a card
    not in the table (no MFU is better than one against a guessed peak)."""
    if not device_name:
        return None
    return next((peak for part, peak in BF16_DENSE_PEAK_FLOPS if part in device_name), None)


def model_flops_utilization(
    parameters: int, tokens_per_second: float | None, peak: float | None, gpus: int = 1
) -> float | None:
    """6 x parameters x tokens/s over `gpus` cards of `peak` FLOP/s, to 4 decimals;
    None when a figure is unknown."""
    if not peak or not tokens_per_second or parameters <= 0 or gpus < 1:
        return None
    return round(6 * parameters * tokens_per_second / (peak * gpus), 4)


def parameter_count(model: Any) -> int:
    """All parameters of `model`, 4-bit ones unpacked: peft's count for an adapter-wrapped
    model, transformers' for a plain one (both count a packed 4-bit byte as two weights)."""
    peft_count = getattr(model, "get_nb_trainable_parameters", None)
    if callable(peft_count):
        return int(peft_count()[1])
    count = getattr(model, "num_parameters", None)
    if callable(count):
        return int(count())
    return sum(int(p.numel()) for p in model.parameters())


def mfu_meter(
    model: Any, device_name: str | None, gpus: int
) -> Callable[[float | None], float | None] | None:
    """tokens/s -> the run's MFU for `model` on `gpus` cards named `device_name`; None
    when the card's peak is not known (a CPU, a card not in the table)."""
    peak = peak_flops(device_name)
    if peak is None:
        return None
    parameters = parameter_count(model)
    return lambda tokens_per_second: model_flops_utilization(
        parameters, tokens_per_second, peak, gpus
    )
