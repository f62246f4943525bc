"""Packed plans: exact from a tokenizer pass where the planner reaches the tokenizer, else rough.

The operator's packed plan counts one row per sample (2.7-3x too many steps on real data).
`sftjob plan` on a manifest whose model and data are on this machine runs the model's
tokenizer and TRL's preparation over the data instead: its steps must be the steps the
trainer then measures and runs.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import yaml
from sftjob_operator.cli import main as sftjob
from sftjob_operator.plan import plan_for
from sftjob_trainer.settings import load_config
from sftjob_trainer.tiny import tiny_sftjob
from sftjob_trainer.worker import run_worker


def sftjob_plan(manifest: Path, *extra: str) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert sftjob(["plan", "-f", str(manifest), "-o", "json", *extra]) == 0
    return json.loads(out.getvalue())


def measured_plan(output: Path) -> dict:
    lines = (output / "progress.jsonl").read_text().splitlines()
    return next(r["measuredPlan"] for r in map(json.loads, lines) if "measuredPlan" in r)


@pytest.mark.parametrize(
    ("data", "strategy", "max_length", "cut"),
    [
        ("chat", "bfd", 96, False),
        ("prompt-completion", "wrapped", 64, False),
        # Every row is 23 tokens: bfd cuts each to 16, one packed row of its own.
        ("text", "bfd", 16, True),
    ],
)
def test_tokenized_packed_plan_equals_the_steps_the_trainer_runs(
    tiny, tmp_path, data, strategy, max_length, cut
):
    spec = {
        "dataset": {"path": str(tiny.data[data]), "limit": 96},
        "training": {
            "packing": True,
            "packingStrategy": strategy,
            "maxLength": max_length,
            "perDeviceTrainBatchSize": 2,
            "gradientAccumulationSteps": 2,
            "numTrainEpochs": 2,
        },
    }
    document = tiny_sftjob(tiny.model, tiny.data[data], tmp_path / "output", spec)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(document))

    planned = sftjob_plan(manifest)
    assert planned["packedEstimate"] == "tokenized" and planned["estimate"] is False
    assert planned["datasetSizeSource"] == "tokenized"
    rough = plan_for(load_config_of(document, tmp_path).spec)
    assert rough.packedEstimate == "rough" and rough.estimate is True
    if cut:
        assert planned["rowsTruncated"] == 96 and planned["totalSteps"] == rough.totalSteps
    else:
        assert planned["rowsTruncated"] == 0 and planned["totalSteps"] < rough.totalSteps

    config_path = tmp_path / "config.json"
    outcome = run_worker(write_config(document, config_path))
    assert outcome.reason == "Completed", outcome.message
    measured = measured_plan(tmp_path / "output")
    assert planned["datasetSize"] == measured["datasetSize"]
    assert planned["totalSteps"] == measured["totalSteps"] == outcome.step
    assert planned["rowsTruncated"] == measured["rowsTruncated"]
    assert planned["rowsDropped"] == measured["rowsDropped"]


def test_a_plan_without_the_tokenizer_stays_rough_and_says_why(tiny, tmp_path):
    document = tiny_sftjob(
        tiny.model, tiny.data["chat"], tmp_path / "output", {"training": {"packing": True}}
    )
    document["spec"]["model"] = {"name": "Qwen/Qwen2.5-1.5B-Instruct"}
    manifest = tmp_path / "job.yaml"
    manifest.write_text(yaml.safe_dump(document))
    planned = sftjob_plan(manifest)
    assert (planned["packedEstimate"], planned["estimate"]) == ("rough", True)
    assert planned["datasetSizeSource"] == "limit"
    assert any(
        "no tokenizer pass: the tokenizer (Qwen/Qwen2.5-1.5B-Instruct) is not a folder" in n
        for n in planned["notes"]
    )
    # --tokenize never skips it: the same rough plan, without the note.
    skipped = sftjob_plan(manifest, "--tokenize", "never")
    assert skipped["packedEstimate"] == "rough"
    assert not any("tokenizer pass" in n for n in skipped["notes"])


def write_config(document: dict, path: Path) -> Path:
    from sftjob_operator.api import parse_sftjob
    from sftjob_operator.trainer_config import build_trainer_config

    config = build_trainer_config(parse_sftjob(document))
    config["job"]["name"] = None  # progress to the console
    path.write_text(json.dumps(config))
    return path


def load_config_of(document: dict, folder: Path):
    return load_config(write_config(document, folder / "plan-config.json"))
