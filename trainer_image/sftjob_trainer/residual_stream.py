"""The bf16ResidualStream speed lever: hidden states between layers in bf16.

Under bf16 autocast with fp32 weights, the input embedding returns fp32, and so every
residual addition, every norm input and every hidden state kept for the backward is fp32:
the linear layers compute in bf16, but the stream that carries their outputs from layer to
layer does not. Casting the embedding's output to bf16 makes that stream bf16 (each
residual addition adds two bf16 tensors), which halves the memory traffic of the
memory-bound work between the matrix products and the activations kept for the backward.

Unlike the other levers this changes the arithmetic: the residual additions round to bf16,
as they do when a model is trained in bf16 with fp32 master weights (the weights, their
gradients and the optimizer stay fp32 here). Measured on the bench's full case: 1.5-2.3%
more tokens/s, losses within 1.3e-4 of the fp32 stream's over 25 steps; on the LoRA case
no gain, so "auto" keeps it for full fine-tunes (docs/performance.md).

The cast is a forward hook on the input embedding, removed when training ends, so a
forward outside autocast afterwards (a LoRA merge, an evaluation in fp32) sees the model
as it was loaded.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import TrainerCallback


def _to_bf16(module: Any, args: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output.to(torch.bfloat16)
    return output


class Bf16ResidualStream(TrainerCallback):  # type: ignore[misc]
    """Casts the input embedding's output to bf16 from now until training ends."""

    def __init__(self, model: Any) -> None:
        self.embedding = model.get_input_embeddings()
        self.handle: Any = self.embedding.register_forward_hook(_to_bf16)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None


def use_bf16_residual_stream(trainer: Any) -> str:
    """Make the trainer's model carry bf16 hidden states; what was done, for the log."""
    model = trainer.model
    embedding = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not isinstance(embedding, torch.nn.Module):
        return "not applied: the model has no input embedding module"
    stream = Bf16ResidualStream(model)
    trainer.add_callback(stream)
    return f"{type(embedding).__name__} output cast to bf16 until training ends"
