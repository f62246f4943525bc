"""`sftjob run` and signals (issue 22, defect 6): a real `sftjob run` process on the tiny
job, stopped mid-training by SIGTERM (`kill PID`) or by a terminal's Ctrl-C (SIGINT to its
whole process group). Both checkpoint, end every process of the tree, and exit as a pod
does: 14 (Interrupted) with the termination message, and no traceback."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml
from sftjob_trainer.failures import EXIT_INTERRUPTED
from sftjob_trainer.tiny import tiny_sftjob


def progress_step(output: Path) -> int:
    """The newest step rank 0 reported in progress.jsonl, 0 before the first report."""
    try:
        lines = (output / "progress.jsonl").read_text().splitlines()
    except OSError:
        return 0
    steps = [json.loads(line).get("progress", {}).get("step") or 0 for line in lines if line]
    return max(steps, default=0)


def running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_run(
    tiny, tmp_path: Path, *, seconds_per_step: float = 0.5, from_step: int = 2
) -> tuple[subprocess.Popen[str], Path]:
    output = tmp_path / "output"
    # 16 steps of (by default) half a second each: the signal lands mid-training.
    document = tiny_sftjob(tiny.model, tiny.data["chat"], output, {"dataset": {"limit": 64}})
    manifest = tmp_path / "sftjob.yaml"
    manifest.write_text(yaml.safe_dump(document))
    env = {**os.environ, "SFTJOB_TEST_SLEEP_PER_STEP": str(seconds_per_step)}
    process = subprocess.Popen(
        [sys.executable, "-m", "sftjob_operator.cli", "run", "-f", str(manifest)]
        + ["--workdir", str(tmp_path / "work")],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a shell gives a foreground job
    )
    deadline = time.monotonic() + 180
    while progress_step(output) < from_step:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.2)
    return process, output


@pytest.mark.parametrize(
    ("signum", "to_group"),
    [(signal.SIGTERM, False), (signal.SIGINT, True)],
    ids=["sigterm-to-the-process", "ctrl-c-to-the-process-group"],
)
def test_stop_signal_checkpoints_and_ends_the_whole_tree(tiny, tmp_path, signum, to_group):
    process, output = start_run(tiny, tmp_path)
    tree = [process.pid] + [p.pid for p in psutil.Process(process.pid).children(recursive=True)]
    assert len(tree) >= 3, tree  # sftjob run, the launcher and its worker

    if to_group:
        os.killpg(process.pid, signum)
    else:
        os.kill(process.pid, signum)
    try:
        _, err = process.communicate(timeout=120)
    finally:
        alive = [pid for pid in tree if running(pid)]
        for pid in alive:  # what a failed run left behind
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()

    assert not alive, f"left running: {alive}"
    name = signal.Signals(signum).name
    assert process.returncode == EXIT_INTERRUPTED, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert f"tiny: stopped (Interrupted, exit {EXIT_INTERRUPTED}): stopped by {name} at step" in err
    termination = json.loads((tmp_path / "work" / "tiny" / "termination-log-0").read_text())
    assert termination["reason"] == "Interrupted"
    step = termination["step"]
    assert 2 <= step < 16
    assert (output / "checkpoints" / f"checkpoint-{step}" / "trainer_state.json").is_file()


def test_a_second_ctrl_c_stops_everything_at_once(tiny, tmp_path):
    # Long steps: the second signal comes while the first waits for the step's end.
    process, _ = start_run(tiny, tmp_path, seconds_per_step=5, from_step=1)
    tree = [process.pid] + [p.pid for p in psutil.Process(process.pid).children(recursive=True)]
    os.killpg(process.pid, signal.SIGINT)
    time.sleep(0.2)
    os.killpg(process.pid, signal.SIGINT)
    try:
        _, err = process.communicate(timeout=60)
    finally:
        alive = [pid for pid in tree if running(pid)]
        for pid in alive:
            with contextlib.suppress(psutil.Error):
                psutil.Process(pid).kill()

    assert not alive, f"left running: {alive}"
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    # As the kubelet reports a killed container: 128 + 9, Interrupted.
    assert process.returncode == 137, err[-3000:]
    assert "tiny: stopped (Interrupted, exit 137)" in err
