"""Issue 21 end to end: a tenant that may only create SFTJobs cannot get past its profile.

Local control plane only (the operator, a local node running pods as processes). The admin
installs the case table's profiles (tests/policy_cases.py) and labels the tenant namespace
before the operator starts, so its first pass already sees them. The tenant is a
ServiceAccount whose only permission is `create` on sftjobs in its namespace (a Role and
RoleBinding, sftjob_local.demo.install_tenant_account) and authenticates with its own
TokenRequest token; the test reads statuses, pods and ConfigMaps as the admin.

Every refusal case is created at once as the tenant and must end Failed/PolicyViolation
naming its rule and field, with no pod and no ConfigMap. Then the tenant's compliant job
runs to Succeeded with the profile's defaults in its status and its pod.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from policy_cases import (
    CASES,
    MODEL_CACHE_CLAIM,
    TENANT_NAMESPACE_LABELS,
    TENANT_PROFILE_NAME,
    PolicyCase,
    job_manifest,
    profile_documents,
)

pytestmark = pytest.mark.e2e

TENANT_NAMESPACE = "tenant-a"
TENANT = "team-a"
GROUP, VERSION, PLURAL = "tuning.sftjob.dev", "v1alpha1", "sftjobs"
LABEL_JOB = "sftjob.dev/job-name"


class Tenancy:
    """The local cluster with the tenant set up: admin and tenant API clients."""

    def __init__(self, env: Any, tenant_kubeconfig: Path):
        self.env = env
        self.admin = kubernetes.config.new_client_from_config(str(env.kubeconfig))
        self.tenant = kubernetes.config.new_client_from_config(str(tenant_kubeconfig))
        self.core = kubernetes.client.CoreV1Api(self.admin)
        self.custom = kubernetes.client.CustomObjectsApi(self.admin)

    def create_as_tenant(self, manifest: dict[str, Any]) -> None:
        kubernetes.client.CustomObjectsApi(self.tenant).create_namespaced_custom_object(
            GROUP, VERSION, TENANT_NAMESPACE, PLURAL, manifest
        )

    def jobs(self) -> dict[str, dict[str, Any]]:
        items = self.custom.list_namespaced_custom_object(GROUP, VERSION, TENANT_NAMESPACE, PLURAL)
        return {j["metadata"]["name"]: j for j in items["items"]}

    def pods(self, job: str) -> list[dict[str, Any]]:
        found = self.core.list_namespaced_pod(
            TENANT_NAMESPACE, label_selector=f"{LABEL_JOB}={job}"
        ).items
        return [self.admin.sanitize_for_serialization(p) for p in found]

    def children_by_job(self, kind: str) -> dict[str, int]:
        """How many pods or ConfigMaps each job has, by the job label."""
        lister = (
            self.core.list_namespaced_pod if kind == "Pod" else self.core.list_namespaced_config_map
        )
        counts: dict[str, int] = {}
        for item in lister(TENANT_NAMESPACE, label_selector=LABEL_JOB).items:
            job = item.metadata.labels[LABEL_JOB]
            counts[job] = counts.get(job, 0) + 1
        return counts


@pytest.fixture(scope="module")
def tenancy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Tenancy]:
    from sftjob_local.demo import DemoEnvironment

    workdir = tmp_path_factory.mktemp("e2e-policy") / "cluster"
    with DemoEnvironment(
        workdir,
        namespace=TENANT_NAMESPACE,
        profiles=profile_documents(),
        namespace_labels={TENANT_NAMESPACE: TENANT_NAMESPACE_LABELS},
    ) as env:
        env.prepare_data()  # the tiny model and data, in the tenant's claim sftjob-demo-data
        env.create_claims([MODEL_CACHE_CLAIM])  # the profile's shared model cache
        try:
            yield Tenancy(env, env.tenant_kubeconfig(TENANT_NAMESPACE, TENANT))
        finally:
            log = workdir / "operator.log"
            if log.exists():
                print(f"operator log ({log}), last lines:\n{log.read_text()[-4000:]}")


def case_job(case: PolicyCase) -> str:
    return f"p-{case.name}"


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}; last: {last!r}")


def failed_condition(job: dict[str, Any]) -> dict[str, Any] | None:
    status = job.get("status") or {}
    return next((c for c in status.get("conditions") or [] if c["type"] == "Failed"), None)


@pytest.fixture(scope="module")
def refused(tenancy: Tenancy) -> dict[str, dict[str, Any]]:
    """Every case created at once as the tenant, once the operator decided them all."""
    names = [case_job(case) for case in CASES]
    for case in CASES:
        tenancy.create_as_tenant(job_manifest(case_job(case), TENANT_NAMESPACE, case))

    def decided() -> dict[str, dict[str, Any]] | None:
        jobs = tenancy.jobs()
        done = {n: jobs[n] for n in names if (jobs[n].get("status") or {}).get("phase")}
        return done if len(done) == len(names) else None

    jobs: dict[str, dict[str, Any]] = wait_for(decided, 60, "every case decided")
    time.sleep(2.0)  # any pass that would create children has had its turn
    return jobs


def test_the_table_tries_every_way_past_the_profile() -> None:
    assert len(CASES) >= 25
    rules = {case.rule for case in CASES}
    for rule in (
        "limits.allowedImages",
        "limits.allowedSecretNames",
        "protectedEnv",
        "limits.maxNodes",
        "limits.maxGpusPerJob",
        "limits.allowRemoteCode",
        "limits.maxActiveDeadlineSeconds",
    ):
        assert rule in rules, rule


def test_the_tenant_may_only_create(tenancy: Tenancy) -> None:
    """What the tenant was given: create on sftjobs in its namespace, nothing else."""
    tenant = kubernetes.client.CustomObjectsApi(tenancy.tenant)
    for call in (
        lambda: tenant.list_namespaced_custom_object(GROUP, VERSION, TENANT_NAMESPACE, PLURAL),
        lambda: tenant.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL),
        lambda: tenant.list_cluster_custom_object(GROUP, VERSION, "sftprofiles"),
        lambda: kubernetes.client.CoreV1Api(tenancy.tenant).list_namespaced_pod(TENANT_NAMESPACE),
    ):
        with pytest.raises(kubernetes.client.ApiException) as refused:
            call()
        assert refused.value.status == 403


@pytest.mark.timeout(180)
@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_each_attempt_is_refused_by_policy_with_no_pod(
    case: PolicyCase, tenancy: Tenancy, refused: dict[str, dict[str, Any]]
) -> None:
    name = case_job(case)
    job = refused[name]
    assert job["status"]["phase"] == "Failed", job["status"]
    failed = failed_condition(job)
    assert failed is not None and failed["reason"] == "PolicyViolation", failed
    # The message names the rule and the field: "<field>: <what to do> (rule <rule>)".
    assert f"{case.field}: " in failed["message"], failed["message"]
    assert f"(rule {case.rule})" in failed["message"], failed["message"]
    assert name not in tenancy.children_by_job("Pod")
    assert name not in tenancy.children_by_job("ConfigMap")
    assert "effective" not in job["status"]


@pytest.mark.timeout(300)
def test_the_tenants_compliant_job_runs_with_the_profiles_defaults(
    tenancy: Tenancy, refused: dict[str, dict[str, Any]]
) -> None:
    name = "tenant-ok"
    tenancy.create_as_tenant(job_manifest(name, TENANT_NAMESPACE))

    def finished() -> dict[str, Any] | None:
        job = tenancy.jobs()[name]
        phase = (job.get("status") or {}).get("phase")
        assert phase != "Failed", job["status"]
        return job if phase == "Succeeded" else None

    job = wait_for(finished, 240, f"{name} Succeeded")
    effective = job["status"]["effective"]
    assert effective["profile"] == TENANT_PROFILE_NAME
    added = {item["field"]: json.loads(item["value"]) for item in effective["fromProfile"]}
    assert added["spec.image"] == "ghcr.io/sftjob/sftjob-trainer:0.1.0"
    assert added["spec.resources.nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert added["spec.activeDeadlineSeconds"] == 1800
    assert added["pod.queueName"] == "tenant-queue"
    assert added["pod.modelCache"]["claimName"] == MODEL_CACHE_CLAIM
    # The job's own spec stays as the tenant wrote it.
    assert "image" not in job["spec"] and "activeDeadlineSeconds" not in job["spec"]

    [pod] = tenancy.pods(name)
    spec = pod["spec"]
    trainer = spec["containers"][0]
    env = {e["name"]: e.get("value") for e in trainer["env"]}
    assert pod["status"]["phase"] == "Succeeded"
    assert trainer["image"] == "ghcr.io/sftjob/sftjob-trainer:0.1.0"
    assert spec["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "tenant-queue"
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HOME"] == "/cache/huggingface"
    assert trainer["resources"]["requests"] == {
        "ephemeral-storage": "2Gi",
        "cpu": "1",
        "memory": "4Gi",
    }
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["model-cache"]["persistentVolumeClaim"]["claimName"] == MODEL_CACHE_CLAIM
    assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "2Gi"}
    assert spec["securityContext"] == {
        "runAsNonRoot": True,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
