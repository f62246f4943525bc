"""Linear layers compute with bf16 copies of their weights, made once per optimizer step.

The castWeightsOncePerStep speed lever. Under bf16 autocast with fp32 weights, every
linear layer casts its weight and bias to bf16 at every micro-step, and its backward casts
the bf16 weight gradient back to fp32 before autograd adds it into `.grad`. The weights
only change at the optimizer step, so with N micro-steps per step the same casts are made
N times. Here each plain `nn.Linear` with fp32 weights keeps a bf16 copy of its weight and
bias (non-persistent buffers, so checkpoints and the state dict do not change) and
computes with them; the copies are made again after every optimizer step, at the start of
training (after a checkpoint has loaded) and at its end. A hook adds each copy's bf16
gradient into the fp32 parameter's `.grad`, in fp32.

The arithmetic is the same as autocast's: a copy rounds the fp32 weight to bf16 as
autocast's cast does, the layer then runs the same bf16 matmul, and adding a bf16
gradient into an fp32 `.grad` promotes it to fp32 first, as the cast back did. The
optimizer, gradient clipping and checkpoints see only the fp32 parameters.

Not for several processes: DDP and FSDP reduce the gradients that autograd accumulates
into the parameters themselves, and these arrive through the hook instead (speed.py turns
the lever off there).
"""

from __future__ import annotations

import logging
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("sftjob_trainer.weight_copies")

COPY_DTYPE = torch.bfloat16


class LinearWithWeightCopies(nn.Linear):
    """An nn.Linear that multiplies by its bf16 copies (`weight_copy`, `bias_copy`)."""

    weight_copy: torch.Tensor
    bias_copy: torch.Tensor | None

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return F.linear(input, self.weight_copy, self.bias_copy)


def _add_into_parameter(module: nn.Module, name: str, copy: torch.Tensor) -> None:
    """Hook after autograd accumulated `copy.grad`: move it into the fp32 parameter's grad."""
    grad = copy.grad
    copy.grad = None
    parameter = getattr(module, name)
    if grad is None or parameter is None:
        return
    if parameter.grad is None:
        parameter.grad = grad.to(parameter.dtype)
    else:
        parameter.grad.add_(grad)  # fp32 += bf16 is computed in fp32


def eligible(module: nn.Module, skip: set[int]) -> bool:
    """Exactly nn.Linear (not a quantized or adapter subclass), fp32, not skipped."""
    return (
        type(module) is nn.Linear
        and module.weight.dtype == torch.float32
        and id(module.weight) not in skip
    )


class WeightCopies:
    """The copies of one model, and the callback that makes them again after each step."""

    def __init__(self, model: nn.Module) -> None:
        # The LM head tied to the input embedding: the lean LM head casts it itself, and
        # the embedding lookup reads the same fp32 tensor.
        embeddings = getattr(model, "get_input_embeddings", lambda: None)()
        skip = {id(embeddings.weight)} if embeddings is not None else set()
        self.slots: list[tuple[nn.Module, str]] = []  # (layer, "weight" | "bias")
        self.layers = 0
        for module in model.modules():
            if not eligible(module, skip):
                continue
            for name in ("weight", "bias"):
                parameter = getattr(module, name)
                copy = None if parameter is None else parameter.detach().to(COPY_DTYPE)
                module.register_buffer(f"{name}_copy", copy, persistent=False)
                if parameter is not None:
                    self.slots.append((module, name))
            module.__class__ = LinearWithWeightCopies
            self.layers += 1
        self.hook_gradients()

    def pairs(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(fp32 parameter, bf16 copy) of every slot, looked up now."""
        return [(getattr(m, name), getattr(m, f"{name}_copy")) for m, name in self.slots]

    def hook_gradients(self) -> None:
        """Route each trainable copy's gradient into its parameter.

        Looked up again at the start of training: moving a module to another device
        (`.to()`) replaces its buffers, and a copy without the hook would keep its gradient
        to itself while the parameter got none.
        """
        for module, name in self.slots:
            parameter, copy = getattr(module, name), getattr(module, f"{name}_copy")
            if not parameter.requires_grad or getattr(copy, "_sftjob_hooked", False):
                continue
            copy.requires_grad_(True)
            copy.register_post_accumulate_grad_hook(partial(_add_into_parameter, module, name))
            copy._sftjob_hooked = True  # type: ignore[attr-defined]

    @torch.no_grad()
    def refresh(self) -> None:
        """Round each fp32 parameter into its bf16 copy, in place (the buffers stay put)."""
        for parameter, copy in self.pairs():
            copy.copy_(parameter)

    def callback(self) -> Any:
        from transformers import TrainerCallback

        copies = self

        class RefreshWeightCopies(TrainerCallback):  # type: ignore[misc]
            # The optimizer changes the weights at each step; a resume loads them after the
            # trainer was built; load_best_model_at_end loads them before the end.
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                copies.hook_gradients()
                copies.refresh()

            def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                copies.refresh()

            def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                copies.refresh()

        return RefreshWeightCopies()


def use_weight_copies(trainer: Any) -> str:
    """Give the trainer's model bf16 weight copies; what was done, for the log."""
    copies = WeightCopies(trainer.model)
    if not copies.layers:
        return "no plain nn.Linear with fp32 weights: nothing to copy"
    trainer.add_callback(copies.callback())
    size = sum(copy.numel() * copy.element_size() for _, copy in copies.pairs())
    return (
        f"{copies.layers} linear layers compute with bf16 copies of their weights "
        f"({size / 2**30:.2f} GiB), made once per optimizer step"
    )
