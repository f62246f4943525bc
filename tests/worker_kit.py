"""Helpers for tests that run the trainer's worker as a real process and stop it mid-run."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path


def progress_steps(output: Path) -> list[int]:
    """The steps of every progress report the worker appended to output/progress.jsonl."""
    file = output / "progress.jsonl"
    if not file.exists():
        return []
    return [json.loads(line)["progress"]["step"] for line in file.read_text().splitlines() if line]


def sigterm_at_step(
    process: subprocess.Popen, output: Path, step: int, timeout: float
) -> tuple[int, str]:
    """Wait until the worker reported `step`, send SIGTERM as the kubelet does, and return its
    exit code and output once it has checkpointed and exited."""
    deadline = time.monotonic() + timeout
    while not any(done >= step for done in progress_steps(output)):
        assert process.poll() is None, process.stdout.read()[-3000:]  # type: ignore[union-attr]
        assert time.monotonic() < deadline, f"training never reached step {step}"
        time.sleep(0.1)
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=60)
    return process.returncode, out
