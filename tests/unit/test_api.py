"""The typed SFTJob API: defaults, and field-level errors for bad specs."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from sftjob_operator.api import SpecError, parse_sftjob, parse_spec

MINIMAL: dict[str, Any] = {
    "model": {"name": "Qwen/Qwen2.5-1.5B-Instruct"},
    "dataset": {"name": "trl-lib/Capybara", "limit": 1000},
}


def spec_with(**changes: Any) -> dict[str, Any]:
    """MINIMAL with dotted-path changes applied; a value of ... deletes the key."""
    spec = copy.deepcopy(MINIMAL)
    for dotted, value in changes.items():
        *parents, leaf = dotted.split("__")
        node = spec
        for part in parents:
            node = node.setdefault(part, {})
        if value is ...:
            node.pop(leaf, None)
        else:
            node[leaf] = value
    return spec


def test_defaults_follow_the_reference() -> None:
    spec = parse_spec(MINIMAL)
    training = spec.training
    assert (training.perDeviceTrainBatchSize, training.gradientAccumulationSteps) == (2, 8)
    assert training.numTrainEpochs == 3
    assert training.warmupRatio == 0.03
    assert training.lrSchedulerType == "cosine"
    assert training.loggingSteps == 10
    assert training.gradientCheckpointing is True
    assert spec.method == "lora"
    assert spec.learning_rate == 2e-4
    assert spec.bf16 is True  # one GPU by default


def test_learning_rate_default_depends_on_method() -> None:
    assert parse_spec(spec_with(method="full")).learning_rate == 2e-5
    assert parse_spec(spec_with(method="qlora")).learning_rate == 2e-4
    explicit = parse_spec(spec_with(method="full", training__learningRate=1e-5))
    assert explicit.learning_rate == 1e-5


def test_cpu_job_is_legal_and_runs_without_bf16() -> None:
    spec = parse_spec(spec_with(resources={"nodes": 3, "gpusPerNode": 0}))
    assert spec.resources.world_size == 3
    assert spec.bf16 is False


def test_numbers_as_users_write_them() -> None:
    spec = parse_spec(spec_with(training={"learningRate": 2e-4, "numTrainEpochs": 3}))
    assert spec.training.learningRate == pytest.approx(2e-4)
    assert spec.training.numTrainEpochs == 3.0


def test_target_modules_accepts_a_single_string() -> None:
    spec = parse_spec(spec_with(lora={"targetModules": "all-linear"}))
    assert spec.lora_settings is not None
    assert spec.lora_settings.targetModules == ["all-linear"]


def test_whole_document_parses_and_ignores_status() -> None:
    job = parse_sftjob(
        {
            "apiVersion": "tuning.sftjob.dev/v1alpha1",
            "kind": "SFTJob",
            "metadata": {"name": "demo", "namespace": "ml"},
            "spec": MINIMAL,
            "status": {"phase": "Running"},
        }
    )
    assert job.metadata.name == "demo"
    assert job.status is None


# (spec, field path the error must name, fragment the message must contain)
INVALID: list[tuple[str, dict[str, Any], str, str]] = [
    (
        "renamed maxSeqLength",
        spec_with(training__maxSeqLength=2048),
        "spec.training.maxSeqLength",
        "renamed to maxLength",
    ),
    (
        "snake max_seq_length",
        spec_with(training__max_seq_length=2048),
        "spec.training.max_seq_length",
        "renamed to maxLength",
    ),
    (
        "snake_case field",
        spec_with(training__per_device_train_batch_size=2),
        "spec.training.per_device_train_batch_size",
        "perDeviceTrainBatchSize",
    ),
    (
        "typo in field",
        spec_with(training__learningrate=1e-4),
        "spec.training.learningrate",
        "did you mean learningRate",
    ),
    ("typo at top", spec_with(trainng={}), "spec.trainng", "did you mean training"),
    ("typo in resources", spec_with(resources__gpus=2), "spec.resources.gpus", "gpusPerNode"),
    ("unknown without match", spec_with(model__colour="red"), "spec.model.colour", "Valid fields"),
    (
        "lora block with full",
        spec_with(method="full", lora={"r": 8}),
        "spec.lora",
        "method is full",
    ),
    (
        "qlora without gpus",
        spec_with(method="qlora", resources={"gpusPerNode": 0}),
        "spec.resources.gpusPerNode",
        "qlora needs GPUs",
    ),
    ("fsdp with qlora", spec_with(method="qlora", distributed="fsdp"), "spec.distributed", "fsdp"),
    ("unknown method", spec_with(method="Lora"), "spec.method", "'full', 'lora' or 'qlora'"),
    (
        "zero batch",
        spec_with(training__perDeviceTrainBatchSize=0),
        "spec.training.perDeviceTrainBatchSize",
        "greater than or equal to 1",
    ),
    (
        "negative accumulation",
        spec_with(training__gradientAccumulationSteps=-2),
        "spec.training.gradientAccumulationSteps",
        "greater than or equal to 1",
    ),
    (
        "zero epochs",
        spec_with(training__numTrainEpochs=0),
        "spec.training.numTrainEpochs",
        "greater than 0",
    ),
    (
        "zero maxSteps",
        spec_with(training__maxSteps=0),
        "spec.training.maxSteps",
        "greater than or equal to 1",
    ),
    (
        "negative gpus",
        spec_with(resources={"gpusPerNode": -1}),
        "spec.resources.gpusPerNode",
        "greater than or equal to 0",
    ),
    (
        "zero nodes",
        spec_with(resources={"nodes": 0}),
        "spec.resources.nodes",
        "greater than or equal to 1",
    ),
    (
        "string batch",
        spec_with(training__perDeviceTrainBatchSize="4"),
        "spec.training.perDeviceTrainBatchSize",
        "valid integer",
    ),
    ("string bool", spec_with(training__packing="yes"), "spec.training.packing", "valid boolean"),
    (
        "string lr",
        spec_with(training__learningRate="fast"),
        "spec.training.learningRate",
        "valid number",
    ),
    (
        "lr too big",
        spec_with(training__learningRate=2.0),
        "spec.training.learningRate",
        "less than 1",
    ),
    (
        "warmup ratio 1",
        spec_with(training__warmupRatio=1.0),
        "spec.training.warmupRatio",
        "less than 1",
    ),
    (
        "warmup both",
        spec_with(training__warmupRatio=0.1, training__warmupSteps=5),
        "spec.training.warmupSteps",
        "not both",
    ),
    (
        "bad scheduler",
        spec_with(training__lrSchedulerType="cosine_annealing"),
        "spec.training.lrSchedulerType",
        "cosine",
    ),
    (
        "bad packing strategy",
        spec_with(training__packingStrategy="ffd"),
        "spec.training.packingStrategy",
        "bfd",
    ),
    (
        "extraArgs clash",
        spec_with(training__extraArgs={"learning_rate": 1e-4}),
        "spec.training.extraArgs",
        "training.learningRate",
    ),
    (
        "extraArgs renamed",
        spec_with(training__extraArgs={"max_seq_length": 10}),
        "spec.training.extraArgs",
        "maxLength",
    ),
    ("no model", spec_with(model=...), "spec.model", "required"),
    ("no dataset", spec_with(dataset=...), "spec.dataset", "required"),
    (
        "two model sources",
        spec_with(model={"name": "a", "path": "/m"}),
        "spec.model.name",
        "exactly one",
    ),
    ("no model source", spec_with(model={"revision": "main"}), "spec.model.name", "exactly one"),
    (
        "two dataset sources",
        spec_with(dataset={"name": "a", "uri": "s3://b/c"}),
        "spec.dataset.name",
        "exactly one",
    ),
    ("bad dataset format", spec_with(dataset__format="chatml"), "spec.dataset.format", "messages"),
    ("zero limit", spec_with(dataset__limit=0), "spec.dataset.limit", "greater than or equal to 1"),
    (
        "literal hf token",
        spec_with(secrets={"hfToken": "hf_abc"}),
        "spec.secrets.hfToken",
        "never a literal",
    ),
    (
        "bad cpu quantity",
        spec_with(resources={"cpu": "lots"}),
        "spec.resources.cpu",
        "Kubernetes quantity",
    ),
    (
        "bad memory quantity",
        spec_with(resources={"memory": "16 GB"}),
        "spec.resources.memory",
        "Kubernetes quantity",
    ),
    ("lora dropout 1", spec_with(lora={"dropout": 1.0}), "spec.lora.dropout", "less than 1"),
    ("lora rank 0", spec_with(lora={"r": 0}), "spec.lora.r", "greater than or equal to 1"),
    (
        "empty target modules",
        spec_with(lora={"targetModules": []}),
        "spec.lora.targetModules",
        "at least 1",
    ),
    ("bad distributed", spec_with(distributed="deepspeed"), "spec.distributed", "'ddp' or 'fsdp'"),
    (
        "volume relative path",
        spec_with(volumes=[{"name": "m", "claimName": "c", "mountPath": "data"}]),
        "spec.volumes[0].mountPath",
        "^/",
    ),
    (
        "volume bad name",
        spec_with(volumes=[{"name": "Models", "claimName": "c", "mountPath": "/m"}]),
        "spec.volumes[0].name",
        "does not match",
    ),
    (
        "toleration operator",
        spec_with(resources={"tolerations": [{"key": "a", "operator": "Maybe"}]}),
        "spec.resources.tolerations[0].operator",
        "Exists",
    ),
    (
        "env bad name",
        spec_with(env=[{"name": "1BAD", "value": "x"}]),
        "spec.env[0].name",
        "does not match",
    ),
    (
        "negative ttl",
        spec_with(ttlSecondsAfterFinished=-1),
        "spec.ttlSecondsAfterFinished",
        "greater than or equal to 0",
    ),
    ("spec not a mapping", ["a"], "spec", "must be a mapping"),  # type: ignore[list-item]
    (
        "keepBest without eval",
        spec_with(output__keepBest=True),
        "spec.output.keepBest",
        "needs an eval loss to pick the best checkpoint by: add dataset.eval",
    ),
    (
        "evalSteps without eval",
        spec_with(training__evalSteps=50),
        "spec.training.evalSteps",
        "is set but dataset.eval is not",
    ),
    (
        "keepBest evaluating between checkpoints",
        spec_with(
            dataset__eval={"fraction": 0.05},
            training__evalSteps=50,
            output__keepBest=True,
        ),
        "spec.training.evalSteps",
        "must equal training.saveSteps with output.keepBest",
    ),
    (
        "eval with two sources",
        spec_with(dataset__eval={"split": "test", "fraction": 0.1}),
        "spec.dataset.eval.split",
        "set exactly one of dataset.eval.split",
    ),
    (
        "eval split of a local file",
        {**spec_with(), "dataset": {"path": "/data/train.jsonl", "eval": {"split": "test"}}},
        "spec.dataset.eval.split",
        "dataset.name is not set",
    ),
    (
        "eval fraction of all rows",
        spec_with(dataset__eval={"fraction": 1.0}),
        "spec.dataset.eval.fraction",
        "less than 1",
    ),
    (
        "eval_steps in extraArgs",
        spec_with(training__extraArgs={"eval_steps": 10}),
        "spec.training.extraArgs",
        "eval_steps: use training.evalSteps",
    ),
    (
        "output uri not s3",
        spec_with(output={"uri": "gs://models/run/"}),
        "spec.output.uri",
        "does not match",
    ),
    (
        "s3 endpoint without scheme",
        spec_with(objectStorage={"endpointUrl": "minio.storage:9000"}),
        "spec.objectStorage.endpointUrl",
        "does not match",
    ),
    (
        "s3 secret without name",
        spec_with(secrets={"s3": {"accessKeyIdKey": "id"}}),
        "spec.secrets.s3.name",
        "required",
    ),
]


@pytest.mark.parametrize(
    ("spec", "path", "fragment"),
    [pytest.param(s, p, f, id=i) for i, s, p, f in INVALID],
)
def test_invalid_spec_names_the_field(spec: dict[str, Any], path: str, fragment: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_spec(spec)
    errors = {str(e.path): e.message for e in caught.value.errors}
    assert path in errors, f"expected an error at {path}, got {errors}"
    assert fragment in errors[path], errors[path]


def test_evaluation_fields_parse() -> None:
    spec = parse_spec(
        spec_with(
            dataset__eval={"fraction": 0.05, "seed": 7},
            training__evalSteps=100,
            output__keepBest=True,
        )
    )
    assert spec.dataset.eval is not None and spec.dataset.eval.fraction == 0.05
    assert (spec.training.evalSteps, spec.training.saveSteps, spec.output.keepBest) == (
        100,
        100,
        True,
    )


def test_there_are_at_least_30_invalid_cases() -> None:
    assert len(INVALID) >= 30


def test_all_errors_are_reported_at_once() -> None:
    bad = spec_with(training={"maxSeqLength": 1, "perDeviceTrainBatchSize": 0}, method="x")
    with pytest.raises(SpecError) as caught:
        parse_spec(bad)
    paths = {e.path for e in caught.value.errors}
    assert {
        "spec.training.maxSeqLength",
        "spec.training.perDeviceTrainBatchSize",
        "spec.method",
    } <= paths


@pytest.mark.parametrize(
    ("metadata", "fragment"),
    [({"name": "My_Job"}, "lowercase"), ({"name": "a" * 60}, "at most 50")],
)
def test_job_name_must_suit_child_names(metadata: dict[str, Any], fragment: str) -> None:
    with pytest.raises(SpecError) as caught:
        parse_sftjob(
            {
                "apiVersion": "tuning.sftjob.dev/v1alpha1",
                "kind": "SFTJob",
                "metadata": metadata,
                "spec": MINIMAL,
            }
        )
    assert any(e.path == "metadata.name" and fragment in e.message for e in caught.value.errors)


def test_multi_node_job_name_must_start_with_a_letter() -> None:
    """Its rendezvous Service is named after it; Service names are DNS-1035 labels."""
    document = {
        "apiVersion": "tuning.sftjob.dev/v1alpha1",
        "kind": "SFTJob",
        "metadata": {"name": "1job"},
        "spec": {**MINIMAL, "resources": {"nodes": 2}},
    }
    with pytest.raises(SpecError) as caught:
        parse_sftjob(document)
    assert [e.path for e in caught.value.errors] == ["metadata.name"]
    assert "start with a letter" in caught.value.errors[0].message
    assert parse_sftjob({**document, "spec": MINIMAL}).metadata.name == "1job"


def test_wrong_kind_or_top_level_field() -> None:
    with pytest.raises(SpecError) as caught:
        parse_sftjob(
            {
                "apiVersion": "tuning.sftjob.dev/v1alpha1",
                "kind": "SFTJob",
                "spce": {},
                "spec": MINIMAL,
            }
        )
    assert any(e.path == "spce" and "did you mean spec" in e.message for e in caught.value.errors)
