"""Linear layers that multiply in fp8: the mechanics of the fp8Matmuls lever (fp8_matmuls.py).

The steady state's matmuls are about 72% of the kernel time (session 19's profile), at
about two thirds of the card's bf16 peak; Hopper's and Ada's tensor cores run fp8 at twice
bf16's. A layer here keeps, instead of a bf16 copy of its weight (weight_copies.py), two
fp8 copies made once per optimizer step: the weight (out x in, e4m3) and its transpose
(in x out, e4m3, contiguous), with one fp32 scale for the tensor. Each micro-step

- the forward rounds its input to e4m3 with one scale for the tensor (its largest
  magnitude maps to e4m3's largest, 448) and multiplies with `torch._scaled_mm`, output
  bf16 (what autocast's linear gives);
- the backward rounds the output's gradient to e5m2 (more range, less precision: the
  usual recipe for gradients) and multiplies it by the transposed weight for the input's
  gradient, and, for a trainable layer, by the input kept from the forward in e4m3 (its
  transpose: half the memory of the bf16 input autograd keeps otherwise) for the weight's
  gradient, whose fp32 product is added into the fp32 gradient sum that IS the
  parameter's `.grad` while training runs (weight_copies.py's sums).

This is the recipe torchao's float8 training calls "tensorwise" (dynamic scales, e4m3
forward, e5m2 gradients), written here with torch's own op so the trainer image needs
nothing new. It is not exact: e4m3 keeps 3 bits of mantissa, so each product's inputs
carry up to 6% relative rounding (the products' errors average out over the inner
dimension). The lever's claim is the loss curve, measured against the plain run.

`_scaled_mm` needs every dimension a multiple of 16 and the second operand column-major;
rows (tokens) that are not are padded with zeros, which add nothing to any product.
Layers with a dimension under `MIN_DIM` stay in bf16 (too small for fp8 to gain), and so
do LoRA's adapters, whatever their rank (weight_copies.py leaves them out): the rounding
would fall on what LoRA trains.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
ALIGN = 16  # torch._scaled_mm: every dimension a multiple of 16
MIN_DIM = 64  # a smaller layer stays bf16


def fits_fp8(module: nn.Linear) -> bool:
    """Whether `_scaled_mm` takes this layer's weight and fp8 is worth it for its size."""
    sizes = (module.in_features, module.out_features)
    return all(size % ALIGN == 0 and size >= MIN_DIM for size in sizes)


def rounded_to_fp8(tensor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """`tensor` in fp8 with one scale for the whole tensor, and the fp32 scale that
    multiplies it back (tensor ~ fp8 * scale). The largest magnitude maps to the format's
    largest, so nothing overflows and the small values keep what precision there is."""
    largest = torch.finfo(dtype).max
    amax = tensor.detach().abs().amax().float().clamp(min=1e-12)
    scale = largest / amax
    fp8 = (tensor.float() * scale).clamp(-largest, largest).to(dtype)
    return fp8, scale.reciprocal()


def padded_rows(matrix: torch.Tensor) -> torch.Tensor:
    """`matrix` with zero rows added up to a multiple of 16 (they add nothing to a product)."""
    extra = -matrix.shape[0] % ALIGN
    return F.pad(matrix, (0, 0, 0, extra)) if extra else matrix


@torch.library.custom_op(
    "sftjob::accumulate_fp8_linear_grads", mutates_args=("weight_sum", "bias_sum")
)
def accumulate_fp8_linear_grads(
    weight_sum: torch.Tensor,
    bias_sum: torch.Tensor | None,
    grad_t: torch.Tensor,
    grad_scale: torch.Tensor,
    input_t: torch.Tensor,
    input_scale: torch.Tensor,
    grad_output: torch.Tensor,
) -> None:
    """weight_sum += grad^T @ input (fp8 operands, fp32 product), bias_sum += the
    gradient's column sums. `grad_t` is the e5m2 gradient transposed (out x tokens) and
    `input_t` the e4m3 input transposed (in x tokens), both contiguous. A custom op that
    declares what it mutates, so a compiled backward keeps it as one in-place call
    (weight_copies.accumulate_linear_grads says why)."""
    weight_sum.add_(
        torch._scaled_mm(grad_t, input_t.t(), grad_scale, input_scale, out_dtype=torch.float32)
    )
    if bias_sum is not None:
        bias_sum.add_(grad_output.sum(0, dtype=torch.float32))


@accumulate_fp8_linear_grads.register_fake
def _(
    weight_sum: Any,
    bias_sum: Any,
    grad_t: Any,
    grad_scale: Any,
    input_t: Any,
    input_scale: Any,
    grad_output: Any,
) -> None:
    return None


class _Fp8Linear(torch.autograd.Function):
    """The layer's product in fp8 (the module docstring says how). The weight's fp8
    copies get no gradient: a trainable layer's goes into `weight_sum`, which rides on
    `ctx` rather than among the saved tensors (as in weight_copies._LinearAccumulating).
    `weight` is the fp32 parameter, passed only so that autograd runs this backward
    whenever the parameter is trainable (also where the input needs no gradient, as the
    first layer's of a frozen embedding); it gets None, its gradient being in the sum."""

    @staticmethod
    def forward(
        ctx: Any,
        input: torch.Tensor,
        weight: torch.Tensor,
        weight_fp8: torch.Tensor,
        weight_fp8_t: torch.Tensor,
        weight_scale: torch.Tensor,
        bias: torch.Tensor | None,
        weight_sum: torch.Tensor | None,
        bias_sum: torch.Tensor | None,
    ) -> torch.Tensor:
        shape = input.shape
        rows = input.reshape(-1, shape[-1])
        count = rows.shape[0]
        input_fp8, input_scale = rounded_to_fp8(padded_rows(rows), E4M3)
        # Fast accumulation in the forward only, as torchao's recipe does: the gradients'
        # products keep the full-precision accumulate.
        out = torch._scaled_mm(
            input_fp8,
            weight_fp8.t(),
            input_scale,
            weight_scale,
            bias=bias,  # the bf16 bias copy
            out_dtype=torch.bfloat16,
            use_fast_accum=True,
        )
        if weight_sum is None:  # frozen: no weight gradient, no input kept
            ctx.save_for_backward(weight_fp8_t, weight_scale)
        else:
            ctx.save_for_backward(
                weight_fp8_t, weight_scale, input_fp8.t().contiguous(), input_scale
            )
        ctx.sums = (weight_sum, bias_sum)
        ctx.input_shape = shape
        ctx.input_dtype = input.dtype
        ctx.count = count
        return out[:count].reshape(*shape[:-1], weight_fp8.shape[0])

    @staticmethod
    def backward(ctx: Any, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        weight_fp8_t, weight_scale, *kept = ctx.saved_tensors
        weight_sum, bias_sum = ctx.sums
        grad = grad_output.reshape(-1, grad_output.shape[-1])
        grad_fp8, grad_scale = rounded_to_fp8(padded_rows(grad), E5M2)
        if weight_sum is not None:
            input_t, input_scale = kept
            torch.ops.sftjob.accumulate_fp8_linear_grads(
                weight_sum,
                bias_sum,
                grad_fp8.t().contiguous(),
                grad_scale,
                input_t,
                input_scale,
                grad,
            )
        grad_input = None
        if ctx.needs_input_grad[0]:
            grad_input = torch._scaled_mm(
                grad_fp8, weight_fp8_t.t(), grad_scale, weight_scale, out_dtype=torch.bfloat16
            )
            grad_input = grad_input[: ctx.count].reshape(ctx.input_shape).to(ctx.input_dtype)
        return grad_input, None, None, None, None, None, None, None


class LinearInFp8(nn.Linear):
    """An nn.Linear that multiplies by its fp8 copies (`weight_fp8`, `weight_fp8_t`,
    `weight_scale`) and its bf16 bias copy; a trainable one adds its gradients into
    `weight_grad_sum`/`bias_grad_sum` (None while frozen)."""

    weight_fp8: torch.Tensor
    weight_fp8_t: torch.Tensor
    weight_scale: torch.Tensor
    bias_copy: torch.Tensor | None
    weight_grad_sum: torch.Tensor | None
    bias_grad_sum: torch.Tensor | None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if self.weight_grad_sum is None and self.weight.requires_grad and torch.is_grad_enabled():
            # Frozen when the copies were made (a LoRA base layer), unfrozen since: its
            # gradient would have nowhere to go.
            raise RuntimeError(
                "a layer frozen at the start of training was unfrozen, but its fp8 copies "
                "keep no gradient; set spec.training.speed.fp8Matmuls: off to train it"
            )
        return _Fp8Linear.apply(
            input,
            self.weight,
            self.weight_fp8,
            self.weight_fp8_t,
            self.weight_scale,
            self.bias_copy,
            self.weight_grad_sum,
            self.bias_grad_sum,
        )


def add_fp8_copies(module: nn.Linear) -> None:
    """Give `module` its fp8 buffers (filled by `refresh_fp8_copies`) and make it a
    LinearInFp8; its bias keeps a bf16 copy and the gradient sums are set by the caller."""
    weight = module.weight
    module.register_buffer("weight_fp8", torch.empty_like(weight, dtype=E4M3), persistent=False)
    module.register_buffer(
        "weight_fp8_t", torch.empty_like(weight.t(), dtype=E4M3).contiguous(), persistent=False
    )
    module.register_buffer(
        "weight_scale",
        torch.ones((), dtype=torch.float32, device=weight.device),
        persistent=False,
    )
    module.__class__ = LinearInFp8


@torch.no_grad()
def refresh_fp8_copies(module: LinearInFp8) -> None:
    """Round the fp32 weight into the fp8 copies, in place (the buffers stay put)."""
    fp8, scale = rounded_to_fp8(module.weight, E4M3)
    module.weight_fp8.copy_(fp8)
    module.weight_fp8_t.copy_(fp8.t())
    module.weight_scale.copy_(scale)


def drop_fp8_copies(module: nn.Module) -> None:
    for name in ("weight_fp8", "weight_fp8_t", "weight_scale"):
        module._buffers.pop(name, None)
