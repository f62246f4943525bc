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

It also moves what models derive from the hidden states' dtype: rotary embeddings
(Llama, Qwen2) return their cos/sin tables in it, so the rotation of queries and keys is
computed in bf16 too (an error of up to 2e-3 in the tables at 32k positions; the bench's
2048-token rows do not probe long contexts).

The cast is a forward hook on the input embedding, present while training runs (added at
train begin, removed at train end), so an evaluation or a LoRA merge after training sees
the model as it was loaded. Models that add absolute position embeddings after the token
embedding (GPT-2, OPT) would add them back in fp32, so the lever is not applied to them.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback


def _to_bf16(module: Any, args: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output.to(torch.bfloat16)
    return output


class Bf16ResidualStream(TrainerCallback):  # type: ignore[misc]
    """Casts the input embedding's output to bf16 while training runs."""

    def __init__(self, embedding: nn.Module) -> None:
        self.embedding = embedding
        self.handle: Any = None

    def start(self) -> None:
        if self.handle is None:  # a train() that raised never reached on_train_end
            self.handle = self.embedding.register_forward_hook(_to_bf16)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.remove()
            self.handle = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stop()


def input_embedding(model: Any) -> nn.Module | None:
    """The token embedding, or None where transformers cannot find it."""
    try:
        module = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # not found under a name it knows
        return None
    return module if isinstance(module, nn.Module) else None


def other_embeddings(model: nn.Module, embedding: nn.Module) -> list[str]:
    """Embeddings besides the token embedding: learned positions (GPT-2's wpe, OPT's
    embed_positions) whose fp32 output is added to the stream after the cast."""
    return [
        name
        for name, module in model.named_modules()
        if isinstance(module, nn.Embedding) and module is not embedding
    ]


def use_bf16_residual_stream(trainer: Any) -> str:
    """Make the trainer's model carry bf16 hidden states; what was done, for the log."""
    model = trainer.model
    embedding = input_embedding(model)
    if embedding is None:
        return "not applied: the model's input embedding cannot be found"
    added = other_embeddings(model, embedding)
    if added:
        return (
            f"not applied: the model adds another embedding ({added[0]}, such as learned "
            "positions) in fp32 after the token embedding, so the stream would stay fp32"
        )
    trainer.add_callback(Bf16ResidualStream(embedding))
    return f"{type(embedding).__name__} output cast to bf16 while training runs"
