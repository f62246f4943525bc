"""varlenAttention: packed documents through torch's FlashAttention-2 kernel (packed_flash.py).

The kernel runs on CUDA only; the lever's contract probe compares it with per-document SDPA
on the GPU at start (a failing probe turns the lever off). Here, on CPU: the decision, the
pre-flight refusal without CUDA, and the adapter transformers calls (shapes, grouped-query
heads, the document boundaries TRL's collator computes) with the reference kernel in place
of the flash one, against each document run alone through the plain model.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
import torch
from lever_jobs import H100, QWEN_15B, SEED_REFERENCE_JOB
from sftjob_trainer.levers.contract import Hardware, ModelShape, SpeedOptions
from sftjob_trainer.levers.packed_flash import (
    IMPLEMENTATION,
    probe_varlen,
    reference_causal,
    register,
    varlen_attention,
)
from sftjob_trainer.preflight import device_problems
from sftjob_trainer.speed import decide

pytestmark = pytest.mark.trainer

ON = SpeedOptions(varlenAttention="on")


def choice(plan: Any, lever: str) -> Any:
    return next(c for c in plan.choices if c.lever == lever)


# The seed's reference job as the planner sees it on its second pass: 6.2M tokens per GPU,
# under the break-even, and no compiled artifacts of its shape at hand.
SHORT_COLD = replace(
    SEED_REFERENCE_JOB,
    run_tokens_per_gpu=189 * 16 * 2048,
    compile_payback_tokens=9_750_000,
    compile_cache_warm=False,
)


def test_auto_takes_flex_attentions_place_where_the_model_is_not_compiled() -> None:
    plan = decide(SpeedOptions(), H100, SHORT_COLD, QWEN_15B)
    assert plan.on("varlenAttention") and not plan.on("flexAttention")
    assert "a short run with a cold compile cache" in choice(plan, "compile").reason
    assert plan.model_updates == {"attnImplementation": IMPLEMENTATION}
    assert "varlenAttention is on" in choice(plan, "flexAttention").reason
    # Nothing compiled, nothing padded: the kernel reads the documents' boundaries.
    assert not plan.on("compile") and plan.static_length is None
    assert plan.kernels_lever is None
    # Its cost is linear in the documents' lengths, as flex attention's: the micro-batch
    # is sized as for flex (4 x 2048 on 80 GB, no checkpointing).
    assert plan.sft_kwargs()["per_device_train_batch_size"] == 4


def test_a_compiled_model_keeps_flex_attention_under_auto() -> None:
    # A long run (or one not looked up yet): compiled, with flex attention, the measured pair.
    plan = decide(SpeedOptions(), H100, SEED_REFERENCE_JOB, QWEN_15B)
    assert plan.on("compile") and plan.on("flexAttention") and not plan.on("varlenAttention")
    assert "the model is compiled" in choice(plan, "varlenAttention").reason
    warm = decide(SpeedOptions(), H100, replace(SHORT_COLD, compile_cache_warm=True), QWEN_15B)
    assert warm.on("compile") and warm.on("flexAttention") and not warm.on("varlenAttention")


def test_flex_attention_asked_for_keeps_its_place() -> None:
    options = SpeedOptions(flexAttention="on")
    plan = decide(options, H100, SHORT_COLD, QWEN_15B)
    assert plan.on("flexAttention") and not plan.on("varlenAttention")
    assert "flexAttention is on" in choice(plan, "varlenAttention").reason
    # Both asked for: the varlen kernel attends.
    both = SpeedOptions(flexAttention="on", varlenAttention="on")
    plan = decide(both, H100, SHORT_COLD, QWEN_15B)
    assert plan.on("varlenAttention") and not plan.on("flexAttention")


def test_on_keeps_the_boundaries_when_the_model_is_compiled() -> None:
    options = SpeedOptions(varlenAttention="on", compile="on")
    plan = decide(options, H100, SEED_REFERENCE_JOB, QWEN_15B)
    assert plan.on("varlenAttention") and plan.on("compile")
    assert plan.static_length == 4 * SEED_REFERENCE_JOB.max_length


WINDOWED = replace(QWEN_15B, attention_extras="a sliding window of 4096")


@pytest.mark.parametrize(
    ("options", "hardware", "job", "shape", "why"),
    [
        (SpeedOptions(varlenAttention="off"), H100, SEED_REFERENCE_JOB, QWEN_15B, "turned off"),
        (ON, H100, replace(SEED_REFERENCE_JOB, padding_free=False), QWEN_15B, "not packed"),
        (ON, H100, replace(SEED_REFERENCE_JOB, bf16=False), QWEN_15B, "bf16 is off"),
        (ON, H100, replace(SEED_REFERENCE_JOB, attn_set=True), QWEN_15B, "attnImplementation"),
        (ON, H100, SEED_REFERENCE_JOB, WINDOWED, "a sliding window of 4096, which this"),
        (ON, H100, SEED_REFERENCE_JOB, None, "config could not be read"),
        (
            SpeedOptions(),
            Hardware(cuda=False, memory_gib=24.0),
            SEED_REFERENCE_JOB,
            QWEN_15B,
            "no CUDA",
        ),
    ],
)
def test_it_stays_off_where_the_kernel_cannot_serve(
    options: SpeedOptions, hardware: Hardware, job: Any, shape: Any, why: str
) -> None:
    plan = decide(options, hardware, job, shape)
    assert not plan.on("varlenAttention") and why in choice(plan, "varlenAttention").reason
    assert plan.model_updates.get("attnImplementation") != IMPLEMENTATION


@pytest.mark.parametrize(
    ("config", "extras"),
    [
        ("Qwen2Config", None),
        ("LlamaConfig", None),
        ("MistralConfig", "a sliding window of 4096"),
        ("Gemma2Config", "sliding-window layers, attention logit soft-capping"),
    ],
)
def test_the_models_attention_extras_are_read_from_its_config(
    config: str, extras: str | None
) -> None:
    import transformers

    shape = ModelShape.from_config(getattr(transformers, config)())
    assert shape.attention_extras == extras
    windowed = transformers.Qwen2Config(
        use_sliding_window=True, max_window_layers=2, num_hidden_layers=4
    )
    assert ModelShape.from_config(windowed).attention_extras == "sliding-window layers"
    dropout = transformers.LlamaConfig(attention_dropout=0.1)
    assert ModelShape.from_config(dropout).attention_extras == "attention dropout"


def test_without_cuda_the_preflight_names_the_switch() -> None:
    plan = decide(ON, Hardware(cuda=False, memory_gib=24.0), SEED_REFERENCE_JOB, QWEN_15B)
    (problem,) = device_problems(plan.summary(), None, cuda=False)
    assert problem.startswith("spec.training.speed.varlenAttention is on, but this run has no")
    assert "CUDA only" in problem
    assert device_problems(plan.summary(), None, cuda=True) == []
    assert probe_varlen("cpu") is None  # nothing to compare where it cannot run


def packed_row() -> dict[str, torch.Tensor | int]:
    """Three documents in one row, with the boundaries TRL's padding-free collator adds."""
    lengths = [5, 9, 6]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    cu_seq_lens = torch.tensor([0, 5, 14, 20], dtype=torch.int32)
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, 200, (1, sum(lengths)), generator=generator)
    return {
        "input_ids": input_ids,
        "position_ids": position_ids,
        "cu_seq_lens_q": cu_seq_lens,
        "cu_seq_lens_k": cu_seq_lens,
        "max_length_q": max(lengths),
        "max_length_k": max(lengths),
    }


def load(tiny: Any, attention: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny.model), attn_implementation=attention)


def test_the_adapter_attends_within_each_document(tiny: Any) -> None:
    # The registered function with the reference kernel: transformers loads the model by
    # the lever's name and calls it with TRL's boundaries; grouped-query heads (4 query,
    # 2 key/value) as the tiny Qwen2 has them.
    register(kernel=reference_causal)
    ours = load(tiny, IMPLEMENTATION)
    assert ours.config._attn_implementation == IMPLEMENTATION
    assert ours.config.num_key_value_heads < ours.config.num_attention_heads
    plain = load(tiny, "sdpa")
    row = packed_row()
    ours_logits = ours(**row).logits[0]
    # Each document alone through the plain model: what packing must not change.
    starts = row["cu_seq_lens_q"].tolist()
    for start, end in zip(starts[:-1], starts[1:], strict=True):
        alone = plain(input_ids=row["input_ids"][:, start:end]).logits[0]
        torch.testing.assert_close(ours_logits[start:end], alone, rtol=1e-5, atol=1e-5)
    # The control: the row as one causal sequence, whose later documents see the earlier
    # ones, has other logits there.
    whole = plain(input_ids=row["input_ids"]).logits[0]
    assert not torch.allclose(whole[5:], ours_logits[5:], atol=1e-3)
    # And gradients flow through it, as training needs.
    ours(**row).logits.float().pow(2).mean().backward()
    assert all(p.grad is not None for p in ours.model.layers[0].self_attn.parameters())


def test_the_adapter_refuses_a_row_without_boundaries() -> None:
    attention = varlen_attention(reference_causal)
    query = torch.zeros(1, 4, 6, 8)
    key = value = torch.zeros(1, 2, 6, 8)
    with pytest.raises(ValueError, match="spec.training.speed.varlenAttention needs packed"):
        attention(torch.nn.Module(), query, key, value, None)
    with pytest.raises(ValueError, match="sliding window"):
        attention(
            torch.nn.Module(),
            query,
            key,
            value,
            None,
            sliding_window=4,
            cu_seq_lens_q=torch.tensor([0, 6], dtype=torch.int32),
            max_length_q=6,
        )
