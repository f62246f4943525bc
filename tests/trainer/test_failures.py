"""Each failure class ends with its reason, exit code and a termination message."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from sftjob_trainer.failures import MAX_MESSAGE_BYTES, DataError, Outcome, classify
from sftjob_trainer.worker import run_worker


@pytest.fixture
def termination_log(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv("SFTJOB_TERMINATION_LOG", str(path))
    return path


def written(path) -> Outcome:
    return Outcome.from_json(path.read_text())


def test_malformed_rows_are_a_data_error_naming_the_row(tiny, make_config, termination_log):
    outcome = run_worker(
        make_config({"dataset": {"path": str(tiny.data["malformed"]), "limit": None}})
    )
    assert (outcome.reason, outcome.exit_code) == ("DataError", 11)
    assert "row 3: messages[1].role is 'bot'" in outcome.message
    assert written(termination_log) == outcome


def test_unknown_extra_arg_is_a_config_error_with_suggestion(make_config, termination_log):
    outcome = run_worker(make_config({"training": {"extraArgs": {"packing_stratgy": "bfd"}}}))
    assert (outcome.reason, outcome.exit_code) == ("ConfigError", 12)
    assert "did you mean packing_strategy" in outcome.message
    assert written(termination_log).reason == "ConfigError"


def test_missing_model_path_is_a_model_load_error(tmp_path, make_config, termination_log):
    outcome = run_worker(make_config({"model": {"path": str(tmp_path / "no-model")}}))
    assert (outcome.reason, outcome.exit_code) == ("ModelLoadError", 13)
    assert "does not exist" in outcome.message


def test_broken_model_folder_is_a_model_load_error(tmp_path, make_config):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    outcome = run_worker(make_config({"model": {"path": str(broken)}}))
    assert (outcome.reason, outcome.exit_code) == ("ModelLoadError", 13)


def test_oom_test_hook_is_out_of_memory_at_first_step(make_config, monkeypatch, termination_log):
    monkeypatch.setenv("SFTJOB_TEST_OOM_ABOVE_BATCH", "2")
    outcome = run_worker(make_config({"training": {"perDeviceTrainBatchSize": 4}}))
    assert (outcome.reason, outcome.exit_code, outcome.step) == ("OutOfMemory", 10, 0)
    # The micro-batch the operator shrinks to (4 -> 2) fits under the same hook.
    assert (
        run_worker(make_config({"training": {"perDeviceTrainBatchSize": 2}})).reason == "Completed"
    )


def test_classify_messages():
    assert (
        classify(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")).exit_code
        == 10
    )
    assert classify(RuntimeError("CUDA error: out of memory")).reason == "OutOfMemory"
    internal = classify(KeyError("boom"))
    assert internal.reason == "InternalError" and internal.exit_code == 1
    assert internal.message.startswith("KeyError")
    long = classify(DataError("x" * 10_000))
    assert len(long.to_json().encode()) < 4096
    assert len(long.message.encode()) <= MAX_MESSAGE_BYTES


def test_launcher_propagates_the_worker_reason(make_config, tmp_path):
    # The pod's process is the launcher: its exit code and termination log must carry the
    # worker's reason, not a generic launcher failure.
    log = tmp_path / "pod-termination-log"
    env = {
        **os.environ,
        "SFTJOB_TERMINATION_LOG": str(log),
        "SFTJOB_TEST_OOM_ABOVE_BATCH": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "sftjob_trainer", "--config", str(make_config())],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 10, result.stderr[-2000:]
    message = json.loads(log.read_text())
    assert message["reason"] == "OutOfMemory" and message["step"] == 0


def test_unreadable_config_is_a_config_error(tmp_path):
    log = tmp_path / "log"
    result = subprocess.run(
        [sys.executable, "-m", "sftjob_trainer", "--config", str(tmp_path / "missing.json")],
        env={**os.environ, "SFTJOB_TERMINATION_LOG": str(log)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 12
    assert json.loads(log.read_text())["reason"] == "ConfigError"


def test_unwritable_termination_log_is_skipped(make_config, monkeypatch):
    monkeypatch.setenv("SFTJOB_TERMINATION_LOG", "/proc/no/such/termination-log")
    outcome = run_worker(make_config({"training": {"extraArgs": {"nope": 1}}}))
    assert outcome.reason == "ConfigError"
