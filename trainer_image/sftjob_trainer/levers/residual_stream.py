"""The bf16ResidualStream lever's mechanics: hidden states between layers in bf16.

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
(Llama, Qwen2) compute their cos/sin tables in fp32 and return them in it, so the tables
are rounded to bf16 (half a bf16 step, up to 2e-3) and the rotation of queries and keys
is bf16 too; the bench's loss curves include this.

The cast is a forward hook on the input embedding, present while training runs (added at
train begin, removed at train end), so an evaluation or a LoRA merge after training sees
the model as it was loaded. Some models turn the stream back to fp32 after the cast
(GPT-2's and OPT's learned positions, MoE blocks that sum experts into an fp32 buffer,
norms whose fp32 weight promotes their output): a one-off forward of a few tokens checks
the hidden states between layers with the cast in place, and the lever is not applied
where they are not all bf16 (the rounding would come without the gain).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

from .training_hooks import ForwardHooksWhileTraining, found_module


def _to_bf16(module: Any, args: Any, output: Any) -> Any:
    if isinstance(output, torch.Tensor) and output.is_floating_point():
        return output.to(torch.bfloat16)
    return output


class Bf16ResidualStream(ForwardHooksWhileTraining):
    """Casts the input embedding's output to bf16 while training runs."""

    def __init__(self, embedding: nn.Module) -> None:
        super().__init__([embedding], _to_bf16)


def stream_dtypes(model: Any, embedding: nn.Module) -> set[torch.dtype] | None:
    """The dtypes of the hidden states between layers with the cast in place, from one
    forward of a few tokens under bf16 autocast; None where the model does not report
    them (fewer than two layers, no hidden states, parameters not materialised).

    The forward runs with torch.compile's stance at force_eager: under flex attention
    transformers compiles flex_attention and its block mask on their first eager call
    (12 s on CPU for this forward, a Triton flex kernel and a mask on a GPU), graphs the
    compiled training model never uses (it traces flex attention inline). Eager flex
    attention computes the same attention unfused, in the same dtypes.
    """
    device = next(model.parameters()).device
    if device.type == "meta":
        return None
    # Dropout in the probe must not move the random state training starts from.
    cuda_devices = [device.index or 0] if device.type == "cuda" else []
    handle = embedding.register_forward_hook(_to_bf16)
    try:
        ids = torch.zeros((1, 4), dtype=torch.long, device=device)
        packed = packed_row_kwargs(model, ids)
        with (
            torch.random.fork_rng(devices=cuda_devices),
            torch.no_grad(),
            torch.autocast(device.type, dtype=torch.bfloat16),
            torch.compiler.set_stance("force_eager"),
            warnings.catch_warnings(),
        ):
            # Eager flex attention warns that it is unfused: meant here, for 4 tokens.
            warnings.filterwarnings("ignore", message="flex_attention called without torch")
            out = model(input_ids=ids, output_hidden_states=True, use_cache=False, **packed)
    finally:
        handle.remove()
    states = getattr(out, "hidden_states", None)
    # The first is the embedding's output, the last is after the final norm (fp32 where
    # its weight is): the ones in between are the stream.
    if not states or len(states) < 3:
        return None
    return {state.dtype for state in states[1:-1]}


def packed_row_kwargs(model: Any, ids: torch.Tensor) -> dict[str, Any]:
    """The probe's row as TRL's padding-free collator describes a packed row (one document
    here), where the model attends through the varlenAttention kernel: that kernel reads
    the documents' boundaries and refuses a row without them (the check then could not run,
    and the lever went on unchecked). Other attentions get the plain row."""
    from .packed_flash import IMPLEMENTATION

    if getattr(model.config, "_attn_implementation", None) != IMPLEMENTATION:
        return {}
    tokens = ids.size(1)
    bounds = torch.tensor([0, tokens], dtype=torch.int32, device=ids.device)
    return {
        "position_ids": torch.arange(tokens, device=ids.device).unsqueeze(0),
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
        "max_length_q": tokens,
        "max_length_k": tokens,
    }


def use_bf16_residual_stream(trainer: Any) -> str:
    """Make the trainer's model carry bf16 hidden states; what was done, for the log."""
    model = trainer.model
    embedding = found_module(model, "get_input_embeddings")
    if embedding is None:
        return "not applied: the model's input embedding cannot be found"
    try:
        dtypes = stream_dtypes(model, embedding)
        unchecked = "" if dtypes else " (not checked: the model reports no hidden states)"
    except Exception as exc:  # the check is a courtesy: the lever was measured without it
        dtypes, unchecked = None, f" (not checked: {type(exc).__name__}: {exc})"
    if dtypes and dtypes != {torch.bfloat16}:
        names = ", ".join(sorted(str(d).removeprefix("torch.") for d in dtypes))
        return (
            f"not applied: with the cast the hidden states between layers are still {names} "
            "(the model adds fp32 tensors after its embedding: learned positions, MoE "
            "experts or norms with fp32 weights), so it would round without gaining"
        )
    trainer.add_callback(Bf16ResidualStream(embedding))
    return f"{type(embedding).__name__} output cast to bf16 while training runs{unchecked}"


def probe_bf16_stream(device: str) -> str | None:
    """The cast on an embedding's output: its values rounded to bf16, nothing else."""
    embedding = nn.Embedding(10, 8).to(device)
    ids = torch.arange(6, device=device).reshape(2, 3)
    handle = embedding.register_forward_hook(_to_bf16)
    try:
        with torch.no_grad():
            cast = embedding(ids)
    finally:
        handle.remove()
    with torch.no_grad():
        plain = embedding(ids)
    if cast.dtype != torch.bfloat16 or not torch.equal(cast, plain.to(torch.bfloat16)):
        return f"the hooked embedding returns {cast.dtype}, not its output rounded to bf16"
    return None
