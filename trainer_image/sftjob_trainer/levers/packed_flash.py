"""The varlenAttention lever's mechanics: packed documents through torch's FlashAttention-2.

TRL's padding-free batches are one row of concatenated documents, with their boundaries
already computed on the host (`cu_seq_lens_q`, `max_length_q`). FlashAttention's varlen
kernel attends within each document from exactly those: no mask to build and nothing to
compile. torch ships that kernel itself (`torch.nn.attention.varlen.varlen_attn`, CUDA
only, with a backward), so no flash-attn package is needed. transformers calls attention
functions by name; `register` adds this one (and the mask function transformers uses for
its own flash variants, which builds no mask for packed rows) under IMPLEMENTATION.

Why: uncompiled, flex attention is compiled by transformers on its first calls, 50-59 s
of the reference job's first step on an H100 (docs/performance.md, session 14), against
about 10 s for the whole first step of the plain snippet.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

# torch is imported where it is used: the lever reads IMPLEMENTATION while planning, which
# `sftjob plan` and the operator do without torch.
IMPLEMENTATION = "sftjob_varlen"

# (query, key, value, cu_seq_lens, max_length, scale) -> output; (tokens, heads, dim) each.
Kernel = Callable[..., Any]


@functools.cache
def _causal_arguments() -> dict[str, Any]:
    """How this torch's varlen_attn asks for causal attention (the argument moved)."""
    from torch.nn.attention.varlen import varlen_attn

    if "is_causal" in inspect.signature(varlen_attn).parameters:
        return {"is_causal": True}
    return {"window_size": (-1, 0)}


def flash_causal(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    scale: float,
    causal: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Causal attention within each document: torch's FlashAttention-2 varlen kernel
    (bf16 or fp16 only: fp32 inputs, without autocast, are computed in bf16). `causal`:
    this torch's causal argument, found beforehand (`flash_kernel`) where the call may be
    traced by torch.compile, which cannot trace the signature lookup."""
    import torch
    from torch.nn.attention.varlen import varlen_attn

    dtype = query.dtype if query.dtype in (torch.bfloat16, torch.float16) else torch.bfloat16
    out = varlen_attn(
        query.to(dtype),
        key.to(dtype),
        value.to(dtype),
        cu_seq_lens,
        cu_seq_lens,
        max_length,
        max_length,
        scale=scale,
        **(_causal_arguments() if causal is None else causal),
    )
    out = out[0] if isinstance(out, tuple) else out
    return out.to(query.dtype)


def flash_kernel() -> Kernel:
    """flash_causal with this torch's causal argument bound, looked up now (eagerly)."""
    return functools.partial(flash_causal, causal=_causal_arguments())


def reference_causal(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    scale: float,
) -> torch.Tensor:
    """The same, one document at a time through SDPA (any device): what the probe and the
    CPU tests compare the kernel and the adapter against."""
    import torch
    import torch.nn.functional as F

    starts = cu_seq_lens.tolist()
    parts = []
    for start, end in zip(starts[:-1], starts[1:], strict=True):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        parts.append(F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale))
    return torch.cat([part.transpose(0, 1) for part in parts])


def varlen_attention(kernel: Kernel = flash_causal) -> Callable[..., tuple[torch.Tensor, None]]:
    """A transformers attention function (AttentionInterface) over `kernel`."""

    def attention(
        module: torch.nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        dropout: float = 0.0,
        scaling: float | None = None,
        sliding_window: int | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, None]:
        cu_seq_lens = kwargs.get("cu_seq_lens_q")
        max_length = kwargs.get("max_length_q")
        if cu_seq_lens is None or max_length is None or query.size(0) != 1:
            raise ValueError(
                "spec.training.speed.varlenAttention needs packed padding-free batches (one "
                "row with TRL's cu_seq_lens_q and max_length_q): set it to auto or off"
            )
        if sliding_window is not None or kwargs.get("softcap") or (dropout and module.training):
            raise ValueError(
                "spec.training.speed.varlenAttention computes full causal attention without "
                "dropout; this model has a sliding window, logit soft-capping or attention "
                "dropout: set it to auto or off"
            )
        from transformers.integrations.sdpa_attention import repeat_kv

        # Grouped-query attention: each key/value head serves `groups` query heads, repeated
        # as transformers' own attention functions repeat them. Then (1, heads, tokens,
        # dim) -> (tokens, heads, dim).
        groups = query.size(1) // key.size(1)
        q, k, v = (
            t[0].transpose(0, 1).contiguous()
            for t in (query, repeat_kv(key, groups), repeat_kv(value, groups))
        )
        scale = scaling if scaling is not None else query.size(-1) ** -0.5
        return kernel(q, k, v, cu_seq_lens, int(max_length), scale).unsqueeze(0), None

    return attention


def register(kernel: Kernel | None = None) -> None:
    """Make IMPLEMENTATION a name transformers loads models with (attn_implementation);
    the flash kernel unless another is given (the CPU tests give the reference one)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    AttentionInterface.register(
        IMPLEMENTATION, varlen_attention(flash_kernel() if kernel is None else kernel)
    )
    # The flash variants' mask: none for a packed row (the kernel reads the boundaries).
    AttentionMaskInterface.register(IMPLEMENTATION, flash_attention_mask)


def probe_varlen(device: str) -> str | None:
    """The kernel against one-document-at-a-time SDPA on two packed documents (GQA)."""
    if device != "cuda":
        return None  # it cannot run there, and the pre-flight refuses it without CUDA
    import torch

    generator = torch.Generator(device="cpu").manual_seed(0)
    tokens, heads, kv_heads, dim = 40, 4, 2, 64
    shape = (1, heads, tokens, dim)
    query = torch.randn(shape, generator=generator).to(device, torch.bfloat16)
    key, value = (
        torch.randn((1, kv_heads, tokens, dim), generator=generator).to(device, torch.bfloat16)
        for _ in range(2)
    )
    cu = torch.tensor([0, 17, tokens], dtype=torch.int32, device=device)
    module = torch.nn.Module().eval()
    ours, _ = varlen_attention(flash_causal)(
        module, query, key, value, None, cu_seq_lens_q=cu, max_length_q=23
    )
    plain, _ = varlen_attention(reference_causal)(
        module, query, key, value, None, cu_seq_lens_q=cu, max_length_q=23
    )
    difference = (ours.float() - plain.float()).abs().max().item()
    if difference > 2e-2:  # bf16 kernels: a few ulps of values of order one
        return f"the varlen kernel differs from per-document SDPA by {difference:.3g}"
    return None
