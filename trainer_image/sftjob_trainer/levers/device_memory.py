"""How much device memory the trainer may plan for: a leaf the planner and levers read.

A cap in $SFTJOB_GPU_MEMORY_GIB (a shared card, or the bench imitating an 80 GB H100 on a
larger one) lowers what the device reports.
"""

from __future__ import annotations

from collections.abc import Mapping

# Set on a sized run to size batches for less memory than the device has (a shared card,
# or the bench imitating an 80 GB H100 on a larger one).
ENV_MEMORY_GIB = "SFTJOB_GPU_MEMORY_GIB"

# Share of the device's memory the lean LM head may fill with one micro-batch's bf16
# logits, kept for its backward instead of computed twice (kept_logits.py): 4 GiB of 80.
KEPT_LOGITS_SHARE = 0.05


def capped_memory_gib(total_gib: float, env: Mapping[str, str]) -> float:
    """The device's memory, or less when $SFTJOB_GPU_MEMORY_GIB says so.

    A cap that is not a number is a ValueError; the planner reads the cap first (when it
    detects the device) and reports it as the trainer's ConfigError.
    """
    cap = env.get(ENV_MEMORY_GIB, "").strip()
    if not cap:
        return total_gib
    try:
        return min(total_gib, float(cap))
    except ValueError:
        raise ValueError(f"{ENV_MEMORY_GIB} must be a number of GiB, got {cap!r}") from None
