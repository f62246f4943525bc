"""The LM head's log-probabilities from logits kept for the backward: no GEMM computed twice.

TRL 1.16's `ChunkedLogProbFunction` never holds a micro-batch's `[tokens, vocab]` logits:
it folds them tile by tile into an online log-sum-exp, and its backward computes every
tile again before turning it into the gradient. That second projection is one more GEMM
of the LM head's size per micro-step (about 5% of the FLOPs of a 1.5B step with a
152k vocabulary), and the tiles cost dozens of small launches.

When a micro-batch's bf16 logits fit in a small share of the device (2.3 GiB for 8192
tokens x 151,936 fit in `device_memory.KEPT_LOGITS_SHARE` of 80 GiB; the micro-batch lever counts
them in its memory estimate), `KeptLogitsLogProb` computes them in one GEMM, folds them
with TRL's own kernels (the same fp32 online log-sum-exp over the same 1024-column
blocks, so the log-probabilities are TRL's up to the rounding of one GEMM against
its tiles), keeps them, and in the backward turns them
into the logits' gradient in place (TRL's backward kernel) followed by the two gradient
GEMMs, which accumulate in fp32 as TRL's do. Otherwise `lean_lm_head` uses TRL's
function.
"""

from __future__ import annotations

import functools
from typing import Any

import torch

# fp32 temporaries of the logits' size (and twice their bytes) that TRL's CPU fallbacks
# allocate while folding the whole matrix: about 12 times the kept bf16 logits, rounded up.
CPU_TEMPORARIES = 16
# The kernels' arguments for plain logits: no scale, no soft-cap, temperature 1.
PLAIN_LOGITS = {"logit_scale": 1.0, "softcap": 1.0, "inv_t": 1.0, "HAS_SOFTCAP": False}


@functools.cache
def kept_logits_budget(device: torch.device) -> int:
    """Bytes the kept logits may take on this device (host RAM when there is no GPU).

    A cap in $SFTJOB_GPU_MEMORY_GIB (a shared card, the bench's --memory-gib) counts, as
    it does for the micro-batch lever.
    """
    import os

    from .device_memory import KEPT_LOGITS_SHARE, capped_memory_gib

    if device.type == "cuda":
        total = torch.cuda.get_device_properties(device).total_memory
        total = int(capped_memory_gib(total / 2**30, os.environ) * 2**30)
        return int(KEPT_LOGITS_SHARE * total)
    # Without Triton, TRL's torch fallbacks fold the whole [N, V] at once in fp32, with a
    # few temporaries of that size: budget for them, not just for the kept logits.
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(KEPT_LOGITS_SHARE * total / CPU_TEMPORARIES)


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the head's GEMM runs in: autocast's, else the hidden states' (as TRL's)."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def fits(tokens: int, vocab: int, dtype: torch.dtype, budget: int) -> bool:
    return tokens * vocab * dtype.itemsize <= budget


def _fp32_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`a @ b` accumulated and returned in fp32, without rounding to the inputs' dtype."""
    if a.device.type == "cuda" and a.dtype in (torch.float16, torch.bfloat16):
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


class KeptLogitsLogProb(torch.autograd.Function):
    """log p(target) per row of `hidden @ weight.T (+ bias)`; the logits stay for the backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,  # [N, H]
        weight: torch.Tensor,  # [V, H]
        bias: torch.Tensor | None,  # [V]
        targets: torch.Tensor,  # [N], each in [0, V)
    ) -> torch.Tensor:
        from trl.kernels import chunked_logprob as trl_kernels

        targets = targets.contiguous()  # the kernels read it with stride 1
        device = hidden.device
        dtype = compute_dtype(hidden)
        rows = hidden.to(dtype)
        logits = torch.mm(rows, weight.to(dtype).t())
        if bias is not None:
            logits.add_(bias.to(dtype))
        tokens, vocab = logits.shape
        running_max = torch.full((tokens,), float("-inf"), device=device, dtype=torch.float32)
        sum_exp = torch.zeros((tokens,), device=device, dtype=torch.float32)
        target_logit = torch.zeros((tokens,), device=device, dtype=torch.float32)
        unused = torch.zeros((tokens,), device=device, dtype=torch.float32)  # metrics not asked
        triton = trl_kernels._use_triton(device)
        fold = trl_kernels._forward_kernel[(tokens,)] if triton else trl_kernels._forward_tile
        fold(
            logits,
            logits.stride(0),
            targets,
            running_max,
            sum_exp,
            unused,
            unused,
            unused,
            unused,
            target_logit,
            0,
            vocab,
            **PLAIN_LOGITS,
            HAS_ENTROPY=False,
            HAS_LOG_SUM_SQ_PROBS=False,
            HAS_MEAN_LOGITS=False,
            HAS_IS_TOP1=False,
            BLOCK_SIZE=trl_kernels._BLOCK_SIZE,
        )
        log_z = running_max + torch.log(sum_exp)
        # The weight is kept as the parameter (cast again in the backward) rather than as
        # a bf16 copy, which would hold another vocab x hidden matrix until then.
        ctx.save_for_backward(rows, weight, bias, targets, log_z, logits)
        ctx.hidden_dtype = hidden.dtype
        ctx.spent = False
        return target_logit - log_z

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad_log_probs: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        from trl.kernels import chunked_logprob as trl_kernels

        # The backward overwrites the kept logits with their gradient (on CUDA through a
        # raw pointer, which autograd's version check does not see): it can run once only.
        if ctx.spent:
            raise RuntimeError(
                "KeptLogitsLogProb's backward ran twice (retain_graph=True): its logits "
                "are spent; turn speed.lightMetrics off for double backward"
            )
        ctx.spent = True
        rows, weight, bias, targets, log_z, logits = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        tokens, vocab = logits.shape
        grad = grad_log_probs.float().contiguous()
        triton = trl_kernels._use_triton(logits.device)
        blocks = -(-vocab // trl_kernels._BLOCK_SIZE)
        to_gradient = (
            trl_kernels._backward_kernel[(tokens, blocks)] if triton else trl_kernels._backward_tile
        )
        # In place: the kept logits become d(loss)/d(logits); they are not needed after.
        to_gradient(
            logits,
            logits.stride(0),
            targets,
            log_z,
            log_z,  # entropy: no entropy gradient is asked for
            grad,
            grad,
            0,
            vocab,
            **PLAIN_LOGITS,
            HAS_LOGPROB_GRAD=True,
            HAS_ENTROPY_GRAD=False,
            BLOCK_SIZE=trl_kernels._BLOCK_SIZE,
        )
        grad_hidden = grad_weight = grad_bias = None
        if needs_hidden:
            grad_hidden = _fp32_product(logits, weight.to(logits.dtype)).to(ctx.hidden_dtype)
        if needs_weight:
            grad_weight = _fp32_product(logits.t(), rows).to(weight.dtype)
        if needs_bias:
            grad_bias = logits.sum(dim=0, dtype=torch.float32).to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None


def probe_kept_logits(device: str) -> str | None:
    """The kept-logits head against TRL's chunked one on a few tensors (fp32, a vocabulary
    of several of TRL's tiles and the kernels' 1024-column blocks): log-probabilities and
    gradients within 1e-5; None when they agree, else the largest difference."""
    from trl.kernels import ChunkedLogProbFunction

    generator = torch.Generator().manual_seed(0)
    tokens, hidden_size, vocab = 7, 16, 2100

    def leaves() -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(1)
        return [
            torch.randn(shape, generator=g).to(device).requires_grad_()
            for shape in ((tokens, hidden_size), (vocab, hidden_size), (vocab,))
        ]

    targets = torch.randint(0, vocab, (tokens,), generator=generator).to(device)
    upstream = torch.randn(tokens, generator=generator).to(device)
    results = []
    for kept in (True, False):
        hidden, weight, bias = leaves()
        if kept:
            log_probs = KeptLogitsLogProb.apply(hidden, weight, bias, targets)
        else:
            log_probs = ChunkedLogProbFunction.apply(
                hidden, weight, bias, targets, 1.0, 512, None, 1.0, ("log_probs",)
            )[0]
        grads = torch.autograd.grad((log_probs * upstream).sum(), (hidden, weight, bias))
        results.append([log_probs.detach(), *grads])
    for name, ours, trl in zip(
        ("log_probs", "d hidden", "d weight", "d bias"), *results, strict=True
    ):
        difference = (ours - trl).abs().max().item()
        if not difference <= 1e-5 * max(1.0, trl.abs().max().item()):
            return f"{name} differ from TRL's by {difference:.1e}"
    return None
