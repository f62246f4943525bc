"""A step log for benchmarks: one JSON line per training log, written by rank 0.

With $SFTJOB_STEP_LOG set to a file, the trainer appends `{"step", "time", "loss",
"num_tokens"}` at every training log (`time`: wall-clock seconds, so another process can
compare it with its own clock). The bench adds the same callback to the plain-TRL side, so
both sides of a comparison are timed by the same code at the same point (after the log,
whose loss read-back waits for the GPU). It only observes: nothing in training changes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

ENV_STEP_LOG = "SFTJOB_STEP_LOG"


def step_log_callback(path: Path) -> Any:
    from transformers import TrainerCallback

    class StepLog(TrainerCallback):  # type: ignore[misc]
        def _write(self, record: dict[str, Any]) -> None:
            with path.open("a") as handle:
                handle.write(json.dumps(record) + "\n")

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                self._write({"event": "train_begin", "time": time.time()})

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            if not state.is_world_process_zero or not logs or "loss" not in logs:
                return
            self._write(
                {
                    "step": state.global_step,
                    "time": time.time(),
                    "loss": float(logs["loss"]),
                    "num_tokens": logs.get("num_tokens"),
                }
            )

    return StepLog()


def read_step_log(path: Path) -> tuple[float | None, list[dict[str, Any]]]:
    """(train-begin time, the per-log records in step order); nothing when absent."""
    if not path.is_file():
        return None, []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    begin = next((r["time"] for r in records if r.get("event") == "train_begin"), None)
    steps = sorted((r for r in records if "step" in r), key=lambda r: r["step"])
    return begin, steps
