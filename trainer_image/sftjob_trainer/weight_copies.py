"""Linear layers compute with bf16 copies of their weights, made once per optimizer step.

The castWeightsOncePerStep speed lever. Under bf16 autocast with fp32 weights, every
linear layer casts its weight and bias to bf16 at every micro-step, and its backward casts
the bf16 weight gradient back to fp32 before autograd adds it into `.grad`. The weights
only change at the optimizer step, so with N micro-steps per step the same casts are made
N times. Here each plain `nn.Linear` with fp32 weights keeps a bf16 copy of its weight and
bias (non-persistent buffers, so checkpoints and the state dict do not change) and
computes with them; the copies are made again at the start of training (after a
checkpoint has loaded) and after every optimizer step. A hook adds each copy's bf16
gradient into the fp32 parameter's `.grad`, in fp32. When training ends the layers become
plain `nn.Linear` again, so whatever runs after (a LoRA merge, a forward outside
autocast) sees ordinary layers.

The arithmetic is the same as autocast's: a copy rounds the fp32 weight to bf16 as
autocast's cast does, the layer then runs the same bf16 matmul, and adding a bf16
gradient into an fp32 `.grad` promotes it to fp32 first, as the cast back did. The
optimizer, gradient clipping and checkpoints see only the fp32 parameters.

Not for FSDP, DeepSpeed or several processes: they take the gradients autograd puts on the
parameters themselves, and these arrive through the hook instead (speed.py turns the lever
off there, and `use_weight_copies` refuses a trainer set up for them). Not for the LM head
either: TRL's and the lean LM head read its weight directly.
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
SLOTS = ("weight", "bias")


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
    if grad is None or parameter is None or not parameter.requires_grad:
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
        and id(module) not in skip
        and id(module.weight) not in skip
    )


def not_for_copies(trainer: Any) -> str | None:
    """Why this trainer's set-up cannot take the copies, or None."""
    if getattr(trainer, "is_fsdp_enabled", False) or getattr(
        trainer, "is_deepspeed_enabled", False
    ):
        return "FSDP or DeepSpeed wraps the parameters"
    accelerator = getattr(trainer, "accelerator", None)
    if accelerator is not None and accelerator.num_processes > 1:
        return f"{accelerator.num_processes} processes reduce the parameters' own gradients"
    if getattr(getattr(trainer, "args", None), "n_gpu", 1) > 1:
        return "DataParallel over several GPUs replicates the layers"
    return None


def found_module(model: Any, getter: str) -> nn.Module | None:
    """`model.<getter>()` (get_input_embeddings, get_output_embeddings), or None where
    transformers cannot find that module."""
    try:
        module = getattr(model, getter, lambda: None)()
    except (AttributeError, NotImplementedError):  # not found under a name it knows
        return None
    return module if isinstance(module, nn.Module) else None


def embeddings(model: nn.Module) -> list[nn.Module]:
    """The input embedding and the LM head, those that can be found."""
    getters = ("get_input_embeddings", "get_output_embeddings")
    return [module for get in getters if (module := found_module(model, get)) is not None]


class WeightCopies:
    """The copies of one model, and the callback that keeps them current during training."""

    def __init__(self, model: nn.Module) -> None:
        # The LM head (tied to the embedding or not): TRL's fused head and the lean head
        # read its weight directly, so a copy would never be used.
        skip: set[int] = set()
        for module in embeddings(model):
            skip.update((id(module), id(module.weight)))
        self.modules: list[LinearWithWeightCopies] = []
        for module in model.modules():
            if not eligible(module, skip):
                continue
            for name in SLOTS:
                parameter = getattr(module, name)
                copy = None if parameter is None else parameter.detach().to(COPY_DTYPE)
                module.register_buffer(f"{name}_copy", copy, persistent=False)
            module.__class__ = LinearWithWeightCopies
            self.modules.append(module)  # type: ignore[arg-type]
        self.hook_gradients()

    @property
    def layers(self) -> int:
        return len(self.modules)

    def pairs(self) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """(fp32 parameter, bf16 copy) of every weight and bias, looked up now."""
        return [
            (getattr(module, name), getattr(module, f"{name}_copy"))
            for module in self.modules
            for name in SLOTS
            if getattr(module, name) is not None
        ]

    def hook_gradients(self) -> None:
        """Route each copy's gradient into its parameter; again at the start of training.

        Moving a module (`.to()`) puts new tensors in its buffers, made by an autograd op
        since the copies require grad: each is made a leaf again and hooked, else it would
        keep its gradient to itself while the parameter got none.
        """
        for module in self.modules:
            for name in SLOTS:
                key = f"{name}_copy"
                copy = module._buffers.get(key)
                if copy is None:
                    continue
                if copy.grad_fn is not None:
                    copy = module._buffers[key] = copy.detach()
                if not getattr(copy, "_sftjob_hooked", False):
                    # Hooked even while its parameter is frozen (a hook needs requires_grad;
                    # refresh sets it to the parameter's), in case it is unfrozen later.
                    copy.requires_grad_(True)
                    copy.register_post_accumulate_grad_hook(
                        partial(_add_into_parameter, module, name)
                    )
                    copy._sftjob_hooked = True  # type: ignore[attr-defined]
        self.refresh()

    @torch.no_grad()
    def refresh(self) -> None:
        """Round each fp32 parameter into its bf16 copy, in place (the buffers stay put).

        A copy needs a gradient exactly when its parameter does (a layer unfrozen during
        training gets one from its next micro-step on).
        """
        for parameter, copy in self.pairs():
            copy.copy_(parameter)
            copy.requires_grad_(parameter.requires_grad)

    def remove(self) -> None:
        """Plain nn.Linear layers again, without the copies."""
        for module in self.modules:
            for name in SLOTS:
                module._buffers.pop(f"{name}_copy", None)
            module.__class__ = nn.Linear
        self.modules = []

    def callback(self) -> Any:
        from transformers import TrainerCallback

        copies = self

        class KeepWeightCopiesCurrent(TrainerCallback):  # type: ignore[misc]
            # A resume loads the weights after the trainer was built, before this; the
            # optimizer changes them at each step; after training nothing refreshes them.
            def on_train_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                copies.hook_gradients()

            def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                copies.refresh()

            def on_train_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
                copies.remove()

        return KeepWeightCopiesCurrent()


def use_weight_copies(trainer: Any) -> str:
    """Give the trainer's model bf16 weight copies; what was done, for the log."""
    refused = not_for_copies(trainer)
    if refused:
        return f"not applied: {refused}"
    if len(embeddings(trainer.model)) < 2:
        # The LM head must not get a copy (its weight is read directly): it must be found.
        return "not applied: the model's embeddings or LM head cannot be found"
    copies = WeightCopies(trainer.model)
    if not copies.layers:
        return "no plain nn.Linear with fp32 weights: nothing to copy"
    trainer.add_callback(copies.callback())
    size = sum(copy.numel() * copy.element_size() for _, copy in copies.pairs())
    return (
        f"{copies.layers} linear layers compute with bf16 copies of their weights "
        f"({size / 2**30:.2f} GiB), made once per optimizer step"
    )
