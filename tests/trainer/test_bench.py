"""The benchmark harness on CPU (correctness of the harness, not speed) and the speed rules."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from lever_jobs import H100, QWEN_15B, SEED_REFERENCE_JOB
from sftjob_bench.bench_report import report
from sftjob_operator.advice import COMPILE_PAYBACK_TOKENS, COMPILE_PAYBACK_TOKENS_WITHOUT_LIGER
from sftjob_trainer.failures import ConfigError
from sftjob_trainer.levers.micro_batch import decide as micro_batch
from sftjob_trainer.levers.micro_batch import kept_logits_bytes
from sftjob_trainer.speed import (
    Hardware,
    Job,
    SpeedOptions,
    cpus_per_process,
    decide,
    keep_compiled_kernels,
    options_from,
    usable_memory_gib,
)

# Stored GPU runs (JSON lines) that the issue's criteria are checked against.
BENCH_RESULTS = Path(__file__).resolve().parents[2] / "docs" / "bench-results"


def test_cpu_smoke_sides_match() -> None:
    # autoMicroBatch forced on: the sftjob side then runs per_device 16 x 1 without
    # checkpointing, which must not change what it learns (same rows per optimizer step).
    env = {**os.environ, "SFTJOB_SPEED": json.dumps({"autoMicroBatch": "on"})}
    done = subprocess.run(
        [sys.executable, "-m", "sftjob_bench.bench", "--case", "cpu-smoke", "--steps", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    sides = {line["side"]: line for line in lines}
    assert list(sides) == ["reference", "sftjob"]
    ref, ours = sides["reference"], sides["sftjob"]
    for side in (ref, ours):
        assert side["case"] == "cpu-smoke"
        assert side["tokens_per_s"] > 0
        assert side["mfu"] is None and side["peak_mem_gib"] is None  # CPU
        assert len(side["losses"]) == 4
        assert all(math.isfinite(loss) for loss in side["losses"])
        assert side["settings"]["steps"] == 4
    # Same real tokens trained on (padding, if any, is not counted).
    assert ref["tokens_total"] == ours["tokens_total"] > 0
    rs, os_ = ref["settings"], ours["settings"]
    assert rs["effective_batch"] == os_["effective_batch"] == 16
    for key in ("data_sha", "data_rows", "packed_rows", "max_length", "learning_rate", "seed"):
        assert rs[key] == os_[key], key
    assert (rs["per_device"], rs["accumulation"], rs["gradient_checkpointing"]) == (2, 8, True)
    assert (os_["per_device"], os_["accumulation"], os_["gradient_checkpointing"]) == (16, 1, False)
    assert rs["attn_implementation"] == os_["attn_implementation"] == "sdpa"
    # Same rows per step, exact recomputation: the curves agree, not only the first loss.
    for a, b in zip(ref["losses"], ours["losses"], strict=True):
        assert abs(a - b) < 1e-3
    speed = os_["speed"]
    assert speed["autoMicroBatch"]["on"]
    assert not speed["flexAttention"]["on"] and "CUDA" in speed["flexAttention"]["reason"]
    assert not speed["ligerKernel"]["on"] and speed["ligerKernel"]["reason"]
    assert "speed flexAttention: off" in done.stderr

    # The report for docs/performance.md takes its figures from these lines.
    text = report(lines, title="cpu-smoke")
    assert f"{ours['tokens_per_s'] / ref['tokens_per_s']:.2f}x" in text
    assert "| reference | per_device 2, accum 8, checkpointing, sdpa |" in text
    assert "| sftjob | per_device 16, accum 1, no checkpointing, sdpa |" in text
    loss_rows = [row for row in text.splitlines() if row[:4] in ("| 1 ", "| 2 ", "| 3 ", "| 4 ")]
    assert len(loss_rows) == 4 and f"{ref['losses'][0]:.4f}" in loss_rows[0]
    assert "NOT the same" not in text


def test_h100_full_picks_the_measured_best_shape() -> None:
    plan = decide(SpeedOptions(), H100, SEED_REFERENCE_JOB, QWEN_15B)
    assert plan.model_updates == {"attnImplementation": "flex_attention"}
    kwargs = plan.sft_kwargs(["activation_checkpointing"])
    assert kwargs == {
        "per_device_train_batch_size": 4,
        "gradient_accumulation_steps": 4,
        "activation_checkpointing": False,
        "torch_compile": True,
        "pad_to_multiple_of": 4 * 2048,  # the chosen micro-batch, one static shape
        "logging_nan_inf_filter": False,  # a host sync per micro-step
        "dataloader_num_workers": 2,  # CPUs unknown here: the workers are wanted
        "dataloader_persistent_workers": True,
    }
    assert plan.static_length == 4 * 2048
    assert plan.on("lightMetrics") and not plan.on("ligerKernel")
    assert "compiled" in plan.summary()["ligerKernel"]["reason"]


def test_the_steady_bench_plans_its_few_steps_as_a_long_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Session 20's first call: 20 steps of the full case planned by their own size (0.7M
    # tokens per GPU) compiled the decoder layers, not the whole model a long job compiles.
    from sftjob_bench.bench import CASES, compile_as_a_long_job, trainer_config
    from sftjob_trainer.levers.compile_model import ENV_COMPILE_REGIONS, REGIONAL, WHOLE
    from sftjob_trainer.speed import job_from

    config = trainer_config(CASES["full"], 20, tmp_path / "model", tmp_path / "out", gpus=1)
    on = SpeedOptions(compile="on")

    def form() -> str:
        return decide(on, H100, job_from(config), QWEN_15B).variant("compile")

    monkeypatch.delenv(ENV_COMPILE_REGIONS, raising=False)
    assert job_from(config).run_tokens_per_gpu == 20 * 16 * 2048
    assert form() == REGIONAL  # the 20 steps alone
    env: dict[str, str] = {}
    compile_as_a_long_job(env)
    monkeypatch.setenv(ENV_COMPILE_REGIONS, env[ENV_COMPILE_REGIONS])
    assert form() == WHOLE
    forced = {ENV_COMPILE_REGIONS: "on"}  # the fullreg stage's form is kept
    compile_as_a_long_job(forced)
    assert forced == {ENV_COMPILE_REGIONS: "on"}


def test_estimate_counts_the_logits_the_lean_head_keeps() -> None:
    full = Job(**{**SEED_REFERENCE_JOB.__dict__, "checkpointing": False})
    lean = micro_batch(SpeedOptions(), H100, full, QWEN_15B, True, lean_head=True)
    plain = micro_batch(SpeedOptions(), H100, full, QWEN_15B, True, lean_head=False)
    assert lean.sft == plain.sft  # 4 x 2048 still fits on 80 GB
    # 8192 tokens x 151,936 bf16 logits: 2.3 GiB more in the estimate (measured peaks
    # 48.7-49.9 GiB with them, estimate 51.0).
    assert "estimate 51.0 of 79 GiB" in lean.reason and "estimate 48.7 of" in plain.reason
    assert kept_logits_bytes(QWEN_15B, 8192, 79.1, bf16=True) == 2 * 8192 * 151_936
    assert kept_logits_bytes(QWEN_15B, 8192, 79.1, bf16=False) == 0  # fp32: 4.6 GiB, over 5%
    assert kept_logits_bytes(QWEN_15B, 16384, 79.1, bf16=True) == 0  # TRL's tiles, none kept
    # Through decide: counted only where the lean head keeps them, over static batches.
    no_copies = {"castWeightsOncePerStep": "off"}  # their 2.4 GiB are another test's
    kept = decide(SpeedOptions(**no_copies), H100, SEED_REFERENCE_JOB, QWEN_15B)
    assert "estimate 51.0 of" in kept.summary()["autoMicroBatch"]["reason"]
    # Uncompiled, flex attention's batches are static too (static_batches.py),
    flex_eager = SpeedOptions(compile="off", varlenAttention="off", **no_copies)
    eager = decide(flex_eager, H100, SEED_REFERENCE_JOB, QWEN_15B)
    assert eager.static_length == 4 * 2048
    assert "estimate 51.0 of" in eager.summary()["autoMicroBatch"]["reason"]
    # but not the varlen kernel's (auto where the model is not compiled): none are kept.
    varlen = decide(SpeedOptions(compile="off", **no_copies), H100, SEED_REFERENCE_JOB, QWEN_15B)
    assert varlen.on("varlenAttention") and varlen.static_length is None
    assert "estimate 48.7 of" in varlen.summary()["autoMicroBatch"]["reason"]
    # The user's own pad_to_multiple_of: no static batches, so no logits are kept.
    own_padding = replace(SEED_REFERENCE_JOB, extra_args=("pad_to_multiple_of",))
    no_static = decide(SpeedOptions(**no_copies), H100, own_padding, QWEN_15B)
    assert no_static.static_length is None
    assert "estimate 48.7 of" in no_static.summary()["autoMicroBatch"]["reason"]
    no_lean = decide(
        SpeedOptions(lightMetrics="off", **no_copies), H100, SEED_REFERENCE_JOB, QWEN_15B
    )
    assert "estimate 48.7 of" in no_lean.summary()["autoMicroBatch"]["reason"]


def test_estimate_counts_the_weight_copies() -> None:
    from sftjob_trainer.levers.micro_batch import static_bytes

    copies = 2 * (QWEN_15B.params - QWEN_15B.vocab * QWEN_15B.hidden)  # bf16, no embedding
    assert static_bytes(QWEN_15B, "full", weight_copies=True) - static_bytes(
        QWEN_15B, "full"
    ) == pytest.approx(copies)
    on = decide(SpeedOptions(castWeightsOncePerStep="on"), H100, SEED_REFERENCE_JOB, QWEN_15B)
    assert on.on("castWeightsOncePerStep")
    # 2.4 GiB more than the 51.0 without them; 4 x 2048 still fits on 80 GB.
    assert "estimate 53.4 of" in on.summary()["autoMicroBatch"]["reason"]
    assert on.sft_kwargs()["per_device_train_batch_size"] == 4
    default = decide(SpeedOptions(), H100, SEED_REFERENCE_JOB, QWEN_15B)
    assert default.on("castWeightsOncePerStep")  # about 1% on a GPU (session 6)
    assert default.sft_kwargs() == on.sft_kwargs()


def test_auto_weight_copies_give_way_to_the_micro_batch() -> None:
    # 65 GiB: 0.8 x 65 = 52 GiB holds 4 x 2048 without the copies (51.0), not with (53.4).
    tight = Hardware(cuda=True, memory_gib=65.0, name="tight")
    auto = decide(SpeedOptions(), tight, SEED_REFERENCE_JOB, QWEN_15B)
    copies = auto.summary()["castWeightsOncePerStep"]
    assert not copies["on"]
    assert (
        "without them: per_device 4, checkpointing off; with them: per_device 2"
        in (copies["reason"])
    )
    assert auto.sft_kwargs()["per_device_train_batch_size"] == 4
    assert "estimate 51.0 of 65" in auto.summary()["autoMicroBatch"]["reason"]
    # "on" is obeyed, and the micro-batch makes room for the copies instead.
    forced = decide(SpeedOptions(castWeightsOncePerStep="on"), tight, SEED_REFERENCE_JOB, QWEN_15B)
    assert forced.on("castWeightsOncePerStep")
    assert forced.sft_kwargs()["per_device_train_batch_size"] < 4
    # 48 GiB: 2 x 2048 fits without checkpointing and without the copies; with them only
    # a checkpointed micro-batch fits. Checkpointing costs more than the copies save.
    smaller = decide(
        SpeedOptions(), Hardware(cuda=True, memory_gib=48.0), SEED_REFERENCE_JOB, QWEN_15B
    )
    assert not smaller.on("castWeightsOncePerStep")
    assert "checkpointing on)" in smaller.summary()["castWeightsOncePerStep"]["reason"]
    assert "gradient_checkpointing" in smaller.sft_kwargs()  # turned off, as without copies
    assert not smaller.sft_kwargs()["gradient_checkpointing"]
    # Only checkpointing differs: 2 x 1 at 48 GiB fits without checkpointing, but with the
    # copies only with it. That alone is reason enough to leave the copies off.
    two = Job(**{**SEED_REFERENCE_JOB.__dict__, "per_device": 2, "accumulation": 1})
    at_48 = Hardware(cuda=True, memory_gib=48.0)
    only_ckpt = decide(SpeedOptions(), at_48, two, QWEN_15B)
    assert only_ckpt.summary()["castWeightsOncePerStep"]["reason"] == (
        "auto: they would change the micro-batch (without them: per_device 2, checkpointing "
        "off; with them: per_device 2, checkpointing on)"
    )
    assert (
        only_ckpt.sft_kwargs()
        == decide(SpeedOptions(castWeightsOncePerStep="off"), at_48, two, QWEN_15B).sft_kwargs()
    )


def test_auto_weight_copies_need_a_memory_estimate() -> None:
    # Without the micro-batch lever's estimate nothing checks the copies' memory.
    def copies(
        options: SpeedOptions, job: Job = SEED_REFERENCE_JOB, shape=QWEN_15B, hw=H100
    ) -> dict:
        return decide(options, hw, job, shape).summary()["castWeightsOncePerStep"]

    unpacked = Job(**{**SEED_REFERENCE_JOB.__dict__, "padding_free": False})
    shrunk = Job(**{**SEED_REFERENCE_JOB.__dict__, "shrunk": True})
    cases = {
        "turned off": copies(SpeedOptions(autoMicroBatch="off")),
        "dense-mask": copies(SpeedOptions(), job=unpacked),  # no flex without packing
        "shape unknown": copies(SpeedOptions(), shape=None),
        "memory unknown": copies(SpeedOptions(), hw=Hardware(cuda=True)),
        "shrank": copies(SpeedOptions(), job=shrunk),
    }
    for words, choice in cases.items():
        assert not choice["on"], words
        assert choice["reason"].startswith("auto: no fitting micro-batch estimate"), choice

        assert words in choice["reason"], choice["reason"]
    # 35 GiB: nothing fits with the copies; 4 x 2048 with checkpointing without them.
    at_35 = Hardware(cuda=True, memory_gib=35.0)
    nothing = copies(SpeedOptions(), hw=at_35)
    assert not nothing["on"]
    # The micro-batch is the one picked without the copies, not the copies' (none fits).
    assert (
        decide(SpeedOptions(), at_35, SEED_REFERENCE_JOB, QWEN_15B).sft_kwargs()
        == decide(
            SpeedOptions(castWeightsOncePerStep="off"), at_35, SEED_REFERENCE_JOB, QWEN_15B
        ).sft_kwargs()
    )
    assert nothing["reason"] == (
        "auto: nothing fits with them (without them: per_device 4, checkpointing on)"
    )
    qlora = copies(SpeedOptions(), job=Job(**{**SEED_REFERENCE_JOB.__dict__, "method": "qlora"}))
    assert not qlora["on"] and "qlora" in qlora["reason"]
    # "on" is the user's call: kept without an estimate.
    assert copies(SpeedOptions(castWeightsOncePerStep="on", autoMicroBatch="off"))["on"]


def test_compile_lever_rules() -> None:
    cpu = Hardware(cuda=False, memory_gib=24.0)
    auto = SpeedOptions()
    assert not decide(auto, cpu, SEED_REFERENCE_JOB, QWEN_15B).on(
        "compile"
    )  # CPU: off, with reason
    assert "CPU" in decide(auto, cpu, SEED_REFERENCE_JOB, QWEN_15B).summary()["compile"]["reason"]
    no_flex = SpeedOptions(flexAttention="off")
    assert not decide(no_flex, H100, SEED_REFERENCE_JOB, QWEN_15B).on("compile")
    fsdp = Job(**{**SEED_REFERENCE_JOB.__dict__, "distributed": "fsdp"})
    assert not decide(SpeedOptions(compile="on"), H100, fsdp, QWEN_15B).on("compile")
    assert not decide(SpeedOptions(compile="off"), H100, SEED_REFERENCE_JOB, QWEN_15B).on("compile")
    qlora = Job(**{**SEED_REFERENCE_JOB.__dict__, "method": "qlora"})
    assert not decide(auto, H100, qlora, QWEN_15B).on("compile")
    assert decide(SpeedOptions(compile="on"), H100, qlora, QWEN_15B).on("compile")
    lora = Job(**{**SEED_REFERENCE_JOB.__dict__, "method": "lora"})
    assert decide(auto, H100, lora, QWEN_15B).on("compile")  # measured: 5.3x
    # Forced on CPU with SDPA: compiled, and still one static shape (the batch is kept).
    forced = decide(SpeedOptions(compile="on"), cpu, SEED_REFERENCE_JOB, QWEN_15B)
    assert forced.on("compile") and forced.static_length == 2 * 2048
    # Padded (unpacked) batches, or the user's own padding: compiled, shapes left alone.
    padded = Job(**{**SEED_REFERENCE_JOB.__dict__, "padding_free": False})
    assert decide(SpeedOptions(compile="on"), H100, padded, QWEN_15B).static_length is None
    own = Job(**{**SEED_REFERENCE_JOB.__dict__, "extra_args": ("pad_to_multiple_of",)})
    plan = decide(auto, H100, own, QWEN_15B)
    assert plan.on("compile") and plan.static_length is None
    assert "pad_to_multiple_of" not in plan.sft_kwargs()


def test_the_compile_break_even_follows_what_trains_uncompiled_here(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib

    from sftjob_trainer.speed import compile_payback_tokens

    # This venv has no liger (CI's install leaves out the image's gpu extra): uncompiled
    # runs at the varlen kernel's 33.1k, so compiling pays back after 14.1M tokens.
    assert importlib.util.find_spec("liger_kernel") is None
    assert compile_payback_tokens() == COMPILE_PAYBACK_TOKENS_WITHOUT_LIGER
    # Where liger_kernel is importable (the image), uncompiled is faster: 48.7M.
    (tmp_path / "liger_kernel").mkdir()
    (tmp_path / "liger_kernel" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    assert compile_payback_tokens() == COMPILE_PAYBACK_TOKENS
    assert COMPILE_PAYBACK_TOKENS > 3 * COMPILE_PAYBACK_TOKENS_WITHOUT_LIGER
    # Turned off, liger trains nothing: uncompiled runs at the varlen kernel's rate again.
    assert compile_payback_tokens("off") == COMPILE_PAYBACK_TOKENS_WITHOUT_LIGER


def test_a_short_run_compiles_only_with_a_warm_cache() -> None:
    # The seed's reference job: 189 planned steps x 16 sequences x 2048 = 6.2M tokens per GPU,
    # under the measured break-even; a cold compile would make it finish later.
    payback = COMPILE_PAYBACK_TOKENS
    short = Job(
        **{**SEED_REFERENCE_JOB.__dict__, "run_tokens_per_gpu": 189 * 16 * 2048}
        | {"compile_payback_tokens": payback}
    )
    auto = SpeedOptions()
    cold = decide(auto, H100, replace(short, compile_cache_warm=False), QWEN_15B)
    reason = cold.summary()["compile"]["reason"]
    assert not cold.on("compile")
    # Uncompiled, the varlen kernel attends: nothing compiles, nothing is padded.
    assert cold.on("varlenAttention") and not cold.on("flexAttention")
    assert cold.static_length is None
    assert "6.2M tokens per GPU" in reason and f"{payback / 1e6:.1f}M" in reason
    # With the varlen kernel off, flex attention compiles its own kernels, padded to one
    # shape (static_batches.py).
    flex = decide(
        SpeedOptions(varlenAttention="off"),
        H100,
        replace(short, compile_cache_warm=False),
        QWEN_15B,
    )
    assert flex.static_length == 4 * 2048
    assert "padded to 8192 tokens" in flex.summary()["flexAttention"]["reason"]
    # Uncompiled, the levers that stand in for inductor's fusions are wanted again.
    assert "compiled" not in cold.summary()["ligerKernel"]["reason"]
    warm = decide(auto, H100, replace(short, compile_cache_warm=True), QWEN_15B)
    assert warm.on("compile") and warm.static_length is not None
    assert warm.on("flexAttention") and not warm.on("varlenAttention")
    # Not looked up yet (the planner's first pass), a long run, or no plan: compiled.
    assert decide(auto, H100, short, QWEN_15B).on("compile")
    long = replace(short, run_tokens_per_gpu=payback, compile_cache_warm=False)
    assert decide(auto, H100, long, QWEN_15B).on("compile")
    unknown = replace(short, run_tokens_per_gpu=None, compile_cache_warm=False)
    assert decide(auto, H100, unknown, QWEN_15B).on("compile")
    # compile: on is the user's word, short run or not.
    forced = decide(
        SpeedOptions(compile="on"), H100, replace(short, compile_cache_warm=False), QWEN_15B
    )
    assert forced.on("compile")


def test_light_metrics_and_liger_rules() -> None:
    cpu = Hardware(cuda=False, memory_gib=24.0)
    assert not decide(SpeedOptions(), cpu, SEED_REFERENCE_JOB, QWEN_15B).on("lightMetrics")
    assert decide(SpeedOptions(lightMetrics="on"), cpu, SEED_REFERENCE_JOB, QWEN_15B).on(
        "lightMetrics"
    )
    assert not decide(SpeedOptions(lightMetrics="off"), H100, SEED_REFERENCE_JOB, QWEN_15B).on(
        "lightMetrics"
    )
    # The user's own NaN filter setting is kept.
    own = Job(**{**SEED_REFERENCE_JOB.__dict__, "extra_args": ("logging_nan_inf_filter",)})
    assert "logging_nan_inf_filter" not in decide(SpeedOptions(), H100, own, QWEN_15B).sft_kwargs()
    # Without compile, liger is wanted where it is installed (not in this test venv).
    plan = decide(SpeedOptions(compile="off"), H100, SEED_REFERENCE_JOB, QWEN_15B)
    assert "compiled" not in plan.summary()["ligerKernel"]["reason"]


def test_data_workers_rules() -> None:
    cpu = Hardware(cuda=False, memory_gib=24.0, cpus=2.0)
    assert not decide(SpeedOptions(), cpu, SEED_REFERENCE_JOB, QWEN_15B).on("dataWorkers")
    assert (
        "CUDA"
        in decide(SpeedOptions(), cpu, SEED_REFERENCE_JOB, QWEN_15B).summary()["dataWorkers"][
            "reason"
        ]
    )
    forced = decide(SpeedOptions(dataWorkers="on"), cpu, SEED_REFERENCE_JOB, QWEN_15B)
    assert forced.sft_kwargs()["dataloader_num_workers"] == 2
    roomy = Hardware(cuda=True, memory_gib=79.1, cpus=16.0)
    assert decide(SpeedOptions(), roomy, SEED_REFERENCE_JOB, QWEN_15B).on("dataWorkers")
    cramped = Hardware(cuda=True, memory_gib=79.1, cpus=3.0)
    plan = decide(SpeedOptions(), cramped, SEED_REFERENCE_JOB, QWEN_15B)
    assert not plan.on("dataWorkers") and "3 CPUs" in plan.summary()["dataWorkers"]["reason"]
    assert not decide(SpeedOptions(dataWorkers="off"), roomy, SEED_REFERENCE_JOB, QWEN_15B).on(
        "dataWorkers"
    )
    own = Job(**{**SEED_REFERENCE_JOB.__dict__, "extra_args": ("dataloader_num_workers",)})
    assert "dataloader_num_workers" not in decide(SpeedOptions(), roomy, own, QWEN_15B).sft_kwargs()
    own = Job(**{**SEED_REFERENCE_JOB.__dict__, "extra_args": ("dataloader_persistent_workers",)})
    kwargs = decide(SpeedOptions(), roomy, own, QWEN_15B).sft_kwargs()
    assert kwargs["dataloader_num_workers"] == 2 and "dataloader_persistent_workers" not in kwargs


def test_cpus_per_process_reads_the_cgroup_quota() -> None:
    assert cpus_per_process({}, "400000 100000") == 4.0
    assert cpus_per_process({"LOCAL_WORLD_SIZE": "2"}, "800000 100000") == 4.0
    assert cpus_per_process({}, "150000 100000") == 1.5
    # No quota ("max") or no cgroup v2 file: the cores this process may run on.
    assert cpus_per_process({}, "max 100000") == float(len(os.sched_getaffinity(0)))
    assert cpus_per_process({}, "") == float(len(os.sched_getaffinity(0)))


def test_memory_cap_from_env() -> None:
    assert usable_memory_gib(139.8, {}) == 139.8
    assert usable_memory_gib(139.8, {"SFTJOB_GPU_MEMORY_GIB": "80"}) == 80.0
    assert usable_memory_gib(40.0, {"SFTJOB_GPU_MEMORY_GIB": "80"}) == 40.0
    with pytest.raises(ConfigError, match="SFTJOB_GPU_MEMORY_GIB"):
        usable_memory_gib(139.8, {"SFTJOB_GPU_MEMORY_GIB": "lots"})


@pytest.mark.parametrize("per_device,accumulation", [(2, 8), (1, 12), (3, 5), (4, 4), (1, 1)])
@pytest.mark.parametrize("memory", [24.0, 40.0, 79.1, 139.8])
@pytest.mark.parametrize("method", ["full", "lora"])
def test_micro_batch_keeps_the_effective_batch_exact(
    per_device: int, accumulation: int, memory: float, method: str
) -> None:
    job = Job(
        **{
            **SEED_REFERENCE_JOB.__dict__,
            "per_device": per_device,
            "accumulation": accumulation,
            "method": method,
        }
    )
    choice = micro_batch(SpeedOptions(), Hardware(True, memory), job, QWEN_15B, True)
    if choice.on:
        sft = choice.sft
        assert sft["per_device_train_batch_size"] * sft["gradient_accumulation_steps"] == (
            per_device * accumulation
        )
        assert sft["per_device_train_batch_size"] * 2048 <= 16384


def test_micro_batch_reason_states_the_jobs_effective_batch_over_all_processes() -> None:
    one = micro_batch(SpeedOptions(), H100, SEED_REFERENCE_JOB, QWEN_15B, True)
    assert "per_device 4 x accumulation 4 (effective 16 kept)" in one.reason
    # Two GPUs: each process keeps 2 x 8; the status's plan says effective 32.
    two = Job(**{**SEED_REFERENCE_JOB.__dict__, "world_size": 2})
    reason = micro_batch(SpeedOptions(), H100, two, QWEN_15B, True).reason
    assert "per_device 4 x accumulation 4 x 2 processes (effective 32 kept)" in reason


def test_micro_batch_respects_switches_and_spec() -> None:
    sparse = True
    assert not micro_batch(
        SpeedOptions(autoMicroBatch="off"), H100, SEED_REFERENCE_JOB, QWEN_15B, sparse
    ).on
    assert not micro_batch(SpeedOptions(), H100, SEED_REFERENCE_JOB, QWEN_15B, False).on  # SDPA
    shrunk = Job(**{**SEED_REFERENCE_JOB.__dict__, "shrunk": True})
    assert "OOM" in micro_batch(SpeedOptions(), H100, shrunk, QWEN_15B, sparse).reason
    fsdp = Job(**{**SEED_REFERENCE_JOB.__dict__, "distributed": "fsdp"})
    assert not micro_batch(SpeedOptions(), H100, fsdp, QWEN_15B, sparse).on
    no_ckpt = Job(**{**SEED_REFERENCE_JOB.__dict__, "checkpointing": False})
    small = Hardware(True, 24.0)
    choice = micro_batch(SpeedOptions(), small, no_ckpt, QWEN_15B, sparse)
    assert choice.sft.get("gradient_checkpointing") is not True  # never turned on
    assert not micro_batch(
        SpeedOptions(), H100, SEED_REFERENCE_JOB, None, sparse
    ).on  # shape unknown


def test_extra_args_win_over_levers() -> None:
    job = Job(
        **{**SEED_REFERENCE_JOB.__dict__, "extra_args": ("use_liger_kernel", "torch_compile")}
    )
    plan = decide(SpeedOptions(ligerKernel="on", compile="on"), H100, job, QWEN_15B)
    assert "use_liger_kernel" not in plan.sft_kwargs()
    assert "torch_compile" not in plan.sft_kwargs()


def test_speed_options_from_env() -> None:
    class Spec:
        class training:  # noqa: N801
            speed = None

    assert options_from(Spec, {}) == SpeedOptions()
    opts = options_from(Spec, {"SFTJOB_SPEED": '{"flexAttention": false, "compile": true}'})
    assert opts.flexAttention == "off" and opts.compile == "on"
    for bad in ("{", "[]", '{"flex": "on"}', '{"ligerKernel": "maybe"}'):
        with pytest.raises(ConfigError):
            options_from(Spec, {"SFTJOB_SPEED": bad})


def test_compiled_kernels_kept_on_the_output_volume() -> None:
    env: dict[str, str] = {}
    assert keep_compiled_kernels("/out", env) == "/out/.sftjob-cache/torchinductor"
    assert env["TRITON_CACHE_DIR"] == "/out/.sftjob-cache/triton"  # liger's and TRL's kernels
    env = {"TORCHINDUCTOR_CACHE_DIR": "/cache", "TRITON_CACHE_DIR": "/triton"}
    assert keep_compiled_kernels("/out", env) == "/cache"  # the platform's own choice wins
    assert env["TRITON_CACHE_DIR"] == "/triton"


def test_report_flags_sides_that_saw_different_data() -> None:
    settings = {
        "device": "cpu",
        "steps": 2,
        "timed_steps": 1,
        "per_device": 2,
        "accumulation": 8,
        "gradient_checkpointing": True,
        "attn_implementation": "sdpa",
    }
    side = {"case": "cpu-smoke", "tokens_per_s": 10.0, "settings": settings, "losses": [2.0, 1.0]}
    lines = [
        {**side, "side": "reference", "tokens_total": 100},
        {**side, "side": "sftjob", "tokens_per_s": 25.0, "tokens_total": 90, "losses": [2.0, 1.1]},
        {
            "check": "packed_isolation",
            "attn_implementation": "sdpa",
            "max_abs_diff": 3e-7,
            "leak_if_unmasked": 0.77,
        },
    ]
    text = report(lines)
    assert "2.50x" in text and "NOT the same" in text
    assert "Largest relative loss difference: 1.0e-01" in text
    assert "| sdpa | 3.0e-07 | 0.77 |" in text


def test_throughput_script_runs_and_reports(tmp_path) -> None:
    # bench/throughput.sh is what a device call runs; here with the CPU case only.
    root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [
            "bash",
            str(root / "bench" / "throughput.sh"),
            str(tmp_path),
            "smoke|180|--case cpu-smoke --steps 2 --sides sftjob "
            '--extra-args {"dataloader_num_workers": 0}',
        ],
        env={**os.environ, "PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / "exits.txt").read_text().strip() == "smoke: exit 0"
    line = json.loads((tmp_path / "smoke.jsonl").read_text().splitlines()[-1])
    assert line["settings"]["extra_args"] == {"dataloader_num_workers": 0}
    report_text = (tmp_path / "report.md").read_text()
    assert "### smoke" in report_text and "extraArgs" in report_text


def test_logging_steps_apply_to_both_sides() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "sftjob_bench.bench", "--case", "cpu-smoke", "--steps", "4"]
        + ["--logging-steps", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    sides = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert [side["side"] for side in sides] == ["reference", "sftjob"]
    ref, ours = sides
    for side in sides:
        assert side["settings"]["logging_steps"] == 2
        assert len(side["losses"]) == 2  # steps 2 and 4, each the mean of its two steps
    for a, b in zip(ref["losses"], ours["losses"], strict=True):
        assert abs(a - b) < 1e-3
    # The report labels each logged loss with its step.
    rows = [row for row in report(sides).splitlines() if row[:4] in ("| 1 ", "| 2 ", "| 4 ")]
    assert [row.split("|")[1].strip() for row in rows] == ["2", "4"]
    assert f"{ref['losses'][1]:.4f}" in rows[1]


def test_sync_report_counts_each_call_stack(tmp_path) -> None:
    import types
    import warnings

    from sftjob_bench.bench import make_sync_report

    def copy_to_device() -> None:
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    def read_loss() -> None:
        warnings.warn("called a synchronizing CUDA operation", UserWarning, stacklevel=1)

    modes: list[str] = []
    report = tmp_path / "syncs.txt"
    callback = make_sync_report(5, 2, report, set_mode=modes.append)
    state = types.SimpleNamespace(global_step=4)
    shown: list[str] = []
    with warnings.catch_warnings():
        warnings.simplefilter("default")

        def show(message, *args, **kwargs) -> None:
            shown.append(str(message))

        warnings.showwarning = show
        filters = warnings.filters[:]
        callback.on_step_end(None, state, None)  # before the window: nothing switched
        assert modes == []
        state.global_step = 5
        callback.on_step_end(None, state, None)
        assert modes == ["warn"] and warnings.showwarning is not show
        for _ in range(3):
            copy_to_device()
        read_loss()
        warnings.warn("unrelated", UserWarning, stacklevel=1)
        assert shown == ["unrelated"]  # passed on to the handler that was there, not counted
        state.global_step = 6
        callback.on_step_end(None, state, None)
        assert modes == ["warn"] and not report.exists()
        state.global_step = 7
        callback.on_step_end(None, state, None)
        assert modes == ["warn", "default"]
        assert warnings.showwarning is show and warnings.filters == filters
        text = report.read_text()
        assert text.startswith("4 syncs in 2 steps")
        blocks = text.split("--- ")[1:]
        assert len(blocks) == 2
        assert blocks[0].startswith("3 times") and "in copy_to_device" in blocks[0]
        assert blocks[1].startswith("1 times") and "in read_loss" in blocks[1]
        assert not any("in record" in block or "warnings.py" in block for block in blocks)
        copy_to_device()  # after the window: shown as before, not counted
        assert shown[-1].startswith("called a synchronizing")
        assert report.read_text() == text

    # Training that ends inside the window still writes the report and switches back.
    modes.clear()
    early = make_sync_report(5, 2, tmp_path / "early.txt", set_mode=modes.append)
    with warnings.catch_warnings():
        state.global_step = 5
        early.on_step_end(None, state, None)
        read_loss()
        early.on_train_end(None, state, None)
    assert modes == ["warn", "default"]
    assert (tmp_path / "early.txt").read_text().startswith("1 syncs in 2 steps")


def bench_script(name: str) -> Any:
    """A standalone script of bench/, imported as a module."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_attention_variants_pack_the_full_case_into_whole_micro_batches() -> None:
    module = bench_script("attention_variants")
    batches = module.packed_batches(3)
    assert len(batches) == 3
    for docs in batches:
        # One micro-batch: 4 rows of 2048 tokens, padding as one-token documents.
        assert sum(docs) == module.ROWS * module.WIDTH
        assert max(docs) <= module.WIDTH and min(docs) >= 1
        assert sum(doc for doc in docs if doc > 1) > module.ROWS * module.WIDTH // 2  # not padding
    # Causal attention inside each document: 4 * heads * dim * n(n+1)/2 per document.
    assert module.causal_flops([2, 1]) == 4 * 12 * 128 * (3 + 1)


def test_gradient_check_on_cpu_finds_the_fused_layers_equal_to_autocast() -> None:
    # On CPU the fused layers multiply in bf16 and add, autocast's arithmetic: their
    # errors against float64 must equal autocast's, and both must be real (non-zero) and
    # small, so the GPU run's comparison (fp32 products) means something.
    import torch

    result = bench_script("gradient_check").check(torch.device("cpu"), compiled=False)
    assert result["matmul_adds_in_fp32"] == "no fp32-output matmul on cpu"
    assert result["same_parameters_have_gradients"]
    errors = result["relative_error_against_float64"]
    assert set(errors) == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.1.mlp.down_proj.weight",
        "model.layers.0.self_attn.q_proj.bias",
    }
    for name, runs in errors.items():
        assert runs["fused"] == runs["autocast"], name
        assert 1e-5 < runs["autocast"] < 0.05, (name, runs)


def test_acceptance_judges_issue_7_done_when(tmp_path) -> None:
    import copy

    from sftjob_bench.bench_report import acceptance, main, read_lines

    measured = read_lines(BENCH_RESULTS / "2026-11-28-h200-session5" / "call7-full.jsonl")
    verdicts = {criterion: passed for criterion, passed, _ in acceptance(measured)}
    # Session 5's run passes everything but the card: it is an H200, not an H100.
    assert verdicts == {
        "card is an H100": False,
        "same data on both sides": True,
        "speed-up at least 3.5x (full)": True,
        "losses agree within 1%": True,
        "packed sequences isolated (each attention)": True,
    }

    def variant(change) -> list[dict]:
        lines = copy.deepcopy(measured)
        for line in lines:
            if "side" in line:
                line["settings"]["device"] = "NVIDIA H100 80GB HBM3"
        change(lines)
        return lines

    def failures(lines: list[dict]) -> list[str]:
        return [criterion for criterion, passed, _ in acceptance(lines) if not passed]

    on_h100 = variant(lambda lines: None)
    assert failures(on_h100) == []
    path = tmp_path / "h100.jsonl"
    path.write_text("\n".join(json.dumps(line) for line in on_h100))
    assert main(["--check", str(path)]) == 0
    assert (
        main(
            [
                str(path),
                "--check",
                str(BENCH_RESULTS / "2026-11-28-h200-session5" / "call7-full.jsonl"),
            ]
        )
        == 1
    )

    def slower(lines: list[dict]) -> None:
        lines[-1]["tokens_per_s"] = lines[-2]["tokens_per_s"] * 3.4

    def drifting(lines: list[dict]) -> None:
        lines[-1]["losses"][10] *= 1.02

    def other_data(lines: list[dict]) -> None:
        lines[-1]["tokens_total"] += 1

    assert failures(variant(slower)) == ["speed-up at least 3.5x (full)"]
    assert failures(variant(drifting)) == ["losses agree within 1%"]
    assert failures(variant(other_data)) == ["same data on both sides"]
    no_isolation = [line for line in on_h100 if "side" in line]
    assert failures(no_isolation) == ["packed sequences isolated (each attention)"]
    assert failures([on_h100[-1]]) == ["both sides in the same run"]
    # LoRA: its own bar (3x), and no isolation check asked of it.
    lora = variant(lambda lines: None)
    for line in lora:
        line["case"] = "lora"
    lora[-1]["tokens_per_s"] = lora[-2]["tokens_per_s"] * 3.1
    lora = [line for line in lora if "side" in line]
    assert failures(lora) == []


def test_report_names_the_weight_copies_when_on() -> None:
    from sftjob_bench.bench_report import describe

    settings = {
        "per_device": 4,
        "accumulation": 4,
        "gradient_checkpointing": False,
        "attn_implementation": "flex_attention",
        "speed": {"castWeightsOncePerStep": {"on": True, "reason": "on"}},
    }
    assert describe(settings).endswith("weights cast once per step")
    settings["speed"] = {"castWeightsOncePerStep": {"on": False, "reason": "off"}}
    assert "weights cast" not in describe(settings)
    settings["speed"] = {"bf16ResidualStream": {"on": True, "reason": "on"}}
    assert describe(settings).endswith("bf16 residual stream")
    settings["speed"] = {"bf16ResidualStream": {"on": False, "reason": "off"}}
    assert "residual" not in describe(settings)
    settings["speed"] = {"fuseGradientAccumulation": {"on": True, "reason": "on"}}
    assert describe(settings).endswith("gradients accumulated in the matmul")
    settings["speed"] = {"fuseGradientAccumulation": {"on": False, "reason": "off"}}
    assert "accumulated" not in describe(settings)
    settings["speed"] = {"fp8Matmuls": {"on": True, "reason": "on"}}
    assert describe(settings).endswith("fp8 matmuls")
    settings["speed"] = {"fp8Matmuls": {"on": False, "reason": "off"}}
    assert "fp8" not in describe(settings)


def failed_checks(session: str, name: str) -> list[str]:
    """The issue's criteria that a stored run of docs/bench-results fails."""
    from sftjob_bench.bench_report import acceptance, read_lines

    lines = read_lines(BENCH_RESULTS / session / name)
    return [criterion for criterion, passed, _ in acceptance(lines) if not passed]


def test_check_on_session_6_runs() -> None:
    def failed(name: str) -> list[str]:
        return failed_checks("2026-11-28-h200-session6", name)

    # The defaults (call 4): all but the card. Call 2's reference ran at 15.3k: 3.34x.
    assert failed("call4-full.jsonl") == ["card is an H100"]
    assert failed("call2-full.jsonl") == ["card is an H100", "speed-up at least 3.5x (full)"]
    assert failed("call2-lora.jsonl") == ["card is an H100"]


def test_check_on_session_7_runs() -> None:
    def failed(name: str) -> list[str]:
        return failed_checks("2026-11-28-h200-session7", name)

    # The defaults with the gradient sums in the matmul (call 2) and before them (call 1),
    # and LoRA (call 3): all but the card. A one-sided A/B file is not a comparison.
    assert failed("call2-full.jsonl") == ["card is an H100"]
    assert failed("call1-full.jsonl") == ["card is an H100"]
    assert failed("call3-lora.jsonl") == ["card is an H100"]
    assert failed("call2-g1-fuse-on.jsonl") == ["both sides in the same run"]


def test_the_tokenizing_bench_times_both_and_packs_the_same_rows() -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "bench" / "tokenizing_processes.py"
    result = subprocess.run(
        [sys.executable, str(script), "--rows", "300", "--processes", "2"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["rows"] == 300 and line["same_rows"] is True
    assert sorted(line["seconds"]) == ["1", "2"]
    assert all(len(runs) == 2 and min(runs) > 0 for runs in line["seconds"].values())


def test_the_startup_probe_times_each_save_and_compares_the_files(tmp_path: Path) -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[2] / "bench" / "startup_probe.py"
    result = subprocess.run(
        [sys.executable, str(script), "--device", "cpu", "--skip", "imports"]
        + ["--save-dir", str(tmp_path / "saves"), "--threads", "2", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    line = json.loads(result.stdout.strip().splitlines()[-1])
    assert line["probe"] == "save" and line["bytes"] > 0
    assert sorted(line["seconds"]) == ["plain", "plain_again", "threads_2", "threads_4"]
    # Every threaded save wrote transformers' own file, byte for byte.
    assert line["same_file"] == {"threads_2": True, "threads_4": True, "plain_again": True}
    assert not (tmp_path / "saves").exists()  # the probe leaves no 6 GB behind
