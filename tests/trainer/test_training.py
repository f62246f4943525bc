"""Real TRL training on the tiny model, in-process on CPU."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sftjob_operator.plan import plan_for
from sftjob_trainer.settings import load_config
from sftjob_trainer.train import build_trainer
from sftjob_trainer.worker import run_worker


def reports(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "progress.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(
    ("data", "method", "packing"),
    [
        ("chat", "full", False),
        ("chat", "lora", True),
        ("prompt-completion", "full", True),
        ("prompt-completion", "lora", False),
    ],
)
def test_trains_and_saves(tiny, make_config, tmp_path, data, method, packing):
    spec = {
        "dataset": {"path": str(tiny.data[data]), "limit": 48},
        "method": method,
        "training": {"packing": packing, "maxLength": 96},
    }
    if method == "lora":
        spec["lora"] = {"r": 4, "alpha": 8, "targetModules": ["q_proj", "v_proj"]}
    config_path = make_config(spec)
    outcome = run_worker(config_path)
    assert (outcome.reason, outcome.exit_code) == ("Completed", 0), outcome.message

    output = tmp_path / "output"
    final = output / "final"
    if method == "lora":
        adapter = json.loads((final / "adapter_config.json").read_text())
        assert adapter["r"] == 4 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
        assert (final / "adapter_model.safetensors").is_file()
    else:
        assert (final / "model.safetensors").is_file()
    assert (final / "tokenizer.json").is_file()

    sent = reports(output)
    measured = next(r["measuredPlan"] for r in sent if "measuredPlan" in r)
    last = sent[-1]["progress"]
    assert last["step"] == last["totalSteps"] == measured["totalSteps"] == outcome.step
    assert last["loss"] is not None and last["loss"] > 0
    if packing:
        # Packed rows: the measured row count is what the Trainer iterated, not the 48 samples.
        assert measured["datasetSize"] < 48
    else:
        assert measured["datasetSize"] == 48
        assert measured["totalSteps"] == plan_for(load_config(config_path).spec).totalSteps


class Measured(Exception):
    """Raised at train begin: the Trainer has computed max_steps, no step needs to run."""


def measured_max_steps(config_path: Path) -> tuple[int, int]:
    from transformers import TrainerCallback

    class Capture(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            raise Measured(state.max_steps)

    trainer = build_trainer(load_config(config_path), callbacks=[Capture()])
    with pytest.raises(Measured) as caught:
        trainer.train()
    return caught.value.args[0], len(trainer.train_dataset)


@pytest.mark.parametrize(
    ("rows", "per_device", "accumulation", "training"),
    [
        (32, 4, 1, {"numTrainEpochs": 1}),
        (30, 4, 3, {"numTrainEpochs": 1.5}),  # fractional epochs stop mid-epoch, rounded up
        (30, 4, 2, {"numTrainEpochs": 2, "dataloaderDropLast": True}),
        (37, 4, 2, {"maxSteps": 5}),
        (3, 4, 8, {"numTrainEpochs": 3}),  # fewer rows than one micro-batch
        (50, 3, 4, {"numTrainEpochs": 2.5}),  # accumulation does not divide the batches
    ],
)
def test_plan_equals_trainer_max_steps(make_config, rows, per_device, accumulation, training):
    # The lead's cross-check: plan_for(spec).totalSteps == trainer.state.max_steps.
    config_path = make_config(
        {
            "dataset": {"limit": rows},
            "training": {
                "perDeviceTrainBatchSize": per_device,
                "gradientAccumulationSteps": accumulation,
                **training,
            },
        }
    )
    max_steps, prepared_rows = measured_max_steps(config_path)
    assert prepared_rows == rows  # no row dropped by truncation: the plan is exact
    assert plan_for(load_config(config_path).spec).totalSteps == max_steps


def test_chat_data_needs_a_chat_template(tiny, make_config):
    outcome = run_worker(make_config({"model": {"path": str(tiny.model_without_template)}}))
    assert (outcome.reason, outcome.exit_code) == ("ConfigError", 12)
    assert "no chat template" in outcome.message


def test_text_data_trains_without_a_chat_template(tiny, make_config):
    spec = {
        "model": {"path": str(tiny.model_without_template)},
        "dataset": {"path": str(tiny.data["text"]), "limit": 16},
    }
    outcome = run_worker(make_config(spec))
    assert outcome.reason == "Completed", outcome.message


def test_qlora_without_gpu_is_a_config_error(make_config):
    # A QLoRA spec for a GPU pod that landed on a machine without one (or without bitsandbytes).
    outcome = run_worker(make_config({"method": "qlora", "resources": {"gpusPerNode": 1}}))
    assert (outcome.reason, outcome.exit_code) == ("ConfigError", 12)
    assert "qlora needs a CUDA GPU" in outcome.message
