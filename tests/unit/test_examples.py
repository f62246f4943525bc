"""Every committed example parses, plans and builds a trainer config."""

from __future__ import annotations

from pathlib import Path

import pytest
from sftjob_operator.advice import advise
from sftjob_operator.documents import sftjobs_in
from sftjob_operator.plan import plan_for
from sftjob_operator.trainer_config import build_trainer_config

# The SFTJob examples; profile-*.yaml hold SFTProfiles (tests/unit/test_policy_examples.py).
EXAMPLES = sorted(
    p
    for p in (Path(__file__).resolve().parents[2] / "deploy" / "examples").glob("*.yaml")
    if not p.name.startswith("profile-")
)


def test_there_are_examples() -> None:
    assert len(EXAMPLES) >= 4


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_parses_and_plans(path: Path) -> None:
    jobs = sftjobs_in(path.read_text(), source=str(path))
    assert jobs, f"{path.name} holds no SFTJob"
    for job in jobs:
        plan = plan_for(job.spec)
        assert plan.effectiveBatchSize >= 1
        assert plan.totalSteps is None or plan.totalSteps >= 1
        advise(job.spec, plan)
        config = build_trainer_config(job)
        assert config["plan"]["effectiveBatchSize"] == plan.effectiveBatchSize


def test_oom_shrink_keeps_the_plan() -> None:
    job = sftjobs_in((EXAMPLES[0].parent / "tiny-cpu.yaml").read_text())[0]
    before = build_trainer_config(job)
    after = build_trainer_config(job, attempt=2, per_device=2, accumulation=4)
    assert after["plan"] == before["plan"]
    assert after["resolved"]["perDeviceTrainBatchSize"] == 2
    assert after["resolved"]["gradientAccumulationSteps"] == 4
