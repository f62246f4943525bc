"""The example profiles of deploy/examples parse, and give the example jobs real verdicts."""

from __future__ import annotations

from pathlib import Path

import pytest
from sftjob_operator.api import SFTJob
from sftjob_operator.documents import sftjobs_in, sftprofiles_in
from sftjob_operator.policy import resolve
from sftjob_operator.profile_api import SFTProfile

EXAMPLES = Path(__file__).resolve().parents[2] / "deploy" / "examples"
SHARED = {"tuning.sftjob.dev/pool": "shared-gpu"}
RESEARCH = {"tuning.sftjob.dev/pool": "research"}


def only_profile(name: str) -> SFTProfile:
    [profile] = sftprofiles_in((EXAMPLES / name).read_text(), source=name)
    return profile


def example_job(name: str) -> SFTJob:
    [job] = sftjobs_in((EXAMPLES / name).read_text(), source=name)
    return job


@pytest.fixture(scope="module")
def profiles() -> list[SFTProfile]:
    return [only_profile("profile-shared-gpu-lora.yaml"), only_profile("profile-research.yaml")]


def verdict(job: str, labels: dict[str, str], profiles: list[SFTProfile]) -> list[tuple[str, str]]:
    resolution = resolve(example_job(job).spec, "team", labels, profiles)
    return [(v.rule, v.field) for v in resolution.violations]


def test_every_profile_example_is_a_valid_profile_and_no_sftjob() -> None:
    names = sorted(p.name for p in EXAMPLES.glob("profile-*.yaml"))
    assert names == ["profile-research.yaml", "profile-shared-gpu-lora.yaml"]
    for name in names:
        text = (EXAMPLES / name).read_text()
        assert sftprofiles_in(text, source=name) and sftjobs_in(text, source=name) == []


def test_each_namespace_gets_its_pools_profile(profiles: list[SFTProfile]) -> None:
    for labels, expected in ((SHARED, "shared-gpu-lora"), (RESEARCH, "research")):
        resolution = resolve(example_job("qlora-single-gpu.yaml").spec, "team", labels, profiles)
        assert resolution.profile is not None and resolution.profile.metadata.name == expected
    unlabelled = resolve(example_job("qlora-single-gpu.yaml").spec, "team", {}, profiles)
    assert unlabelled.profile is None


@pytest.mark.parametrize(
    ("job", "expected"),
    [
        ("qlora-single-gpu.yaml", []),
        ("qwen2.5-capybara-reference.yaml", [("limits.allowedMethods", "spec.method")]),
        (
            "llama-lora-large-dataset.yaml",
            [
                ("limits.maxNodes", "spec.resources.nodes"),
                ("limits.maxGpusPerJob", "spec.resources.gpusPerNode"),
            ],
        ),
        (
            "tiny-lora-2node.yaml",
            [
                ("limits.allowedModelSources", "spec.model.path"),
                ("limits.allowedModelSources", "spec.dataset.path"),
                ("limits.maxNodes", "spec.resources.nodes"),
            ],
        ),
    ],
)
def test_the_shared_pool_takes_small_lora_jobs_from_its_sources(
    job: str, expected: list[tuple[str, str]], profiles: list[SFTProfile]
) -> None:
    assert verdict(job, SHARED, profiles) == expected


def test_the_shared_pool_fills_in_its_node_pool_queue_and_cache(profiles: list[SFTProfile]) -> None:
    resolution = resolve(example_job("qlora-single-gpu.yaml").spec, "team", SHARED, profiles)
    effective = resolution.spec
    assert effective.image == "ghcr.io/sftjob/sftjob-trainer:0.1.0"
    assert effective.resources.nodeSelector == {"tuning.sftjob.dev/pool": "shared-gpu"}
    assert (effective.resources.cpu, effective.resources.memory) == ("8", "48Gi")
    assert effective.activeDeadlineSeconds == 21600
    assert resolution.pod.queueName == "shared-gpu"
    assert resolution.pod.modelCache is not None
    assert resolution.pod.modelCache.claimName == "hf-model-cache"
    assert resolution.pod.ephemeralStorage == "50Gi"


@pytest.mark.parametrize(
    "job",
    [
        "qlora-single-gpu.yaml",
        "qwen2.5-capybara-reference.yaml",
        "llama-lora-large-dataset.yaml",
        "tiny-cpu.yaml",
        "tiny-lora-2node.yaml",
    ],
)
def test_the_research_pool_takes_every_cluster_example(
    job: str, profiles: list[SFTProfile]
) -> None:
    assert verdict(job, RESEARCH, profiles) == []


def test_the_research_pool_lets_a_job_pick_its_gpus_up_to_4_nodes(
    profiles: list[SFTProfile],
) -> None:
    llama = example_job("llama-lora-large-dataset.yaml").spec
    resolution = resolve(llama, "team", RESEARCH, profiles)
    # allowSchedulingOverrides: the job's A100 wins over the pool's default H100.
    assert resolution.spec.resources.nodeSelector == {
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"
    }
    assert resolution.spec.resources.cpu == "32"  # the job's own
    five = llama.model_copy(
        update={"resources": llama.resources.model_copy(update={"nodes": 5, "gpusPerNode": 8})}
    )
    assert [(v.rule, v.field) for v in resolve(five, "team", RESEARCH, profiles).violations] == [
        ("limits.maxNodes", "spec.resources.nodes"),
        ("limits.maxGpusPerJob", "spec.resources.gpusPerNode"),
    ]
