"""What a run may do with its output folder, decided before the model loads.

Rank 0 holds the output's lease (output_lease) for the whole run. With `output.resume:
auto` every rank picks the same resume point: the newest checkpoint, if every checkpoint
there is this job's, written with the same training settings (checkpoints.resume_point);
with `never`, rank 0 first moves the earlier run's files to superseded/<time>/.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .checkpoints import RunRecord, record_callback, record_for, resume_point, set_aside
from .config_map import CHECKPOINT_DIR, FINAL_DIR
from .output_lease import OutputLease, lease_callback, lease_seconds_from_env
from .progress import PROGRESS_FILE
from .settings import TrainerConfig

MERGED_DIR = "merged"
MODEL_CARD = "README.md"
LOSS_CURVE = "loss-curve.png"
# What one run leaves in its output; `output.resume: never` moves all of it aside.
RUN_FILES = [CHECKPOINT_DIR, FINAL_DIR, MERGED_DIR, MODEL_CARD, LOSS_CURVE, PROGRESS_FILE]


def is_main_process() -> bool:
    """Global rank 0 (accelerate sets RANK for each process; a single process has none)."""
    return int(os.environ.get("RANK", "0") or 0) == 0


@dataclass
class OutputGuard:
    record: RunRecord
    resume: Path | None
    lease: OutputLease | None = None
    superseded: Path | None = None

    @classmethod
    def open(cls, config: TrainerConfig) -> OutputGuard:
        """Lease the output (rank 0), then decide the resume point. Raises ConfigError."""
        output = config.output_path
        record = record_for(config)
        lease = None
        if is_main_process():
            lease = OutputLease(output, record.identity, config.attempt, lease_seconds_from_env())
            lease.acquire()
        try:
            if config.spec.output.resume == "never":
                moved = set_aside(output, RUN_FILES) if is_main_process() else None
                return cls(record=record, resume=None, lease=lease, superseded=moved)
            return cls(
                record=record, resume=resume_point(output / CHECKPOINT_DIR, record), lease=lease
            )
        except BaseException:
            if lease is not None:
                lease.release()
            raise

    def callbacks(self) -> list[Any]:
        found = [record_callback(self.record)]
        if self.lease is not None:
            found.append(lease_callback(self.lease))
        return found

    def close(self) -> None:
        if self.lease is not None:
            self.lease.release()
