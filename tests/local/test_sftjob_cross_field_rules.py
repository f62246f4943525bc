"""The SFTJob's cross-field rules hold in both places: the operator's parse and the CRD's CEL.

Each rule is a ``CrossFieldRule`` in operator/sftjob_operator/api.py; the CRD carries its CEL
as ``x-kubernetes-validations``. Here the Python check and the CEL rule (evaluated by the
emulator's CEL module after the CRD's defaults, as the apiserver does) must agree on the same
cases, and ``kubectl apply`` of a job breaking a rule is refused with the rule's message.
The refusal's shape is the apiextensions apiserver's (schema/cel/validation.go:
``<field>: Invalid value: "object": <message>``).
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel
from sftjob_local.emulator import cel, schema
from sftjob_operator import profile_api
from sftjob_operator.api import (
    CrossFieldRule,
    SFTJobSpec,
    SpecError,
    SpecModel,
    _model_in,
    parse_spec,
)
from sftjob_operator.crd import crd_manifest

pytestmark = [pytest.mark.local, pytest.mark.timeout(120)]

ROOT = Path(__file__).resolve().parents[2]
BASE: dict[str, Any] = {"model": {"name": "Qwen/Qwen2.5-0.5B"}, "dataset": {"name": "trl-lib/x"}}


def spec_with(**changes: Any) -> dict[str, Any]:
    spec = copy.deepcopy(BASE)
    spec.update(changes)
    return spec


# Each case breaks at most one rule (pydantic reports only the first broken one of an object,
# and none of the parent's once a child object failed).
CASES: dict[str, dict[str, Any]] = {
    "minimal": spec_with(),
    "model path": spec_with(model={"path": "/models/m"}),
    "model name and path": spec_with(model={"name": "m", "path": "/models/m"}),
    "model neither": spec_with(model={"revision": "main"}),
    "model path null": spec_with(model={"name": "m", "path": None}),
    "dataset path": spec_with(dataset={"path": "/data/train.jsonl"}),
    "dataset uri": spec_with(dataset={"uri": "s3://bucket/train.jsonl"}),
    "dataset name and uri": spec_with(dataset={"name": "d", "uri": "s3://b/t.jsonl"}),
    "dataset all three": spec_with(dataset={"name": "d", "path": "/d", "uri": "s3://b/t"}),
    "dataset none": spec_with(dataset={"split": "train"}),
    "warmup steps": spec_with(training={"warmupSteps": 5}),
    "warmup ratio": spec_with(training={"warmupRatio": 0.1}),
    "warmup both": spec_with(training={"warmupRatio": 0.1, "warmupSteps": 5}),
    "warmup both at the default ratio": spec_with(training={"warmupRatio": 0.03, "warmupSteps": 5}),
    "warmup steps null": spec_with(training={"warmupRatio": 0.1, "warmupSteps": None}),
    "full with lora": spec_with(method="full", lora={"r": 8}),
    "full with empty lora": spec_with(method="full", lora={}),
    "full without lora": spec_with(method="full"),
    "full with null lora": spec_with(method="full", lora=None),
    "lora with lora": spec_with(method="lora", lora={"r": 8}),
    "qlora on cpu": spec_with(method="qlora", resources={"gpusPerNode": 0}),
    "qlora on gpu": spec_with(method="qlora", resources={"gpusPerNode": 2}),
    "qlora default resources": spec_with(method="qlora"),
    "lora on cpu": spec_with(resources={"gpusPerNode": 0}),
    "fsdp qlora": spec_with(method="qlora", distributed="fsdp"),
    "fsdp full": spec_with(method="full", distributed="fsdp"),
    "ddp qlora": spec_with(method="qlora", distributed="ddp"),
    "eval split": spec_with(dataset={"name": "d", "eval": {"split": "validation"}}),
    "eval fraction": spec_with(dataset={"path": "/d", "eval": {"fraction": 0.1, "seed": 3}}),
    "eval file": spec_with(dataset={"path": "/d", "eval": {"path": "/e.jsonl"}}),
    "eval split and fraction": spec_with(
        dataset={"name": "d", "eval": {"split": "validation", "fraction": 0.1}}
    ),
    "eval without a source": spec_with(dataset={"name": "d", "eval": {"seed": 3}}),
    "eval split of a file": spec_with(dataset={"path": "/d", "eval": {"split": "validation"}}),
    "eval steps without eval": spec_with(training={"evalSteps": 10}),
    "eval steps with eval": spec_with(
        dataset={"name": "d", "eval": {"split": "test"}}, training={"evalSteps": 10}
    ),
    "keep best without eval": spec_with(output={"keepBest": True}),
    "keep best with eval": spec_with(
        dataset={"name": "d", "eval": {"split": "test"}}, output={"keepBest": True}
    ),
    "keep best with aligned steps": spec_with(
        dataset={"name": "d", "eval": {"split": "test"}},
        training={"evalSteps": 100, "saveSteps": 100},
        output={"keepBest": True},
    ),
    "keep best with misaligned steps": spec_with(
        dataset={"name": "d", "eval": {"split": "test"}},
        training={"evalSteps": 30, "saveSteps": 100},
        output={"keepBest": True},
    ),
    "full merge adapter": spec_with(method="full", output={"mergeAdapter": True}),
    "full no merge": spec_with(method="full", output={"mergeAdapter": False}),
    "lora merge adapter": spec_with(method="lora", output={"mergeAdapter": True}),
    "exact preset": spec_with(training={"speed": {"preset": "exact"}}),
    "exact preset with data workers on": spec_with(
        training={"speed": {"preset": "exact", "dataWorkers": "on"}}
    ),
    "exact preset with compile on": spec_with(
        training={"speed": {"preset": "exact", "compile": "on"}}
    ),
    "default preset with compile on": spec_with(training={"speed": {"compile": "on"}}),
}


def _spec_models(model: type[BaseModel], path: str) -> list[tuple[str, type[SpecModel]]]:
    """(spec path, model) for every spec object reachable from SFTJobSpec (not list items)."""
    found: list[tuple[str, type[SpecModel]]] = [(path, model)]  # type: ignore[list-item]
    for name, info in model.model_fields.items():
        inner = _model_in(info.annotation)
        origin = getattr(info.annotation, "__origin__", None)
        if inner is not None and origin is not list:
            found += _spec_models(inner, f"{path}.{name}")
    return found


SITES = [
    (f"{path}.{rule.field}", rule)
    for path, model in _spec_models(SFTJobSpec, "spec")
    for rule in model.cross_field_rules
]


def _all_subclasses(cls: type) -> set[type]:
    out = set(cls.__subclasses__())
    for sub in list(out):
        out |= _all_subclasses(sub)
    return out


def crd_schema() -> dict[str, Any]:
    return crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def python_broken(spec: dict[str, Any]) -> set[tuple[str, str]]:
    try:
        parse_spec(copy.deepcopy(spec))
    except SpecError as exc:
        return {(e.path, e.message) for e in exc.errors}
    return set()


def cel_causes(spec: dict[str, Any]) -> list[dict[str, str]]:
    """What the apiserver answers for this spec: defaults applied, schema checked, rules run."""
    obj = {
        "apiVersion": "tuning.sftjob.dev/v1alpha1",
        "kind": "SFTJob",
        "metadata": {"name": "x"},
        "spec": copy.deepcopy(spec),
    }
    crd = crd_schema()
    schema.apply_defaults(obj, crd)
    assert schema.validate(obj, crd) == [], "cases must pass the CRD's schema"
    return cel.validate(obj, None, crd)


def test_every_cross_field_rule_is_a_declared_rule_with_a_cel_twin():
    """No spec object checks fields against each other outside CrossFieldRule, and every rule
    sits in the CRD at its object's node."""
    job_models = {m for _, m in _spec_models(SFTJobSpec, "spec")}
    for model in _all_subclasses(SpecModel):
        validators = set(model.__pydantic_decorators__.model_validators)
        assert validators <= {"_check_cross_field_rules"}, (
            f"{model.__name__} has model validators {validators}: state cross-field rules as "
            "CrossFieldRule so the CRD carries them too"
        )
        if model.cross_field_rules:
            assert model in job_models or model.__module__ == profile_api.__name__, model
    # This file runs the SFTJob CRD's rules; the SFTProfile CRD's are probed with kubectl in
    # tests/local/test_kubectl_deploy.py.
    assert len(SITES) == sum(len(m.cross_field_rules) for m in job_models)
    for field, rule in SITES:
        node = crd_schema()["properties"]
        parts = field.split(".")[: -len(rule.field.split("."))]
        current: dict[str, Any] = {"properties": node}
        for part in parts:
            current = current["properties"][part]
        assert rule.x_kubernetes_validation() in current["x-kubernetes-validations"], field


@pytest.mark.parametrize("label", list(CASES))
def test_python_check_and_cel_rule_agree(label):
    spec = CASES[label]
    python = python_broken(spec)
    causes = cel_causes(spec)
    for field, rule in SITES:
        by_python = (field, rule.message) in python
        by_cel = any(
            c["field"] == field and c["message"] == f'Invalid value: "object": {rule.message}'
            for c in causes
        )
        assert by_python == by_cel, (label, field, python, causes)
    # Nothing else is refused on either side: the cases differ only in these rules.
    assert len(python) == len(causes), (python, causes)


def test_every_rule_is_broken_by_a_case_and_kept_by_another():
    for field, rule in SITES:
        verdicts = {(field, rule.message) in python_broken(spec) for spec in CASES.values()}
        assert verdicts == {True, False}, f"{field}: cases must break and keep {rule.cel}"


def test_the_rules_compile_for_the_api_server():
    """The same check as at CRD creation (compilation, reason, fieldPath)."""
    assert cel.check_crd_rules(crd_manifest()["spec"]) == []
    for _, rule in SITES:
        assert isinstance(rule, CrossFieldRule) and rule.message and "\n" not in rule.message


# --------------------------------------------------------------------------- kubectl


@pytest.fixture
def kubectl(cluster, tmp_path: Path):
    env = {
        "PATH": "/usr/bin:/bin:/usr/local/bin",
        "HOME": str(tmp_path),
        "KUBECONFIG": str(cluster.kubeconfig),
        "KUBECACHEDIR": str(tmp_path / "cache"),
    }

    def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["kubectl", *args], env=env, input=stdin, capture_output=True, text=True, timeout=60
        )

    return run


@pytest.fixture
def sftjob_crd(cluster, kubectl):
    applied = kubectl("apply", "-f", str(ROOT / "crds" / "sftjob.yaml"))
    assert applied.returncode == 0, applied.stderr
    cluster.wait_for(
        lambda: cluster.request("GET", "/apis/tuning.sftjob.dev/v1alpha1")[0] == 200, timeout=30
    )
    yield
    if " created" in applied.stdout:
        kubectl("delete", "-f", str(ROOT / "crds" / "sftjob.yaml"), "--wait=false")


def manifest(name: str, namespace: str, spec: dict[str, Any]) -> str:
    return yaml.safe_dump(
        {
            "apiVersion": "tuning.sftjob.dev/v1alpha1",
            "kind": "SFTJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        }
    )


@pytest.mark.parametrize(("field", "rule"), SITES, ids=[f for f, _ in SITES])
def test_kubectl_apply_breaking_a_rule_is_refused_and_nothing_is_stored(
    cluster, kubectl, sftjob_crd, uniq, field, rule
):
    """The apiserver evaluates the CRD's rules on create: 422, ``The SFTJob "x" is invalid:
    <field>: Invalid value: "object": <message>`` (kubectl's wording of a 422 Status)."""
    spec = next(s for s in CASES.values() if (field, rule.message) in python_broken(s))
    name = f"rule-{uniq}"
    result = kubectl("apply", "-f", "-", stdin=manifest(name, cluster.namespace, spec))
    assert result.returncode != 0, result.stdout
    assert f'The SFTJob "{name}" is invalid: ' in result.stderr, result.stderr
    assert f'{field}: Invalid value: "object": {rule.message}' in result.stderr, result.stderr
    got = kubectl("get", "sftjob", name, "-n", cluster.namespace)
    assert got.returncode != 0 and "NotFound" in got.stderr, got


def test_kubectl_apply_of_a_job_keeping_every_rule_is_accepted(cluster, kubectl, sftjob_crd, uniq):
    name = f"rules-ok-{uniq}"
    spec = spec_with(method="qlora", training={"warmupSteps": 5}, resources={"gpusPerNode": 1})
    result = kubectl("apply", "-f", "-", stdin=manifest(name, cluster.namespace, spec))
    assert result.returncode == 0, result.stderr
    try:
        stored = cluster.ok(
            "GET",
            f"/apis/tuning.sftjob.dev/v1alpha1/namespaces/{cluster.namespace}/sftjobs/{name}",
        )
        # The CRD does not default warmupRatio: the stored job re-parses under the rule.
        assert "warmupRatio" not in stored["spec"]["training"]
        assert parse_spec(stored["spec"]).training.warmupSteps == 5
    finally:
        kubectl("delete", "sftjob", name, "-n", cluster.namespace, "--wait=false")


@pytest.mark.parametrize(
    "example",
    # profile-*.yaml hold SFTProfiles, no SFTJob.
    sorted(p for p in (ROOT / "deploy" / "examples").glob("*.yaml") if "profile-" not in p.name),
    ids=lambda p: p.name,
)
def test_shipped_examples_keep_every_rule(example: Path):
    jobs = [d for d in yaml.safe_load_all(example.read_text()) if (d or {}).get("kind") == "SFTJob"]
    assert jobs, f"{example} has no SFTJob"
    for job in jobs:
        assert cel_causes(job["spec"]) == []
