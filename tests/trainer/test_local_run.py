"""`sftjob run -f`: plan, train locally through the pod entrypoint, say where the model is."""

from __future__ import annotations

import time

import yaml
from sftjob_trainer.local_run import run_file
from sftjob_trainer.tiny import tiny_sftjob


def test_run_file_trains_and_prints_plan_and_result(tiny, tmp_path, capsys):
    document = tiny_sftjob(
        tiny.model,
        tiny.data["chat"],
        tmp_path / "unused",
        {"dataset": {"limit": 24}},
        name="tiny-run",
    )
    del document["spec"]["output"]  # default /output: a pod path, so the workdir is used
    manifest = tmp_path / "sftjob.yaml"
    manifest.write_text(yaml.safe_dump(document))

    started = time.monotonic()
    code = run_file(manifest, workdir=tmp_path / "work", dataset_size=None)
    elapsed = time.monotonic() - started
    out = capsys.readouterr().out
    assert code == 0
    assert "SFTJob default/tiny-run" in out and "total steps       6" in out
    final = tmp_path / "work" / "tiny-run" / "output" / "final"
    assert f"Model saved in {final}" in out
    assert (final / "model.safetensors").is_file()
    assert elapsed < 120


def test_run_file_reports_invalid_specs(tmp_path, capsys):
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(
        "apiVersion: tuning.sftjob.dev/v1alpha1\nkind: SFTJob\nmetadata: {name: bad}\n"
        "spec: {model: {path: /m}, dataset: {path: /d}, training: {maxSeqLength: 10}}\n"
    )
    assert run_file(manifest, workdir=tmp_path) == 2
    assert "renamed to maxLength" in capsys.readouterr().err
