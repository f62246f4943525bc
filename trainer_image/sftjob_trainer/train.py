"""The training run itself: resolved config -> data, model, SFTTrainer -> saved result.

Layout after TRL's `trl/scripts/sft.py`: `main` takes parsed objects and does the
work, heavy imports happen inside it, parsing lives in `worker.py`.

Output folder (spec.output.path):
    checkpoints/checkpoint-N/   resume points (the newest complete one is resumed when
                                its sftjob-run.json names this job and its settings)
    final/                      the model, or the LoRA adapter, plus tokenizer (its weight
                                files hard links to the last step's checkpoint's, which
                                holds the same model: checkpoints.save_final_model)
    merged/                     output.mergeAdapter: the base model with the adapter merged
    README.md, loss-curve.png   the model card (rank 0, at the end)
    progress.jsonl              every progress report (rank 0)
    sftjob-lease.json           the running writer's lease (output_lease)
    superseded/<time>/          output.resume never: what an earlier run left here
With output.uri (s3://), rank 0 then uploads final/ (with a copy of the model card) there,
completion marker last (object_store.upload_output).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shutil
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftjob_operator.plan import BatchShape, steps_per_epoch

from .checkpoints import complete_checkpoints, lean_final_checkpoint, save_final_model
from .config_map import CHECKPOINT_DIR, FINAL_DIR
from .failures import Interrupted, refused_settings
from .flops import mfu_meter
from .merge_adapter import save_merged_model
from .model import load_model, lora_config
from .model_card import facts_from_run, write_model_card
from .object_store import is_s3, upload_output
from .output_guard import LOSS_CURVE, MERGED_DIR, MODEL_CARD, OutputGuard
from .preflight import prepare
from .prepared_rows import sft_trainer_class
from .progress import Reporter, make_progress_callback, make_sink
from .settings import TrainerConfig
from .speed import speed_plan_status
from .step_log import ENV_STEP_LOG, step_log_callback

log = logging.getLogger("sftjob_trainer.train")

ENV_TEST_OOM_ABOVE_BATCH = "SFTJOB_TEST_OOM_ABOVE_BATCH"
ENV_TEST_SLEEP_PER_STEP = "SFTJOB_TEST_SLEEP_PER_STEP"


@dataclass
class RunState:
    """What the failure handler needs to know about a run in progress."""

    step: int | None = None
    training: bool = False
    stepped: bool = False  # a training step has begun: errors since are not set-up errors
    stop_requested: bool = False
    stop_signal: str = "SIGTERM"
    dataset_rows: int | None = None  # rows of training data, for the model card
    result: dict[str, Any] = field(default_factory=dict)


STATE = RunState()


def newest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint-N with trainer_state.json: one killed mid-write has none."""
    found = complete_checkpoints(folder)
    return found[0] if found else None


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def install_sigterm_handler() -> None:
    """SIGTERM (pod deletion, preemption, suspend) or SIGINT (Ctrl-C under `sftjob run`):
    checkpoint at the step end, then exit 14.

    Before training starts there is nothing to save, so the signal ends the run at once.
    """

    def handler(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if STATE.training:
            if not STATE.stop_requested:
                log.warning("%s: saving a checkpoint after this step, then stopping", name)
            STATE.stop_requested = True
            STATE.stop_signal = name
        else:
            raise Interrupted(f"stopped by signal {name} before training")

    for stop in STOP_SIGNALS:
        signal.signal(stop, handler)


def _worker_in_own_session(init: Callable[[int], None] | None, worker_id: int) -> None:
    with contextlib.suppress(OSError):  # already a session leader (spawned, not forked)
        os.setsid()
    if init is not None:
        init(worker_id)


def shield_loader_workers(trainer: Any) -> None:
    """DataLoader worker processes leave the pod's process group at start.

    A SIGTERM to the whole process group (the local node deleting a pod, Slurm, `kill --
    -PGID`) would otherwise kill the workers too, and PyTorch's SIGCHLD check would fail
    the training process with "DataLoader worker ... killed by signal" before it could
    save its checkpoint. In their own session the workers get only what the training
    process sends them: they stop with their loader (terminated by pid at exit), or when
    the training process dies (they watch their parent).
    """
    for name in ("get_train_dataloader", "get_eval_dataloader"):
        build = getattr(trainer, name)

        def shielded(*args: Any, _build: Any = build, **kwargs: Any) -> Any:
            loader = _build(*args, **kwargs)
            # accelerate's loader wraps the torch DataLoader that starts the workers.
            torch_loader = getattr(loader, "base_dataloader", loader)
            init = torch_loader.worker_init_fn
            # Evaluation loaders with persistent workers come back cached: wrap them once.
            if getattr(init, "func", None) is not _worker_in_own_session:
                torch_loader.worker_init_fn = functools.partial(_worker_in_own_session, init)
            return loader

        setattr(trainer, name, shielded)


def _callbacks(per_device: int) -> list[Any]:
    import torch
    from transformers import TrainerCallback

    oom_above = os.environ.get(ENV_TEST_OOM_ABOVE_BATCH)
    sleep = float(os.environ.get(ENV_TEST_SLEEP_PER_STEP) or 0)

    class RunControl(TrainerCallback):  # type: ignore[misc]
        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            STATE.training = True
            STATE.step = state.global_step

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            STATE.stepped = True
            # Test hook for the operator's OOM auto-shrink: a deterministic OOM without a GPU.
            if oom_above and per_device > int(oom_above):
                raise torch.OutOfMemoryError(
                    f"test hook {ENV_TEST_OOM_ABOVE_BATCH}={oom_above}: per_device_train_batch_size "
                    f"{per_device} does not fit"
                )

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            STATE.step = state.global_step
            if sleep:
                time.sleep(sleep)
            if _any_rank(STATE.stop_requested, args):
                STATE.stop_requested = True
                control.should_save = True
                control.should_training_stop = True

    step_log = os.environ.get(ENV_STEP_LOG)  # benchmarks: a timed line per training log
    return [RunControl()] + ([step_log_callback(Path(step_log))] if step_log else [])


def _any_rank(flag: bool, args: Any) -> bool:
    """True on every rank if any rank has it: ranks must stop at the same step or hang."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    tensor = torch.tensor([1 if flag else 0], device=args.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def cuda_device_name(args: Any) -> str | None:
    """The name of the GPU this process trains on (None on a CPU), for its MFU peak."""
    import torch

    return torch.cuda.get_device_name(args.device) if args.device.type == "cuda" else None


def build_trainer(config: TrainerConfig, *, callbacks: list[Any] | None = None) -> Any:
    """Checked data, model and SFTConfig in an SFTTrainer, not started. Raises TrainerFailure."""
    spec = config.spec
    resolved = config.resolved

    # Everything that can fail without the model fails before it loads (never relaunched).
    ready = prepare(config)
    speed, args, dataset, tokenizer = ready.speed, ready.args, ready.dataset, ready.tokenizer
    eval_dataset = ready.eval_dataset
    STATE.dataset_rows = len(dataset)  # training rows (after any eval hold-out), for the card
    model = load_model(
        spec.model.model_copy(update=speed.model_updates),
        method=resolved["method"],
        use_cpu=bool(resolved["useCpu"]),
    )
    peft_config = lora_config(resolved.get("lora"))

    try:
        trainer = sft_trainer_class()(
            model=model,
            args=args,
            train_dataset=dataset,
            eval_dataset=eval_dataset,
            processing_class=tokenizer,
            peft_config=peft_config,
            callbacks=_callbacks(args.per_device_train_batch_size) + list(callbacks or []),
        )
    except Exception as exc:
        refused = refused_settings(exc, "SFTTrainer")
        if refused is None:
            raise
        raise refused from exc
    speed.apply(trainer)
    trainer.sftjob_speed_plan = speed  # what ran, for status.speedPlan
    shield_loader_workers(trainer)
    lean_final_checkpoint(trainer)
    if spec.distributed == "fsdp" and not trainer.is_fsdp_enabled:
        # accelerate turns FSDP on only for GPU-like process groups; on CPU it runs plain DDP.
        log.warning(
            "distributed fsdp requested but accelerate runs %s: training without sharding",
            trainer.accelerator.distributed_type.value,
        )
    return trainer


def main(config: TrainerConfig) -> dict[str, Any]:
    """Train as configured; returns a summary (step, output paths). Raises TrainerFailure."""
    guard = OutputGuard.open(config)  # before the model loads: a refusal costs nothing
    try:
        return _train(config, guard)
    finally:
        guard.close()


def _train(config: TrainerConfig, guard: OutputGuard) -> dict[str, Any]:
    resolved = config.resolved
    output = config.output_path
    trainer = build_trainer(config)
    args = trainer.args
    row_counts = getattr(trainer, "row_counts", {})
    counts = row_counts.get("train")
    over_length = counts.sentence() if counts is not None else None
    eval_counts = row_counts.get("eval")
    eval_over_length = eval_counts.sentence("eval") if eval_counts is not None else None
    if trainer.is_world_process_zero():
        for sentence in (over_length, eval_over_length):
            if sentence:
                log.warning(sentence)

    if trainer.is_world_process_zero():
        shape = BatchShape(
            per_device=args.per_device_train_batch_size,
            accumulation=args.gradient_accumulation_steps,
            world_size=args.world_size,
        )
        plan_info = {
            "worldSize": shape.world_size,
            "effectiveBatchSize": shape.effective,
            "perDeviceTrainBatchSize": shape.per_device,
            "gradientAccumulationSteps": shape.accumulation,
            "rowsTruncated": counts.truncated if counts is not None else None,
            "rowsDropped": counts.dropped if counts is not None else None,
        }
        callback = make_progress_callback(
            Reporter(
                make_sink(config.job_namespace, config.job_name, config.job_uid, config.attempt),
                output,
            ),
            interval_seconds=float(resolved.get("progressIntervalSeconds") or 10),
            plan_info=plan_info,
            speed_plan=speed_plan_status(trainer),
            steps_per_epoch=lambda rows: steps_per_epoch(rows, shape, args.dataloader_drop_last),
            notes=[over_length] if over_length else [],
            # Counted before train() wraps the model (FSDP shards it there).
            mfu=mfu_meter(trainer.model, cuda_device_name(args), args.world_size),
        )
        callback.trainer = trainer
        trainer.add_callback(callback)

    for output_callback in guard.callbacks():  # checkpoint records, the lease
        trainer.add_callback(output_callback)
    resume = guard.resume
    if resume is not None:
        log.info("resuming from %s", resume)
    STATE.result = {
        "worldSize": args.world_size,
        "distributedType": str(trainer.accelerator.distributed_type.value),
        "datasetSize": len(trainer.train_dataset),
        "rowsTruncated": counts.truncated if counts is not None else None,
        "rowsDropped": counts.dropped if counts is not None else None,
        "resumedFrom": str(resume) if resume else None,
    }
    try:
        trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    except Exception as exc:
        # The data loader, optimizer and schedule are built inside train(), before step 1.
        refused = None if STATE.stepped else refused_settings(exc, "the Trainer")
        if refused is None:
            raise
        raise refused from exc
    STATE.training = False
    STATE.step = trainer.state.global_step
    STATE.result.update(step=trainer.state.global_step, totalSteps=trainer.state.max_steps)
    if STATE.stop_requested and trainer.state.global_step < trainer.state.max_steps:
        raise Interrupted(
            f"stopped by {STATE.stop_signal} at step "
            f"{trainer.state.global_step}/{trainer.state.max_steps}; "
            f"checkpoint saved in {output / CHECKPOINT_DIR}"
        )
    save_outputs(config, trainer)
    return STATE.result


def save_outputs(config: TrainerConfig, trainer: Any) -> None:
    """What a job leaves once trained: the final model (linked from the last checkpoint),
    its tokenizer, the merged model when asked, the model card, and the upload when the
    output is an object store."""
    output = config.output_path
    final = output / FINAL_DIR
    log.info("%s", save_final_model(trainer, final))
    if trainer.is_world_process_zero():
        trainer.processing_class.save_pretrained(str(final))
        merge = config.spec.output.mergeAdapter and config.resolved["method"] in ("lora", "qlora")
        if merge:
            merged = save_merged_model(config.spec.model, final, output / MERGED_DIR)
            STATE.result["mergedPath"] = str(merged)
        facts = facts_from_run(config, trainer, dataset_rows=STATE.dataset_rows, merged=merge)
        write_model_card(output, facts, card=MODEL_CARD, curve=LOSS_CURVE)
    STATE.result["finalPath"] = str(final)
    spec = config.spec
    if is_s3(spec.output.uri) and trainer.is_world_process_zero():
        # The uploaded model carries its card (Hugging Face keeps README.md beside the weights).
        for name in (MODEL_CARD, LOSS_CURVE):
            if (output / name).is_file():
                shutil.copy2(output / name, final / name)
        about = {"job": config.job_name, "uid": config.job_uid, "step": STATE.step}
        upload_output(spec, final, about=about)
        STATE.result["outputUri"] = spec.output.uri
