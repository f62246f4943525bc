"""The compile lever's static batches on a real (tiny) SFTTrainer, on CPU.

torch.compile runs with the "eager" backend here: dynamo guards, and so compiles new
graphs, exactly as under inductor, without minutes of C++ compilation on a 2-core machine. The
GPU run with inductor is in docs/performance.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch
from sftjob_trainer.levers.static_batches import PADDING_KEY, VARLEN_KEYS
from sftjob_trainer.settings import load_config
from sftjob_trainer.train import build_trainer
from transformers import TrainerCallback

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]

PER_DEVICE, ACCUMULATION, MAX_LENGTH = 2, 2, 128
STATIC = PER_DEVICE * MAX_LENGTH
STEPS = 3


class Logs(TrainerCallback):
    """Logged losses, and how many graphs dynamo has compiled when each step ends."""

    def __init__(self) -> None:
        self.logs: list[dict[str, Any]] = []
        self.graphs: list[int] = []

    def on_step_end(self, args: Any, state: Any, control: Any, **_: Any) -> None:
        from torch._dynamo.utils import counters

        self.graphs.append(int(counters["stats"]["unique_graphs"]))

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **_: Any) -> None:
        if logs and "loss" in logs:
            self.logs.append(dict(logs))


@pytest.fixture
def trainer_for(make_config: Any, varied_text: Path) -> Any:
    def build(speed: dict[str, str], extra: dict[str, Any]) -> Any:
        return _trainer(make_config, varied_text, speed, extra)

    return build


def _trainer(make_config: Any, data: Path, speed: dict[str, str], extra: dict[str, Any]) -> Any:
    quiet = {"autoMicroBatch": "off", "ligerKernel": "off", "lightMetrics": "off"}
    spec = {
        "dataset": {"path": str(data), "format": "text", "limit": 48},
        "training": {
            "maxSteps": STEPS,
            "loggingSteps": 1,
            "packing": True,
            "packingStrategy": "bfd",
            "perDeviceTrainBatchSize": PER_DEVICE,
            "gradientAccumulationSteps": ACCUMULATION,
            "maxLength": MAX_LENGTH,
            "speed": {**quiet, **speed},
            "extraArgs": extra,
        },
    }
    recorder = Logs()
    trainer = build_trainer(load_config(make_config(spec)), callbacks=[recorder])
    trainer.recorded = recorder
    return trainer


# SDPA: flex attention has no backward on CPU outside inductor. Static batches do not
# depend on the attention (both build the document mask from position_ids).
COMPILED = {"flexAttention": "off", "compile": "on"}
EAGER_BACKEND = {"torch_compile_backend": "eager"}


@pytest.fixture(autouse=True)
def restore_inductor_cache_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # The compile lever points the cache at the job's output; undone after each test.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "")


@pytest.fixture
def fresh_dynamo() -> Any:
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def assert_same_run_as_plain(trained: Any, trainer_for: Any) -> None:
    """`trained`'s logs against an unpadded, uncompiled run of the same job: the same
    losses, and the same real tokens counted (the padding is subtracted again)."""
    plain = trainer_for({"flexAttention": "off", "compile": "off"}, {})
    assert plain.args.pad_to_multiple_of is None and not plain.args.torch_compile
    plain.train()
    ours, reference = trained.recorded.logs, plain.recorded.logs
    assert len(ours) == len(reference) == STEPS
    for a, b in zip(ours, reference, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
        assert a["num_tokens"] == b["num_tokens"]


def test_static_batches_have_one_shape_and_no_varlen_keys(
    trainer_for: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    trainer = trainer_for(COMPILED, EAGER_BACKEND)
    # Compiled kernels are kept on the output volume, for the next attempt of the job.
    cache = Path(os.environ["TORCHINDUCTOR_CACHE_DIR"])
    output = Path(trainer.args.output_dir).parent  # the job's output; checkpoints below it
    assert cache == output / ".sftjob-cache" / "torchinductor"
    assert trainer.args.torch_compile and trainer.args.pad_to_multiple_of == STATIC
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    widths, paddings = set(), []
    for start in range(0, len(rows) - PER_DEVICE + 1, PER_DEVICE):
        examples = rows[start : start + PER_DEVICE]
        batch = trainer.data_collator(examples)
        assert not set(VARLEN_KEYS) & set(batch)
        widths.add(batch["input_ids"].size(1))
        real = sum(len(example["input_ids"]) for example in examples)
        assert batch[PADDING_KEY] == STATIC - real
        paddings.append(batch[PADDING_KEY])
        # Padding: not trained on, and each padding token a document of its own.
        assert (batch["labels"][0, real:] == -100).all()
        assert (batch["position_ids"][0, real:] == 0).all()
    assert widths == {STATIC}
    assert len(set(paddings)) > 1  # the real lengths do vary: the test sees a fixed shape


def test_compiled_static_run_compiles_once_and_learns_the_same(
    trainer_for: Any, fresh_dynamo: None
) -> None:
    compiled = trainer_for(COMPILED, EAGER_BACKEND)
    compiled.train()
    graphs = compiled.recorded.graphs
    assert graphs[0] >= 1  # dynamo did compile the model in the first step
    assert graphs == [graphs[0]] * STEPS  # and never again: no recompiles

    assert_same_run_as_plain(compiled, trainer_for)


def test_varying_shapes_would_recompile(trainer_for: Any, fresh_dynamo: None) -> None:
    # The control: the user's own pad_to_multiple_of turns static batches off, so the
    # packed length varies and dynamo recompiles (what the lever exists to prevent).
    trainer = trainer_for(COMPILED, {**EAGER_BACKEND, "pad_to_multiple_of": 8})
    assert trainer.args.pad_to_multiple_of == 8
    trainer.train()
    graphs = trainer.recorded.graphs
    assert graphs[-1] > graphs[0], graphs


def test_an_uncompiled_flex_plan_pads_and_keeps_its_kernels(
    trainer_for: Any, tmp_path: Path
) -> None:
    """The plan of a GPU run whose model is not compiled: flex attention pads the batches
    (static_batches.py) and its kernels go to the compile cache under the plan's key.

    On CPU flex attention has no backward (the pre-flight refuses it), so that plan is
    applied to a trainer built with SDPA and no lever that pads; the wiring is the same.
    """
    from sftjob_trainer.levers.contract import Choice
    from sftjob_trainer.speed import SpeedPlan, speed_plan_status

    # The user's own pad_to_multiple_of: TRL pads to it, and no lever of the built plan pads.
    trainer = trainer_for(
        {"flexAttention": "off", "compile": "off"}, {"pad_to_multiple_of": STATIC}
    )
    assert trainer.sftjob_speed_plan.static_length is None
    flex = Choice("flexAttention", True, "GPU plan", sft={"pad_to_multiple_of": STATIC})
    plan = SpeedPlan(
        (flex, Choice("compile", False, "a short run")),
        output_dir=str(tmp_path),
        compile_cache_key="flexkey",
    )
    assert plan.static_length == STATIC and plan.kernels_lever == "flexAttention"
    plan.apply(trainer)
    trainer.sftjob_speed_plan = plan

    rows = [trainer.train_dataset[i] for i in range(PER_DEVICE)]
    batch = trainer.data_collator(rows)
    assert batch["input_ids"].size(1) == STATIC and not set(VARLEN_KEYS) & set(batch)
    assert batch[PADDING_KEY] == STATIC - sum(len(row["input_ids"]) for row in rows)
    cache = trainer.sftjob_compile_cache
    assert cache.key == "flexkey" and cache.dirs[0] == tmp_path / ".sftjob-cache" / (
        "compile-artifacts"
    )
    # status.speedPlan says it on the flex lever, the one whose kernels are kept.
    levers = {lever["name"]: lever for lever in speed_plan_status(trainer)["levers"]}
    assert levers["flexAttention"]["reason"].startswith("compile cache cold (key flexkey")
    assert levers["compile"]["reason"] == "a short run"

    # The padding is not trained on and not counted: the same run as without it.
    trainer.train()
    assert_same_run_as_plain(trainer, trainer_for)
