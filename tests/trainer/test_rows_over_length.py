"""Rows longer than maxLength: counted, reported, and the plan says it is an estimate.

TRL cuts such rows to maxLength and, without packing, drops those left with nothing to
learn from (here: a prompt filling maxLength under completion-only loss), silently. The
trainer counts both from TRL's own preparation and reports them with the measured plan,
which must then equal what ran.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from sftjob_operator.plan import plan_for
from sftjob_operator.progress_report import KEY_MEASURED_PLAN, encode_report, parse_report
from sftjob_trainer.settings import load_config
from sftjob_trainer.worker import run_worker

LONG = " ".join(["the cat likes red apples and the river sees small boats"] * 12)


def write_rows(path: Path, short: int, long_completion: int, long_prompt: int) -> Path:
    rows = [{"prompt": f"Q{i}: hi?", "completion": " yes."} for i in range(short)]
    rows += [{"prompt": "Q: tell me", "completion": f" {LONG}"} for _ in range(long_completion)]
    rows += [{"prompt": f"Q: {LONG}", "completion": " no."} for _ in range(long_prompt)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def reports(output: Path) -> list[dict]:
    return [json.loads(line) for line in (output / "progress.jsonl").read_text().splitlines()]


def test_rows_over_max_length_are_counted_and_the_measured_plan_is_what_ran(
    make_config, tmp_path, caplog
):
    data = write_rows(tmp_path / "long.jsonl", short=7, long_completion=2, long_prompt=2)
    config_path = make_config(
        {
            "dataset": {"path": str(data), "limit": 11, "format": "prompt-completion"},
            "training": {
                "maxLength": 48,
                "perDeviceTrainBatchSize": 1,
                "gradientAccumulationSteps": 1,
                "numTrainEpochs": 1,
            },
        }
    )
    planned = plan_for(load_config(config_path).spec)
    # The operator's plan cannot know how many rows TRL will drop: it says so.
    assert planned.totalSteps == 11 and planned.estimate is True
    assert any("prompt fills maxLength 48" in note for note in planned.notes)

    with caplog.at_level(logging.WARNING, logger="sftjob_trainer"):
        outcome = run_worker(config_path)
    assert outcome.reason == "Completed", outcome.message

    sent = reports(tmp_path / "output")
    measured = next(r["measuredPlan"] for r in sent if "measuredPlan" in r)
    assert (measured["rowsTruncated"], measured["rowsDropped"]) == (2, 2)
    # Eleven rows given, two dropped: nine steps ran and the measured plan says nine.
    assert measured["datasetSize"] == 9
    assert measured["totalSteps"] == outcome.step == 9
    sentence = (
        "4 of 11 training rows were longer than maxLength: 2 truncated to maxLength 48 "
        "tokens and 2 dropped"
    )
    assert any(note.startswith(sentence) for note in measured["notes"])
    assert any(r.getMessage().startswith(sentence) for r in caplog.records)

    # The counts pass the operator's validation into status.measuredPlan.
    report = parse_report(
        {**encode_report(job_uid="u", attempt=1, measured_plan=measured)}, job_uid="u", attempt=1
    )
    assert report.ignored == ()
    assert report.measured_plan is not None
    assert (report.measured_plan["rowsTruncated"], report.measured_plan["rowsDropped"]) == (2, 2)
    assert KEY_MEASURED_PLAN in encode_report(job_uid="u", attempt=1, measured_plan=measured)


def test_rows_within_max_length_report_zero(make_config, tmp_path):
    outcome = run_worker(make_config({"dataset": {"limit": 8}}))
    assert outcome.reason == "Completed", outcome.message
    measured = next(r["measuredPlan"] for r in reports(tmp_path / "output") if "measuredPlan" in r)
    assert (measured["rowsTruncated"], measured["rowsDropped"]) == (0, 0)
    assert measured["datasetSize"] == 8


@pytest.mark.parametrize(
    "training",
    [
        {"packing": True, "maxLength": 64},
        {"packing": True, "packingStrategy": "wrapped", "maxLength": 40},
        {"packing": True, "packingStrategy": "bfd_split", "maxLength": 16},
        {"maxLength": 16},
    ],
)
def test_counting_prepares_exactly_the_rows_plain_trl_prepares(make_config, tiny, training):
    # Counting runs TRL's preparation in two halves; training must see the very same rows
    # (order included) as one call of plain SFTTrainer, or the run would not be TRL's.
    from sftjob_trainer.data import prepare_dataset
    from sftjob_trainer.train import build_trainer
    from trl import SFTTrainer

    config = load_config(
        make_config(
            {
                "dataset": {"path": str(tiny.data["prompt-completion"]), "limit": 40},
                "training": training,
            }
        )
    )
    counted = build_trainer(config)
    assert type(counted) is not SFTTrainer and "train" in counted.row_counts
    rows, _ = prepare_dataset(config.spec.dataset)
    plain = SFTTrainer(
        model=counted.model,
        args=counted.args,
        train_dataset=rows,
        processing_class=counted.processing_class,
    )
    assert counted.train_dataset.column_names == plain.train_dataset.column_names
    assert counted.train_dataset[:] == plain.train_dataset[:]


def test_rows_tokenized_in_two_processes_are_packed_as_in_one(make_config, varied_text):
    # The dataWorkers lever tokenizes a large dataset in several processes
    # (dataset_num_proc). Packed in one process afterwards, the rows are those of a single
    # process's preparation; TRL's own call would pack each process's shard apart.
    import copy

    from sftjob_trainer.data import prepare_dataset
    from sftjob_trainer.train import build_trainer
    from trl import SFTTrainer

    # Rows of 3 to 59 words, so how they pack depends on which rows share a process.
    training = {"packing": True, "packingStrategy": "bfd", "maxLength": 128}
    config = load_config(
        make_config(
            {
                "dataset": {"path": str(varied_text), "format": "text"},
                "training": {**training, "extraArgs": {"dataset_num_proc": 2}},
            }
        )
    )
    counted = build_trainer(config)
    assert counted.args.dataset_num_proc == 2
    rows, _ = prepare_dataset(config.spec.dataset)
    one_process = copy.copy(counted.args)
    one_process.dataset_num_proc = None

    def plain(args):
        trainer = SFTTrainer(
            model=counted.model,
            args=args,
            train_dataset=rows,
            processing_class=counted.processing_class,
        )
        return trainer.train_dataset[:]

    assert counted.row_counts["train"].prepared == len(counted.train_dataset)
    # Each preparation computed afresh: datasets' cache key does not include num_proc, so
    # with it on, every call below would return the packing above.
    import datasets

    datasets.disable_caching()
    try:
        assert counted.train_dataset[:] == plain(one_process)
        # The control: TRL's single call with two processes packs each half apart.
        assert plain(counted.args) != plain(one_process)
    finally:
        datasets.enable_caching()
