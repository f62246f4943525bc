"""The lightMetrics lever on a real (tiny) SFTTrainer: same loss, no full-vocab metrics."""

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


def train_logs(make_config: Any, light: bool) -> list[dict[str, Any]]:
    speed = {
        "lightMetrics": "on" if light else "off",
        "autoMicroBatch": "off",
        "flexAttention": "off",
    }
    spec = {"training": {"maxSteps": 3, "loggingSteps": 1, "speed": speed}}
    recorder = Logs()
    trainer = build_trainer(load_config(make_config(spec)), callbacks=[recorder])
    trainer.train()
    return recorder.logs


def test_light_metrics_drop_entropy_and_accuracy_but_not_the_loss(make_config: Any) -> None:
    full = train_logs(make_config, light=False)
    light = train_logs(make_config, light=True)
    assert len(full) == len(light) == 3
    assert all("entropy" in log and "mean_token_accuracy" in log for log in full)
    assert not any("entropy" in log or "mean_token_accuracy" in log for log in light)
    for a, b in zip(full, light, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
