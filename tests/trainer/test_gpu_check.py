"""The GPU check's harness on CPU (`--smoke`): the real entrypoint, the losses it reads back."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

from sftjob_operator.api import parse_sftjob
from sftjob_trainer.gpu_check import job_manifest, logged_losses


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


def test_smoke_run_starts_fresh_and_reports_the_logged_losses(tmp_path):
    # An earlier run's checkpoint in the same workdir must not be resumed from.
    write_state(tmp_path / "output" / "checkpoints" / "checkpoint-99", [{"step": 99, "loss": 1.0}])
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "sftjob_trainer.gpu_check",
            "--smoke",
            "--workdir",
            str(tmp_path),
            "--steps",
            "4",
            "--rows",
            "300",
            "--accumulation",
            "2",
            "--logging-steps",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["exit_code"] == 0
    assert summary["accumulation"] == 2
    assert summary["steps"] == 4
    assert summary["termination"]["reason"] == "Completed"
    assert "resumed" not in summary["termination"]["message"]
    assert sorted(summary["losses"]) == ["2", "4"]
    assert all(math.isfinite(loss) and loss > 0 for loss in summary["losses"].values())
    assert summary["tokens_per_s"] and summary["tokens_per_s"] > 0
