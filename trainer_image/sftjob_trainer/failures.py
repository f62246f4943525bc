"""Failure classification: one reason and exit code per kind of failure.

The operator decides what to do from the pod's exit code and termination message:
an out-of-memory run is relaunched with a smaller micro-batch, a preempted one
resumes from its checkpoint, and data/config/model errors fail the job at once
(retrying cannot fix them). So every exit goes through `classify`, and the message
is short enough for the kubelet, which keeps at most 4096 bytes of it.
"""

from __future__ import annotations

import json
import os
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path

ENV_TERMINATION_LOG = "SFTJOB_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
MAX_MESSAGE_BYTES = 3000

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_OOM = 10
EXIT_DATA = 11
EXIT_CONFIG = 12
EXIT_MODEL_LOAD = 13
EXIT_INTERRUPTED = 14

EXIT_CODES = {
    "Completed": EXIT_OK,
    "InternalError": EXIT_INTERNAL,
    "OutOfMemory": EXIT_OOM,
    "DataError": EXIT_DATA,
    "ConfigError": EXIT_CONFIG,
    "ModelLoadError": EXIT_MODEL_LOAD,
    "Interrupted": EXIT_INTERRUPTED,
}
REASONS_BY_CODE = {code: reason for reason, code in EXIT_CODES.items()}


class TrainerFailure(Exception):
    """A failure whose class we know; `reason` is the CamelCase word the operator reads."""

    reason = "InternalError"


class DataError(TrainerFailure):
    reason = "DataError"


class ConfigError(TrainerFailure):
    reason = "ConfigError"


class ModelLoadError(TrainerFailure):
    reason = "ModelLoadError"


class Interrupted(TrainerFailure):
    reason = "Interrupted"


@dataclass(frozen=True)
class Outcome:
    reason: str
    message: str
    step: int | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.reason, EXIT_INTERNAL)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Outcome:
        data = json.loads(text)
        return cls(
            reason=str(data["reason"]), message=str(data.get("message", "")), step=data.get("step")
        )


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # the launcher parent may run before torch is importable
        pass
    text = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text.lower() or isinstance(exc, MemoryError)
    )


def _shorten(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    # Keep the head (what failed) and the tail (the innermost cause) of long messages.
    half = limit // 2 - 10
    return data[:half].decode(errors="ignore") + "\n...\n" + data[-half:].decode(errors="ignore")


def classify(exc: BaseException, step: int | None = None) -> Outcome:
    """The outcome for an exception raised anywhere in the worker."""
    if isinstance(exc, TrainerFailure):
        return Outcome(exc.reason, _shorten(str(exc)), step)
    if _is_oom(exc):
        return Outcome(
            "OutOfMemory",
            _shorten(
                f"out of memory: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"
            ),
            step,
        )
    if isinstance(exc, KeyboardInterrupt):
        return Outcome("Interrupted", "interrupted", step)
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return Outcome("InternalError", _shorten(f"{type(exc).__name__}: {exc}{where}"), step)


def termination_log_path() -> Path:
    return Path(os.environ.get(ENV_TERMINATION_LOG) or DEFAULT_TERMINATION_LOG)


def write_outcome(outcome: Outcome, path: Path | None = None) -> bool:
    """Write the termination message; False when the file is not writable (e.g. off-cluster)."""
    target = path or termination_log_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(outcome.to_json())
        return True
    except OSError:
        return False


# When several ranks report, the most specific cause wins: a rank that ran out of
# memory makes the launcher stop the others (they then report Interrupted or a
# broken collective as InternalError), and the operator must see OutOfMemory.
_PRIORITY = {
    "OutOfMemory": 0,
    "DataError": 1,
    "ConfigError": 1,
    "ModelLoadError": 1,
    "InternalError": 2,
    "Interrupted": 3,
    "Completed": 4,
}


def most_specific(outcomes: list[Outcome]) -> Outcome | None:
    if not outcomes:
        return None
    return min(outcomes, key=lambda o: _PRIORITY.get(o.reason, 2))
