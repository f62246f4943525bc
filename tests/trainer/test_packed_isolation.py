"""Packed sequences stay isolated: a padding-free row equals each sequence run alone.

TRL's bfd packing runs padding-free: one concatenated row whose position_ids restart at
every document. transformers turns those resets into a document mask (block-diagonal
for SDPA, a sparse BlockMask for flex_attention). If the mask were lost, tokens would
attend across documents and the logits would differ from each document run alone.
"""

from __future__ import annotations

import logging

import pytest
import torch
from lever_jobs import SEED_REFERENCE_JOB
from sftjob_bench.bench import isolation_check
from sftjob_trainer.levers.flex_attention import decide as flex_attention
from sftjob_trainer.speed import Hardware, Job, SpeedOptions, decide


def test_sdpa_keeps_packed_sequences_isolated() -> None:
    result = isolation_check("sdpa")
    assert result["attn_implementation"] == "sdpa"
    assert result["max_abs_diff"] < 1e-5
    assert result["leak_if_unmasked"] > 1e-3  # the comparison would notice a lost mask


def test_flex_attention_keeps_packed_sequences_isolated(monkeypatch: pytest.MonkeyPatch) -> None:
    """flex_attention runs on CPU in this torch; compiled through inductor it takes ~20 s.

    Eager flex applies the same BlockMask transformers builds from the position_ids, so the
    document masking is what is checked here; the compiled GPU kernel is checked on the
    GPU by `python -m sftjob_bench.bench --isolation` (docs/performance.md).
    """
    pytest.importorskip("torch.nn.attention.flex_attention")
    monkeypatch.setattr(torch, "compile", lambda fn=None, **kw: fn or (lambda f: f))
    result = isolation_check("flex_attention")
    assert result["attn_implementation"] == "flex_attention"
    assert result["max_abs_diff"] < 1e-5
    assert result["leak_if_unmasked"] > 1e-3


def test_flex_lever_is_off_on_cpu_with_a_reason(caplog: pytest.LogCaptureFixture) -> None:
    job = Job(**{**SEED_REFERENCE_JOB.__dict__, "bf16": False})
    choice = flex_attention(SpeedOptions(), Hardware(cuda=False), job)
    assert not choice.on and "CUDA" in choice.reason and choice.model == {}
    forced = flex_attention(SpeedOptions(flexAttention="on"), Hardware(cuda=False), job)
    assert forced.model == {"attnImplementation": "flex_attention"}
    on_gpu = flex_attention(SpeedOptions(), Hardware(cuda=True, memory_gib=80), job)
    assert on_gpu.on
    padded = flex_attention(
        SpeedOptions(),
        Hardware(cuda=True, memory_gib=80),
        Job(**{**job.__dict__, "padding_free": False}),
    )
    assert not padded.on
    with caplog.at_level(logging.INFO, logger="sftjob_trainer.speed"):
        decide(SpeedOptions(), Hardware(cuda=False), job, None).log()
    assert "flexAttention: off (no CUDA" in caplog.text
