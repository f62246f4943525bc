"""Profiles enforced by the operator process (issue 21), on the API emulator.

The tenant profile and base job come from the shared case table (tests/policy_cases.py).
Each test labels its own namespace so the profile selects it, and waits until the operator
has seen both (tests/policy_probe.py) before creating its jobs. The test plays the kubelet
where a pod must run, as tests/controller/test_operator.py does.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from operator_harness import ROOT, Cluster, condition, wait_for
from policy_cases import (
    POOL_LABEL,
    TENANT_NAMESPACE_LABELS,
    TENANT_PROFILE_NAME,
    job_manifest,
    merge_patch,
    profile_documents,
)
from policy_probe import wait_until_policy_is_seen
from sftjob_local.emulator import EmulatorThread
from sftjob_operator.cached_kube import CachedKube
from sftjob_operator.reconciler import OperatorSettings, reconcile
from sftjob_operator.watch_cache import WatchCache

pytestmark = [pytest.mark.operator, pytest.mark.timeout(120)]

GROUP, VERSION, PROFILES = "tuning.sftjob.dev", "v1alpha1", "sftprofiles"
MERGE = "application/merge-patch+json"


@pytest.fixture(scope="module")
def profiles(emulator: tuple[EmulatorThread, Path]) -> Iterator[kubernetes.client.ApiClient]:
    """The SFTProfile CRD and the case table's profiles, installed by the admin."""
    _, kubeconfig = emulator
    api = kubernetes.config.new_client_from_config(str(kubeconfig))
    crd = yaml.safe_load((ROOT / "crds" / "sftprofile.yaml").read_text())
    kubernetes.client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
    custom = kubernetes.client.CustomObjectsApi(api)
    wait_for(lambda: _served(custom), what="the SFTProfile CRD served")
    for document in profile_documents():
        custom.create_cluster_custom_object(GROUP, VERSION, PROFILES, document)
    yield api


def _served(custom: kubernetes.client.CustomObjectsApi) -> bool:
    try:
        custom.list_cluster_custom_object(GROUP, VERSION, PROFILES)
    except kubernetes.client.ApiException:
        return False
    return True


def tenant_namespace(cluster: Cluster, labels: dict[str, str] | None = None) -> None:
    """Label the test's namespace so the profile selects it; wait until the operator sees it."""
    patch = {"metadata": {"labels": labels or TENANT_NAMESPACE_LABELS}}
    cluster.core.patch_namespace(cluster.namespace, patch)
    wait_until_policy_is_seen(cluster.api, cluster.namespace)


def job(name: str, cluster: Cluster, **spec_patch: Any) -> dict[str, Any]:
    manifest = job_manifest(name, cluster.namespace)
    manifest["spec"] = merge_patch(manifest["spec"], spec_patch)
    return manifest


def config_maps(cluster: Cluster, name: str) -> list[dict[str, Any]]:
    items = cluster.core.list_namespaced_config_map(
        cluster.namespace, label_selector=f"sftjob.dev/job-name={name}"
    ).items
    return [cluster.plain(c) for c in items]


def policy_failure(cluster: Cluster, name: str) -> dict[str, Any]:
    return wait_for(
        lambda: (
            (j := cluster.job(name))
            and (j.get("status") or {}).get("phase") == "Failed"
            and (c := condition(j, "Failed"))
            and c["reason"] == "PolicyViolation"
            and j
        ),
        what=f"{name} Failed/PolicyViolation",
    )


def event_reasons(cluster: Cluster, name: str) -> list[str]:
    return sorted(e["reason"] for e in cluster.events(name))


def the_pod(cluster: Cluster, name: str, attempt: int = 1) -> dict[str, Any]:
    pods = wait_for(
        lambda: [
            p
            for p in cluster.live_pods(name)
            if p["metadata"]["labels"]["sftjob.dev/attempt"] == str(attempt)
        ],
        what=f"{name}'s pod of attempt {attempt}",
    )
    return pods[0]


def trainer(pod: dict[str, Any]) -> dict[str, Any]:
    return pod["spec"]["containers"][0]


def env_of(pod: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in trainer(pod)["env"]}


def test_a_pass_waits_for_the_jobs_namespace_to_show_in_the_cache(
    cluster: Cluster, profiles: kubernetes.client.ApiClient
) -> None:
    """One pass in-process (no operator yet: this test must stay first), over a cache that
    holds the job and the profiles but not the job's namespace: deciding then could miss
    the profile selecting it, so the pass writes nothing and asks to run again."""
    cluster.core.patch_namespace(
        cluster.namespace, {"metadata": {"labels": TENANT_NAMESPACE_LABELS}}
    )
    cluster.create_job(job("early", cluster, method="full"))
    cache = WatchCache()
    cache.on_job_event(None, cluster.job("early"))
    custom = kubernetes.client.CustomObjectsApi(profiles)
    for profile in custom.list_cluster_custom_object(GROUP, VERSION, PROFILES)["items"]:
        cache.on_profile_event(None, profile)
    kube = CachedKube(cluster.api, cache)
    settings = OperatorSettings(default_image="example.test/trainer:dev")

    outcome = asyncio.run(reconcile(cluster.job("early"), kube, settings))
    assert (outcome.phase, outcome.requeue_after) == ("Pending", 2.0)
    assert not cluster.job("early").get("status")
    assert cluster.events("early") == []

    namespace = cluster.core.read_namespace(cluster.namespace)
    cache.on_namespace_event(None, cluster.plain(namespace))
    assert asyncio.run(reconcile(cluster.job("early"), kube, settings)).phase == "Failed"
    failed = condition(cluster.job("early"), "Failed")
    assert failed is not None and failed["reason"] == "PolicyViolation"
    assert "limits.allowedMethods" in failed["message"]
    assert cluster.pods("early") == []


def test_a_violating_job_fails_naming_each_rule_and_field_with_no_children(
    cluster: Cluster, profiles: object, operator_process: object
) -> None:
    tenant_namespace(cluster)
    cluster.create_job(job("bad", cluster, method="full", image="docker.io/evil/trainer:1"))
    failed = condition(policy_failure(cluster, "bad"), "Failed")
    assert failed is not None
    for named in ("limits.allowedMethods", "spec.method", "limits.allowedImages", "spec.image"):
        assert named in failed["message"], named
    assert "; " in failed["message"]  # one message, every violation
    wait_for(lambda: "PolicyViolation" in event_reasons(cluster, "bad"), what="the Event")
    time.sleep(1.5)  # passes that would create children or post again have had their turn
    assert cluster.pods("bad") == []
    assert config_maps(cluster, "bad") == []
    assert event_reasons(cluster, "bad").count("PolicyViolation") == 1
    warning = next(e for e in cluster.events("bad") if e["reason"] == "PolicyViolation")
    assert warning["type"] == "Warning" and warning["message"] == failed["message"]


def test_a_refused_job_runs_once_an_edit_complies(
    cluster: Cluster, profiles: object, operator_process: object
) -> None:
    tenant_namespace(cluster)
    cluster.create_job(job("fixme", cluster, method="full"))
    policy_failure(cluster, "fixme")
    cluster.patch_job("fixme", {"spec": {"method": "lora"}})
    pod = the_pod(cluster, "fixme")
    assert pod["metadata"]["name"] == "fixme-a1-r0"
    fixed = cluster.job("fixme")
    assert fixed["status"]["phase"] == "Pending"
    assert fixed["status"]["observedGeneration"] == 2
    failed = condition(fixed, "Failed")
    assert failed is not None and (failed["status"], failed["reason"]) == (
        "False",
        "PolicyCompliant",
    )
    assert fixed["status"]["effective"]["profile"] == TENANT_PROFILE_NAME
    # Refused again by a new edit? No: a launched job keeps its launch's verdict.
    assert event_reasons(cluster, "fixme").count("PolicyViolation") == 1
    # The Failed condition's turn to False is told once, with its reason.
    assert event_reasons(cluster, "fixme").count("PolicyCompliant") == 1


def test_a_compliant_job_runs_the_effective_spec_and_records_it(
    cluster: Cluster, profiles: object, operator_process: object
) -> None:
    tenant_namespace(cluster)
    cluster.create_job(job("good", cluster))
    pod = the_pod(cluster, "good")
    status = cluster.job("good")["status"]
    effective = status["effective"]
    assert effective["profile"] == TENANT_PROFILE_NAME
    assert effective["profileGeneration"] == 1
    added = {item["field"]: json.loads(item["value"]) for item in effective["fromProfile"]}
    assert added["spec.image"] == "ghcr.io/sftjob/sftjob-trainer:0.1.0"
    assert added["spec.activeDeadlineSeconds"] == 1800
    # The pod: the profile's defaults, merged under the job.
    assert trainer(pod)["image"] == "ghcr.io/sftjob/sftjob-trainer:0.1.0"
    assert pod["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert pod["spec"]["tolerations"][0]["key"] == "tuning.sftjob.dev/gpu-pool"
    assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "tenant-queue"
    env = env_of(pod)
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["HF_HOME"] == "/cache/huggingface"
    claims = {v["name"]: v.get("persistentVolumeClaim") for v in pod["spec"]["volumes"]}
    assert claims["model-cache"] == {"claimName": "sftjob-model-cache"}
    resources = trainer(pod)["resources"]
    assert resources["requests"] == {"ephemeral-storage": "2Gi", "cpu": "1", "memory": "4Gi"}
    assert "runAsUser" not in pod["spec"]["securityContext"]
    # The run's config is the effective spec; the verdict is frozen beside it.
    config = cluster.config("good")
    assert config["spec"]["activeDeadlineSeconds"] == 1800
    assert config["spec"]["image"] == "ghcr.io/sftjob/sftjob-trainer:0.1.0"
    [config_map] = [
        c for c in config_maps(cluster, "good") if c["metadata"]["name"].endswith("-config")
    ]
    frozen = json.loads(config_map["data"]["policy.json"])
    assert frozen["pod"]["queueName"] == "tenant-queue"
    assert frozen["maxActiveDeadlineSeconds"] == 3600
    assert frozen["effective"] == effective
    # The job's own spec is untouched: the profile's additions are not an edit.
    assert "image" not in cluster.job("good")["spec"]
    cluster.set_pod(pod["metadata"]["name"], "Running")
    running = wait_for(
        lambda: (j := cluster.job("good"))["status"].get("phase") == "Running" and j,
        what="Running",
    )
    assert condition(running, "SpecChangeIgnored") is None


def _own_profile(api: kubernetes.client.ApiClient, name: str, pool: str) -> dict[str, Any]:
    """A copy of the tenant profile for one test (profiles are cluster-wide)."""
    [document] = [d for d in profile_documents() if d["metadata"]["name"] == TENANT_PROFILE_NAME]
    document["metadata"]["name"] = name
    document["spec"]["namespaceSelector"] = {"matchLabels": {POOL_LABEL: pool}}
    custom = kubernetes.client.CustomObjectsApi(api)
    return dict(custom.create_cluster_custom_object(GROUP, VERSION, PROFILES, document))


def test_a_profile_edit_changes_new_jobs_only(
    cluster: Cluster, profiles: kubernetes.client.ApiClient, operator_process: object
) -> None:
    _own_profile(profiles, "edited-profile", "edited")
    tenant_namespace(cluster, {POOL_LABEL: "edited"})
    cluster.create_job(job("before", cluster))
    first = the_pod(cluster, "before")
    cluster.set_pod(first["metadata"]["name"], "Running")
    wait_for(lambda: cluster.job("before")["status"].get("phase") == "Running", what="Running")
    frozen = {c["metadata"]["name"]: c["data"] for c in config_maps(cluster, "before")}

    custom = kubernetes.client.CustomObjectsApi(profiles)
    custom.patch_cluster_custom_object(
        GROUP,
        VERSION,
        PROFILES,
        "edited-profile",
        {
            "spec": {
                "defaults": {"queueName": "new-queue", "env": [{"name": "MIRROR", "value": "2"}]}
            }
        },
    )
    # The operator has seen the edit once a new job gets it.
    cluster.create_job(job("after", cluster))
    after = the_pod(cluster, "after")
    assert after["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "new-queue"
    assert env_of(after)["MIRROR"] == "2"
    assert cluster.job("after")["status"]["effective"]["profileGeneration"] == 2

    # The running job: same pod, same ConfigMaps, same recorded verdict.
    [still] = cluster.live_pods("before")
    assert still["metadata"]["uid"] == first["metadata"]["uid"]
    assert _config_unchanged(frozen, config_maps(cluster, "before"))
    assert cluster.job("before")["status"]["effective"]["profileGeneration"] == 1
    # A resume is a new launch of the same run: built from the frozen verdict.
    cluster.patch_job("before", {"spec": {"suspend": True}})
    wait_for(lambda: cluster.job("before")["status"].get("phase") == "Suspended", what="Suspended")
    cluster.patch_job("before", {"spec": {"suspend": False}})
    resumed = the_pod(cluster, "before", attempt=2)
    assert resumed["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "tenant-queue"
    assert "MIRROR" not in env_of(resumed)


def _config_unchanged(frozen: dict[str, Any], now: list[dict[str, Any]]) -> bool:
    """The config ConfigMap (spec and frozen verdict) is as it was at the launch (the
    progress one is the trainer's to write)."""
    current = {c["metadata"]["name"]: c["data"] for c in now}
    name = "before-config"
    return "policy.json" in frozen[name] and current[name] == frozen[name]


def test_a_deadline_edit_above_the_cap_is_refused(
    cluster: Cluster, profiles: object, operator_process: object
) -> None:
    tenant_namespace(cluster)
    cluster.create_job(job("capped", cluster, activeDeadlineSeconds=8))
    pod = the_pod(cluster, "capped")
    cluster.set_pod(pod["metadata"]["name"], "Running")
    wait_for(lambda: cluster.job("capped")["status"].get("phase") == "Running", what="Running")
    cluster.patch_job("capped", {"spec": {"activeDeadlineSeconds": 7200}})
    refused = wait_for(
        lambda: (
            (j := cluster.job("capped"))
            and (c := condition(j, "SpecChangeIgnored"))
            and c["reason"] == "PolicyViolation"
            and c
        ),
        what="SpecChangeIgnored/PolicyViolation",
    )
    assert refused["status"] == "True"
    assert "limits.maxActiveDeadlineSeconds" in refused["message"]
    assert "spec.activeDeadlineSeconds" in refused["message"]
    # The launched deadline still holds: the run ends at 8 s, not at 7200.
    failed = wait_for(
        lambda: (j := cluster.job("capped"))["status"].get("phase") == "Failed" and j,
        timeout=30,
        what="DeadlineExceeded",
    )
    assert condition(failed, "Failed")["reason"] == "DeadlineExceeded"
    assert cluster.config("capped")["spec"]["activeDeadlineSeconds"] == 8
