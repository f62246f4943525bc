"""The training run itself: resolved config -> data, model, SFTTrainer -> saved result.

Layout after TRL's `trl/scripts/sft.py`: `main` takes parsed objects and does the
work, heavy imports happen inside it, parsing lives in `worker.py`.

Output folder (spec.output.path):
    checkpoints/checkpoint-N/   resume points (newest complete one is resumed)
    final/                      the model, or the LoRA adapter, plus tokenizer
    progress.jsonl              every progress report (rank 0)
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sftjob_operator.plan import BatchShape, steps_per_epoch

from .config_map import CHECKPOINT_DIR, FINAL_DIR, build_sft_config
from .data import is_conversational, prepare_dataset
from .failures import ConfigError, Interrupted, refused_settings
from .model import load_model, load_tokenizer, lora_config, quantization_config
from .progress import Reporter, make_progress_callback, make_sink
from .settings import TrainerConfig
from .speed import plan_speed, speed_plan_status

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
    result: dict[str, Any] = field(default_factory=dict)


STATE = RunState()


def newest_checkpoint(folder: Path) -> Path | None:
    """The newest checkpoint-N with trainer_state.json: one killed mid-write has none."""
    if not folder.is_dir():
        return None
    found = []
    for child in folder.iterdir():
        match = re.fullmatch(r"checkpoint-(\d+)", child.name)
        if match and child.is_dir() and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return max(found)[1] if found else None


def install_sigterm_handler() -> None:
    """SIGTERM (pod deletion, preemption, suspend): checkpoint at the step end, then exit 14.

    Before training starts there is nothing to save, so the signal ends the run at once.
    """

    def handler(signum: int, frame: object) -> None:
        if STATE.training:
            STATE.stop_requested = True
            log.warning("SIGTERM: saving a checkpoint after this step, then stopping")
        else:
            raise Interrupted(f"stopped by signal {signal.Signals(signum).name} before training")

    signal.signal(signal.SIGTERM, handler)


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

    return [RunControl()]


def _any_rank(flag: bool, args: Any) -> bool:
    """True on every rank if any rank has it: ranks must stop at the same step or hang."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    tensor = torch.tensor([1 if flag else 0], device=args.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def build_trainer(config: TrainerConfig, *, callbacks: list[Any] | None = None) -> Any:
    """Checked data, model and SFTConfig in an SFTTrainer, not started. Raises TrainerFailure."""
    from trl import SFTTrainer

    spec = config.spec
    resolved = config.resolved

    # Cheapest checks first: a typo in extraArgs should not wait for a model download.
    if resolved["method"] == "qlora":
        quantization_config()  # raises ConfigError without a GPU or bitsandbytes
    speed = plan_speed(config)  # fast defaults, each lever switchable: docs/performance.md
    args = build_sft_config(
        config,
        dataset_format=spec.dataset.format if spec.dataset.format != "auto" else None,
        speed=speed,
    )
    dataset, fmt = prepare_dataset(spec.dataset)
    if fmt == "text" and spec.dataset.textField != args.dataset_text_field:
        args.dataset_text_field = spec.dataset.textField
    tokenizer = load_tokenizer(spec.model)
    if is_conversational(dataset, fmt) and not tokenizer.chat_template:
        raise ConfigError(
            f"the dataset is conversational ({fmt}) but the tokenizer of "
            f"{spec.model.tokenizer or spec.model.name or spec.model.path} has no chat template: "
            "use an instruct/chat model, set model.tokenizer to one with a template, or give "
            "the data as text"
        )
    model = load_model(
        spec.model.model_copy(update=speed.model_updates),
        method=resolved["method"],
        use_cpu=bool(resolved["useCpu"]),
    )
    peft_config = lora_config(resolved.get("lora"))

    try:
        trainer = SFTTrainer(
            model=model,
            args=args,
            train_dataset=dataset,
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
    if spec.distributed == "fsdp" and not trainer.is_fsdp_enabled:
        # accelerate turns FSDP on only for GPU-like process groups; on CPU it runs plain DDP.
        log.warning(
            "distributed fsdp requested but accelerate runs %s: training without sharding",
            trainer.accelerator.distributed_type.value,
        )
    return trainer


def main(config: TrainerConfig) -> dict[str, Any]:
    """Train as configured; returns a summary (step, output paths). Raises TrainerFailure."""
    resolved = config.resolved
    output = config.output_path
    trainer = build_trainer(config)
    args = trainer.args
    tokenizer = trainer.processing_class

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
        )
        callback.trainer = trainer
        trainer.add_callback(callback)

    resume = newest_checkpoint(output / CHECKPOINT_DIR)
    if resume is not None:
        log.info("resuming from %s", resume)
    STATE.result = {
        "worldSize": args.world_size,
        "distributedType": str(trainer.accelerator.distributed_type.value),
        "datasetSize": len(trainer.train_dataset),
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
            f"stopped by SIGTERM at step {trainer.state.global_step}/{trainer.state.max_steps}; "
            f"checkpoint saved in {output / CHECKPOINT_DIR}"
        )
    final = output / FINAL_DIR
    trainer.save_model(str(final))
    if trainer.is_world_process_zero():
        tokenizer.save_pretrained(str(final))
    STATE.result["finalPath"] = str(final)
    return STATE.result
