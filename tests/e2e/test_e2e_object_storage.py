"""An SFTJob reads its dataset from and writes its model to S3-compatible storage.

The local S3 server (moto in server mode, authentication on; tests/s3_kit.py) runs beside
the local control plane; the key pair reaches the pod only through a Secret named in
spec.secrets.s3. Local mode only: a real cluster's pods cannot reach a server on this host.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_harness import E2ECluster, condition, termination_report
from s3_kit import S3Server
from sftjob_trainer.object_store import MARKER, download_output
from sftjob_trainer.tiny import write_tiny_datasets

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def s3(cluster: E2ECluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    if cluster.local is None:
        pytest.skip("the local S3 server is reachable from local-node pods only")
    server = S3Server(tmp_path_factory.mktemp("s3") / "server.log")
    for bucket in ("e2e-data", "e2e-models"):
        server.make_bucket(bucket)
    yield server
    server.stop()


def create_key_secret(cluster: E2ECluster, name: str, access_key: str, secret_key: str) -> None:
    cluster.kubectl(
        "create",
        "secret",
        "generic",
        name,
        f"--from-literal=AWS_ACCESS_KEY_ID={access_key}",
        f"--from-literal=AWS_SECRET_ACCESS_KEY={secret_key}",
    )


def s3_job_spec(s3: S3Server, secret: str, dataset_uri: str, output_uri: str) -> dict[str, Any]:
    return {
        "spec": {
            "dataset": {"path": None, "uri": dataset_uri, "limit": 32},
            "output": {"uri": output_uri},
            "objectStorage": {"endpointUrl": s3.endpoint},
            "secrets": {"s3": {"name": secret}},
            "training": {"maxLength": 64, "loggingSteps": 1},
            "progressIntervalSeconds": 1,
        }
    }


@pytest.mark.timeout(300)
def test_dataset_and_model_on_object_storage_with_credentials_from_a_secret(
    cluster: E2ECluster, s3: S3Server, tmp_path: Path
) -> None:
    name = cluster.name("s3")
    data = write_tiny_datasets(tmp_path / "data")
    s3.put("e2e-data/chat/train.jsonl", data["chat"].read_bytes())
    secret = f"{name}-s3"
    create_key_secret(cluster, secret, s3.access_key, s3.secret_key)
    output_uri = f"s3://e2e-models/{name}/"
    spec = s3_job_spec(s3, secret, "s3://e2e-data/chat/train.jsonl", output_uri)
    cluster.submit(cluster.job_manifest("tiny-cpu.yaml", name, spec))

    status = cluster.wait_phase(name, "Succeeded", timeout=cluster.seconds(240))

    # 32 rows, micro-batch 4 x accumulation 2: 4 steps per epoch, 2 epochs.
    assert status["progress"]["step"] == status["plan"]["totalSteps"] == 8, status["progress"]
    report = termination_report(cluster.pod(f"{name}-a1-r0"))
    assert report.get("reason") == "Completed", report
    assert f"uploaded to {output_uri}" in report.get("message", ""), report
    keys = s3.keys(f"e2e-models/{name}")
    assert f"e2e-models/{name}/{MARKER}" in keys, keys
    download = tmp_path / "model"
    manifest = download_output(output_uri, download, s3.filesystem())
    assert {"model.safetensors", "config.json", "tokenizer.json"} <= set(manifest["files"])
    assert manifest["step"] == 8
    # The model card travels with the model: front matter that parses, the final loss as the
    # run logged it, and the loss curve it shows, a PNG that opens and is not blank.
    assert {"README.md", "loss-curve.png"} <= set(manifest["files"]), manifest["files"]
    card = (download / "README.md").read_text()
    front = yaml.safe_load(card.split("---")[1])
    assert front["library_name"] == "transformers", front  # tiny-cpu.yaml is a full fine-tune
    assert "loss-curve.png" in card
    from PIL import Image

    with Image.open(download / "loss-curve.png") as curve:
        assert curve.size[0] >= 300 and curve.size[1] >= 200, curve.size
        assert len(set(curve.convert("L").getdata())) > 2, "the loss curve is blank"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(download).num_parameters() > 0
    # The key pair went through the Secret only: not in the config the pods read.
    config = cluster.get_json("configmap", f"{name}-config")
    assert s3.secret_key not in json.dumps(config)
    pod_env = cluster.pod(f"{name}-a1-r0")["spec"]["containers"][0]["env"]
    by_name = {var["name"]: var for var in pod_env}
    assert by_name["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == secret


@pytest.mark.timeout(180)
def test_a_refused_key_pair_fails_the_job_with_a_config_error_and_no_retry(
    cluster: E2ECluster, s3: S3Server
) -> None:
    name = cluster.name("s3-keys")
    secret = f"{name}-s3"
    create_key_secret(cluster, secret, s3.access_key, "not-the-secret")
    s3.put("e2e-data/refused.jsonl", b"{}\n")
    spec = s3_job_spec(s3, secret, "s3://e2e-data/refused.jsonl", f"s3://e2e-models/{name}/")
    cluster.submit(cluster.job_manifest("tiny-cpu.yaml", name, spec))

    status = cluster.wait_phase(name, "Failed", timeout=cluster.seconds(150))

    failed = condition(status, "Failed")
    assert failed["reason"] == "ConfigError", failed
    assert f"spec.secrets.s3 (Secret {secret}" in failed["message"], failed["message"]
    assert status["attempts"] == 1 and status.get("restarts", 0) == 0
