"""The dataWorkers lever on a real (tiny) SFTTrainer: batches collated in worker
processes, the same batches in the same order as without them."""

from __future__ import annotations

from typing import Any

import pytest
from sftjob_trainer.settings import load_config
from sftjob_trainer.train import build_trainer
from transformers import TrainerCallback

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(300)]


class Logs(TrainerCallback):
    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []
        self.loader: Any = None

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.loader = kwargs.get("train_dataloader")  # the loader that trains

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def trained(make_config: Any, workers: str) -> tuple[Any, list[dict[str, Any]]]:
    """The training DataLoader and the logged steps of a 3-step run."""
    speed = {"dataWorkers": workers, "autoMicroBatch": "off", "flexAttention": "off"}
    spec = {"training": {"maxSteps": 3, "loggingSteps": 1, "speed": speed}}
    recorder = Logs()
    trainer = build_trainer(load_config(make_config(spec)), callbacks=[recorder])
    trainer.train()
    return recorder.loader, recorder.logs


def test_workers_collate_the_same_batches_in_the_same_order(make_config: Any) -> None:
    plain_loader, plain = trained(make_config, "off")
    loader, with_workers = trained(make_config, "on")
    assert plain_loader.num_workers == 0
    loader = getattr(loader, "base_dataloader", loader)  # accelerate's wrapper, if any
    assert loader.num_workers == 2 and loader.persistent_workers
    assert len(plain) == len(with_workers) == 3
    for a, b in zip(plain, with_workers, strict=True):
        assert b["loss"] == a["loss"]  # the same rows, so bit for bit the same step
        assert b["num_tokens"] == a["num_tokens"]


def test_evaluation_loaders_are_shielded_once(make_config: Any) -> None:
    # Persistent evaluation loaders come back cached: their workers' start-up hook (leave
    # the pod's process group, test_resume.py) is added once, not once per evaluation.
    from sftjob_trainer.train import _worker_in_own_session

    speed = {"dataWorkers": "on", "autoMicroBatch": "off", "flexAttention": "off"}
    config = make_config({"training": {"maxSteps": 1, "speed": speed}})
    trainer = build_trainer(load_config(config))
    for _ in range(3):
        loader = trainer.get_eval_dataloader(trainer.train_dataset)
    init = getattr(loader, "base_dataloader", loader).worker_init_fn
    assert init.func is _worker_in_own_session
    assert getattr(init.args[0], "func", None) is not _worker_in_own_session
    train_loader = trainer.get_train_dataloader()
    train_init = getattr(train_loader, "base_dataloader", train_loader).worker_init_fn
    assert train_init.func is _worker_in_own_session


@pytest.mark.parametrize(
    ("cpus", "rows", "extra", "processes"),
    [
        (16.0, 100_000, (), 8),  # at most 8
        (6.0, 100_000, (), 6),  # at most the CPUs of this training process
        (16.0, 1_000, (), 8),  # the reference job's rows: 125 each
        (16.0, 600_000, (), 8),
        (4.0, 1_000, (), 4),  # at most the CPUs
        (16.0, 999, (), None),  # starting the processes would cost what they save
        (16.0, None, (), None),  # rows not known when planning
        (16.0, 100_000, ("dataset_num_proc",), None),  # the user's own setting is kept
    ],
)
def test_a_large_dataset_is_tokenized_in_several_processes(
    cpus: float, rows: int | None, extra: tuple[str, ...], processes: int | None
) -> None:
    from dataclasses import replace

    from lever_jobs import SEED_REFERENCE_JOB
    from sftjob_trainer.levers.contract import Hardware, SpeedOptions
    from sftjob_trainer.levers.data_workers import decide

    hardware = Hardware(cuda=True, memory_gib=79.1, name="NVIDIA H100 80GB HBM3", cpus=cpus)
    job = replace(SEED_REFERENCE_JOB, rows=rows, extra_args=extra)
    choice = decide(SpeedOptions(), hardware, job)
    assert choice.on  # the DataLoader workers either way
    assert choice.sft.get("dataset_num_proc") == processes
    if processes:
        assert f"{processes} processes tokenize the {rows:,} rows" in choice.reason
    else:
        assert "tokenize" not in choice.reason
    # Turned off, nothing runs in other processes.
    assert "dataset_num_proc" not in decide(SpeedOptions(dataWorkers="off"), hardware, job).sft
