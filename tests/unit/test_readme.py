"""README.md stays true: the quickstart, the generated reference, and every command."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from sftjob_operator.reference import (
    embedded_profile_reference,
    embedded_reference,
    profile_reference_markdown,
    reference_markdown,
)

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
CI_SCRIPT = (ROOT / ".ci" / "run").read_text()


def shell_blocks() -> list[list[str]]:
    blocks = re.findall(r"```sh\n(.*?)```", README, flags=re.S)
    return [
        [line.split("#")[0].strip() for line in block.splitlines() if line.split("#")[0].strip()]
        for block in blocks
    ]


def section(title: str) -> str:
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, flags=re.S | re.M)
    assert match, f"README has no section {title!r}"
    return match.group(1)


def test_quickstart_is_exactly_the_two_commands_demo_first() -> None:
    blocks = re.findall(r"```sh\n(.*?)```", section("Quickstart"), flags=re.S)
    assert len(blocks) == 1
    assert blocks[0].split("\n")[:-1] == ["make demo", "make test"]


def test_ci_runs_the_quickstart_commands() -> None:
    # A clean clone on a fresh machine: CI runs both commands with nothing else first
    # but the shared install step both of them perform themselves.
    assert "make demo" in CI_SCRIPT and "make test" in CI_SCRIPT


def test_field_reference_is_generated_from_the_model() -> None:
    assert embedded_reference(README) == reference_markdown(), (
        "README field reference drifted: run `sftjob reference --write README.md`"
    )


def test_profile_field_reference_is_generated_from_the_model() -> None:
    assert embedded_profile_reference(README) == profile_reference_markdown(), (
        "README SFTProfile reference drifted: run `sftjob reference --write README.md`"
    )
    assert "### SFTProfile fields" in README


# Commands the README shows that other places run for real: CI's script, or a test.
RUN_ELSEWHERE = {
    "make demo": ".ci/run",
    "make test": ".ci/run",
    "make lint": ".ci/run",
    "make test-unit": ".ci/run",
    "make crd": ".ci/run",
    "kubectl apply -k deploy/": "tests/local/test_kubectl_deploy.py",
    "kubectl delete sftjobs --all -A": "tests/local/test_kubectl_deploy.py",
    "kubectl delete -f deploy/base/operator.yaml": "tests/local/test_kubectl_deploy.py",
    "kubectl delete -k deploy/ --ignore-not-found": "tests/local/test_kubectl_deploy.py",
    "kubectl apply -k deploy/overlays/cluster": "tests/local/test_deploy_overlays_rbac.py",
    "kubectl create namespace team-a": "tests/local/test_deploy_overlays_rbac.py",
    "kubectl create namespace team-b": "tests/local/test_deploy_overlays_rbac.py",
    "kubectl apply -k deploy/overlays/namespaced": "tests/local/test_deploy_overlays_rbac.py",
    "kubectl apply -f deploy/examples/profile-shared-gpu-lora.yaml": (
        "tests/local/test_profile_admission.py"
    ),
    "kubectl apply -k deploy/policy": "tests/local/test_profile_admission.py",
    "kubectl apply -f deploy/policy/binding-shared-gpu-lora.yaml": (
        "tests/local/test_profile_admission.py"
    ),
    ".venv/bin/sftjob tiny-data": "tests/trainer/test_readme_run.py",
    ".venv/bin/sftjob run -f deploy/examples/tiny-run-local.yaml": "tests/trainer/test_readme_run.py",
    # "From the terminal": run as written (NAME, a job's name) by the local tier.
    **dict.fromkeys(
        [
            "sftjob get",
            "sftjob get -A -o wide",
            "sftjob get NAME -o yaml",
            "sftjob status NAME",
            "sftjob watch -A",
            "sftjob watch --until-finished",
            "sftjob watch --timeout 10",
        ],
        "tests/local/test_sftjob_views.py",
    ),
}


# A block run as written, top to bottom, by the test its marker names.
RUN_AS_A_BLOCK = re.compile(
    r"<!-- run as written, top to bottom, by (\S+) -->\n```sh\n(.*?)```", re.S
)


def test_blocks_run_as_written_are_run_by_the_test_they_name() -> None:
    blocks = RUN_AS_A_BLOCK.findall(README)
    assert blocks, "the local control plane by hand block lost its marker"
    for where, _ in blocks:
        test = (ROOT / where).read_text()
        assert f"by {where} -->" in test, f"{where} does not look for its README block"


def test_every_readme_command_is_run_somewhere() -> None:
    run_as_blocks = {
        line.split("#")[0].strip()
        for _, block in RUN_AS_A_BLOCK.findall(README)
        for line in block.splitlines()
    }
    commands = [command for block in shell_blocks() for command in block]
    assert commands, "no shell commands found in README"
    for command in commands:
        if command in run_as_blocks:
            continue  # run as written by test_blocks_run_as_written_are_run_by_the_test_they_name

        if command.startswith(".venv/bin/sftjob plan"):
            continue  # run by test_plan_commands_from_the_readme below
        where = RUN_ELSEWHERE.get(command)
        assert where, f"README command {command!r} is run by no test: add one"
        assert command in (ROOT / where).read_text(), f"{where} does not run {command!r}"


PLAN_COMMANDS = [c for b in shell_blocks() for c in b if c.startswith(".venv/bin/sftjob plan")]


def test_readme_shows_plan_commands() -> None:
    assert len(PLAN_COMMANDS) >= 3


@pytest.mark.parametrize("command", PLAN_COMMANDS)
def test_plan_commands_from_the_readme(command: str) -> None:
    args = shlex.split(command)[1:]  # the project's own sftjob, through this interpreter
    result = subprocess.run(
        [sys.executable, "-m", "sftjob_operator.cli", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "effective" in result.stdout.lower() or "effectiveBatchSize" in result.stdout
