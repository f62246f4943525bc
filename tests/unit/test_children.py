"""The pure child builders: names, ownership, labels, RBAC scope and the pod spec."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from sftjob_operator.api import SFTJob, parse_sftjob
from sftjob_operator.children import (
    DEFAULT_TRAINER_IMAGE,
    build_config_map,
    build_pod,
    build_pods,
    build_progress_config_map,
    build_rendezvous_service,
    build_role,
    build_role_binding,
    build_service_account,
    build_static_children,
    default_scratch_storage,
    training_spec_hash,
)
from sftjob_operator.policy import PodDefaults
from sftjob_operator.profile_api import MODEL_CACHE_MOUNT, ModelCacheSpec
from sftjob_operator.trainer_config import build_trainer_config, main_port

UID = "0b9c1e7a-1111-4222-8333-444455556666"
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def make_job(
    name: str = "demo",
    namespace: str | None = "ml",
    labels: dict[str, str] | None = None,
    **spec_changes: Any,
) -> SFTJob:
    spec: dict[str, Any] = {
        "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct"},
        "dataset": {"name": "trl-lib/Capybara", "limit": 1000},
    }
    spec.update(spec_changes)
    metadata: dict[str, Any] = {"name": name, "uid": UID, "generation": 1}
    if namespace is not None:
        metadata["namespace"] = namespace
    if labels:
        metadata["labels"] = labels
    return parse_sftjob(
        {
            "apiVersion": "tuning.sftjob.dev/v1alpha1",
            "kind": "SFTJob",
            "metadata": metadata,
            "spec": spec,
        }
    )


def container(pod: dict[str, Any]) -> dict[str, Any]:
    containers = pod["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def env_of(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container(pod)["env"]}


def volumes_of(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod["spec"]["volumes"]}


def mounts_of(pod: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["name"]: m for m in container(pod)["volumeMounts"]}


def assert_owned(obj: dict[str, Any], name: str = "demo") -> None:
    assert obj["metadata"]["ownerReferences"] == [
        {
            "apiVersion": "tuning.sftjob.dev/v1alpha1",
            "kind": "SFTJob",
            "name": name,
            "uid": UID,
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]


def assert_common_labels(obj: dict[str, Any], component: str, name: str = "demo") -> None:
    labels = obj["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "sftjob"
    assert labels["app.kubernetes.io/managed-by"] == "sftjob-operator"
    assert labels["sftjob.dev/job-name"] == name
    assert labels["app.kubernetes.io/component"] == component


class TestBuildConfigMap:
    def test_fixed_name_namespace_owner_and_labels(self) -> None:
        job = make_job()
        cm = build_config_map(job, build_trainer_config(job))
        assert (cm["apiVersion"], cm["kind"]) == ("v1", "ConfigMap")
        assert cm["metadata"]["name"] == "demo-config"
        assert cm["metadata"]["namespace"] == "ml"
        assert_owned(cm)
        assert_common_labels(cm, "config")

    def test_config_json_parses_and_carries_the_plan(self) -> None:
        job = make_job(training={"perDeviceTrainBatchSize": 4, "gradientAccumulationSteps": 2})
        config = build_trainer_config(job)
        cm = build_config_map(job, config)
        assert list(cm["data"]) == ["config.json"]
        parsed = json.loads(cm["data"]["config.json"])
        assert parsed == config
        # 1000 rows, 1 GPU, micro-batch 4: 250 micro-batches, accumulation 2 -> 125 steps/epoch.
        assert parsed["plan"]["stepsPerEpoch"] == 125
        assert parsed["plan"]["totalSteps"] == 375
        assert parsed["plan"]["effectiveBatchSize"] == 8
        assert parsed["job"] == {"name": "demo", "namespace": "ml", "uid": UID, "generation": 1}

    def test_namespace_defaults_to_default(self) -> None:
        job = make_job(namespace=None)
        assert build_config_map(job, {})["metadata"]["namespace"] == "default"


class TestBuildServiceAccount:
    def test_fixed_name_owner_and_labels(self) -> None:
        sa = build_service_account(make_job())
        assert (sa["apiVersion"], sa["kind"]) == ("v1", "ServiceAccount")
        assert sa["metadata"]["name"] == "demo-trainer"
        assert sa["metadata"]["namespace"] == "ml"
        assert_owned(sa)
        assert_common_labels(sa, "rbac")


class TestBuildRole:
    def test_fixed_name_owner_and_labels(self) -> None:
        role = build_role(make_job())
        assert (role["apiVersion"], role["kind"]) == ("rbac.authorization.k8s.io/v1", "Role")
        assert role["metadata"]["name"] == "demo-trainer"
        assert_owned(role)
        assert_common_labels(role, "rbac")

    def test_trainer_may_write_only_this_jobs_progress_config_map(self) -> None:
        rules = build_role(make_job())["rules"]
        # Every rule is pinned to this job's progress ConfigMap by name.
        for rule in rules:
            assert rule["apiGroups"] == [""]
            assert rule["resourceNames"] == ["demo-progress"]
        grants = {
            (resource, verb)
            for rule in rules
            for resource in rule["resources"]
            for verb in rule["verbs"]
        }
        assert grants == {("configmaps", "get"), ("configmaps", "patch")}

    def test_nothing_of_the_sftjob_is_granted(self) -> None:
        # Its status holds phase, attempts, restarts and conditions, which the operator acts on.
        rules = build_role(make_job())["rules"]
        verbs = {verb for rule in rules for verb in rule["verbs"]}
        assert verbs.isdisjoint({"create", "update", "delete", "deletecollection", "list", "watch"})
        assert "*" not in verbs
        assert all("*" not in rule["resources"] for rule in rules)
        assert not [r for rule in rules for r in rule["resources"] if r.startswith("sftjobs")]
        assert all("tuning.sftjob.dev" not in rule["apiGroups"] for rule in rules)


class TestBuildProgressConfigMap:
    def test_fixed_name_owner_labels_and_empty_data(self) -> None:
        cm = build_progress_config_map(make_job())
        assert (cm["apiVersion"], cm["kind"]) == ("v1", "ConfigMap")
        assert cm["metadata"]["name"] == "demo-progress"
        assert cm["metadata"]["namespace"] == "ml"
        assert cm["data"] == {}
        assert_owned(cm)
        assert_common_labels(cm, "progress")


class TestBuildRoleBinding:
    def test_binds_the_service_account_to_the_role(self) -> None:
        binding = build_role_binding(make_job())
        assert binding["kind"] == "RoleBinding"
        assert binding["metadata"]["name"] == "demo-trainer"
        assert_owned(binding)
        assert_common_labels(binding, "rbac")
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "demo-trainer",
        }
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": "demo-trainer", "namespace": "ml"}
        ]

    def test_role_binding_and_pods_agree_on_names(self) -> None:
        job = make_job()
        assert build_role_binding(job)["roleRef"]["name"] == build_role(job)["metadata"]["name"]
        sa_name = build_service_account(job)["metadata"]["name"]
        assert build_role_binding(job)["subjects"][0]["name"] == sa_name
        assert build_pod(job, 0, 1)["spec"]["serviceAccountName"] == sa_name


class TestBuildRendezvousService:
    def test_headless_service_selects_rank_zero_early(self) -> None:
        svc = build_rendezvous_service(make_job(resources={"nodes": 2}))
        assert svc["kind"] == "Service"
        assert svc["metadata"]["name"] == "demo-rdzv"
        assert_owned(svc)
        assert_common_labels(svc, "rendezvous")
        spec = svc["spec"]
        assert spec["clusterIP"] == "None"
        assert spec["publishNotReadyAddresses"] is True
        assert spec["selector"] == {"sftjob.dev/job-name": "demo", "sftjob.dev/rank": "0"}
        port = main_port(make_job(resources={"nodes": 2}))
        assert 20000 <= port < 30000
        assert spec["ports"] == [{"name": "rendezvous", "port": port, "targetPort": port}]

    def test_selector_matches_rank_zero_pod_only(self) -> None:
        job = make_job(resources={"nodes": 3})
        selector = build_rendezvous_service(job)["spec"]["selector"]
        matching = [
            pod["metadata"]["name"]
            for pod in build_pods(job, attempt=1)
            if all(pod["metadata"]["labels"].get(k) == v for k, v in selector.items())
        ]
        assert matching == ["demo-a1-r0"]


class TestBuildStaticChildren:
    def test_single_node_has_no_service(self) -> None:
        job = make_job()
        kinds = [c["kind"] for c in build_static_children(job, build_trainer_config(job))]
        assert kinds == ["ConfigMap", "ConfigMap", "ServiceAccount", "Role", "RoleBinding"]

    def test_multi_node_adds_the_rendezvous_service(self) -> None:
        job = make_job(resources={"nodes": 2})
        children = build_static_children(job, build_trainer_config(job))
        assert [c["kind"] for c in children] == [
            "ConfigMap",
            "ConfigMap",
            "ServiceAccount",
            "Role",
            "RoleBinding",
            "Service",
        ]
        assert children[-1]["metadata"]["name"] == "demo-rdzv"
        for child in children:
            assert_owned(child)


class TestBuildPod:
    def test_name_labels_and_owner(self) -> None:
        pod = build_pod(make_job(resources={"nodes": 2}), rank=1, attempt=3)
        assert (pod["apiVersion"], pod["kind"]) == ("v1", "Pod")
        assert pod["metadata"]["name"] == "demo-a3-r1"
        assert pod["metadata"]["namespace"] == "ml"
        assert_owned(pod)
        assert_common_labels(pod, "trainer")
        assert pod["metadata"]["labels"]["sftjob.dev/rank"] == "1"
        assert pod["metadata"]["labels"]["sftjob.dev/attempt"] == "3"
        assert pod["spec"]["hostname"] == "demo-r1"
        assert pod["spec"]["subdomain"] == "demo-rdzv"

    def test_kueue_queue_label_travels_to_pods(self) -> None:
        job = make_job(labels={"kueue.x-k8s.io/queue-name": "gpu-queue", "team": "nlp"})
        labels = build_pod(job, 0, 1)["metadata"]["labels"]
        assert labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
        # Other labels of the SFTJob are not copied.
        assert "team" not in labels

    def test_no_kueue_label_without_a_queue(self) -> None:
        labels = build_pod(make_job(), 0, 1)["metadata"]["labels"]
        assert "kueue.x-k8s.io/queue-name" not in labels

    def test_two_node_job_with_a_queue_is_one_kueue_gang(self) -> None:
        job = make_job(
            labels={"kueue.x-k8s.io/queue-name": "gpu-queue"},
            resources={"nodes": 2},
        )
        pods = build_pods(job, 3)
        assert len(pods) == 2
        for pod in pods:
            assert pod["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] == "demo-a3"
            assert pod["metadata"]["annotations"] == {
                "kueue.x-k8s.io/pod-group-total-count": "2",
                "kueue.x-k8s.io/retriable-in-group": "false",
            }
            # Kueue's webhook adds its managed label and admission gate, not the operator.
            assert "kueue.x-k8s.io/managed" not in pod["metadata"]["labels"]
            assert "schedulingGates" not in pod["spec"]
        # A new attempt is a new group, so a new Kueue Workload.
        next_attempt = build_pods(job, 4)[0]["metadata"]["labels"]
        assert next_attempt["kueue.x-k8s.io/pod-group-name"] == "demo-a4"

    def test_no_kueue_gang_without_a_queue_or_for_one_node(self) -> None:
        unqueued = make_job(resources={"nodes": 2})
        single = make_job(labels={"kueue.x-k8s.io/queue-name": "gpu-queue"})
        for pod in [*build_pods(unqueued, 1), *build_pods(single, 1)]:
            assert "kueue.x-k8s.io/pod-group-name" not in pod["metadata"]["labels"]
            assert "annotations" not in pod["metadata"]

    def test_image_from_spec_or_default(self) -> None:
        assert container(build_pod(make_job(), 0, 1))["image"] == DEFAULT_TRAINER_IMAGE
        assert container(build_pod(make_job(), 0, 1, "reg/own:1"))["image"] == "reg/own:1"
        custom = make_job(image="registry.example/trainer:2.0")
        assert container(build_pod(custom, 0, 1, "reg/own:1"))["image"] == (
            "registry.example/trainer:2.0"
        )

    def test_gpu_cpu_and_memory_resources(self) -> None:
        job = make_job(
            resources={
                "gpusPerNode": 4,
                "gpuResourceName": "amd.com/gpu",
                "cpu": "16",
                "memory": "128Gi",
            }
        )
        # Scratch: 4 GiB + the 0.5B hub model's bf16 weights (1 GiB) in the HF cache.
        assert container(build_pod(job, 0, 1))["resources"] == {
            "limits": {
                "ephemeral-storage": "5Gi",
                "amd.com/gpu": "4",
                "cpu": "16",
                "memory": "128Gi",
            },
            "requests": {"ephemeral-storage": "5Gi", "cpu": "16", "memory": "128Gi"},
        }

    def test_default_gpu_resource_name(self) -> None:
        resources = container(build_pod(make_job(), 0, 1))["resources"]
        assert resources == {
            "limits": {"ephemeral-storage": "5Gi", "nvidia.com/gpu": "1"},
            "requests": {"ephemeral-storage": "5Gi"},
        }

    def test_cpu_job_has_no_gpu_limit_and_no_shm(self) -> None:
        job = make_job(resources={"gpusPerNode": 0, "cpu": "2", "memory": "4Gi"})
        pod = build_pod(job, 0, 1)
        assert container(pod)["resources"] == {
            "limits": {"ephemeral-storage": "5Gi", "cpu": "2", "memory": "4Gi"},
            "requests": {"ephemeral-storage": "5Gi", "cpu": "2", "memory": "4Gi"},
        }
        assert "dshm" not in volumes_of(pod)
        assert "dshm" not in mounts_of(pod)

    def test_node_selector_and_tolerations(self) -> None:
        job = make_job(
            resources={
                "nodeSelector": {"gpu": "h100"},
                "tolerations": [
                    {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
                ],
            }
        )
        spec = build_pod(job, 0, 1)["spec"]
        assert spec["nodeSelector"] == {"gpu": "h100"}
        assert spec["tolerations"] == [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ]

    def test_no_selector_or_tolerations_unless_asked(self) -> None:
        spec = build_pod(make_job(), 0, 1)["spec"]
        assert "nodeSelector" not in spec
        assert "tolerations" not in spec

    def test_anti_affinity_only_multi_node(self) -> None:
        assert "affinity" not in build_pod(make_job(), 0, 1)["spec"]
        assert "subdomain" not in build_pod(make_job(), 0, 1)["spec"]
        affinity = build_pod(make_job(resources={"nodes": 2}), 0, 1)["spec"]["affinity"]
        (term,) = affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert term["podAffinityTerm"] == {
            "topologyKey": "kubernetes.io/hostname",
            "labelSelector": {"matchLabels": {"sftjob.dev/job-name": "demo"}},
        }

    def test_hf_token_comes_from_a_secret_ref(self) -> None:
        job = make_job(secrets={"hfToken": {"name": "hf-token", "key": "token"}})
        env = env_of(build_pod(job, 0, 1))
        assert env["HF_TOKEN"] == {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "token"}},
        }
        assert "value" not in env["HF_TOKEN"]

    def test_no_hf_token_without_a_secret(self) -> None:
        assert "HF_TOKEN" not in env_of(build_pod(make_job(), 0, 1))

    def test_s3_key_pair_comes_from_a_secret_ref_and_the_endpoint_from_the_config(self) -> None:
        job = make_job(
            dataset={"uri": "s3://data/chat.jsonl"},
            output={"uri": "s3://models/run-1/"},
            objectStorage={"endpointUrl": "http://minio.storage:9000"},
            secrets={"s3": {"name": "s3-keys", "secretAccessKeyKey": "secret"}},
        )
        env = env_of(build_pod(job, 0, 1))
        assert env["AWS_ACCESS_KEY_ID"]["valueFrom"] == {
            "secretKeyRef": {"name": "s3-keys", "key": "AWS_ACCESS_KEY_ID"}
        }
        assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"] == {
            "secretKeyRef": {"name": "s3-keys", "key": "secret"}
        }
        # Not secret: the trainer reads the endpoint and URIs from its config.
        spec = build_trainer_config(job)["spec"]
        assert spec["objectStorage"]["endpointUrl"] == "http://minio.storage:9000"
        assert spec["output"]["uri"] == "s3://models/run-1/"
        assert not any(name.startswith("AWS_") for name in env_of(build_pod(make_job(), 0, 1)))

    def test_single_node_rank_env(self) -> None:
        env = env_of(build_pod(make_job(), 0, 1))
        assert env["SFTJOB_NODE_RANK"]["value"] == "0"
        assert env["SFTJOB_NUM_NODES"]["value"] == "1"
        assert env["SFTJOB_MAIN_ADDR"]["value"] == "127.0.0.1"
        assert env["SFTJOB_MAIN_PORT"]["value"] == str(main_port(make_job()))
        assert env["SFTJOB_CONFIG"]["value"] == "/etc/sftjob/config.json"

    def test_multi_node_rank_env_points_at_the_rendezvous_service(self) -> None:
        job = make_job(resources={"nodes": 3})
        pods = build_pods(job, attempt=2)
        assert [p["metadata"]["name"] for p in pods] == ["demo-a2-r0", "demo-a2-r1", "demo-a2-r2"]
        for rank, pod in enumerate(pods):
            env = env_of(pod)
            assert env["SFTJOB_NODE_RANK"]["value"] == str(rank)
            assert env["SFTJOB_NUM_NODES"]["value"] == "3"
            assert env["SFTJOB_MAIN_ADDR"]["value"] == "demo-rdzv.ml.svc"

    def test_user_env_is_appended(self) -> None:
        job = make_job(env=[{"name": "WANDB_DISABLED", "value": "true"}])
        assert env_of(build_pod(job, 0, 1))["WANDB_DISABLED"]["value"] == "true"

    def test_volumes_with_emptydir_output(self) -> None:
        pod = build_pod(make_job(), 0, 1)
        volumes, mounts = volumes_of(pod), mounts_of(pod)
        assert volumes["config"] == {"name": "config", "configMap": {"name": "demo-config"}}
        assert mounts["config"] == {"name": "config", "mountPath": "/etc/sftjob", "readOnly": True}
        # Disk-backed emptyDirs are bounded by the pod's scratch storage.
        assert volumes["output"] == {"name": "output", "emptyDir": {"sizeLimit": "5Gi"}}
        assert mounts["output"]["mountPath"] == "/output"
        assert volumes["tmp"] == {"name": "tmp", "emptyDir": {"sizeLimit": "5Gi"}}
        assert volumes["dshm"] == {
            "name": "dshm",
            "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"},
        }
        assert mounts["dshm"]["mountPath"] == "/dev/shm"

    def test_volumes_with_output_pvc_and_user_pvcs(self) -> None:
        job = make_job(
            output={"path": "/ckpt", "claimName": "ckpt-pvc"},
            volumes=[
                {"name": "models", "claimName": "models-pvc", "mountPath": "/models"},
                {
                    "name": "scratch",
                    "claimName": "scratch-pvc",
                    "mountPath": "/scratch",
                    "readOnly": False,
                },
            ],
        )
        pod = build_pod(job, 0, 1)
        volumes, mounts = volumes_of(pod), mounts_of(pod)
        assert volumes["output"] == {
            "name": "output",
            "persistentVolumeClaim": {"claimName": "ckpt-pvc"},
        }
        assert mounts["output"]["mountPath"] == "/ckpt"
        assert env_of(pod)["SFTJOB_OUTPUT_DIR"]["value"] == "/ckpt"
        assert volumes["user-models"] == {
            "name": "user-models",
            "persistentVolumeClaim": {"claimName": "models-pvc", "readOnly": True},
        }
        assert mounts["user-models"] == {
            "name": "user-models",
            "mountPath": "/models",
            "readOnly": True,
        }
        assert volumes["user-scratch"]["persistentVolumeClaim"]["readOnly"] is False
        assert mounts["user-scratch"]["readOnly"] is False
        # Every mount refers to a declared volume.
        assert set(mounts) <= set(volumes)

    def test_security_context(self) -> None:
        pod = build_pod(make_job(), 0, 1)
        pod_sc = pod["spec"]["securityContext"]
        # No fixed ids: the image's numeric non-root USER runs (OpenShift assigns its own).
        assert pod_sc == {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}}
        assert container(pod)["securityContext"] == {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "capabilities": {"drop": ["ALL"]},
        }

    def test_restart_policy_and_termination_message(self) -> None:
        pod = build_pod(make_job(), 0, 1)
        assert pod["spec"]["restartPolicy"] == "Never"
        c = container(pod)
        assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
        assert c["terminationMessagePath"] == "/dev/termination-log"
        assert env_of(pod)["SFTJOB_TERMINATION_LOG"]["value"] == "/dev/termination-log"

    def test_build_pods_one_per_rank_with_unique_names(self) -> None:
        pods = build_pods(make_job(resources={"nodes": 4}), attempt=1)
        names = [p["metadata"]["name"] for p in pods]
        assert names == ["demo-a1-r0", "demo-a1-r1", "demo-a1-r2", "demo-a1-r3"]
        assert [p["metadata"]["labels"]["sftjob.dev/rank"] for p in pods] == ["0", "1", "2", "3"]


class TestPodDefaultsFromTheProfile:
    """What only a profile gives a pod (policy.PodDefaults), merged with what the job asks."""

    DEFAULTS = PodDefaults(
        affinity={
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": [
                        {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]}
                    ]
                }
            }
        },
        priorityClassName="tenant-low",
        queueName="tenant-queue",
        ephemeralStorage="30Gi",
        modelCache=ModelCacheSpec(claimName="model-cache"),
        runAsUser=2000,
        runAsGroup=3000,
        fsGroup=4000,
    )

    def test_priority_queue_ids_and_storage_come_from_the_profile(self) -> None:
        pod = build_pod(make_job(), 0, 1, pod=self.DEFAULTS)
        assert pod["spec"]["priorityClassName"] == "tenant-low"
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "tenant-queue"
        assert pod["spec"]["securityContext"] == {
            "runAsNonRoot": True,
            "runAsUser": 2000,
            "runAsGroup": 3000,
            "fsGroup": 4000,
            "seccompProfile": {"type": "RuntimeDefault"},
        }
        resources = container(pod)["resources"]
        assert resources["requests"]["ephemeral-storage"] == "30Gi"
        assert resources["limits"]["ephemeral-storage"] == "30Gi"
        volumes = volumes_of(pod)
        assert volumes["tmp"]["emptyDir"] == {"sizeLimit": "30Gi"}
        assert volumes["output"]["emptyDir"] == {"sizeLimit": "30Gi"}
        assert volumes["dshm"]["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}

    def test_profile_queue_makes_a_two_node_job_one_kueue_gang(self) -> None:
        job = make_job(resources={"nodes": 2})
        pods = build_pods(job, 1, pod=self.DEFAULTS)
        assert [p["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] for p in pods] == [
            "tenant-queue",
            "tenant-queue",
        ]
        assert {p["metadata"]["labels"]["kueue.x-k8s.io/pod-group-name"] for p in pods} == {
            "demo-a1"
        }
        assert {
            p["metadata"]["annotations"]["kueue.x-k8s.io/pod-group-total-count"] for p in pods
        } == {"2"}

    def test_the_jobs_own_queue_label_wins(self) -> None:
        job = make_job(labels={"kueue.x-k8s.io/queue-name": "own"})
        pod = build_pod(job, 0, 1, pod=self.DEFAULTS)
        assert pod["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "own"

    def test_model_cache_is_mounted_read_write_as_hf_home(self) -> None:
        pod = build_pod(make_job(), 0, 1, pod=self.DEFAULTS)
        assert volumes_of(pod)["model-cache"] == {
            "name": "model-cache",
            "persistentVolumeClaim": {"claimName": "model-cache"},
        }
        mount = mounts_of(pod)["model-cache"]
        assert mount == {"name": "model-cache", "mountPath": MODEL_CACHE_MOUNT}
        assert env_of(pod)["HF_HOME"]["value"] == MODEL_CACHE_MOUNT
        # Without a profile's cache the scratch HF home stays.
        assert env_of(build_pod(make_job(), 0, 1))["HF_HOME"]["value"] == "/tmp/hf-home"
        assert "model-cache" not in volumes_of(build_pod(make_job(), 0, 1))

    def test_affinity_single_node_is_the_profiles(self) -> None:
        pod = build_pod(make_job(), 0, 1, pod=self.DEFAULTS)
        assert pod["spec"]["affinity"] == dict(self.DEFAULTS.affinity)

    def test_affinity_multi_node_merges_the_spread_into_the_profiles(self) -> None:
        defaults = PodDefaults(
            affinity={
                **self.DEFAULTS.affinity,
                "podAntiAffinity": {
                    "preferredDuringSchedulingIgnoredDuringExecution": [
                        {"weight": 10, "podAffinityTerm": {"topologyKey": "zone"}}
                    ]
                },
            }
        )
        pod = build_pod(make_job(resources={"nodes": 2}), 0, 1, pod=defaults)
        affinity = pod["spec"]["affinity"]
        assert affinity["nodeAffinity"] == self.DEFAULTS.affinity["nodeAffinity"]
        terms = affinity["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"]
        assert [t["podAffinityTerm"]["topologyKey"] for t in terms] == [
            "zone",
            "kubernetes.io/hostname",
        ]
        # The profile's own mapping is never changed by a build.
        assert (
            len(
                defaults.affinity["podAntiAffinity"][
                    "preferredDuringSchedulingIgnoredDuringExecution"
                ]
            )
            == 1
        )

    def test_pods_with_profile_settings_pass_api_server_validation(self) -> None:
        from sftjob_local.emulator import validation

        pod = build_pod(make_job(resources={"nodes": 2}), 1, 1, pod=self.DEFAULTS)
        errors = validation.validate_create("Pod", "", pod, namespaced=True)
        assert errors == [], [e.cause() for e in errors]


class TestDefaultScratchStorage:
    """Without a profile's ephemeralStorage: 4 GiB plus a bf16 copy of the weights for each
    of a hub download (no model cache) and a full fine-tune saved to an emptyDir."""

    @pytest.mark.parametrize(
        ("changes", "model_cache", "expected"),
        [
            # A mounted model, results on a claim: nothing large is written to scratch.
            ({"model": {"path": "/models/x"}, "output": {"claimName": "out"}}, False, "4Gi"),
            # A 7B hub model (ceil(7e9 * 2 / 2^30) = 14 GiB) downloaded into /tmp.
            ({"model": {"name": "Qwen/Qwen2.5-7B"}, "output": {"claimName": "out"}}, False, "18Gi"),
            # The same with a shared model cache: no download into scratch.
            ({"model": {"name": "Qwen/Qwen2.5-7B"}, "output": {"claimName": "out"}}, True, "4Gi"),
            # Full fine-tune of it saved into the emptyDir output as well: two copies.
            ({"model": {"name": "Qwen/Qwen2.5-7B"}, "method": "full"}, False, "32Gi"),
            # A size nobody states: the bf16 weights of a 7-8B model.
            ({"model": {"path": "/models/x"}, "method": "full"}, False, "20Gi"),
            # Declared size wins over the name.
            (
                {
                    "model": {"name": "org/m", "parametersBillions": 1.5},
                    "output": {"claimName": "o"},
                },
                False,
                "7Gi",
            ),
        ],
    )
    def test_derived_from_what_the_pod_writes(
        self, changes: dict[str, Any], model_cache: bool, expected: str
    ) -> None:
        spec = make_job(**changes).spec
        assert default_scratch_storage(spec, model_cache) == expected


class TestTrainingSpecHash:
    def test_ignores_suspend_retry_ttl_and_deadline(self) -> None:
        base = training_spec_hash(make_job())
        assert training_spec_hash(make_job(suspend=True)) == base
        assert training_spec_hash(make_job(retry={"maxRestarts": 9, "oomAutoShrink": False})) == (
            base
        )
        assert training_spec_hash(make_job(ttlSecondsAfterFinished=60)) == base
        assert training_spec_hash(make_job(activeDeadlineSeconds=3600)) == base

    @pytest.mark.parametrize(
        "change",
        [
            {"training": {"learningRate": 1e-4}},
            {"training": {"perDeviceTrainBatchSize": 4}},
            {"resources": {"nodes": 2}},
            {"method": "full"},
            {"image": "other:1"},
        ],
    )
    def test_changes_with_training_fields(self, change: dict[str, Any]) -> None:
        assert training_spec_hash(make_job(**change)) != training_spec_hash(make_job())

    def test_is_stable(self) -> None:
        assert training_spec_hash(make_job()) == training_spec_hash(make_job())
        assert re.fullmatch(r"[0-9a-f]{16}", training_spec_hash(make_job()))


class TestNameLimits:
    def test_every_built_name_is_a_dns_label_for_the_longest_job(self) -> None:
        name = "j" * 48 + "-x"
        assert len(name) == 50
        job = make_job(
            name=name,
            resources={"nodes": 16},
            volumes=[{"name": "models", "claimName": "models-pvc", "mountPath": "/models"}],
        )
        children = build_static_children(job, build_trainer_config(job))
        pod = build_pod(job, rank=15, attempt=99)
        names = [c["metadata"]["name"] for c in children] + [
            pod["metadata"]["name"],
            pod["spec"]["hostname"],
            pod["spec"]["subdomain"],
            *(v["name"] for v in pod["spec"]["volumes"]),
            *(p["name"] for p in container(pod)["ports"]),
        ]
        assert pod["metadata"]["name"] == f"{name}-a99-r15"
        for built in names:
            assert len(built) <= 63, built
            assert DNS_LABEL.fullmatch(built), built
        for value in pod["metadata"]["labels"].values():
            assert len(value) <= 63, value

    def test_user_volume_names_stay_dns_labels(self) -> None:
        long_volume = "v" * 58
        job = make_job(
            volumes=[{"name": long_volume, "claimName": "models-pvc", "mountPath": "/models"}]
        )
        for volume in build_pod(job, 0, 1)["spec"]["volumes"]:
            assert len(volume["name"]) <= 63, volume["name"]


class TestChildrenPassApiServerValidation:
    """Every child passes the apiserver's validation as the local control plane models it
    (sftjob_local.emulator.validation, after pkg/apis/core/validation and rbac/validation)."""

    @pytest.mark.parametrize("name", ["j" * 48 + "-x", "demo", "a1"])
    def test_longest_and_shortest_names_multi_node(self, name: str) -> None:
        from sftjob_local.emulator import validation

        job = make_job(
            name=name,
            resources={"nodes": 16},
            volumes=[{"name": "models", "claimName": "models-pvc", "mountPath": "/models"}],
        )
        children = [
            *build_static_children(job, build_trainer_config(job)),
            build_pod(job, rank=15, attempt=99),
        ]
        for child in children:
            group = child["apiVersion"].rpartition("/")[0]
            errors = validation.validate_create(child["kind"], group, child, namespaced=True)
            assert errors == [], (child["kind"], [e.cause() for e in errors])
