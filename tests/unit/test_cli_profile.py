"""`sftjob plan --profile` as a GitOps pre-flight runs it: files on disk, a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from policy_cases import (
    CASES,
    OTHER_PROFILE_YAML,
    TENANT_NAMESPACE_LABELS,
    TENANT_PROFILE_YAML,
    cases_by_name,
    job_manifest,
)
from sftjob_operator.cli import EXIT_INVALID_SPEC, EXIT_POLICY_VIOLATION
from sftjob_operator.crd import CRD_FILES, profile_crd_yaml

ROOT = Path(__file__).resolve().parents[2]
TENANT_LABELS = ",".join(f"{k}={v}" for k, v in TENANT_NAMESPACE_LABELS.items())


def sftjob(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sftjob_operator.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


@pytest.fixture
def files(tmp_path: Path) -> dict[str, Path]:
    paths = {
        "profiles": tmp_path / "profiles.yaml",
        "tenant": tmp_path / "tenant.yaml",
        "base": tmp_path / "base.yaml",
    }
    paths["profiles"].write_text(TENANT_PROFILE_YAML + "---\n" + OTHER_PROFILE_YAML)
    paths["tenant"].write_text(TENANT_PROFILE_YAML)
    paths["base"].write_text(yaml.safe_dump(job_manifest("base", "team-a")))
    return paths


def write_job(tmp_path: Path, name: str, document: dict[str, Any]) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def plan_json(*args: str) -> tuple[int, Any]:
    result = sftjob("plan", *args, "-o", "json")
    return result.returncode, json.loads(result.stdout)


def test_compliant_job_exits_0_with_what_the_profile_added(files: dict[str, Path]) -> None:
    code, report = plan_json(
        "-f", str(files["base"]), "--profile", str(files["profiles"]),
        "--namespace-labels", TENANT_LABELS,
    )  # fmt: skip
    assert code == 0
    policy = report["policy"]
    assert policy["profile"] == "tenant-lora" and policy["violations"] == []
    added = {item["field"]: item["value"] for item in policy["fromProfile"]}
    assert added["spec.image"] == "ghcr.io/sftjob/sftjob-trainer:0.1.0"
    assert added["spec.activeDeadlineSeconds"] == 1800
    assert added["pod.queueName"] == "tenant-queue"
    assert report["totalSteps"] == 4  # the plan of the effective spec


def test_violating_job_exits_3_naming_rule_and_field(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    bad = write_job(tmp_path, "bad", job_manifest("bad", "team-a", cases_by_name()["method-full"]))
    result = sftjob(
        "plan",
        "-f",
        str(bad),
        "--profile",
        str(files["tenant"]),
        "--namespace-labels",
        TENANT_LABELS,
    )
    assert result.returncode == EXIT_POLICY_VIOLATION != EXIT_INVALID_SPEC
    assert "profile           tenant-lora" in result.stdout
    assert "policy: REFUSED, 1 violation" in result.stdout
    assert "spec.method: method full is not allowed by SFTProfile tenant-lora" in result.stdout
    assert "(rule limits.allowedMethods)" in result.stdout
    assert "error: 1 policy violation" in result.stderr


def test_every_case_of_the_table_gets_the_same_verdict_as_the_policy(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    documents = [job_manifest(f"case-{i}", "team-a", case) for i, case in enumerate(CASES)]
    jobs = tmp_path / "cases.yaml"
    jobs.write_text(yaml.safe_dump_all(documents))
    code, reports = plan_json(
        "-f", str(jobs), "--profile", str(files["profiles"]), "--namespace-labels", TENANT_LABELS
    )
    assert code == EXIT_POLICY_VIOLATION
    assert len(reports) == len(CASES)
    for case, report in zip(CASES, reports, strict=True):
        got = [(v["rule"], v["field"]) for v in report["policy"]["violations"]]
        assert got == [(case.rule, case.field)], case.name
        assert report["policy"]["violations"][0]["message"]


def test_without_namespace_labels_every_given_profile_selects_the_namespace(
    tmp_path: Path, files: dict[str, Path]
) -> None:
    # One profile given: it applies, whatever its selector says.
    code, report = plan_json("-f", str(files["base"]), "--profile", str(files["tenant"]))
    assert code == 0 and report["policy"]["profile"] == "tenant-lora"
    # Several: the job must name one, as in a namespace several profiles select.
    code, report = plan_json("-f", str(files["base"]), "--profile", str(files["profiles"]))
    assert code == EXIT_POLICY_VIOLATION
    [violation] = report["policy"]["violations"]
    assert (
        violation["field"] == "spec.profile"
        and "research-only, tenant-lora" in violation["message"]
    )
    named = write_job(
        tmp_path, "named", job_manifest("named", "team-a", cases_by_name()["profile-unknown"])
    )
    named_doc = yaml.safe_load(named.read_text())
    named_doc["spec"]["profile"] = "tenant-lora"
    named.write_text(yaml.safe_dump(named_doc))
    code, report = plan_json("-f", str(named), "--profile", str(files["profiles"]))
    assert code == 0 and report["policy"]["profile"] == "tenant-lora"


def test_namespace_labels_select_like_the_operator(files: dict[str, Path]) -> None:
    code, report = plan_json(
        "-f", str(files["base"]), "--profile", str(files["profiles"]),
        "--namespace-labels", "tuning.sftjob.dev/pool=elsewhere",
    )  # fmt: skip
    assert code == 0 and report["policy"]["profile"] is None
    code, report = plan_json(
        "-f", str(files["base"]), "--profile", str(files["profiles"]),
        "--namespace-labels", "", "--require-profile", "--namespace", "team-z",
    )  # fmt: skip
    assert code == EXIT_POLICY_VIOLATION
    assert report["policy"]["violations"][0]["message"] == (
        "no SFTProfile selects namespace team-z; ask your platform team"
    )


def test_built_in_rules_apply_without_a_profile(tmp_path: Path, files: dict[str, Path]) -> None:
    code, report = plan_json("-f", str(files["base"]))
    assert code == 0 and report["policy"] == {"profile": None, "fromProfile": [], "violations": []}
    leaky = write_job(
        tmp_path, "leaky", job_manifest("leaky", "team-a", cases_by_name()["env-hf-endpoint"])
    )
    code, report = plan_json("-f", str(leaky))
    assert code == EXIT_POLICY_VIOLATION
    assert [(v["rule"], v["field"]) for v in report["policy"]["violations"]] == [
        ("protectedEnv", "spec.env[1].name")
    ]


def test_the_operators_default_image_is_checked(files: dict[str, Path], tmp_path: Path) -> None:
    strict = tmp_path / "strict.yaml"
    profile = yaml.safe_load(TENANT_PROFILE_YAML)
    del profile["spec"]["defaults"]["image"]
    profile["spec"]["limits"]["allowedImages"] = ["registry.example.com/ml/"]
    strict.write_text(yaml.safe_dump(profile))
    code, _ = plan_json("-f", str(files["base"]), "--profile", str(strict))
    assert code == EXIT_POLICY_VIOLATION
    code, report = plan_json(
        "-f", str(files["base"]), "--profile", str(strict),
        "--default-image", "registry.example.com/ml/trainer:1",
    )  # fmt: skip
    assert code == 0, report["policy"]


def test_an_invalid_profile_exits_2_naming_the_field(
    files: dict[str, Path], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.yaml"
    profile = yaml.safe_load(TENANT_PROFILE_YAML)
    profile["spec"]["limits"]["maxNode"] = 1
    broken.write_text(yaml.safe_dump(profile))
    result = sftjob("plan", "-f", str(files["base"]), "--profile", str(broken))
    assert result.returncode == EXIT_INVALID_SPEC
    assert f"error: {broken}: invalid SFTProfile:" in result.stderr
    assert "spec.limits.maxNode: unknown field; did you mean maxNodes" in result.stderr
    result = sftjob("plan", "-f", str(files["base"]), "--profile", str(files["base"]))
    assert result.returncode == EXIT_INVALID_SPEC
    assert "no SFTProfile documents found" in result.stderr
    result = sftjob("plan", "-f", str(files["base"]), "--namespace-labels", "novalue")
    assert result.returncode == 2 and "'novalue' is not key=value" in result.stderr


def test_numbers_are_read_as_kubectl_reads_them(tmp_path: Path, files: dict[str, Path]) -> None:
    # PyYAML alone reads 2e-4 as a string; kubectl and the API server read a number.
    assert yaml.safe_load("learningRate: 2e-4") == {"learningRate": "2e-4"}
    text = yaml.safe_dump(job_manifest("numbers", "team-a"))
    assert "    numTrainEpochs: 1\n" in text and "    maxLength: 64\n" in text
    text = text.replace("    numTrainEpochs: 1\n", "    numTrainEpochs: 1.0e0\n")
    text = text.replace("    maxLength: 64\n", "    maxLength: 64\n    learningRate: 2e-4\n")
    job = tmp_path / "numbers.yaml"
    job.write_text(text)
    code, report = plan_json("-f", str(job), "--profile", str(files["tenant"]))
    assert code == 0, report
    assert report["learningRate"] == 0.0002 and report["epochs"] == 1


def test_crd_command_prints_or_writes_both_crds(tmp_path: Path) -> None:
    printed = sftjob("crd", "--kind", "sftprofile")
    assert printed.returncode == 0 and printed.stdout == profile_crd_yaml()
    written = sftjob("crd", "--write", str(tmp_path))
    assert written.returncode == 0
    for name, render in CRD_FILES.items():
        assert (tmp_path / name).read_text() == render()
