"""Shared by the levers that hook a model: forward hooks kept while training runs, and the
modules transformers can find by name (a leaf: it imports no lever)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from torch import nn
from transformers import TrainerCallback


def found_module(model: Any, getter: str) -> nn.Module | None:
    """`model.<getter>()` (get_input_embeddings, get_output_embeddings), or None where
    transformers cannot find that module."""
    try:
        module = getattr(model, getter, lambda: None)()
    except (AttributeError, NotImplementedError):  # not found under a name it knows
        return None
    return module if isinstance(module, nn.Module) else None


class ForwardHooksWhileTraining(TrainerCallback):
    """`hook` on each of `modules`, added at train begin and removed at train end, so an
    evaluation or a LoRA merge after training sees the model as it was loaded."""

    def __init__(self, modules: Iterable[nn.Module], hook: Callable[..., Any]) -> None:
        self.modules = list(modules)
        self.hook = hook
        self.handles: list[Any] = []

    def start(self) -> None:
        if not self.handles:  # a train() that raised never reached on_train_end
            self.handles = [m.register_forward_hook(self.hook) for m in self.modules]

    def stop(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.start()

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.stop()
