"""The lightMetrics lever on a real (tiny) SFTTrainer: same loss, no full-vocab metrics."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from sftjob_trainer.levers.lean_steps import IGNORED_SHARE_MAX, ignored_label_share
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
        # Counted on the host and folded in at each log: the same tokens as TRL counts.
        assert b["num_tokens"] == a["num_tokens"]


# Ops that make the host wait for the device: `.item()`/`bool()` read a value back, and a
# boolean index or nonzero must read how many elements it selects before allocating.
HOST_SYNC_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "is_nonzero", "item"}


class SyncOps:
    """Records the host-sync ops run inside a block, by name (a torch dispatch mode)."""

    def __enter__(self) -> list[str]:
        from torch.utils._python_dispatch import TorchDispatchMode

        seen: list[str] = []

        class Recorder(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
                name = func.overloadpacket.__name__
                index_by_mask = name == "index" and any(
                    t is not None and getattr(t, "dtype", None) == torch.bool
                    for t in (args[1] if len(args) > 1 else [])
                )
                if name in HOST_SYNC_OPS or index_by_mask:
                    seen.append(name)
                return func(*args, **(kwargs or {}))

        self.mode = Recorder()
        self.mode.__enter__()
        return seen

    def __exit__(self, *exc: object) -> None:
        self.mode.__exit__(*exc)


# Static batches need the compile lever; dynamo's eager backend keeps a CPU run cheap (and
# compute_loss is called on the uncompiled model here anyway).
STATIC = {"compile": "on", "flexAttention": "off"}
EAGER_BACKEND = {"torch_compile_backend": "eager"}


def lean_trainer(make_config: Any, speed: dict[str, str], dataset: Any = None) -> Any:
    training = {
        "maxSteps": 1,
        "packing": True,
        "speed": {"autoMicroBatch": "off", **speed},
        "extraArgs": EAGER_BACKEND if speed.get("compile") == "on" else {},
    }
    spec = {"training": training, **({"dataset": dataset} if dataset else {})}
    return build_trainer(load_config(make_config(spec)))


def head_of(trainer: Any) -> str:
    """Which patch answers the model's fused forward: the lean head or TRL's."""
    return trainer.model.forward.__qualname__.split(".")[0]


def micro_step_sync_ops(trainer: Any) -> tuple[list[str], list[str], Any]:
    """The host-sync ops of one training micro-step (forward, loss, backward), and those of
    the backbone's forward alone on the same batch."""
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    trainer.model.train()
    with SyncOps() as backbone:
        # transformers' packed-mask check reads the position ids back in eager mode only
        # (skipped while torch.compile traces): the model's own, not the loss path's.
        trainer.model.base_model(input_ids=inputs["input_ids"], position_ids=inputs["position_ids"])
    with SyncOps() as step:
        loss = trainer.compute_loss(trainer.model, inputs)
        loss.backward()
    return step, backbone, loss


def test_lean_micro_step_adds_no_host_sync(make_config: Any, monkeypatch: Any) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")  # the compile lever points it at output
    trl = lean_trainer(make_config, {**STATIC, "lightMetrics": "off"})
    lean = lean_trainer(make_config, {**STATIC, "lightMetrics": "on"})
    assert head_of(lean) == "lean_lm_head"  # static batches, all labels trained on
    trl_path, backbone, trl_loss = micro_step_sync_ops(trl)
    lean_path, _, lean_loss = micro_step_sync_ops(lean)
    # The control: TRL's own path reads its metrics and token count back every micro-step.
    assert len(trl_path) > len(backbone), trl_path
    assert lean_path == backbone
    assert float(lean_loss.detach()) == pytest.approx(float(trl_loss.detach()), rel=1e-5)


def test_trls_head_is_kept_where_scoring_every_position_would_waste_work(
    make_config: Any, tiny: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")
    # Completion-only loss: the prompts' labels are ignored, too many to score for nothing.
    prompts = {"path": str(tiny.data["prompt-completion"]), "format": "prompt-completion"}
    masked = lean_trainer(make_config, {**STATIC, "lightMetrics": "on"}, dataset=prompts)
    share = ignored_label_share(masked.train_dataset)
    assert share is not None and share > IGNORED_SHARE_MAX
    assert head_of(masked) == "log_probs_only_head"
    # Batches whose width varies (no compile lever): TRL's head too.
    dynamic = lean_trainer(make_config, {"lightMetrics": "on"})
    assert head_of(dynamic) == "log_probs_only_head"
    # Either way the micro-step makes no more host syncs than the backbone (on CPU TRL's
    # head does not index by mask).
    step, backbone, _ = micro_step_sync_ops(masked)
    assert step == backbone


def test_ignored_label_share_counts_the_prepared_labels() -> None:
    from datasets import Dataset

    rows = Dataset.from_dict({"labels": [[-100, -100, 5, 6], [7, 8, 9, -100]]})
    assert ignored_label_share(rows) == pytest.approx(3 / 8)
    assert ignored_label_share(Dataset.from_dict({"input_ids": [[1, 2]]})) is None


def test_evaluation_takes_trls_path_through_the_lean_head(
    make_config: Any, monkeypatch: Any
) -> None:
    # Out of training, TRL's compute_loss runs (it reads entropy and accuracy): same loss.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")
    losses = []
    for light in ("off", "on"):
        trainer = lean_trainer(make_config, {**STATIC, "lightMetrics": light})
        if light == "on":
            assert head_of(trainer) == "lean_lm_head"
        inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
        trainer.model.eval()
        with torch.no_grad():
            losses.append(float(trainer.compute_loss(trainer.model, inputs)))
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
