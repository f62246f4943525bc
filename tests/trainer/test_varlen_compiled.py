"""varlenAttention under torch.compile: the static batches keep the documents' boundaries.

A compiled model pads every packed micro-batch to one width (static_batches.py). The varlen
kernel reads the boundaries, so there they are kept: TRL computes them after padding, each
padding token a document of one; the longest document is given as maxLength, the same for
every batch; and the boundaries' count, which changes with every batch, is marked dynamic.
A compiled decoder layer (regional compilation) then compiles once for every batch.

On CPU the flash kernel cannot run, so the reference kernel stands in for it, wrapped as
an opaque custom op as torch's own varlen_attn is (torch.library), and torch.compile runs
with the "eager" backend: dynamo traces and guards, and so recompiles, exactly as under
inductor.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from sftjob_trainer.levers.compile_model import compile_repeated_blocks
from sftjob_trainer.levers.contract import Choice
from sftjob_trainer.levers.packed_flash import IMPLEMENTATION, reference_causal, register
from sftjob_trainer.levers.static_batches import PADDING_KEY, mark_boundaries_dynamic
from sftjob_trainer.settings import load_config
from sftjob_trainer.speed import SpeedPlan
from sftjob_trainer.train import build_trainer

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]

PER_DEVICE, MAX_LENGTH = 2, 128
STATIC = PER_DEVICE * MAX_LENGTH


# The kernel signature again, typed: torch.library builds the op's schema from it.
@torch.library.custom_op("sftjob_test::varlen_reference", mutates_args=())
def opaque_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seq_lens: torch.Tensor,
    max_length: int,
    scale: float,
) -> torch.Tensor:
    return reference_causal(query, key, value, cu_seq_lens, max_length, scale)


@opaque_reference.register_fake
def _(query: torch.Tensor, *_: Any) -> torch.Tensor:
    return torch.empty_like(query)


@pytest.fixture
def trainer(make_config: Any, varied_text: Path, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A real trainer built with SDPA and nothing padding, then given the plan of a GPU run
    with varlenAttention and compile on (the pre-flight refuses that plan on CPU)."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")
    off = ("autoMicroBatch", "ligerKernel", "lightMetrics", "flexAttention", "compile")
    spec = {
        "dataset": {"path": str(varied_text), "format": "text", "limit": 48},
        "training": {
            "maxSteps": 2,
            "packing": True,
            "packingStrategy": "bfd",
            "perDeviceTrainBatchSize": PER_DEVICE,
            "maxLength": MAX_LENGTH,
            "speed": dict.fromkeys(off, "off"),
            "extraArgs": {"pad_to_multiple_of": STATIC},
        },
    }
    built = build_trainer(load_config(make_config(spec)))
    plan = SpeedPlan(
        (
            Choice("varlenAttention", True, "GPU plan", model={"attnImplementation": "x"}),
            Choice("compile", True, "GPU plan", sft={"pad_to_multiple_of": STATIC}),
        )
    )
    plan.apply(built)
    return built


def batches(trainer: Any) -> list[dict[str, Any]]:
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return [
        trainer.data_collator(rows[start : start + PER_DEVICE])
        for start in range(0, len(rows) - PER_DEVICE + 1, PER_DEVICE)
    ]


def test_static_batches_keep_the_boundaries_with_padding_as_documents_of_one(
    trainer: Any,
) -> None:
    counts = set()
    for batch in batches(trainer):
        assert batch["input_ids"].size(1) == STATIC
        # The bound, not this batch's longest document: the same value for every batch.
        assert batch["max_length_q"] == batch["max_length_k"] == MAX_LENGTH
        cu = batch["cu_seq_lens_q"]
        assert torch.equal(cu, batch["cu_seq_lens_k"])
        lengths = cu.diff()
        assert int(cu[-1]) == STATIC and int(lengths.max()) <= MAX_LENGTH
        # The documents' starts are exactly the position resets; every padding token is one.
        starts = (batch["position_ids"][0] == 0).nonzero().flatten()
        assert torch.equal(cu[:-1].long(), starts)
        padding = batch[PADDING_KEY]
        assert padding > 0 and (lengths[-padding:] == 1).all()
        counts.add(cu.numel())
    assert len(counts) > 1  # the count does change from batch to batch


def compiled_layer_outputs(trainer: Any, marked: bool) -> tuple[list[torch.Tensor], int]:
    """Logits of every batch through the model with its decoder layers compiled in place,
    and the graphs dynamo compiled for them."""
    from torch._dynamo.utils import counters

    model = trainer.model
    model.set_attn_implementation(IMPLEMENTATION)
    torch._dynamo.reset()
    counters.clear()
    assert compile_repeated_blocks(model.model, backend="eager") == model.config.num_hidden_layers
    outputs = []
    with torch.no_grad():
        for batch in batches(trainer):
            inputs = {k: v for k, v in batch.items() if k not in ("labels", PADDING_KEY)}
            if marked:
                mark_boundaries_dynamic(inputs)
            outputs.append(model(**inputs).logits)
    return outputs, int(counters["stats"]["unique_graphs"])


def test_a_compiled_layer_compiles_once_for_every_count_of_documents(trainer: Any) -> None:
    register(kernel=opaque_reference)
    model = trainer.model.eval()
    with torch.no_grad():
        model.set_attn_implementation(IMPLEMENTATION)
        eager = [
            model(**{k: v for k, v in b.items() if k not in ("labels", PADDING_KEY)}).logits
            for b in batches(trainer)
        ]
    try:
        marked, graphs = compiled_layer_outputs(trainer, marked=True)
        # One graph for the layer, shared by every layer and every batch.
        assert graphs == 1
        for ours, plain in zip(marked, eager, strict=True):
            torch.testing.assert_close(ours, plain, rtol=1e-5, atol=1e-5)
        # The control: unmarked, a new count of documents compiles the layer again.
        _, unmarked_graphs = compiled_layer_outputs(trainer, marked=False)
        assert unmarked_graphs > 1
    finally:
        torch._dynamo.reset()
