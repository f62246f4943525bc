"""Evaluation: dataset.eval, training.evalSteps and output.keepBest on a real tiny run."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from sftjob_operator.plan import plan_for
from sftjob_operator.progress_report import encode_report, parse_report
from sftjob_trainer.config_map import sft_kwargs
from sftjob_trainer.settings import load_config
from sftjob_trainer.worker import run_worker


def reports(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "progress.jsonl").read_text().splitlines()]


def eval_losses(sent: list[dict]) -> dict[int, float]:
    """{step: eval loss} where a report brought a new one (later reports repeat the latest)."""
    found: dict[int, float] = {}
    previous = None
    for report in sent:
        loss = report.get("progress", {}).get("evalLoss")
        if loss is not None and loss != previous:
            found[report["progress"]["step"]] = loss
        previous = loss
    return found


def weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_held_out_eval_reports_losses_and_keeps_the_best_checkpoint(make_config, tmp_path):
    config_path = make_config(
        {
            "dataset": {"limit": 32, "eval": {"fraction": 0.25, "seed": 5}},
            "training": {
                "perDeviceTrainBatchSize": 4,
                "numTrainEpochs": 2,
                "evalSteps": 2,
                "saveSteps": 2,
                "saveTotalLimit": 1,
                # A high rate makes the eval loss go up and down: the best is not always the last.
                "learningRate": 0.9,
                "lrSchedulerType": "constant",
            },
            "output": {"keepBest": True},
        }
    )
    config = load_config(config_path)
    planned = plan_for(config.spec)
    # ceil(0.25 x 32) = 8 rows held out, 24 train: 6 steps an epoch, 12 in all.
    assert (planned.datasetSize, planned.totalSteps) == (24, 12)

    outcome = run_worker(config_path)
    assert outcome.reason == "Completed", outcome.message
    assert outcome.step == planned.totalSteps

    output = tmp_path / "output"
    sent = reports(output)
    measured = next(r["measuredPlan"] for r in sent if "measuredPlan" in r)
    assert measured["datasetSize"] == 24 and measured["totalSteps"] == 12
    losses = eval_losses(sent)
    # Evaluated every 2 steps: one report each, unthrottled, so the history has all six.
    assert sorted(losses) == [2, 4, 6, 8, 10, 12]
    assert all(math.isfinite(loss) and loss > 0 for loss in losses.values())
    last = sent[-1]["progress"]
    best_step = min(losses, key=lambda step: losses[step])
    # A fixed seed on CPU: the loss at this rate rises after step 8, so the best is not the
    # last checkpoint and saveTotalLimit 1 must keep it anyway.
    assert best_step != 12
    assert last["bestEvalLoss"] == pytest.approx(losses[best_step], rel=1e-6)
    # The status accepts every report.
    parsed = parse_report(
        encode_report(job_uid="u", attempt=1, progress=last), job_uid="u", attempt=1
    )
    assert parsed.ignored == () and parsed.progress is not None
    assert parsed.progress["evalLoss"] == losses[12]

    # keepBest: the best checkpoint survives saveTotalLimit 1 (transformers removes the last
    # one at the end when it is not the best), and the final model is the best one.
    kept = sorted(p.name for p in (output / "checkpoints").glob("checkpoint-*"))
    assert kept == [f"checkpoint-{best_step}"]
    best = output / "checkpoints" / kept[0]
    state = json.loads((best / "trainer_state.json").read_text())
    assert Path(state["best_model_checkpoint"]).name == best.name
    assert state["best_metric"] == pytest.approx(losses[best_step], rel=1e-6)
    final, chosen = weights(output / "final"), weights(best)
    assert final.keys() == chosen.keys()
    assert all((final[name] == chosen[name]).all() for name in final)


def test_eval_file_is_checked_and_evaluated(tiny, make_config, tmp_path):
    eval_file = tmp_path / "eval.jsonl"
    rows = tiny.data["chat"].read_text().splitlines()[:6]
    eval_file.write_text("\n".join(rows) + "\n")
    config_path = make_config(
        {"dataset": {"limit": 16, "eval": {"path": str(eval_file)}}, "training": {"evalSteps": 2}}
    )
    outcome = run_worker(config_path)
    assert outcome.reason == "Completed", outcome.message
    assert sorted(eval_losses(reports(tmp_path / "output"))) == [2, 4]


def test_eval_file_in_another_format_is_a_data_error(tiny, make_config):
    outcome = run_worker(make_config({"dataset": {"eval": {"path": str(tiny.data["text"])}}}))
    assert (outcome.reason, outcome.exit_code)[0] == "DataError"
    assert "dataset.eval" in outcome.message and "text data" in outcome.message


def test_eval_settings_map_to_transformers(make_config):
    config = load_config(
        make_config(
            {
                "dataset": {"eval": {"fraction": 0.1}},
                "training": {"saveSteps": 20},
                "output": {"keepBest": True},
            }
        )
    )
    kwargs = sft_kwargs(config, valid_fields=None)
    # Without evalSteps, evaluate where checkpoints are saved: each one has an eval loss.
    assert (kwargs["eval_strategy"], kwargs["eval_steps"], kwargs["save_steps"]) == (
        "steps",
        20,
        20,
    )
    assert kwargs["load_best_model_at_end"] is True
    assert (kwargs["metric_for_best_model"], kwargs["greater_is_better"]) == ("eval_loss", False)
