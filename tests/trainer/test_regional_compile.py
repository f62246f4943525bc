"""compile: auto's form by the run's size: nothing, the decoder layers, or the whole model.

The break-evens are the measured ones of sftjob_operator.advice (the decoder layers compiled
against the uncompiled defaults: ~3.9M tokens per GPU, LoRA ~1.0M; the whole model against
the layers: ~75M, LoRA ~178M), as the trainer's planner fills them in (speed.job_from).
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from lever_jobs import H100, QWEN_15B, SEED_REFERENCE_JOB
from sftjob_operator.advice import (
    COMPILE_PAYBACK_TOKENS,
    LORA_REGIONAL_PAYBACK_TOKENS,
    LORA_WHOLE_OVER_REGIONAL_TOKENS,
    REGIONAL_PAYBACK_TOKENS,
    WHOLE_OVER_REGIONAL_TOKENS,
    compile_payback_tokens,
    whole_over_regional_tokens,
)
from sftjob_trainer.levers import compile_model
from sftjob_trainer.speed import (
    MAX_REASON,
    SpeedOptions,
    compile_cache_key,
    compile_regions_env,
    decide,
)

AUTO = SpeedOptions()
STEP_TOKENS = 16 * 2048  # per_device 2 x accumulation 8 at 2048: one optimizer step


def job(tokens: int | None, method: str = "full", regions: str = "auto", warm: bool = False):
    """The job as speed.job_from fills in its break-evens (liger installed), by method."""
    return replace(
        SEED_REFERENCE_JOB,
        method=method,
        run_tokens_per_gpu=tokens,
        compile_payback_tokens=COMPILE_PAYBACK_TOKENS,
        regional_payback_tokens=compile_payback_tokens(True, regional=True, method=method),
        whole_over_regional_tokens=whole_over_regional_tokens(method),
        compile_regions=regions,
        compile_cache_warm=warm,
    )


def test_the_break_evens_are_ordered_as_measured() -> None:
    assert 3_500_000 < REGIONAL_PAYBACK_TOKENS < 4_500_000
    assert REGIONAL_PAYBACK_TOKENS < COMPILE_PAYBACK_TOKENS < WHOLE_OVER_REGIONAL_TOKENS


def test_a_mid_size_full_run_compiles_its_layers_with_the_varlen_kernel() -> None:
    # 225 steps of 16 x 2048 (about the bench's long-job, 228 steps): 7.4M tokens per GPU.
    plan = decide(AUTO, H100, job(225 * STEP_TOKENS), QWEN_15B)
    assert plan.on("compile") and plan.variant("compile") == compile_model.REGIONAL
    # The varlen kernel attends inside the compiled layers; flex attention stands down and
    # liger's layer kernels give way to inductor's fusions.
    assert plan.on("varlenAttention") and not plan.on("flexAttention")
    assert not plan.on("ligerKernel") and plan.on("rotaryTablesOnce")
    # The static batches the compiled layer needs (one graph for every micro-batch).
    assert plan.static_length == 4 * 2048
    reason = plan.summary()["compile"]["reason"]
    assert "decoder layers compiled" in reason and "7.4M tokens per GPU" in reason
    assert f"{WHOLE_OVER_REGIONAL_TOKENS / 1e6:.0f}M" in reason
    # Within status.speedPlan's bound even behind the compile cache's note.
    cache_note = "compile cache cold (key 8e7ec6d5; saved after the first step); "
    assert len(cache_note + reason) <= MAX_REASON


def test_a_run_over_the_whole_models_break_even_compiles_it_whole_with_flex() -> None:
    plan = decide(AUTO, H100, job(WHOLE_OVER_REGIONAL_TOKENS), QWEN_15B)
    assert plan.on("compile") and plan.variant("compile") == compile_model.WHOLE
    assert plan.on("flexAttention") and not plan.on("varlenAttention")
    just_under = decide(AUTO, H100, job(WHOLE_OVER_REGIONAL_TOKENS - 1), QWEN_15B)
    assert just_under.variant("compile") == compile_model.REGIONAL
    # A run of unknown length compiles whole, as before: the measured steady-state pair.
    unknown = decide(AUTO, H100, job(None), QWEN_15B)
    assert unknown.variant("compile") == compile_model.WHOLE and unknown.on("flexAttention")


def test_a_short_run_compiles_its_layers_only_with_their_artifacts_at_hand() -> None:
    short = REGIONAL_PAYBACK_TOKENS - 1
    cold = decide(AUTO, H100, job(short), QWEN_15B)
    assert not cold.on("compile") and cold.variant("compile") == ""
    assert cold.on("varlenAttention") and cold.static_length is None
    assert f"{REGIONAL_PAYBACK_TOKENS / 1e6:.1f}M" in cold.summary()["compile"]["reason"]
    warm = decide(AUTO, H100, job(short, warm=True), QWEN_15B)
    assert warm.variant("compile") == compile_model.REGIONAL and warm.on("varlenAttention")
    at_break_even = decide(AUTO, H100, job(REGIONAL_PAYBACK_TOKENS), QWEN_15B)
    assert at_break_even.variant("compile") == compile_model.REGIONAL


def test_lora_compiles_its_layers_from_its_own_break_even() -> None:
    # Session 20: LoRA's layers compiled trained at 46.7k tokens/s against 29.3k uncompiled
    # after 12.1 s more (one machine); the whole model at 49.8k against the layers' 47.5k
    # after 176 s more (another): ~1.0M and ~178M tokens per GPU.
    assert 900_000 < LORA_REGIONAL_PAYBACK_TOKENS < 1_100_000
    assert 170_000_000 < LORA_WHOLE_OVER_REGIONAL_TOKENS < 185_000_000

    def lora(tokens: int | None) -> Any:
        return decide(AUTO, H100, job(tokens, method="lora"), QWEN_15B)

    short = lora(LORA_REGIONAL_PAYBACK_TOKENS - 1)
    assert not short.on("compile") and short.on("varlenAttention")
    assert "under the 1.0M after which compiling pays back" in short.summary()["compile"]["reason"]
    for tokens in (LORA_REGIONAL_PAYBACK_TOKENS, 225 * STEP_TOKENS):
        plan = lora(tokens)
        assert plan.variant("compile") == compile_model.REGIONAL
        assert plan.on("varlenAttention") and not plan.on("flexAttention")
    assert "under the 178M where" in lora(225 * STEP_TOKENS).summary()["compile"]["reason"]
    assert lora(LORA_WHOLE_OVER_REGIONAL_TOKENS - 1).variant("compile") == compile_model.REGIONAL
    for tokens in (LORA_WHOLE_OVER_REGIONAL_TOKENS, None):  # long, or of unknown length
        plan = lora(tokens)
        assert plan.variant("compile") == compile_model.WHOLE and plan.on("flexAttention")
    # A full fine-tune of the same size compiles whole beyond its own ~75M.
    assert decide(AUTO, H100, job(80_000_000), QWEN_15B).variant("compile") == compile_model.WHOLE
    assert lora(80_000_000).variant("compile") == compile_model.REGIONAL


def test_the_planner_fills_in_loras_break_evens(tmp_path: Path) -> None:
    from sftjob_bench.bench import CASES, trainer_config
    from sftjob_trainer.speed import job_from

    for name, regional, whole in (
        ("lora", LORA_REGIONAL_PAYBACK_TOKENS, LORA_WHOLE_OVER_REGIONAL_TOKENS),
        ("full", compile_payback_tokens(False, regional=True), WHOLE_OVER_REGIONAL_TOKENS),
    ):
        config = trainer_config(CASES[name], 20, tmp_path / "model", tmp_path / name, gpus=1)
        planned = job_from(config)  # this venv has no liger: the full figure without it
        assert (planned.regional_payback_tokens, planned.whole_over_regional_tokens) == (
            regional,
            whole,
        )


def test_qlora_keeps_the_whole_model_rule() -> None:
    # bitsandbytes' 4-bit layers under compile are not measured: auto never compiles them.
    mid = decide(AUTO, H100, job(225 * STEP_TOKENS, method="qlora"), QWEN_15B)
    assert not mid.on("compile") and "qlora" in mid.summary()["compile"]["reason"]
    long = decide(AUTO, H100, job(COMPILE_PAYBACK_TOKENS, method="qlora"), QWEN_15B)
    assert not long.on("compile")


def test_several_processes_keep_the_whole_model_rule() -> None:
    # Regional compilation has not run under DDP on a GPU; the whole model compiled has.
    ddp = replace(job(225 * STEP_TOKENS), world_size=2)
    assert not decide(AUTO, H100, ddp, QWEN_15B).on("compile")
    long = replace(job(COMPILE_PAYBACK_TOKENS), world_size=2)
    assert decide(AUTO, H100, long, QWEN_15B).variant("compile") == compile_model.WHOLE


def test_a_model_the_varlen_kernel_cannot_serve_compiles_whole_or_not_at_all() -> None:
    windowed = replace(QWEN_15B, attention_extras="a sliding window")
    mid = decide(AUTO, H100, job(225 * STEP_TOKENS), windowed)
    assert not mid.on("compile") and not mid.on("varlenAttention")
    assert "48.7M" in mid.summary()["compile"]["reason"]
    off = decide(SpeedOptions(varlenAttention="off"), H100, job(225 * STEP_TOKENS), QWEN_15B)
    assert not off.on("compile") and off.on("flexAttention")
    # flexAttention: on is the user's word: flex attention attends, so the whole model's rule.
    flex = decide(SpeedOptions(flexAttention="on"), H100, job(225 * STEP_TOKENS), QWEN_15B)
    assert not flex.on("compile") and flex.on("flexAttention")
    flex_long = decide(SpeedOptions(flexAttention="on"), H100, job(80_000_000), QWEN_15B)
    assert flex_long.variant("compile") == compile_model.WHOLE and flex_long.on("flexAttention")


def test_the_environment_forces_either_form() -> None:
    mid = 225 * STEP_TOKENS
    whole = decide(AUTO, H100, job(mid, regions="off"), QWEN_15B)
    # Forced whole, the mid-size run is short for the whole model's compile: not compiled.
    assert not whole.on("compile")
    on = SpeedOptions(compile="on")
    assert decide(on, H100, job(mid, regions="off"), QWEN_15B).variant("compile") == "whole"
    forced = decide(on, H100, job(None, regions="on"), QWEN_15B)
    assert forced.variant("compile") == compile_model.REGIONAL
    assert compile_regions_env({"SFTJOB_COMPILE_REGIONS": " On "}) == "on"
    assert compile_regions_env({"SFTJOB_COMPILE_REGIONS": "off"}) == "off"
    assert compile_regions_env({"SFTJOB_COMPILE_REGIONS": "yes"}) == "auto"
    assert compile_regions_env({}) == "auto"


def test_the_compiled_artifacts_are_named_by_the_form() -> None:
    model = SimpleNamespace(path="/models/qwen", attnImplementation=None)
    regional_job = job(225 * STEP_TOKENS)
    regional = decide(AUTO, H100, regional_job, QWEN_15B)
    whole = decide(
        SpeedOptions(compile="on"), H100, job(225 * STEP_TOKENS, regions="off"), QWEN_15B
    )
    config = {"model_type": "qwen2"}
    assert compile_cache_key(regional, regional_job, H100, model, config, None) != (
        compile_cache_key(whole, regional_job, H100, model, config, None)
    )


def test_the_layers_are_compiled_only_where_the_plan_says_regional() -> None:
    class Plan:
        def __init__(self, variant: str) -> None:
            self._variant = variant

        def on(self, lever: str) -> bool:
            return bool(self._variant)

        def variant(self, lever: str) -> str:
            return self._variant

        static_length = None

    # Whole (or off): apply leaves the model to accelerate's compile and touches nothing.
    assert compile_model.apply(object(), Plan(compile_model.WHOLE)) is None
    assert compile_model.apply(object(), Plan("")) is None


def test_the_spec_field_quotes_the_break_evens() -> None:
    from sftjob_operator.api import SpeedSpec

    text = SpeedSpec.model_fields["compile"].description or ""
    assert f"~{WHOLE_OVER_REGIONAL_TOKENS / 1e6:.0f}M" in text
    assert f"~{REGIONAL_PAYBACK_TOKENS / 1e6:.1f}M" in text
    assert f"LoRA: from ~{LORA_REGIONAL_PAYBACK_TOKENS / 1e6:.1f}M" in text
    assert f"up to ~{LORA_WHOLE_OVER_REGIONAL_TOKENS / 1e6:.0f}M" in text


S19 = Path(__file__).resolve().parents[2] / "docs" / "bench-results" / "2026-12-06-s19"


def side_line(path: Path) -> dict[str, Any]:
    return next(json.loads(line) for line in path.read_text().splitlines() if '"side"' in line)


def test_session_19_measured_the_layers_over_their_break_even() -> None:
    from sftjob_operator.advice import (
        REGIONAL_BESIDE_WHOLE_TOKENS_PER_S,
        WHOLE_BESIDE_REGIONAL_TOKENS_PER_S,
        break_even_tokens,
    )

    # Call 2, one H100: the long job (7.4M tokens) uncompiled (the defaults then) and with
    # its decoder layers compiled: the same tokens and losses, the layers 32.5 s sooner.
    uncompiled = side_line(S19 / "call2" / "long.jsonl")
    layers = side_line(S19 / "call2" / "longreg.jsonl")
    assert uncompiled["tokens_total"] == layers["tokens_total"] > REGIONAL_PAYBACK_TOKENS
    assert layers["saved_at_s"] < uncompiled["saved_at_s"] - 30
    assert layers["losses"] == pytest.approx(uncompiled["losses"], rel=0.01)
    # That pair's own break-even is under the one the planner uses (the dearest measured).
    extra_s = layers["model_loaded_to_first_step_s"] - uncompiled["model_loaded_to_first_step_s"]
    pair = break_even_tokens(extra_s, uncompiled["tokens_per_s"], layers["tokens_per_s"])
    assert 0 < pair < REGIONAL_PAYBACK_TOKENS
    # Call 1, one H100: the whole model compiled against its layers, the planner's figures.
    whole = next(
        line
        for line in map(json.loads, (S19 / "call1" / "full.jsonl").read_text().splitlines())
        if line.get("side") == "sftjob"
    )
    assert whole["tokens_per_s"] == pytest.approx(WHOLE_BESIDE_REGIONAL_TOKENS_PER_S, abs=1)
    regional = side_line(S19 / "call1" / "fullreg.jsonl")
    assert regional["tokens_per_s"] == pytest.approx(REGIONAL_BESIDE_WHOLE_TOKENS_PER_S, abs=1)
    # Call 3: the reference job under the new auto compiles its layers; 3.11x the snippet.
    img = side_line(S19 / "call3" / "img.jsonl")
    assert img["settings"]["torch_compile"] and img["settings"]["speed"]["compile"]["on"]
    assert "each decoder layer" in img["settings"]["speed"]["compile"]["reason"]  # its words then


S20 = S19.parent / "2026-12-06-s20"


def sftjob_side(path: Path) -> dict[str, Any]:
    lines = map(json.loads, path.read_text().splitlines())
    return next(line for line in lines if line.get("side") == "sftjob")


def test_session_20_measured_loras_break_evens() -> None:
    from sftjob_operator.advice import (
        LORA_REGIONAL_BESIDE_WHOLE_TOKENS_PER_S,
        LORA_REGIONAL_COMPILE_OVERHEAD_S,
        LORA_REGIONAL_TOKENS_PER_S,
        LORA_UNCOMPILED_TOKENS_PER_S,
        LORA_WHOLE_BESIDE_REGIONAL_TOKENS_PER_S,
        LORA_WHOLE_OVER_REGIONAL_OVERHEAD_S,
    )

    # Call 4, one H100: LoRA uncompiled (the varlen kernel, liger) and its layers compiled.
    uncompiled = sftjob_side(S20 / "call4" / "loraoff.jsonl")
    layers = sftjob_side(S20 / "call4" / "lorareg.jsonl")
    assert not uncompiled["settings"]["torch_compile"] and layers["settings"]["torch_compile"]
    assert uncompiled["settings"]["speed"]["ligerKernel"]["on"]
    assert "decoder layers compiled" in layers["settings"]["speed"]["compile"]["reason"]
    assert uncompiled["tokens_per_s"] == pytest.approx(LORA_UNCOMPILED_TOKENS_PER_S, abs=1)
    assert layers["tokens_per_s"] == pytest.approx(LORA_REGIONAL_TOKENS_PER_S, abs=1)
    extra_s = layers["untimed_s"] - uncompiled["untimed_s"]  # the same 5 steps untimed
    assert extra_s == pytest.approx(LORA_REGIONAL_COMPILE_OVERHEAD_S, abs=0.05)
    assert layers["losses"] == pytest.approx(uncompiled["losses"], rel=0.01)
    # What auto now plans for a LoRA run of the reference job's size is what was measured
    # there (forced then with $SFTJOB_COMPILE_REGIONS=on): every lever on or off alike.
    plan = decide(AUTO, H100, job(6_000_000, method="lora"), QWEN_15B)
    measured = {lever: choice["on"] for lever, choice in layers["settings"]["speed"].items()}
    # (fp8Matmuls came after, opt-in: off there, as auto leaves it.)
    assert {lever: choice["on"] for lever, choice in plan.summary().items()} == {
        **measured,
        "fp8Matmuls": False,
    }
    assert plan.variant("compile") == compile_model.REGIONAL
    assert plan.sft_kwargs()["per_device_train_batch_size"] == layers["settings"]["per_device"]
    # Call 3, another H100: the whole model compiled (flex attention) against the layers.
    whole = sftjob_side(S20 / "call3" / "lora.jsonl")
    beside = sftjob_side(S20 / "call3" / "lorareg.jsonl")
    assert whole["settings"]["attn_implementation"] == "flex_attention"
    assert whole["tokens_per_s"] == pytest.approx(LORA_WHOLE_BESIDE_REGIONAL_TOKENS_PER_S, abs=1)
    assert beside["tokens_per_s"] == pytest.approx(LORA_REGIONAL_BESIDE_WHOLE_TOKENS_PER_S, abs=1)
    extra_s = whole["untimed_s"] - beside["untimed_s"]
    assert extra_s == pytest.approx(LORA_WHOLE_OVER_REGIONAL_OVERHEAD_S, abs=0.05)


def test_session_20_full_case_compiled_the_whole_model_once_the_bench_planned_a_long_run() -> None:
    # Call 1 (before bench.compile_as_a_long_job): the 20 steps compiled only the layers.
    slip = sftjob_side(S20 / "call1" / "full.jsonl")["settings"]["speed"]["compile"]["reason"]
    assert slip.startswith("decoder layers compiled")
    # Call 2: the whole model with flex attention, faster than with the varlen kernel inside
    # and than the layers, on one machine.
    rates = {}
    for name in ("full", "fullvw", "fullreg"):
        line = sftjob_side(S20 / "call2" / f"{name}.jsonl")
        rates[name] = line["tokens_per_s"]
        compiled = line["settings"]["speed"]["compile"]["reason"]
        assert compiled.startswith("decoder layers") == (name == "fullreg")
    assert sftjob_side(S20 / "call2" / "full.jsonl")["settings"]["attn_implementation"] == (
        "flex_attention"
    )
    assert rates["full"] > rates["fullvw"] > rates["fullreg"]


def test_a_varlen_kernel_that_fails_its_check_takes_the_layers_compile_with_it() -> None:
    # The self-checks turn a failing lever off and the plan is decided again: without the
    # varlen kernel a mid-size run is short for the whole model's compile.
    failed = {"varlenAttention": "self-check failed: the kernel's output differs"}
    plan = decide(AUTO, H100, job(225 * STEP_TOKENS), QWEN_15B, failed=failed)
    assert not plan.on("varlenAttention") and not plan.on("compile")
    assert plan.on("flexAttention")


def test_the_report_says_when_a_side_repeats_in_one_file() -> None:
    from sftjob_bench.bench_report import report

    lines = [side_line(S19 / "call2" / name) for name in ("long.jsonl", "longreg.jsonl")]
    text = report(lines, title="long")
    assert "sftjob appears more than once; only its last line is reported" in text
    assert "46,531" in text and "37,45" not in text  # long.jsonl: 37,454.5 tokens/s
    assert "appears more than once" not in report(lines[:1])


def test_the_long_job_is_the_reference_job_on_more_rows() -> None:
    from sftjob_bench.e2e import E2E_CASES

    long, reference = E2E_CASES["long-job"], E2E_CASES["reference-job"]
    assert replace(long, name=reference.name, rows=reference.rows) == reference
    assert long.rows == 2500
