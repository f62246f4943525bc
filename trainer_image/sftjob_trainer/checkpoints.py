"""Which checkpoint a run may resume: only its own job's, written with the same training settings.

Every checkpoint-N folder gets a run record, `sftjob-run.json`: the job that wrote it (uid;
for `sftjob run`, the manifest's name), the training-relevant settings and their hash. At
start (`output.resume: auto`) every complete checkpoint in the output must carry this job's
identity and the same settings; otherwise the run refuses with a ConfigError that names the
other job or the changed fields, before the model loads and before anything is written.
Resuming another job's checkpoint-200 reported "Succeeded 201/200"; resuming with a new
learning rate or epoch count ran a schedule that was neither the old one nor the new one.

`output.resume: never` starts from step 0 and first moves what an earlier run left in the
output (checkpoints, final and merged models, model card, progress log) into
`superseded/<UTC time>/`: nothing is deleted, so a failed fresh run loses nothing, and
TRL's checkpoint rotation (the oldest by mtime in checkpoints/) never reaches an earlier
run's checkpoints.

The record is written when the Trainer decides to save (on_step_end, before TRL writes the
folder and its trainer_state.json), and again on_save if missing: a checkpoint that is
complete (has trainer_state.json) always has its record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .failures import ConfigError

log = logging.getLogger("sftjob_trainer.checkpoints")

RUN_RECORD = "sftjob-run.json"
RECORD_KIND = "SFTJobCheckpointRecord"
SUPERSEDED_DIR = "superseded"
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")

# Spec fields that change what a run computes are recorded; these do not (where and how
# it runs, how often it reports or saves, speed levers that keep the numbers), or are
# recorded in a resolved form below (the batch split, which an OOM shrink changes while
# the effective batch stays).
NOT_TRAINING_FIELDS = (
    "output",
    "resources",
    "retry",
    "suspend",
    "ttlSecondsAfterFinished",
    "activeDeadlineSeconds",
    "progressIntervalSeconds",
    "profile",
    "image",
    "volumes",
    "secrets",
    "env",
    "model.parametersBillions",
    "dataset.numSamples",
    "training.perDeviceTrainBatchSize",
    "training.gradientAccumulationSteps",
    "training.gradientCheckpointing",
    "training.loggingSteps",
    "training.saveSteps",
    "training.saveTotalLimit",
    "training.evalSteps",
    "training.speed",
)


@dataclass(frozen=True)
class JobIdentity:
    """Who wrote a checkpoint: the SFTJob's uid, or the manifest name of `sftjob run`."""

    namespace: str | None = None
    name: str | None = None
    uid: str | None = None
    manifest: str | None = None

    @property
    def key(self) -> str | None:
        if self.uid:
            return f"uid:{self.uid}"
        if self.manifest:
            return f"manifest:{self.manifest}"
        return None

    def describe(self) -> str:
        if self.uid:
            return f"job {self.namespace or 'default'}/{self.name or '?'} (uid {self.uid})"
        if self.manifest:
            return f"the `sftjob run` of manifest {self.manifest}"
        return "a run without a job identity"

    def to_json(self) -> dict[str, Any]:
        return {
            "namespace": self.namespace,
            "name": self.name,
            "uid": self.uid,
            "manifestName": self.manifest,
        }

    @classmethod
    def from_json(cls, data: Any) -> JobIdentity:
        data = data if isinstance(data, dict) else {}
        return cls(
            namespace=data.get("namespace"),
            name=data.get("name"),
            uid=data.get("uid"),
            manifest=data.get("manifestName"),
        )


def job_identity(raw_config: dict[str, Any]) -> JobIdentity:
    """The identity in a resolved config's `job` block (the operator writes the uid)."""
    job = raw_config.get("job") or {}
    return JobIdentity(
        namespace=job.get("namespace") or None,
        name=job.get("name") or None,
        uid=job.get("uid") or None,
        manifest=job.get("manifestName") or None,
    )


def _flatten(value: Any, prefix: str, out: dict[str, Any]) -> None:
    if isinstance(value, dict):  # an empty mapping (no extraArgs) records nothing
        for key in sorted(value):
            _flatten(value[key], f"{prefix}.{key}" if prefix else str(key), out)
    else:
        out[prefix] = value


def _excluded(path: str) -> bool:
    return any(path == field or path.startswith(field + ".") for field in NOT_TRAINING_FIELDS)


def training_fields(
    spec: dict[str, Any], resolved: dict[str, Any], plan: dict[str, Any]
) -> dict[str, Any]:
    """The training-relevant settings as dotted spec paths, resolved where the spec defers.

    `spec` is the spec as written (every default filled in); the learning rate, bf16 and
    LoRA settings are the values that ran (a method's default learning rate included).
    """
    flat: dict[str, Any] = {}
    _flatten(spec, "", flat)
    fields = {
        path: value
        for path, value in flat.items()
        if not _excluded(path) and path.split(".")[0] != "lora"
    }
    fields["training.learningRate"] = resolved.get("learningRate")
    fields["training.bf16"] = resolved.get("bf16")
    _flatten(resolved.get("lora") or {}, "lora", fields)
    fields["effectiveBatchSize"] = plan.get("effectiveBatchSize")
    return dict(sorted(fields.items()))


def fields_hash(fields: dict[str, Any]) -> str:
    text = json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _show(value: Any) -> str:
    if isinstance(value, float):
        return format(value, "g")
    if value is None:
        return "(unset)"
    return json.dumps(value, default=str)


def changed_fields(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """`field old -> new` for each difference, in field order."""
    changes = []
    for path in sorted(set(recorded) | set(current)):
        before, after = recorded.get(path), current.get(path)
        if before != after:
            changes.append(f"{path} {_show(before)} -> {_show(after)}")
    return changes


@dataclass(frozen=True)
class RunRecord:
    """What a checkpoint says about the run that wrote it."""

    identity: JobIdentity
    fields: dict[str, Any]
    attempt: int = 1
    trainer_version: str = ""

    @property
    def hash(self) -> str:
        return fields_hash(self.fields)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": RECORD_KIND,
            "job": self.identity.to_json(),
            "attempt": self.attempt,
            "trainer": self.trainer_version,
            "trainingHash": self.hash,
            "trainingFields": self.fields,
        }

    @classmethod
    def from_json(cls, data: Any) -> RunRecord | None:
        if not isinstance(data, dict) or data.get("kind") != RECORD_KIND:
            return None
        fields = data.get("trainingFields")
        return cls(
            identity=JobIdentity.from_json(data.get("job")),
            fields=fields if isinstance(fields, dict) else {},
            attempt=int(data.get("attempt") or 1),
            trainer_version=str(data.get("trainer") or ""),
        )


def trainer_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"sftjob {version('sftjob')}"
    except PackageNotFoundError:
        return "sftjob (version unknown)"


def record_for(config: Any) -> RunRecord:
    """This run's record, from a TrainerConfig."""
    spec = config.written_spec if config.written_spec is not None else config.raw["spec"]
    return RunRecord(
        identity=job_identity(config.raw),
        fields=training_fields(spec, config.resolved, config.plan),
        attempt=config.attempt,
        trainer_version=trainer_version(),
    )


def is_complete(checkpoint: Path) -> bool:
    """Whether a checkpoint folder was written whole: transformers writes trainer_state.json
    last, so one killed mid-write has none."""
    return (checkpoint / "trainer_state.json").is_file()


def complete_checkpoints(folder: Path) -> list[Path]:
    """checkpoint-N folders written whole (is_complete), newest first."""
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = CHECKPOINT_NAME.fullmatch(child.name)
        if match and child.is_dir() and is_complete(child):
            found.append((int(match.group(1)), child))
    return [path for _, path in sorted(found, reverse=True)]


def read_record(checkpoint: Path) -> RunRecord | None:
    try:
        return RunRecord.from_json(json.loads((checkpoint / RUN_RECORD).read_text()))
    except (OSError, ValueError):
        return None


def write_record(checkpoint: Path, record: RunRecord) -> None:
    """Atomically: a reader sees the whole record or none."""
    checkpoint.mkdir(parents=True, exist_ok=True)
    target = checkpoint / RUN_RECORD
    temporary = checkpoint / f".{RUN_RECORD}.{os.getpid()}.tmp"
    temporary.write_text(json.dumps(record.to_json(), indent=2, sort_keys=True))
    os.replace(temporary, target)


FRESH_START_HINT = (
    "To start fresh: give the job a new output.path (or claim), or set output.resume: never "
    "(the earlier run's files move to {output}/superseded/<time>/; nothing is deleted)."
)


def refusal(checkpoint: Path, found: RunRecord | None, mine: RunRecord) -> str | None:
    """Why `checkpoint` cannot be resumed by `mine`, or None when it can."""
    if found is None:
        cause = (
            f"{checkpoint.name} has no run record ({RUN_RECORD}): it was written by another "
            "tool or an older trainer, so it cannot be known to be this job's"
        )
    elif found.identity.key != mine.identity.key:
        cause = f"{checkpoint.name} belongs to {found.identity.describe()}, not to {mine.identity.describe()}"
        changes = changed_fields(found.fields, mine.fields)
        if changes:
            cause += f" (and was trained with other settings: {', '.join(changes)})"
    elif found.hash != mine.hash:
        changes = changed_fields(found.fields, mine.fields) or ["(fields equal, hash differs)"]
        cause = (
            f"{checkpoint.name} was written with other training settings: {', '.join(changes)}; "
            "resuming would continue the old run's schedule under the new settings"
        )
    else:
        return None
    output = checkpoint.parent.parent
    return (
        f"cannot resume from {checkpoint.parent}: {cause}. Nothing was resumed or overwritten. "
        + FRESH_START_HINT.format(output=output)
    )


def resume_point(checkpoints: Path, mine: RunRecord) -> Path | None:
    """The newest checkpoint to resume from; ConfigError if any checkpoint is not this run's."""
    found = complete_checkpoints(checkpoints)
    for checkpoint in found:
        reason = refusal(checkpoint, read_record(checkpoint), mine)
        if reason is not None:
            raise ConfigError(reason)
    return found[0] if found else None


def set_aside(output: Path, names: list[str], *, now: float | None = None) -> Path | None:
    """Move an earlier run's files (`names` under `output`) to superseded/<UTC time>/."""
    present = [name for name in names if (output / name).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
    target = output / SUPERSEDED_DIR / stamp
    suffix = 1
    while target.exists():
        suffix += 1
        target = output / SUPERSEDED_DIR / f"{stamp}-{suffix}"
    target.mkdir(parents=True)
    for name in present:
        os.replace(output / name, target / name)
    log.warning("output.resume never: moved the earlier run's %s to %s", ", ".join(present), target)
    return target


def record_callback(record: RunRecord) -> Any:
    """A TrainerCallback that puts the run record into every checkpoint folder TRL writes."""
    from transformers import TrainerCallback

    class RecordCheckpoints(TrainerCallback):  # type: ignore[misc]
        def _write(self, args: Any, state: Any) -> None:
            if not args.should_save:
                return
            folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            if not (folder / RUN_RECORD).is_file():
                write_record(folder, record)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # Before TRL writes the folder: its trainer_state.json (what makes a checkpoint
            # complete) always comes after the record.
            if control.should_save:
                self._write(args, state)

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._write(args, state)

    return RecordCheckpoints()


def lean_final_checkpoint(trainer: Any) -> bool:
    """Write the checkpoint of the last step without the optimizer state.

    With step-based saving, transformers checkpoints at the last step too, and the run
    saves the final model right after. That checkpoint is kept for a relaunch (a failure
    while the final model or the model card is written, or an upload): resuming from it
    trains nothing and saves the final model again, so its weights and trainer state are
    all it needs. The optimizer, scheduler and RNG states (twice the fp32 weights with
    Adam: about 12 GB of a 1.5B model's 18, 20 s of the job's end on an H100) are not
    written. Kept whole where the library resumes differently: FSDP or DeepSpeed state
    dicts, and load_best_model_at_end (the best checkpoint may be the last). True when on.
    """
    from transformers import TrainerCallback

    args = trainer.args
    if (
        trainer.is_fsdp_enabled
        or getattr(trainer, "is_deepspeed_enabled", False)
        or args.load_best_model_at_end
        or args.save_only_model
    ):
        return False

    class LeanFinalCheckpoint(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            # After transformers' own flow callback has asked for the last step's save.
            if state.global_step >= state.max_steps and control.should_save:
                args.save_only_model = True

    trainer.add_callback(LeanFinalCheckpoint())
    return True


# What a checkpoint holds beside the model files save_model writes: the trainer's state for
# a resume, and this module's run record.
RESUME_ONLY = re.compile(
    r"trainer_state\.json|optimizer\.(pt|bin)|scheduler\.pt|scaler\.pt|rng_state.*\.pth|"
    + re.escape(RUN_RECORD)
)
# The weight files (GBs, seconds to write) are hard-linked into the final model; the rest
# (config, tokenizer, which train.py writes again into final/) are copied, so they stay
# files of their own.
WEIGHT_SUFFIXES = (".safetensors", ".bin")


def final_step_checkpoint(trainer: Any) -> Path | None:
    """The checkpoint of the step training ended at, when it holds the final model as
    save_model would write it; None otherwise.

    The last step's checkpoint is written by save_model right before the run's end, from
    the same weights. Not so where the model changes after it (load_best_model_at_end
    loads the best one back), or where the library saves differently (FSDP and DeepSpeed
    gather sharded states inside save_model, on every rank).
    """
    args = trainer.args
    if (
        trainer.is_fsdp_enabled
        or getattr(trainer, "is_deepspeed_enabled", False)
        or args.load_best_model_at_end
    ):
        return None
    folder = Path(args.output_dir) / f"checkpoint-{trainer.state.global_step}"
    if not is_complete(folder):
        return None
    files = list(folder.iterdir())
    if any(path.is_dir() for path in files):  # a layout this does not know: save it
        return None
    if not any(is_weights(path) for path in files):
        return None
    return folder


def is_weights(path: Path) -> bool:
    return path.name.endswith(WEIGHT_SUFFIXES) and not RESUME_ONLY.fullmatch(path.name)


def link_final_model(checkpoint: Path, final: Path) -> None:
    """final/ with the checkpoint's model files: the weights hard-linked, the rest copied."""
    import shutil

    final.mkdir(parents=True, exist_ok=True)
    for source in checkpoint.iterdir():
        if RESUME_ONLY.fullmatch(source.name):
            continue
        target = final / source.name
        target.unlink(missing_ok=True)  # a partial final model from an earlier attempt
        if is_weights(source):
            os.link(source, target)
        else:
            shutil.copy2(source, target)


def save_final_model(trainer: Any, final: Path) -> str:
    """Write the final model; what was done, for the log.

    With step-based saving the run has just written the last step's checkpoint with the
    same weights: writing them again took 8 s of the reference job's end on an H100
    (session 14), so final/ hard-links the checkpoint's weight files instead (the same
    file system: both are in the output folder). Removing the checkpoint later (rotation)
    leaves final/ whole. Where that checkpoint is not the final model, or linking fails,
    save_model writes it as usual.
    """
    checkpoint = final_step_checkpoint(trainer)
    if checkpoint is not None and trainer.is_world_process_zero():
        try:
            link_final_model(checkpoint, final)
            return f"final model linked from {checkpoint.name} (its weights not written twice)"
        except OSError as exc:
            log.warning("final model: cannot link %s (%s); writing it", checkpoint, exc)
    elif checkpoint is not None:
        return "final model linked by rank 0"
    trainer.save_model(str(final))
    return "final model written"
