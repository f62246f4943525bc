"""SIGTERM mid-run saves a checkpoint and exits Interrupted; a restart resumes to the plan."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sftjob_operator.plan import plan_for
from sftjob_trainer.settings import load_config
from sftjob_trainer.train import newest_checkpoint
from worker_kit import progress_steps, sigterm_at_step


def launch(config: Path, log: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "sftjob_trainer", "--config", str(config)],
        env={**os.environ, "SFTJOB_TERMINATION_LOG": str(log), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def relaunch_completes(config: Path, log: Path, planned: int, *, resumed_from: int) -> None:
    """The trainer launched again finishes the plan, resumed from checkpoint-`resumed_from`."""
    again = launch(config, log)
    out, _ = again.communicate(timeout=120)
    assert again.returncode == 0, out[-3000:]
    done = json.loads(log.read_text())
    assert done["reason"] == "Completed" and done["step"] == planned
    assert f"resumed from checkpoint-{resumed_from}" in done["message"]


def test_sigterm_checkpoints_then_restart_resumes_to_planned_steps(make_config, tmp_path):
    config = make_config({"dataset": {"limit": 64}, "training": {"saveSteps": 100}})
    planned = plan_for(load_config(config).spec).totalSteps
    assert planned == 16
    output = tmp_path / "output"
    log = tmp_path / "termination-log"

    first = launch(config, log, SFTJOB_TEST_SLEEP_PER_STEP="0.25")
    code, out = sigterm_at_step(first, output, 3, timeout=90)
    assert code == 14, out[-3000:]
    interrupted = json.loads(log.read_text())
    assert interrupted["reason"] == "Interrupted"
    stopped_at = interrupted["step"]
    assert 3 <= stopped_at < planned
    checkpoint = newest_checkpoint(output / "checkpoints")
    assert checkpoint is not None and checkpoint.name == f"checkpoint-{stopped_at}"
    assert not (output / "final").exists()

    relaunch_completes(config, log, planned, resumed_from=stopped_at)
    state = json.loads(
        (newest_checkpoint(output / "checkpoints") / "trainer_state.json").read_text()
    )
    assert state["global_step"] == state["max_steps"] == planned
    assert (output / "final" / "model.safetensors").is_file()


def test_sigterm_to_the_process_group_spares_the_data_workers(make_config, tmp_path):
    # The local node (and Slurm) signal the pod's whole process group, DataLoader workers
    # included: the workers ignore it, so the run still checkpoints and exits Interrupted
    # (without that, a killed worker failed the run with an InternalError, no checkpoint).
    config = make_config({"dataset": {"limit": 64}, "training": {"saveSteps": 100}})
    output = tmp_path / "output"
    log = tmp_path / "termination-log"
    first = subprocess.Popen(
        [sys.executable, "-m", "sftjob_trainer", "--config", str(config)],
        env={
            **os.environ,
            "SFTJOB_TERMINATION_LOG": str(log),
            "SFTJOB_TEST_SLEEP_PER_STEP": "0.25",
            "SFTJOB_SPEED": '{"dataWorkers": "on"}',
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    deadline = time.monotonic() + 90
    while not any(step >= 3 for step in progress_steps(output)):
        assert first.poll() is None, first.stdout.read()[-3000:]
        assert time.monotonic() < deadline, "training never reached step 3"
        time.sleep(0.1)
    workers = descendants(first.pid)
    assert len(workers) >= 2  # the two DataLoader workers (and any launcher children)
    os.killpg(first.pid, signal.SIGTERM)
    out, _ = first.communicate(timeout=60)
    assert "speed dataWorkers: on" in out
    assert first.returncode == 14, out[-3000:]
    interrupted = json.loads(log.read_text())
    assert interrupted["reason"] == "Interrupted"
    checkpoint = newest_checkpoint(output / "checkpoints")
    assert checkpoint is not None and checkpoint.name == f"checkpoint-{interrupted['step']}"
    # Out of the process group, the workers still end with the training process.
    deadline = time.monotonic() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in workers):
        assert time.monotonic() < deadline, f"workers left running: {workers}"
        time.sleep(0.2)


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (Linux /proc)."""
    found: list[int] = []
    stack = [pid]
    while stack:
        parent = stack.pop()
        try:
            text = Path(f"/proc/{parent}/task/{parent}/children").read_text()
        except OSError:
            continue
        children = [int(child) for child in text.split()]
        found.extend(children)
        stack.extend(children)
    return found


def test_incomplete_checkpoints_are_not_resumed(tmp_path):
    (tmp_path / "checkpoint-4").mkdir()
    (tmp_path / "checkpoint-4" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-12").mkdir()  # killed while writing: no trainer_state.json
    (tmp_path / "checkpoint-9").mkdir()
    (tmp_path / "checkpoint-9" / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-x").mkdir()
    assert newest_checkpoint(tmp_path) == tmp_path / "checkpoint-9"
    assert newest_checkpoint(tmp_path / "absent") is None


def test_the_last_checkpoint_keeps_no_optimizer_and_a_relaunch_from_it_only_saves(
    make_config, tmp_path
):
    # The last step's checkpoint is there for a relaunch after the run's end failed (the
    # final save, the card, an upload): resuming it trains nothing, so the optimizer state
    # is not written; an earlier checkpoint keeps everything a resume mid-run needs.
    config = make_config({"dataset": {"limit": 64}, "training": {"saveSteps": 5}})
    planned = plan_for(load_config(config).spec).totalSteps
    output = tmp_path / "output"
    log = tmp_path / "termination-log"
    first = launch(config, log)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0, out[-3000:]
    checkpoints = output / "checkpoints"
    last = checkpoints / f"checkpoint-{planned}"
    assert newest_checkpoint(checkpoints) == last
    assert (last / "model.safetensors").is_file() and (last / "trainer_state.json").is_file()
    assert not (last / "optimizer.pt").exists() and not (last / "scheduler.pt").exists()
    earlier = checkpoints / "checkpoint-15"
    assert (earlier / "optimizer.pt").is_file() and (earlier / "scheduler.pt").is_file()
    # The final model's weights are the last checkpoint's file, not written a second time.
    final_weights = output / "final" / "model.safetensors"
    assert final_weights.samefile(last / "model.safetensors")
    assert f"final model linked from checkpoint-{planned}" in out
    assert not (output / "final" / "trainer_state.json").exists()

    # The first run's end failed before the final model was whole: the relaunch resumes
    # the last checkpoint, trains no step and writes the final model.
    final = output / "final" / "model.safetensors"
    final.unlink()
    relaunch_completes(config, log, planned, resumed_from=planned)
    assert final.is_file() and final.samefile(last / "model.safetensors")
    assert newest_checkpoint(checkpoints) == last  # no step trained, nothing new saved
