"""The trainer against plain TRL on CPU, same seed and arguments: bit for bit the same run.

Plain TRL is SFTTrainer given the spec's SFTConfig arguments (config_map.sft_kwargs, what a
user would pass by hand), the model loaded by transformers and the data by datasets. The
trainer is its own path: rows validated, model loaded, speed plan decided and applied,
SFTTrainer built by train.build_trainer. Losses, learning rates, gradient norms and the
final weights must be equal to the bit, for the default speed plan and for the `exact`
preset with every lever it keeps forced on (issue 22).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = [pytest.mark.trainer, pytest.mark.timeout(600)]

# Under bf16 autocast, so the weight copies have casts to save and the stream a dtype.
TRAINING = {"bf16": True, "maxSteps": 4, "perDeviceTrainBatchSize": 2}
# Every lever the exact preset keeps, forced on (on CPU "auto" leaves them off).
EXACT_LEVERS = {
    "dataWorkers": "on",
    "castWeightsOncePerStep": "on",
    "rotaryTablesOnce": "on",
    "parallelSave": "on",
}
LOGGED = ("loss", "learning_rate", "grad_norm")


def run_record(trainer: Any) -> tuple[list[dict[str, float]], dict[str, torch.Tensor]]:
    trainer.train()
    logs = [
        {key: entry[key] for key in LOGGED}
        for entry in trainer.state.log_history
        if "loss" in entry
    ]
    weights = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
    return logs, weights


def plain_trl(config_path: Path, tiny: Any, output: Path) -> Any:
    from datasets import load_dataset
    from sftjob_trainer.config_map import sft_kwargs
    from sftjob_trainer.settings import load_config
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    config = load_config(config_path)
    args = SFTConfig(**{**sft_kwargs(config), "output_dir": str(output)})
    rows = load_dataset("json", data_files=str(tiny.data["chat"]), split="train")
    return SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny.model, dtype=torch.float32),
        args=args,
        train_dataset=rows.select(range(config.spec.dataset.limit)),
        processing_class=AutoTokenizer.from_pretrained(tiny.model),
    )


@pytest.mark.parametrize(
    ("preset", "speed", "levers_on"),
    [
        ("default", {}, set()),
        ("exact", {"preset": "exact", **EXACT_LEVERS}, set(EXACT_LEVERS)),
    ],
)
def test_the_trainer_trains_bit_for_bit_as_plain_trl(
    make_config: Any, tiny: Any, tmp_path: Path, preset: str, speed: dict, levers_on: set
) -> None:
    from sftjob_trainer.settings import load_config
    from sftjob_trainer.speed import speed_plan_status
    from sftjob_trainer.train import build_trainer

    config_path = make_config({"training": {**TRAINING, "speed": speed}})
    ours = build_trainer(load_config(config_path))
    plan = speed_plan_status(ours)
    assert plan is not None and plan["preset"] == preset
    assert {lever["name"] for lever in plan["levers"] if lever["on"]} == levers_on
    our_logs, our_weights = run_record(ours)
    plain = plain_trl(config_path, tiny, tmp_path / "plain")
    plain_logs, plain_weights = run_record(plain)

    assert len(our_logs) == len(plain_logs) == TRAINING["maxSteps"]
    assert our_logs == plain_logs  # float equality: to the bit
    assert our_weights.keys() == plain_weights.keys()
    changed = 0
    for name, weight in plain_weights.items():
        assert torch.equal(our_weights[name], weight), name
        changed += not torch.equal(weight, weights_at_start(tiny)[name])
    assert changed  # the run trained: equal weights are not merely untouched ones
    # The saved model too: parallelSave's threads write TRL's file, byte for byte.
    ours.save_model(str(tmp_path / "ours-saved"))
    plain.save_model(str(tmp_path / "plain-saved"))
    weights_file = "model.safetensors"
    assert (tmp_path / "ours-saved" / weights_file).read_bytes() == (
        tmp_path / "plain-saved" / weights_file
    ).read_bytes()


def test_the_comparison_sees_a_lever_that_changes_numbers(
    make_config: Any, tiny: Any, tmp_path: Path
) -> None:
    """The control: with bf16ResidualStream forced on the losses differ from plain TRL's."""
    from sftjob_trainer.settings import load_config
    from sftjob_trainer.train import build_trainer

    config_path = make_config({"training": {**TRAINING, "speed": {"bf16ResidualStream": "on"}}})
    our_logs, _ = run_record(build_trainer(load_config(config_path)))
    plain_logs, _ = run_record(plain_trl(config_path, tiny, tmp_path / "plain"))
    assert len(our_logs) == len(plain_logs) and our_logs != plain_logs


_START: dict[str, torch.Tensor] = {}


def weights_at_start(tiny: Any) -> dict[str, torch.Tensor]:
    if not _START:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(tiny.model, dtype=torch.float32)
        _START.update({k: v.detach().clone() for k, v in model.state_dict().items()})
    return _START
