"""`sftjob plan` and `sftjob crd` as a user runs them: a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
REFERENCE = ROOT / "deploy" / "examples" / "qwen2.5-capybara-reference.yaml"


def sftjob(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sftjob_operator.cli", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


def test_reference_job_plans_16_63_189_as_an_estimate() -> None:
    result = sftjob("plan", "-f", str(REFERENCE), "-o", "json")
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert (plan["effectiveBatchSize"], plan["stepsPerEpoch"], plan["totalSteps"]) == (16, 63, 189)
    assert plan["datasetSize"] == 1000 and plan["estimate"] is True
    for key in ("worldSize", "epochs", "warmupSteps", "advisories"):
        assert key in plan
    # The reference job (a full fine-tune, at most 6.2M tokens per GPU) is over the ~3.9M
    # after which compiling its decoder layers pays back: no ShortRunCompiles advice.
    assert {a["code"] for a in plan["advisories"]} == {"LearningRateOutOfRange"}


def test_table_output_shows_the_figures() -> None:
    result = sftjob("plan", "-f", str(REFERENCE))
    assert result.returncode == 0
    assert "effective batch   16 = 2 per device x 8 accumulation x 1" in result.stdout
    assert "total steps       189 (3 epochs)" in result.stdout
    assert "[estimate]" in result.stdout


def test_dataset_size_flag() -> None:
    result = sftjob("plan", "-f", str(REFERENCE), "-o", "json", "--dataset-size", "500")
    assert json.loads(result.stdout)["totalSteps"] == 96  # ceil(500/2)=250 -> 32/epoch


def test_invalid_spec_exits_2_naming_the_field() -> None:
    doc = yaml.safe_load(REFERENCE.read_text())
    doc["spec"]["training"]["maxSeqLength"] = 2048
    doc["spec"]["training"]["perDeviceTrainBatchSize"] = 0
    result = sftjob("plan", "-f", "-", stdin=yaml.safe_dump(doc))
    assert result.returncode == 2
    assert "spec.training.maxSeqLength: unknown field: renamed to maxLength" in result.stderr
    assert "spec.training.perDeviceTrainBatchSize" in result.stderr
    assert result.stdout == ""


def test_malformed_yaml_names_the_line() -> None:
    result = sftjob(
        "plan", "-f", "-", stdin="apiVersion: tuning.sftjob.dev/v1alpha1\nkind: [SFTJob\n"
    )
    assert result.returncode == 2
    assert "-:3:1: malformed YAML: expected ',' or ']'" in result.stderr


def test_multi_document_files_plan_every_sftjob() -> None:
    jobs = list(yaml.safe_load_all(REFERENCE.read_text()))
    second = {**jobs[0], "metadata": {"name": "second"}}
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "hf-token"}}
    text = yaml.safe_dump_all([jobs[0], secret, second])
    result = sftjob("plan", "-f", "-", "-o", "json", stdin=text)
    assert result.returncode == 0, result.stderr
    assert [p["name"] for p in json.loads(result.stdout)] == ["qwen25-capybara", "second"]


def test_file_without_sftjob_is_an_error() -> None:
    result = sftjob(
        "plan", "-f", "-", stdin="apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n"
    )
    assert result.returncode == 2 and "no SFTJob documents" in result.stderr


def test_crd_command_prints_the_committed_crd() -> None:
    result = sftjob("crd")
    assert result.returncode == 0
    assert result.stdout == (ROOT / "crds" / "sftjob.yaml").read_text()


@pytest.mark.parametrize(
    ("argv", "env", "expected"),
    [
        pytest.param([], {}, ["default"], id="nothing-default"),
        pytest.param(["-A"], {"SFTJOB_NAMESPACES": "a"}, None, id="all-wins-over-env"),
        pytest.param(["-n", "a", "-n", "b"], {}, ["a", "b"], id="repeated"),
        pytest.param(["-n", "a,b", "--namespace", "c"], {}, ["a", "b", "c"], id="comma-list"),
        pytest.param(["-n", " a , ,a"], {}, ["a"], id="blanks-and-repeats-dropped"),
        pytest.param([], {"SFTJOB_NAMESPACES": "team-a,team-b"}, ["team-a", "team-b"], id="env"),
        pytest.param(["-n", "x"], {"SFTJOB_NAMESPACES": "team-a"}, ["x"], id="flag-wins"),
        pytest.param([], {"SFTJOB_NAMESPACES": " "}, ["default"], id="blank-env"),
    ],
)
def test_operator_namespaces_from_flags_or_env(
    argv: list[str], env: dict[str, str], expected: list[str] | None
) -> None:
    from sftjob_operator.cli import build_parser, watched_namespaces

    args = build_parser().parse_args(["operator", *argv])
    assert watched_namespaces(args.namespace, args.all_namespaces, env) == expected


def test_operator_refuses_namespaces_with_all_namespaces() -> None:
    result = sftjob("operator", "-A", "-n", "a")
    assert result.returncode == 2
    assert "not allowed with argument" in result.stderr
