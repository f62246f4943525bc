"""The CRD is generated from the API model, structural, documented, and committed as is."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from sftjob_operator.crd import (
    CRD_FILES,
    crd_manifest,
    crd_yaml,
    profile_crd_manifest,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))


def walk(node: dict[str, Any], path: str = ""):
    yield path, node
    for name, child in node.get("properties", {}).items():
        yield from walk(child, f"{path}.{name}")
    if "items" in node:
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}{{}}")


def schema() -> dict[str, Any]:
    return crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def profile_schema() -> dict[str, Any]:
    return profile_crd_manifest()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_committed_crd_matches_the_model() -> None:
    committed = (ROOT / "crds" / "sftjob.yaml").read_text()
    assert committed == crd_yaml(), "crds/sftjob.yaml drifted: run `sftjob crd --write crds`"


@pytest.mark.parametrize("name", list(CRD_FILES))
def test_every_committed_crd_matches_its_model(name: str) -> None:
    committed = (ROOT / "crds" / name).read_text()
    assert committed == CRD_FILES[name](), f"crds/{name} drifted: run `sftjob crd --write crds`"


def test_the_kustomization_lists_every_generated_crd() -> None:
    listed = yaml.safe_load((ROOT / "crds" / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(CRD_FILES)


@pytest.mark.parametrize("tree", [schema, profile_schema], ids=["sftjob", "sftprofile"])
def test_schema_is_structural_and_documented(tree: Any) -> None:
    for path, node in walk(tree()):
        assert "$ref" not in node and "anyOf" not in node and "allOf" not in node, path
        assert "type" in node, f"{path} has no type"
        if path.count(".") >= 2 and not path.endswith("[]") and "{}" not in path:
            assert node.get("description"), f"{path} has no description (kubectl explain)"


def test_names_columns_and_status_subresource() -> None:
    spec = crd_manifest()["spec"]
    assert spec["group"] == "tuning.sftjob.dev" and spec["scope"] == "Namespaced"
    assert spec["names"]["shortNames"] == ["sft"] and "all" in spec["names"]["categories"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Phase"] == ".status.phase"
    assert columns["Progress"] == ".status.progress.summary"
    assert {"Epoch", "Loss", "ETA", "Age"} <= set(columns)
    # A printer column cannot round: Loss shows the operator's 4-significant-digit text.
    assert columns["Loss"] == ".status.progress.lossDisplay"
    assert columns["ETA"] == ".status.progress.eta"


def as_json_schema(node: dict[str, Any]) -> dict[str, Any]:
    """OpenAPI 3.0 (nullable, boolean exclusiveMinimum) to JSON Schema for jsonschema."""
    out = {
        k: v
        for k, v in node.items()
        if k not in ("nullable", "x-kubernetes-preserve-unknown-fields", "default")
    }
    if node.get("exclusiveMinimum") is True:
        out["exclusiveMinimum"] = out.pop("minimum")
    if node.get("exclusiveMaximum") is True:
        out["exclusiveMaximum"] = out.pop("maximum")
    if "properties" in node:
        out["properties"] = {k: as_json_schema(v) for k, v in node["properties"].items()}
        if not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    if isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = as_json_schema(node["additionalProperties"])
    if "items" in node:
        out["items"] = as_json_schema(node["items"])
    if node.get("nullable"):
        out["type"] = [node["type"], "null"]
    return out


def test_profile_crd_is_cluster_scoped_with_names_columns_and_status() -> None:
    spec = profile_crd_manifest()["spec"]
    assert spec["group"] == "tuning.sftjob.dev" and spec["scope"] == "Cluster"
    names = spec["names"]
    assert (names["kind"], names["plural"], names["shortNames"]) == (
        "SFTProfile",
        "sftprofiles",
        ["sftp"],
    )
    # Cluster settings, not workloads: `kubectl get all` leaves them out. Not in the "sftjob"
    # category either: kubectl would expand `kubectl get sftjob NAME` to both kinds and fail.
    assert "all" not in names["categories"] and "sftjob" not in names["categories"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns["Namespaces"] == ".spec.namespaceSelector.matchLabels"
    assert columns["Max Nodes"] == ".spec.limits.maxNodes"
    assert columns["Image"] == ".spec.defaults.image"
    assert "Age" in columns
    # kubectl explain sftprofile.spec.limits: every limit is described.
    limits = profile_schema()["properties"]["spec"]["properties"]["limits"]
    assert limits["description"] and all(
        child["description"] for child in limits["properties"].values()
    )
    assert profile_schema()["properties"]["spec"]["properties"]["defaults"]["properties"][
        "affinity"
    ].get("x-kubernetes-preserve-unknown-fields")


def test_profile_crd_carries_the_cross_field_rules_as_cel() -> None:
    spec = profile_schema()["properties"]["spec"]
    rules = spec["x-kubernetes-validations"]
    assert any("maxActiveDeadlineSeconds" in r["rule"] for r in rules)
    requirement = spec["properties"]["namespaceSelector"]["properties"]["matchExpressions"]
    assert "size(self.values)" in requirement["items"]["x-kubernetes-validations"][0]["rule"]


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda p: p.name)
def test_examples_pass_the_crd_schema(example: Path) -> None:
    validators = {
        "SFTJob": jsonschema.Draft202012Validator(as_json_schema(schema())),
        "SFTProfile": jsonschema.Draft202012Validator(as_json_schema(profile_schema())),
    }
    for document in yaml.safe_load_all(example.read_text()):
        errors = sorted(validators[document["kind"]].iter_errors(document), key=str)
        assert not errors, [e.message for e in errors]


def test_crd_schema_rejects_what_the_model_rejects() -> None:
    validator = jsonschema.Draft202012Validator(as_json_schema(schema()))
    bad = {
        "apiVersion": "tuning.sftjob.dev/v1alpha1",
        "kind": "SFTJob",
        "metadata": {"name": "x"},
        "spec": {
            "model": {"name": "m"},
            "dataset": {"name": "d"},
            "method": "sgd",
            "training": {"perDeviceTrainBatchSize": 0, "learningRate": "fast"},
        },
    }
    messages = " | ".join(e.message for e in validator.iter_errors(bad))
    assert "'sgd' is not one of" in messages
    assert "less than the minimum of 1" in messages
    assert "'fast' is not of type 'number'" in messages
