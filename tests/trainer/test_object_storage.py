"""dataset.uri and output.uri on S3-compatible storage, against a real local S3 server.

The server is moto in server mode with authentication on (tests/s3_kit.py), in its own
process; network faults come from a TCP proxy that resets connections mid-upload.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from s3_kit import CuttingProxy, S3Server, free_port
from sftjob_operator.api import parse_sftjob
from sftjob_trainer.failures import DataError, NetworkError, classify
from sftjob_trainer.object_store import (
    MARKER,
    Retries,
    download_output,
    fetch_dataset,
    upload_output,
)
from sftjob_trainer.tiny import tiny_sftjob
from sftjob_trainer.worker import run_worker

QUICK = Retries(attempts=3, first_backoff=0.1)


@pytest.fixture(scope="module")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("s3") / "server.log")
    for bucket in ("data", "models"):
        server.make_bucket(bucket)
    yield server
    server.stop()


@pytest.fixture
def s3_env(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The key pair in the env, as the operator maps it from the job's Secret."""
    for name, value in s3.env().items():
        monkeypatch.setenv(name, value)
    return s3


def s3_spec(endpoint: str, dataset_uri: str, output_uri: str) -> dict[str, object]:
    return {
        "dataset": {"path": None, "uri": dataset_uri, "limit": None},
        "output": {"uri": output_uri},
        "objectStorage": {"endpointUrl": endpoint},
        "secrets": {"s3": {"name": "s3-keys"}},
    }


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_trains_from_a_prefix_of_files_and_uploads_the_model(tiny, make_config, s3_env, tmp_path):
    rows = tiny.data["chat"].read_bytes().splitlines(keepends=True)
    s3_env.put("data/chat/part-1.jsonl", b"".join(rows[:20]))
    s3_env.put("data/chat/part-2.jsonl", b"".join(rows[20:40]))
    config = make_config(s3_spec(s3_env.endpoint, "s3://data/chat/", "s3://models/run-1/"))

    outcome = run_worker(config)

    assert (outcome.reason, outcome.exit_code) == ("Completed", 0), outcome.message
    assert "uploaded to s3://models/run-1/" in outcome.message
    final = tmp_path / "output" / "final"
    keys = s3_env.keys("models/run-1")
    local = {p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()}
    assert keys == {f"models/run-1/{name}" for name in local | {MARKER}}
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= local
    if (final / "README.md").is_file():  # the model card, where the trainer writes one
        assert "models/run-1/README.md" in keys

    download = tmp_path / "download"
    manifest = download_output("s3://models/run-1/", download, s3_env.filesystem())
    assert manifest["step"] == outcome.step and manifest["files"]["model.safetensors"]["size"] > 0
    assert sha256(download / "model.safetensors") == sha256(final / "model.safetensors")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(download)
    assert model.num_parameters() > 0
    # All 40 rows of both files were read: 40 rows / batch 4 = 10 steps in one epoch.
    assert outcome.step == 10


def upload_spec(endpoint: str, output_uri: str) -> object:
    document = tiny_sftjob(
        Path("/m"), Path("/d"), Path("/o"), s3_spec(endpoint, "s3://x/y", output_uri)
    )
    return parse_sftjob(document).spec


def test_a_connection_reset_mid_upload_is_retried_and_the_model_completes(tiny, s3_env, tmp_path):
    proxy = CuttingProxy(s3_env.port, cut_after=100_000, cuts=1)
    try:
        spec = upload_spec(proxy.endpoint, "s3://models/retried/")
        manifest = upload_output(spec, tiny.model, retries=QUICK)
    finally:
        proxy.stop()

    assert proxy.cut_count == 1  # model.safetensors (399 kB) was cut once, then re-sent
    downloaded = download_output("s3://models/retried/", tmp_path, s3_env.filesystem())
    assert downloaded == manifest
    assert sha256(tmp_path / "model.safetensors") == sha256(tiny.model / "model.safetensors")


def test_an_upload_that_keeps_failing_is_a_network_error_and_leaves_no_marker(
    tiny, s3_env, tmp_path
):
    # An earlier run completed here: its marker must not vouch for the new, partial files.
    upload_output(upload_spec(s3_env.endpoint, "s3://models/broken/"), tiny.model, retries=QUICK)
    assert "models/broken/_SUCCESS" in s3_env.keys("models/broken")
    proxy = CuttingProxy(s3_env.port, cut_after=100_000, cuts=1000)
    try:
        spec = upload_spec(proxy.endpoint, "s3://models/broken/")
        with pytest.raises(NetworkError) as caught:
            upload_output(spec, tiny.model, retries=QUICK)
    finally:
        proxy.stop()

    assert proxy.cut_count == QUICK.attempts
    assert "spec.output.uri s3://models/broken/" in str(caught.value)
    assert classify(caught.value).reason == "NetworkError"  # the operator relaunches it
    assert "models/broken/_SUCCESS" not in s3_env.keys("models/broken")
    with pytest.raises(DataError, match="no _SUCCESS"):
        download_output("s3://models/broken/", tmp_path, s3_env.filesystem())


def test_refused_credentials_are_a_config_error_naming_the_secret(make_config, s3, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    s3.put("data/creds.jsonl", b"{}\n")

    outcome = run_worker(
        make_config(s3_spec(s3.endpoint, "s3://data/creds.jsonl", "s3://models/c/"))
    )

    assert outcome.reason == "ConfigError", outcome.message
    assert "spec.secrets.s3 (Secret s3-keys" in outcome.message


@pytest.mark.parametrize("uri", ["s3://data/missing.jsonl", "s3://no-such-bucket/train.jsonl"])
def test_a_missing_object_or_bucket_is_a_data_error_naming_dataset_uri(make_config, s3_env, uri):
    outcome = run_worker(make_config(s3_spec(s3_env.endpoint, uri, "s3://models/m/")))

    assert outcome.reason == "DataError", outcome.message
    assert f"spec.dataset.uri {uri}" in outcome.message


def test_a_missing_output_bucket_fails_before_the_model_loads(make_config, s3_env):
    s3_env.put("data/ok.jsonl", b"{}\n")
    spec = s3_spec(s3_env.endpoint, "s3://data/ok.jsonl", "s3://no-such-bucket/out/")

    outcome = run_worker(make_config(spec))

    assert outcome.reason == "ConfigError", outcome.message
    assert "spec.output.uri s3://no-such-bucket/out/" in outcome.message


def test_an_unreachable_endpoint_is_a_network_error(s3_env, tmp_path):
    nobody = f"http://127.0.0.1:{free_port()}"
    spec = upload_spec(nobody, "s3://models/x/")

    with pytest.raises(NetworkError) as caught:
        fetch_dataset(spec, into=tmp_path, retries=QUICK)

    assert "spec.dataset.uri s3://x/y" in str(caught.value)
    assert classify(caught.value).reason == "NetworkError"
