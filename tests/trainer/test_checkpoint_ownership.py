"""Resume only from this job's checkpoints, written with the same training settings; one
writer per output (issue 22, defect 5). Real tiny TRL runs through the pod entrypoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from sftjob_operator.api import parse_sftjob
from sftjob_operator.trainer_config import build_trainer_config
from sftjob_trainer.checkpoints import (
    RUN_RECORD,
    JobIdentity,
    RunRecord,
    changed_fields,
    read_record,
    training_fields,
)
from sftjob_trainer.output_lease import LEASE_FILE, Holder, take_reason
from sftjob_trainer.tiny import tiny_sftjob
from sftjob_trainer.train import newest_checkpoint
from worker_kit import progress_steps, sigterm_at_step

LEASE = {"SFTJOB_OUTPUT_LEASE_SECONDS": "2"}


def job_config(
    tiny: Any,
    folder: Path,
    output: Path,
    *,
    uid: str,
    name: str = "tiny",
    spec: dict[str, Any] | None = None,
    attempt: int = 1,
) -> Path:
    """A resolved config as the operator writes it for job `name` with `uid`."""
    document = tiny_sftjob(tiny.model, tiny.data["chat"], output, spec or {}, name=name)
    document["metadata"]["uid"] = uid
    config = build_trainer_config(parse_sftjob(document), attempt=attempt)
    path = folder / f"config-{name}-{uid}-{attempt}-{len(list(folder.glob('config-*')))}.json"
    path.write_text(json.dumps(config))
    return path


def start(config: Path, log: Path, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "sftjob_trainer", "--config", str(config)],
        env={
            **os.environ,
            "SFTJOB_REPORT": "console",
            "SFTJOB_TERMINATION_LOG": str(log),
            **LEASE,
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def run(config: Path, log: Path, **env: str) -> tuple[int, dict[str, Any], str]:
    process = start(config, log, **env)
    out, _ = process.communicate(timeout=240)
    return process.returncode, json.loads(log.read_text()), out


def state_of(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def test_changed_training_settings_refuse_to_resume_and_name_the_fields(tiny, tmp_path):
    output = tmp_path / "output"
    log = tmp_path / "termination-log"
    first = job_config(tiny, tmp_path, output, uid="uid-a", spec={"dataset": {"limit": 16}})
    code, done, out = run(first, log)
    assert code == 0, out[-3000:]
    checkpoint = newest_checkpoint(output / "checkpoints")
    assert checkpoint is not None and checkpoint.name == f"checkpoint-{done['step']}"
    record = read_record(checkpoint)
    assert record is not None and record.identity.uid == "uid-a"
    assert record.fields["training.learningRate"] == 1e-3

    # The same job, same settings: its own checkpoint is resumed.
    code, again, out = run(first, log)
    assert code == 0, out[-3000:]
    assert f"resumed from {checkpoint.name}" in again["message"]

    before = {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()}
    changed = job_config(
        tiny,
        tmp_path,
        output,
        uid="uid-a",
        spec={"dataset": {"limit": 16}, "training": {"learningRate": 1e-4, "numTrainEpochs": 2}},
    )
    code, refused, out = run(changed, log)
    assert code == 12, out[-3000:]
    assert refused["reason"] == "ConfigError"
    message = refused["message"]
    assert "training.learningRate 0.001 -> 0.0001" in message
    assert "training.numTrainEpochs 1 -> 2" in message
    assert checkpoint.name in message and "output.resume: never" in message
    # Refused before training: the checkpoint is as it was.
    assert {p.name: p.stat().st_mtime_ns for p in checkpoint.iterdir()} == before


def test_another_jobs_checkpoint_is_refused_and_never_starts_fresh_keeping_it(tiny, tmp_path):
    # The issue: a new job on a reused claim resumed job A's last checkpoint and reported
    # "Succeeded 201/200", or with more steps "250/250" after running only the difference.
    output = tmp_path / "output"
    log = tmp_path / "termination-log"
    spec = {"dataset": {"limit": 16}, "training": {"maxSteps": 3}}
    code, done_a, out = run(
        job_config(tiny, tmp_path, output, uid="uid-a", name="a", spec=spec), log
    )
    assert code == 0, out[-3000:]
    assert done_a["step"] == 3

    longer = {"dataset": {"limit": 16}, "training": {"maxSteps": 5}}
    b = job_config(tiny, tmp_path, output, uid="uid-b", name="b", spec=longer)
    code, refused, out = run(b, log)
    assert code == 12, out[-3000:]
    assert refused["reason"] == "ConfigError"
    assert "checkpoint-3 belongs to job default/a (uid uid-a)" in refused["message"]
    assert "training.maxSteps 3 -> 5" in refused["message"]

    fresh = {**longer, "output": {"resume": "never"}}
    code, done_b, out = run(
        job_config(tiny, tmp_path, output, uid="uid-b", name="b", spec=fresh), log
    )
    assert code == 0, out[-3000:]
    assert done_b["step"] == 5 and "resumed" not in done_b["message"]
    state = state_of(newest_checkpoint(output / "checkpoints"))
    trained = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert trained == [1, 2, 3, 4, 5]  # every step ran in this job, none came from job a
    assert read_record(output / "checkpoints" / "checkpoint-5").identity.uid == "uid-b"
    # Job a's files were moved aside, not deleted.
    (kept,) = (output / "superseded").iterdir()
    assert read_record(kept / "checkpoints" / "checkpoint-3").identity.uid == "uid-a"
    assert (kept / "final" / "model.safetensors").is_file()


def test_sigterm_resume_of_a_job_with_a_uid_stays_exact(tiny, tmp_path):
    # Ownership must not break the exact resume after SIGTERM (test_resume.py runs it
    # without a job identity): here as the operator's relaunch, attempt 2 of the same uid.
    output = tmp_path / "output"
    log = tmp_path / "termination-log"
    spec = {"dataset": {"limit": 64}}
    first = start(
        job_config(tiny, tmp_path, output, uid="uid-a", spec=spec),
        log,
        SFTJOB_TEST_SLEEP_PER_STEP="0.25",
    )
    code, out = sigterm_at_step(first, output, 3, timeout=120)
    assert code == 14, out[-3000:]
    stopped_at = json.loads(log.read_text())["step"]
    assert not (output / LEASE_FILE).exists()  # released on the way out

    second = job_config(tiny, tmp_path, output, uid="uid-a", spec=spec, attempt=2)
    code, done, out = run(second, log)
    assert code == 0, out[-3000:]
    assert f"resumed from checkpoint-{stopped_at}" in done["message"]
    state = state_of(newest_checkpoint(output / "checkpoints"))
    assert state["global_step"] == state["max_steps"] == done["step"] == 16


def test_an_output_leased_by_a_live_run_is_refused(tiny, tmp_path):
    output = tmp_path / "output"
    spec = {"dataset": {"limit": 64}}
    a = start(
        job_config(tiny, tmp_path, output, uid="uid-a", name="a", spec=spec),
        tmp_path / "log-a",
        SFTJOB_TEST_SLEEP_PER_STEP="0.3",
    )
    try:
        deadline = time.monotonic() + 120
        while not progress_steps(output):
            assert a.poll() is None, a.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "job a never started training"
            time.sleep(0.1)
        b = job_config(
            tiny,
            tmp_path,
            output,
            uid="uid-b",
            name="b",
            spec={**spec, "output": {"resume": "never"}},
        )
        code, refused, out = run(b, tmp_path / "log-b")
        assert code == 12, out[-3000:]
        assert refused["reason"] == "ConfigError"
        assert f"output {output} is in use by job default/a (uid uid-a)" in refused["message"]
        assert a.poll() is None  # job a goes on, its files untouched
        assert not (output / "superseded").exists()
    finally:
        a.send_signal(signal.SIGTERM)
        a.communicate(timeout=60)


def test_a_stale_lease_is_taken_over(tiny, tmp_path):
    # A writer on another node died without releasing: nobody renews its lease, so after
    # the lease time the new run takes the output over and trains. That node's clock ran an
    # hour ahead: its renewedAt looks fresh here, so only watching it can tell.
    output = tmp_path / "output"
    output.mkdir()
    dead = Holder(
        identity=JobIdentity(namespace="default", name="a", uid="uid-a"),
        attempt=1,
        host="node-that-died",
        pid=1,
        token="0123456789abcdef",
        renewed_at=time.time() + 3600,
        lease_seconds=2,
    )
    (output / LEASE_FILE).write_text(json.dumps(dead.to_json()))
    config = job_config(tiny, tmp_path, output, uid="uid-b", spec={"dataset": {"limit": 16}})
    started = time.monotonic()
    code, done, out = run(config, tmp_path / "log")
    assert code == 0, out[-3000:]
    assert time.monotonic() - started >= 2
    assert "taking the output lease of job default/a (uid uid-a)" in out
    assert "not renewed for 2s while watched" in out, out[-3000:]
    assert not (output / LEASE_FILE).exists()


def holder(**changes: Any) -> Holder:
    base = {
        "identity": JobIdentity(namespace="ns", name="a", uid="uid-a"),
        "attempt": 1,
        "host": "pod-a",
        "pid": 10,
        "token": "t-a",
        "renewed_at": 1000.0,
        "lease_seconds": 60.0,
    }
    return Holder(**{**base, **changes})


@pytest.mark.parametrize(
    ("held", "me", "now", "alive", "expected"),
    [
        (None, holder(), 1000.0, True, "free"),
        (holder(), holder(), 1001.0, True, "ours"),
        (holder(), holder(token="t-2", attempt=2, host="pod-a2"), 1001.0, True, "attempt 1"),
        (holder(), holder(token="t-b", pid=11), 1001.0, False, "is gone"),
        (holder(), holder(token="t-b"), 1001.0, True, "is gone"),  # our pid: a restart
        (holder(), holder(token="t-b", host="pod-b"), 1061.0, True, "not renewed for 61s"),
        # Live and renewed recently: watched, never taken at once.
        (holder(), holder(token="t-b", host="pod-b"), 1030.0, True, None),
        (holder(), holder(token="t-b", pid=11), 1030.0, True, None),
        (holder(), holder(token="t-2", host="pod-a2"), 1030.0, True, None),  # same attempt
        (
            holder(),
            holder(identity=JobIdentity(uid="uid-b"), token="t-b", attempt=2, host="pod-b"),
            1030.0,
            True,
            None,
        ),
    ],
)
def test_when_a_lease_is_taken_at_once(held, me, now, alive, expected):
    reason = take_reason(held, me, now, lambda pid: alive)
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


def test_training_fields_resolve_defaults_and_skip_what_does_not_train(tiny, tmp_path):
    def fields(spec: dict[str, Any]) -> dict[str, Any]:
        document = tiny_sftjob(tiny.model, tiny.data["chat"], tmp_path, spec)
        config = build_trainer_config(parse_sftjob(document))
        return training_fields(config["spec"], config["resolved"], config["plan"])

    base = fields({"method": "lora", "training": {"learningRate": None}})
    assert base["training.learningRate"] == 2e-4  # the method's default, as it ran
    assert base["lora.r"] == 16 and base["effectiveBatchSize"] == 4
    # An OOM shrink (batch split), reporting, saving and speed do not change the run.
    same = fields(
        {
            "method": "lora",
            "training": {
                "learningRate": None,
                "perDeviceTrainBatchSize": 2,
                "gradientAccumulationSteps": 2,
                "saveSteps": 7,
                "loggingSteps": 3,
                "speed": {"compile": "off"},
            },
            "progressIntervalSeconds": 30,
        }
    )
    assert same == base
    other = fields({"method": "lora", "lora": {"r": 8}, "training": {"learningRate": None}})
    assert changed_fields(base, other) == ["lora.r 16 -> 8"]
    record = RunRecord(identity=JobIdentity(uid="u"), fields=base)
    assert RunRecord.from_json(json.loads(json.dumps(record.to_json()))) == record
    assert RUN_RECORD == "sftjob-run.json"


def test_sftjob_run_is_identified_by_its_manifest_name(tiny, tmp_path):
    from sftjob_trainer.checkpoints import job_identity
    from sftjob_trainer.local_run import local_config

    document = tiny_sftjob(tiny.model, tiny.data["chat"], tmp_path, {}, name="my-run")
    identity = job_identity(local_config(parse_sftjob(document), tmp_path, None))
    assert identity.key == "manifest:my-run"
    assert identity.describe() == "the `sftjob run` of manifest my-run"
    # The operator's config names the job by uid, whatever its name.
    document["metadata"]["uid"] = "1234"
    operator = job_identity(build_trainer_config(parse_sftjob(document)))
    assert operator.key == "uid:1234"
    assert operator.describe() == "job default/my-run (uid 1234)"
