"""The compile cache that outlives the pod (levers/compile_cache.py), on CPU with inductor."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from lever_jobs import SEED_REFERENCE_JOB
from sftjob_trainer.levers.compile_cache import (
    OUTPUT_CACHE,
    SHARED_CACHE,
    CompileCache,
    cache_dirs,
    cache_key,
    key_facts,
)


def sftjob_run(work: Path, hf_home: Path, **more_env: str) -> dict[str, Any]:
    """The bench's sftjob side of the CPU reference job, compiled, in a fresh process."""
    env = {**os.environ, "HF_HOME": str(hf_home), "SFTJOB_SPEED": json.dumps({"compile": "on"})}
    env.update(more_env)
    # Each job's inductor cache in its own output folder (an earlier test in this process
    # may have pinned one for every child through the environment).
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    done = subprocess.run(
        [sys.executable, "-m", "sftjob_bench.bench", "--case", "reference-job-cpu-smoke"]
        + ["--sides", "sftjob", "--workdir", str(work)],
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = [json.loads(x) for x in done.stdout.splitlines() if x.startswith('{"side"')]
    line["stderr"] = done.stderr
    return line


def test_a_second_job_of_the_same_shape_loads_the_first_ones_kernels(tmp_path) -> None:
    shared = tmp_path / "model-cache"
    first = sftjob_run(tmp_path / "job1", shared)
    cache = first["compile_cache"]["artifacts"]
    assert first["settings"]["torch_compile"] and not first["compile_cache"]["warm"]
    assert cache["loaded_from"] is None and cache["saved_artifacts"] > 0
    assert cache["hits"]["fxgraph_hit"] == 0 and cache["hits"]["fxgraph_miss"] > 0
    blob = f"{cache['key']}.torch-artifacts"
    # Kept with the output and on the shared model-cache volume.
    assert (tmp_path / "job1" / "sftjob" / OUTPUT_CACHE / blob).is_file()
    assert (shared / SHARED_CACHE / blob).is_file()
    assert "compile cache cold" in first["stderr"]
    # Where the first step's seconds went, by torch's own timers (logged after step 1 too).
    assert cache["compile_seconds"]["_compile.compile_inner"] > 0
    assert "compile seconds {'_compile.compile_inner'" in first["stderr"]

    # Another job (its own output folder, so inductor's own cache there is empty).
    second = sftjob_run(tmp_path / "job2", shared)
    warm = second["compile_cache"]["artifacts"]
    assert second["compile_cache"]["files_before"] == 0 and second["compile_cache"]["warm"]
    assert warm["key"] == cache["key"]
    assert warm["loaded_from"] == str(shared / SHARED_CACHE / blob)
    assert warm["loaded_artifacts"] == cache["saved_artifacts"]
    # Every graph came from the cache: nothing compiled again.
    assert warm["hits"]["fxgraph_miss"] == 0 and warm["hits"]["fxgraph_hit"] > 0
    assert warm["hits"]["autograd_miss"] == 0 and warm["hits"]["autograd_hit"] > 0
    assert "compile cache warm" in second["stderr"]
    assert second["losses"] == first["losses"]


def key_of(
    levers: dict[str, bool] | None = None, device: str = "NVIDIA H100 80GB HBM3", **changes: Any
) -> str:
    from transformers import Qwen2Config

    shape = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    config = Qwen2Config(**{**shape, **changes.pop("config", {})}).to_dict()
    config.update(changes.pop("config_json", {}))
    run = {"per_device": 2, "max_length": 256, "pad_to_multiple_of": 512, "bf16": True, **changes}
    levers = {"compile": True, "rotaryTablesOnce": False} if levers is None else levers
    return cache_key(key_facts(config, device, run, levers))


def test_the_key_follows_what_decides_the_kernels() -> None:
    base = key_of()
    assert base == key_of()
    # The model's path is not a kernel fact: the same shape elsewhere shares the kernels.
    assert key_of(config_json={"_name_or_path": "/elsewhere"}) == base
    assert key_of(config={"num_hidden_layers": 3}) != base
    assert key_of(config={"hidden_size": 128}) != base
    assert key_of(per_device=4) != base
    assert key_of(device="NVIDIA H200") != base
    assert key_of(lora={"r": 16}) != base
    assert key_of({"compile": True, "rotaryTablesOnce": True}) != base


def test_the_planner_compiles_a_short_run_only_with_its_artifacts_at_hand(tmp_path) -> None:
    from sftjob_trainer.speed import (
        Hardware,
        ModelShape,
        SpeedOptions,
        decide,
        planned_with_compile_cache,
    )

    h100 = Hardware(cuda=True, memory_gib=79.1, name="NVIDIA H100 80GB HBM3")
    shape = ModelShape(
        params=1_543_655_424, hidden=1536, layers=28, intermediate=8960, vocab=151_936
    )
    short = replace(
        SEED_REFERENCE_JOB, run_tokens_per_gpu=6_000_000, compile_payback_tokens=9_750_000
    )
    dirs = [tmp_path / "out" / OUTPUT_CACHE, tmp_path / "shared" / SHARED_CACHE]
    asked: list[bool | None] = []

    def planned(job: Any) -> Any:
        asked.append(job.compile_cache_warm)
        return decide(SpeedOptions(), h100, job, shape)

    def key(plan: Any) -> str:
        return f"{plan.kernels_lever}-{plan.static_length}"

    cold = planned_with_compile_cache(planned, short, key, dirs)
    assert asked == [None, False]
    # Not compiled: the varlen kernel attends in flex attention's place, nothing to compile
    # and so nothing to keep.
    assert not cold.on("compile") and cold.on("varlenAttention")
    assert cold.kernels_lever is None and cold.compile_cache_key is None
    # Another job of the shape left its artifacts on the shared volume: compiled, under the key.
    expected = key(decide(SpeedOptions(), h100, short, shape))
    dirs[1].mkdir(parents=True)
    (dirs[1] / f"{expected}.torch-artifacts").write_bytes(b"artifacts")
    asked.clear()
    warm = planned_with_compile_cache(planned, short, key, dirs)
    assert asked == [None, True]
    assert warm.on("compile") and warm.compile_cache_key == expected == "compile-8192"
    # A run the first pass does not compile is never looked up.
    asked.clear()
    off = planned_with_compile_cache(
        lambda job: (
            asked.append(job.compile_cache_warm),
            decide(SpeedOptions(compile="off", varlenAttention="off"), h100, job, shape),
        )[1],
        short,
        key,
        dirs,
    )
    # Flex attention's own kernels are kept under the uncompiled plan's key.
    assert asked == [None] and off.compile_cache_key == "flexAttention-8192"
    # Nothing compiled at all (neither the model nor flex attention): no key.
    plain = SpeedOptions(compile="off", flexAttention="off")
    none = planned_with_compile_cache(lambda job: decide(plain, h100, job, shape), short, key, dirs)
    assert none.kernels_lever is None and none.compile_cache_key is None


def test_another_keys_artifacts_are_never_loaded(tmp_path) -> None:
    (tmp_path / "k1.torch-artifacts").write_bytes(b"artifacts of another shape")
    cache = CompileCache("k2", [tmp_path])
    assert cache.load() is False
    assert cache.summary()["warm"] is False and cache.loaded_artifacts == 0


def test_a_corrupt_blob_is_a_warning_and_a_cold_start(tmp_path, caplog) -> None:
    output, shared = tmp_path / "out", tmp_path / "shared"
    output.mkdir()
    shared.mkdir()
    (output / "k.torch-artifacts").write_bytes(b"\x00torn write")
    cache = CompileCache("k", [output, shared])
    with caplog.at_level(logging.WARNING, logger="sftjob_trainer.speed"):
        assert cache.load() is False
    assert any("unreadable, ignored" in r.message for r in caplog.records)
    assert cache.notes and "torn" not in cache.describe() and "cold" in cache.describe()
    # Saving replaces the torn file with what this process compiled (nothing, when this
    # test runs alone), never raising.
    written = cache.save()
    assert written >= 0 and (written == 0 or CompileCache("k", [output]).load())


def test_the_scratch_hf_home_is_not_a_shared_cache(tmp_path) -> None:
    assert cache_dirs("/out", {}) == [Path("/out") / OUTPUT_CACHE]
    assert cache_dirs("/out", {"HF_HOME": "/tmp/hf-home"}) == [Path("/out") / OUTPUT_CACHE]
    assert cache_dirs("/out", {"HF_HOME": "/models"}) == [
        Path("/out") / OUTPUT_CACHE,
        Path("/models") / SHARED_CACHE,
    ]


def test_status_speed_plan_says_whether_the_cache_was_warm() -> None:
    from sftjob_trainer.speed import Hardware, SpeedOptions, decide, speed_plan_status

    job = replace(SEED_REFERENCE_JOB, max_length=256, bf16=False)
    plan = decide(SpeedOptions(compile="on"), Hardware(cuda=False, memory_gib=8.0), job, None)
    args = SimpleNamespace(
        per_device_train_batch_size=2,
        gradient_accumulation_steps=8,
        gradient_checkpointing=True,
        torch_compile=True,
    )
    model = SimpleNamespace(config=SimpleNamespace(_attn_implementation="sdpa"))
    trainer = SimpleNamespace(args=args, model=model)
    trainer.sftjob_speed_plan = plan
    reason = {lever["name"]: lever["reason"] for lever in speed_plan_status(trainer)["levers"]}
    assert not reason["compile"].startswith("compile cache")  # no cache in use: as before
    cache = CompileCache("0123456789abcdef", [])
    trainer.sftjob_compile_cache = cache
    reason = {lever["name"]: lever["reason"] for lever in speed_plan_status(trainer)["levers"]}
    assert reason["compile"].startswith("compile cache cold (key 01234567; saved after")
    cache.loaded_from, cache.loaded_artifacts = "/models/x", 8
    reason = {lever["name"]: lever["reason"] for lever in speed_plan_status(trainer)["levers"]}
    assert reason["compile"].startswith("compile cache warm (8 artifacts, key 01234567)")
    assert len(reason["compile"]) <= 256


def test_regional_compilation_compiles_the_layers_and_keeps_the_losses(tmp_path) -> None:
    # compile_model.compile_regions: each decoder layer compiled once, in place. With the
    # lean LM head on, as on a GPU: it replaces the model's forward, which accelerate's own
    # regional compile (a new model object) then bypassed, compiling nothing at all.
    lean = json.dumps({"compile": "on", "lightMetrics": "on"})
    whole = sftjob_run(tmp_path / "whole", tmp_path / "shared", SFTJOB_SPEED=lean)
    regional = sftjob_run(
        tmp_path / "regional", tmp_path / "shared", SFTJOB_SPEED=lean, SFTJOB_COMPILE_REGIONS="on"
    )
    assert "regional compilation (2 repeated blocks compiled in place" in regional["stderr"]
    assert "regional compilation" not in whole["stderr"]
    assert regional["settings"]["torch_compile"]
    hits = regional["compile_cache"]["artifacts"]["hits"]
    assert hits["fxgraph_miss"] > 0 and hits["autograd_miss"] > 0  # the layers did compile
    # One layer's graphs (forward, backward), fewer than the whole model's.
    whole_hits = whole["compile_cache"]["artifacts"]["hits"]
    assert hits["fxgraph_miss"] < whole_hits["fxgraph_miss"]
    assert len(whole["losses"]) >= 3
    assert regional["losses"] == pytest.approx(whole["losses"], rel=1e-5)
    # Another graph set: its own key, so neither loads the other's artifacts.
    assert (
        regional["compile_cache"]["artifacts"]["key"] != whole["compile_cache"]["artifacts"]["key"]
    )
    assert regional["compile_cache"]["artifacts"]["loaded_from"] is None


def test_the_run_length_comes_from_the_plan_else_from_the_rows(make_config) -> None:
    from sftjob_trainer.settings import load_config
    from sftjob_trainer.speed import run_tokens_per_gpu

    planned = load_config(make_config({"dataset": {"limit": 64}, "training": {"maxLength": 128}}))
    steps = planned.plan["totalSteps"]
    assert steps and run_tokens_per_gpu(planned, 16) == steps * 16 * 128
    # Rows the operator could not count (a path without limit or numSamples): the trainer's
    # rows x epochs, maxLength each.
    epochs = load_config(make_config({"training": {"maxLength": 128, "numTrainEpochs": 2.5}}))
    unplanned = replace(epochs, raw={**epochs.raw, "plan": {**epochs.plan, "totalSteps": None}})
    assert run_tokens_per_gpu(unplanned, 16) is None
    assert run_tokens_per_gpu(unplanned, 16, dataset_rows=1000) == 2500 * 128
    training = unplanned.spec.training.model_copy(update={"maxSteps": 7})
    capped = replace(unplanned, spec=unplanned.spec.model_copy(update={"training": training}))
    assert run_tokens_per_gpu(capped, 16, dataset_rows=1000) == 7 * 16 * 128


def test_the_cache_turned_off_is_neither_looked_up_nor_used(tmp_path, monkeypatch) -> None:
    from sftjob_trainer.levers.compile_cache import enabled
    from sftjob_trainer.levers.contract import Choice
    from sftjob_trainer.speed import SpeedPlan

    assert enabled({}) and enabled({"SFTJOB_COMPILE_CACHE": "on"})
    assert not enabled({"SFTJOB_COMPILE_CACHE": "OFF"})
    plan = SpeedPlan(
        (Choice("compile", True, "on"),), output_dir=str(tmp_path), compile_cache_key="k"
    )

    def trainer() -> Any:
        callbacks: list[Any] = []
        return SimpleNamespace(
            callbacks=callbacks,
            add_callback=callbacks.append,
            is_world_process_zero=lambda: True,
        )

    used = trainer()
    plan.apply(used)
    assert used.sftjob_compile_cache.key == "k" and len(used.callbacks) == 1
    monkeypatch.setenv("SFTJOB_COMPILE_CACHE", "off")
    unused = trainer()
    plan.apply(unused)
    assert not hasattr(unused, "sftjob_compile_cache") and unused.callbacks == []
