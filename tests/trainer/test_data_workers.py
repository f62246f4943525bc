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

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


def trained(make_config: Any, workers: str) -> tuple[Any, list[dict[str, Any]]]:
    speed = {"dataWorkers": workers, "autoMicroBatch": "off", "flexAttention": "off"}
    spec = {"training": {"maxSteps": 3, "loggingSteps": 1, "speed": speed}}
    recorder = Logs()
    trainer = build_trainer(load_config(make_config(spec)), callbacks=[recorder])
    trainer.train()
    return trainer, recorder.logs


def test_workers_collate_the_same_batches_in_the_same_order(make_config: Any) -> None:
    plain_trainer, plain = trained(make_config, "off")
    worker_trainer, with_workers = trained(make_config, "on")
    assert plain_trainer.get_train_dataloader().num_workers == 0
    loader = worker_trainer.get_train_dataloader()
    assert loader.num_workers == 2 and loader.persistent_workers
    assert len(plain) == len(with_workers) == 3
    for a, b in zip(plain, with_workers, strict=True):
        assert b["loss"] == a["loss"]  # the same rows, so bit for bit the same step
        assert b["num_tokens"] == a["num_tokens"]
