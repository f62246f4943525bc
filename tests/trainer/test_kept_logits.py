"""The kept-logits LM head gives TRL's log-probabilities and gradients, with one GEMM less.

`KeptLogitsLogProb` is compared with TRL's `ChunkedLogProbFunction` (the function the
reference trains with) on the same inputs, values and gradients, in fp32 and under bf16
autocast; `lean_lm_head` is checked to pick it only within its memory budget.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sftjob_trainer.levers.kept_logits import KeptLogitsLogProb, fits
from sftjob_trainer.levers.lean_steps import lean_lm_head
from transformers import AutoModelForCausalLM
from trl.kernels import ChunkedLogProbFunction
from trl.trainer.utils import add_fused_lm_head

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(300)]

TOKENS, HIDDEN, VOCAB = 37, 16, 300
# TRL's vocabulary tile, smaller than VOCAB so its forward and backward loop over tiles
# (the last one partial), as they do on a real 152k vocabulary.
TRL_CHUNK = 128


def head_inputs(bias: bool) -> list[torch.Tensor | None]:
    generator = torch.Generator().manual_seed(3)
    hidden = torch.randn(TOKENS, HIDDEN, generator=generator, requires_grad=True)
    weight = torch.randn(VOCAB, HIDDEN, generator=generator, requires_grad=True)
    bias_t = torch.randn(VOCAB, generator=generator, requires_grad=True) if bias else None
    return [hidden, weight, bias_t]


def log_probs_and_grads(kept: bool, bias: bool, autocast: bool) -> list[torch.Tensor]:
    hidden, weight, bias_t = head_inputs(bias)
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(4))
    upstream = torch.randn(TOKENS, generator=torch.Generator().manual_seed(5))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        if kept:
            log_probs = KeptLogitsLogProb.apply(hidden, weight, bias_t, targets)
        else:
            log_probs = ChunkedLogProbFunction.apply(
                hidden, weight, bias_t, targets, 1.0, TRL_CHUNK, None, 1.0, ("log_probs",)
            )[0]
    (log_probs * upstream).sum().backward()
    leaves = [t for t in (hidden, weight, bias_t) if t is not None]
    return [log_probs.detach()] + [t.grad for t in leaves]  # type: ignore[misc]


@pytest.mark.parametrize("bias", [False, True])
def test_same_log_probs_and_gradients_as_trl_in_fp32(bias: bool) -> None:
    ours = log_probs_and_grads(kept=True, bias=bias, autocast=False)
    trl = log_probs_and_grads(kept=False, bias=bias, autocast=False)
    assert len(ours) == len(trl) == (4 if bias else 3)
    assert ours[0].shape == (TOKENS,) and bool((ours[0] < 0).all())
    for a, b in zip(ours, trl, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_same_log_probs_and_gradients_as_trl_under_bf16_autocast() -> None:
    ours = log_probs_and_grads(kept=True, bias=True, autocast=True)
    trl = log_probs_and_grads(kept=False, bias=True, autocast=True)
    # Both round the logits to bf16 and do the rest in fp32; the gradient GEMMs sum the
    # vocabulary in a different order (one product against TRL's tiles).
    for a, b in zip(ours, trl, strict=True):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_a_second_backward_is_refused() -> None:
    hidden, weight, bias = head_inputs(bias=True)
    targets = torch.randint(0, VOCAB, (TOKENS,), generator=torch.Generator().manual_seed(4))
    log_probs = KeptLogitsLogProb.apply(hidden, weight, bias, targets)
    log_probs.sum().backward(retain_graph=True)
    # The kept logits became their gradient: a second pass would read gradients as logits.
    with pytest.raises(RuntimeError, match="ran twice"):
        log_probs.sum().backward()


def test_budget_is_bytes_of_the_logits() -> None:
    assert fits(8192, 151_936, torch.bfloat16, 4 * 2**30)  # 2.3 GiB
    assert not fits(16384, 151_936, torch.bfloat16, 4 * 2**30)  # 4.6 GiB
    assert not fits(8192, 151_936, torch.float32, 4 * 2**30)


def backward_functions(tensor: torch.Tensor) -> set[str]:
    """Names of every autograd node behind a tensor."""
    seen: set[str] = set()
    stack = [tensor.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or type(node).__name__ in seen:
            continue
        seen.add(type(node).__name__)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return seen


def lean_loss_and_head(tiny: Any, budget: int) -> tuple[float, torch.Tensor, set[str]]:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny.model)
    add_fused_lm_head(model, outputs=("log_probs",))  # what TRL installs before the lever
    lean_lm_head(model, kept_logits_budget=budget)
    ids = torch.randint(0, model.config.vocab_size, (1, 96))
    labels = ids.clone()
    labels[0, :5] = -100
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    loss = -out.log_probs.sum() / out.label_mask.sum()
    loss.backward()
    head_grad = model.get_output_embeddings().weight.grad
    return float(loss.detach()), head_grad, backward_functions(out.log_probs)


def test_lean_head_keeps_logits_within_its_budget_and_trains_the_same(tiny: Any) -> None:
    kept_loss, kept_grad, kept_nodes = lean_loss_and_head(tiny, budget=2**30)
    tiled_loss, tiled_grad, tiled_nodes = lean_loss_and_head(tiny, budget=0)
    assert "KeptLogitsLogProbBackward" in kept_nodes
    assert "ChunkedLogProbFunctionBackward" not in kept_nodes
    assert "ChunkedLogProbFunctionBackward" in tiled_nodes  # over budget: TRL's function
    assert kept_loss == pytest.approx(tiled_loss, rel=1e-5)
    torch.testing.assert_close(kept_grad, tiled_grad, rtol=1e-4, atol=1e-6)
