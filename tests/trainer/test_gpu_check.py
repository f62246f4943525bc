"""The GPU check's harness on CPU (`--smoke`): the real entrypoint, the losses it reads back."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from sftjob_bench.gpu_check import (
    clear_previous_run,
    job_manifest,
    logged_losses,
    mfu_per_gpu,
    progress_reports,
    trainer_env,
)
from sftjob_operator.api import parse_sftjob


def write_state(checkpoint: Path, history: list[dict]) -> None:
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text(json.dumps({"log_history": history}))


def test_logged_losses_come_from_the_newest_complete_checkpoint(tmp_path):
    write_state(tmp_path / "checkpoint-2", [{"step": 2, "loss": 9.0}])
    write_state(
        tmp_path / "checkpoint-10",
        [{"step": 5, "loss": 3.5}, {"step": 10, "loss": 3.0}, {"step": 10, "train_runtime": 1}],
    )
    (tmp_path / "checkpoint-12").mkdir()  # killed mid-write: no trainer_state.json
    assert logged_losses(tmp_path) == {"5": 3.5, "10": 3.0}
    assert logged_losses(tmp_path / "missing") == {}


def test_the_manifest_carries_the_accumulation_logging_interval_and_extra_args(tmp_path):
    spec = job_manifest(
        tmp_path / "m",
        tmp_path / "d",
        7,
        2,
        accumulation=16,
        logging_steps=1,
        extra_args={"ddp_find_unused_parameters": False},
    )
    job = parse_sftjob(spec)  # a valid SFTJob, extraArgs included
    assert job.spec.training.extraArgs == {"ddp_find_unused_parameters": False}
    training = spec["spec"]["training"]
    assert training["gradientAccumulationSteps"] == 16
    assert training["loggingSteps"] == 1
    assert training["maxSteps"] == 7
    assert spec["spec"]["resources"]["gpusPerNode"] == 2


def test_a_previous_runs_results_are_cleared_and_the_kernel_cache_kept(tmp_path):
    output = tmp_path / "output"
    for name in ("checkpoints/checkpoint-3", "final", ".sftjob-cache/torchinductor"):
        (output / name).mkdir(parents=True)
    (output / "progress.jsonl").write_text("{}\n")
    (output / ".sftjob-cache" / "torchinductor" / "kernel.py").write_text("# compiled")
    termination = tmp_path / "termination.json"
    termination.write_text("{}")
    clear_previous_run(output, termination)
    assert sorted(p.name for p in output.iterdir()) == [".sftjob-cache"]
    assert (output / ".sftjob-cache" / "torchinductor" / "kernel.py").is_file()
    assert not termination.exists()
    clear_previous_run(tmp_path / "never-ran", termination)  # nothing there: no error


def test_the_trainer_environment_carries_the_memory_cap(tmp_path):
    env = trainer_env({"PATH": "/bin"}, tmp_path, tmp_path / "out", 80.0)
    assert env["PATH"] == "/bin"
    assert env["SFTJOB_GPU_MEMORY_GIB"] == "80.0"
    assert env["SFTJOB_OUTPUT_DIR"] == str(tmp_path / "out")
    assert env["SFTJOB_TERMINATION_LOG"] == str(tmp_path / "termination.json")
    assert "SFTJOB_GPU_MEMORY_GIB" not in trainer_env({}, tmp_path, tmp_path / "out", None)
    # A cap the caller's environment already sets is passed on.
    kept = trainer_env({"SFTJOB_GPU_MEMORY_GIB": "70"}, tmp_path, tmp_path, None)
    assert kept["SFTJOB_GPU_MEMORY_GIB"] == "70"


def test_mfu_is_per_gpu_because_the_rate_counts_every_ranks_tokens():
    one = mfu_per_gpu(1_500_000_000, 50_000.0, 1)
    assert one == round(6 * 1.5e9 * 5e4 / 989e12, 4)
    assert mfu_per_gpu(1_500_000_000, 100_000.0, 2) == one
    assert mfu_per_gpu(1_500_000_000, 50_000.0, 0) == one  # a CPU run: one process


def test_no_progress_file_means_no_reports(tmp_path):
    assert progress_reports(tmp_path) == []
    (tmp_path / "progress.jsonl").write_text(
        json.dumps({"measuredPlan": {}, "progress": {"step": 0}})
        + "\n"
        + json.dumps({"progress": {"step": 2, "tokensPerSecond": 10.0}})
        + "\n"
    )
    assert progress_reports(tmp_path) == [{"step": 0}, {"step": 2, "tokensPerSecond": 10.0}]


def run_smoke(workdir: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sftjob_bench.gpu_check",
            "--smoke",
            "--workdir",
            str(workdir),
            "--rows",
            "300",
            *args,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    lines = result.stdout.strip().splitlines()
    assert lines, result.stderr[-3000:]
    return result, json.loads(lines[-1])


def test_smoke_run_starts_fresh_and_reports_the_logged_losses(tmp_path):
    # An earlier run's checkpoint in the same workdir must not be resumed from.
    write_state(tmp_path / "output" / "checkpoints" / "checkpoint-99", [{"step": 99, "loss": 1.0}])
    result, summary = run_smoke(
        tmp_path,
        *("--steps", "4", "--accumulation", "2", "--logging-steps", "2", "--method", "lora"),
        *("--extra-args", '{"adam_beta2": 0.99}', "--memory-gib", "3"),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # The options reached the config the entrypoint trained from.
    spec = json.loads((tmp_path / "config.json").read_text())["spec"]
    assert spec["method"] == "lora"
    assert spec["training"]["gradientAccumulationSteps"] == 2
    assert spec["training"]["loggingSteps"] == 2
    assert spec["training"]["extraArgs"] == {"adam_beta2": 0.99}
    assert summary["exit_code"] == 0
    assert summary["memory_gib"] == "3.0"  # the cap the trainer's environment carried
    assert summary["steps"] == 4
    assert summary["termination"]["reason"] == "Completed"
    assert "resumed" not in summary["termination"]["message"]
    assert sorted(summary["losses"]) == ["2", "4"]
    assert all(math.isfinite(loss) and loss > 0 for loss in summary["losses"].values())
    assert summary["tokens_per_s"] and summary["tokens_per_s"] > 0


def test_a_run_that_fails_before_training_still_reports_its_outcome(tmp_path):
    result, summary = run_smoke(tmp_path, "--steps", "2", "--extra-args", '{"bogus_field": 1}')
    assert result.returncode != 0
    assert summary["exit_code"] == result.returncode
    assert summary["termination"]["reason"] == "ConfigError"
    assert "bogus_field" in summary["termination"]["message"]
    assert summary["steps"] is None and summary["losses"] == {}
