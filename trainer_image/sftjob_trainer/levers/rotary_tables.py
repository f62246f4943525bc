"""The rotaryTablesOnce lever's mechanics: rotary cos/sin tables computed once per forward.

Llama-style models (Qwen2, Llama, Mistral, Gemma) compute the rotary embedding's cos and
sin tables once per forward from the position ids and hand them to every layer. Compiled,
that is not what runs: the tables are a short chain of pointwise operations (positions
times inverse frequencies, cos, sin, a cast), and inductor inlines such a chain into each
kernel that reads it. So every layer's query/key rotation kernels, forward and backward,
recompute cos and sin for each element they rotate (on the bench's GPU profile, three
pointwise kernels per layer, 3.4% of the kernel time at a fraction of the card's memory
bandwidth, and flex attention's forward).

This passes the rotary module's output through an opaque custom op (a copy). Inductor
must then compute the tables into a buffer once, before the op, and every rotation reads
that buffer. Eager, the op is a copy of a few MiB per micro-batch and changes no value.
Compiled, the same operations run in one kernel instead of in each layer's; where the
tables are fp32 the values are bit for bit the same. Where they are bf16 (bf16 weights, or
bf16ResidualStream), the inlined chain skipped their rounding to bf16 (inductor does not
emulate a cast whose result it never stores); stored, they are rounded as eager rounds
them, which moves the loss slightly (on the GPU bench within the runs' own noise).

The hook is present while training runs (added at train begin, removed at train end), like
bf16ResidualStream's. It copies a rotary module's output only where that output is a tuple
of tensors (transformers' (cos, sin)); anything else (a complex `freqs_cis`) goes through
as it was, and where each attention layer has its own rotary module, each computes its
tables once instead of once per kernel. Measured on the bench's full case: +1.8% and
+2.4% (docs/performance.md, session 8).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .training_hooks import ForwardHooksWhileTraining


@torch.library.custom_op("sftjob::rotary_table", mutates_args=())
def rotary_table(table: torch.Tensor) -> torch.Tensor:
    """A copy that torch.compile cannot see through, so its input is computed into a
    buffer once instead of being recomputed inside every kernel that reads it."""
    return table.clone()


@rotary_table.register_fake
def _(table: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(table)


def _pass_gradient(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
    return grad  # a copy's gradient is its output's (learned rotary frequencies)


rotary_table.register_autograd(_pass_gradient)


def _tables_once(module: Any, args: Any, output: Any) -> Any:
    if isinstance(output, tuple) and output and all(isinstance(t, torch.Tensor) for t in output):
        return tuple(rotary_table(table) for table in output)
    return output


def rotary_modules(model: nn.Module) -> list[nn.Module]:
    """The model's rotary embedding modules: transformers names their classes
    `<Model>RotaryEmbedding` and calls them once per forward with the position ids."""
    return [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]


class RotaryTablesOnce(ForwardHooksWhileTraining):
    """Passes the rotary tables through `rotary_table` while training runs."""

    def __init__(self, modules: list[nn.Module]) -> None:
        super().__init__(modules, _tables_once)


def use_rotary_tables_once(trainer: Any) -> str:
    """Make the trainer's model compute its rotary tables once per forward; what was done,
    for the log."""
    modules = rotary_modules(trainer.model)
    if not modules:
        return "not applied: the model has no rotary embedding module (nothing to keep)"
    trainer.add_callback(RotaryTablesOnce(modules))
    names = ", ".join(sorted({type(m).__name__ for m in modules}))
    # Whether a module returns (cos, sin) shows only when it runs: the hook copies tuples
    # of tensors and lets anything else (a complex freqs_cis) through unchanged.
    return (
        f"{len(modules)} module(s) hooked ({names}): the (cos, sin) tables they return are "
        "computed once per forward; other outputs pass through unchanged"
    )


def probe_rotary_table(device: str) -> str | None:
    """The op on a few tensors: a copy, whose gradient is its output's; None when so."""
    table = torch.linspace(-1.0, 1.0, 12, device=device).reshape(3, 4).requires_grad_()
    copied = rotary_table(table)
    (grad,) = torch.autograd.grad((copied * 3).sum(), table)
    if not torch.equal(copied, table.detach()):
        return "sftjob::rotary_table does not return its input's values"
    if not torch.equal(grad, torch.full_like(grad, 3.0)):
        return "sftjob::rotary_table does not pass its gradient through"
    return None
