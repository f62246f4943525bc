"""Flex attention's block mask is traced into the compiled graph (no graph breaks).

transformers builds the block mask with a deprecated flag whose warning breaks dynamo's
graph on every forward; speed.block_mask_in_graph builds the same mask while tracing.
Dynamo runs with the "eager" backend: graph breaks are decided by tracing, as under
inductor, without compiling kernels (flex attention's forward runs on CPU; its backward
does not, so the model is frozen here).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import torch
from sftjob_trainer.speed import block_mask_in_graph
from torch._dynamo.utils import counters
from transformers import Qwen2ForCausalLM, masking_utils

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(300)]


@pytest.fixture
def library_masks() -> Iterator[None]:
    """Dynamo reset around the test, and transformers' own mask functions restored after."""
    mapping = masking_utils.AttentionMaskInterface._global_mapping
    saved = dict(mapping)
    torch._dynamo.reset()
    counters.clear()
    yield
    mapping.clear()
    mapping.update(saved)
    torch._dynamo.reset()


def compiled_forward(model: Any, ids: torch.Tensor, positions: torch.Tensor) -> tuple[int, Any]:
    """Graph breaks dynamo took, and the last hidden state, over two compiled forwards."""
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(model.model, backend="eager")
    for _ in range(2):
        out = compiled(input_ids=ids, position_ids=positions, use_cache=False)
    return sum(counters["graph_break"].values()), out.last_hidden_state


def test_block_mask_is_traced_into_the_graph(library_masks: None, tiny: Any) -> None:
    model = Qwen2ForCausalLM.from_pretrained(tiny.model, attn_implementation="flex_attention")
    model.requires_grad_(False)
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (1, 192))
    # Two packed documents and static padding (each padding token at position 0).
    positions = torch.cat([torch.arange(80), torch.arange(100), torch.zeros(12, dtype=torch.long)])
    positions = positions.unsqueeze(0)
    eager = model.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state

    library_breaks, library_out = compiled_forward(model, ids, positions)
    block_mask_in_graph()
    breaks, out = compiled_forward(model, ids, positions)

    assert library_breaks > 0  # the control: transformers' mask breaks the graph
    assert breaks == 0
    torch.testing.assert_close(out, eager)
    torch.testing.assert_close(library_out, eager)
    # Outside tracing transformers' own function still builds the mask: same result.
    again = model.model(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
    torch.testing.assert_close(again, eager)
