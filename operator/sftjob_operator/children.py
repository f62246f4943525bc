"""Pure builders for an SFTJob's children: ConfigMaps, RBAC, Service, Pods.

Every child has a fixed name derived from the job (pods add the launch number and
rank), the job's labels and an ownerReference to the job, so creating them is
idempotent (409 means "already there") and deleting the job removes them all.
Nothing here talks to the API; `kube.py` sends what these functions return.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from .advice import model_billions
from .api import API_VERSION, KIND, SFTJob, SFTJobSpec
from .object_storage import credentials_env
from .policy import PodDefaults
from .trainer_config import (
    CONFIG_KEY,
    ENV_CONFIG_PATH,
    ENV_MAIN_ADDR,
    ENV_MAIN_PORT,
    ENV_NODE_RANK,
    ENV_NUM_NODES,
    ENV_TERMINATION_LOG,
    POLICY_KEY,
    main_port,
)

DEFAULT_TRAINER_IMAGE = "ghcr.io/sftjob/sftjob-trainer:0.1.0"
LABEL_JOB = "sftjob.dev/job-name"
LABEL_RANK = "sftjob.dev/rank"
LABEL_ATTEMPT = "sftjob.dev/attempt"
LABEL_COMPONENT = "app.kubernetes.io/component"
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Kueue's pod integration (pkg/controller/jobs/pod/constants/constants.go): the ranks of one
# attempt form a pod group that Kueue admits as one Workload, all ranks or none.
KUEUE_POD_GROUP_LABEL = "kueue.x-k8s.io/pod-group-name"
KUEUE_POD_GROUP_TOTAL_ANNOTATION = "kueue.x-k8s.io/pod-group-total-count"
KUEUE_RETRIABLE_IN_GROUP_ANNOTATION = "kueue.x-k8s.io/retriable-in-group"
COMMON_LABELS = {
    "app.kubernetes.io/name": "sftjob",
    "app.kubernetes.io/managed-by": "sftjob-operator",
}
CONFIG_MOUNT = "/etc/sftjob"
TERMINATION_LOG = "/dev/termination-log"
# Time for the trainer to write a checkpoint after SIGTERM before it is killed.
TERMINATION_GRACE_SECONDS = 120
# The Hugging Face cache when no profile mounts a shared one (PodDefaults.modelCache).
SCRATCH_HF_HOME = "/tmp/hf-home"

# Scratch space per pod when no profile sets it (PodDefaults.ephemeralStorage): the
# ephemeral-storage request and limit of the trainer and the sizeLimit of its /tmp and
# output emptyDirs, so a large download is evicted instead of filling the node's disk.
# What the trainer writes outside claims: SCRATCH_BASE_GIB for the datasets' Arrow cache,
# tokenizer files, compile caches and temp files, plus one copy of the weights (bf16: 2
# bytes per parameter) for each of: a hub model downloaded into /tmp/hf-home (no shared
# model cache), and a full fine-tune saved into an emptyDir output (no output claim;
# LoRA adapters are small). The size is the model's declared or named size
# (advice.model_billions); unknown, UNKNOWN_MODEL_GIB: the bf16 weights of a 7-8B
# model, the largest the reference fine-tunes on one node.
SCRATCH_BASE_GIB = 4
UNKNOWN_MODEL_GIB = 16
BYTES_PER_PARAMETER = 2


def config_map_name(job_name: str) -> str:
    return f"{job_name}-config"


def progress_config_map_name(job_name: str) -> str:
    return f"{job_name}-progress"


def service_account_name(job_name: str) -> str:
    return f"{job_name}-trainer"


def rendezvous_service_name(job_name: str) -> str:
    return f"{job_name}-rdzv"


def pod_name(job_name: str, attempt: int, rank: int) -> str:
    # A new launch gets new pod names: the previous launch's pods may still be terminating.
    return f"{job_name}-a{attempt}-r{rank}"


def owner_reference(job: SFTJob) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": job.metadata.name,
        "uid": job.metadata.uid or "",
        "controller": True,
        "blockOwnerDeletion": True,
    }


def job_labels(job: SFTJob) -> dict[str, str]:
    return {**COMMON_LABELS, LABEL_JOB: job.metadata.name}


def kueue_pod_group_name(job_name: str, attempt: int) -> str:
    """One Kueue pod group (and Workload of that name) per attempt: the pod names' prefix."""
    return f"{job_name}-a{attempt}"


def kueue_gang_metadata(
    job_name: str, attempt: int, nodes: int, queue: str | None
) -> tuple[dict[str, str], dict[str, str]]:
    """Labels and annotations that make a multi-node attempt one Kueue gang.

    None without a queue (Kueue leaves such pods alone) or for one node (Kueue admits a
    single plain pod as its own Workload). The operator never replaces a rank inside an
    attempt, it starts a new attempt (a new group): retriable-in-group "false" tells Kueue
    to finish the group's Workload, releasing its quota, once no rank is running, instead of
    waiting for replacement pods. Kueue adds its managed label and admission gate itself.
    """
    if not queue or nodes <= 1:
        return {}, {}
    labels = {KUEUE_POD_GROUP_LABEL: kueue_pod_group_name(job_name, attempt)}
    annotations = {
        KUEUE_POD_GROUP_TOTAL_ANNOTATION: str(nodes),
        KUEUE_RETRIABLE_IN_GROUP_ANNOTATION: "false",
    }
    return labels, annotations


def _metadata(job: SFTJob, name: str, component: str, **labels: str) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": job.metadata.namespace or "default",
        "labels": {**job_labels(job), LABEL_COMPONENT: component, **labels},
        "ownerReferences": [owner_reference(job)],
    }


def training_spec_hash(job: SFTJob) -> str:
    """Hash of everything that shapes the run; suspend and retry settings are left out."""
    spec = job.spec.model_dump(
        mode="json",
        exclude={"suspend", "retry", "ttlSecondsAfterFinished", "activeDeadlineSeconds"},
    )
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def build_config_map(
    job: SFTJob, trainer_config: dict[str, Any], launch_policy: str | None = None
) -> dict[str, Any]:
    """The config the ranks read; with `launch_policy`, the profile's verdict frozen beside
    it (launch_policy.LaunchPolicy as JSON), which only the operator reads."""
    data = {CONFIG_KEY: json.dumps(trainer_config, indent=2, sort_keys=True)}
    if launch_policy is not None:
        data[POLICY_KEY] = launch_policy
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, config_map_name(job.metadata.name), "config"),
        "data": data,
    }


def build_service_account(job: SFTJob) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": _metadata(job, service_account_name(job.metadata.name), "rbac"),
    }


def build_progress_config_map(job: SFTJob) -> dict[str, Any]:
    """Where rank 0 reports progress; the operator validates it into the status.

    Empty at first: the trainer merge-patches its report in (progress_report.encode_report),
    the only object its Role lets it write.
    """
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(job, progress_config_map_name(job.metadata.name), "progress"),
        "data": {},
    }


def build_role(job: SFTJob) -> dict[str, Any]:
    """The trainer may read and patch its job's progress ConfigMap, and nothing else.

    Not the SFTJob's status: phase, attempts, restarts and conditions live there and the
    operator acts on them, so a trainer that could patch it could forge them.
    """
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": _metadata(job, service_account_name(job.metadata.name), "rbac"),
        "rules": [
            {
                "apiGroups": [""],
                "resources": ["configmaps"],
                "resourceNames": [progress_config_map_name(job.metadata.name)],
                "verbs": ["get", "patch"],
            },
        ],
    }


def build_role_binding(job: SFTJob) -> dict[str, Any]:
    name = service_account_name(job.metadata.name)
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _metadata(job, name, "rbac"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
        "subjects": [
            {
                "kind": "ServiceAccount",
                "name": name,
                "namespace": job.metadata.namespace or "default",
            }
        ],
    }


def rendezvous_selector(job: SFTJob, attempt: int | None = None) -> dict[str, str]:
    """Rank 0 of `attempt`: a terminating rank 0 of an earlier attempt must not answer."""
    selector = {LABEL_JOB: job.metadata.name, LABEL_RANK: "0"}
    if attempt is not None:
        selector[LABEL_ATTEMPT] = str(attempt)
    return selector


def build_rendezvous_service(job: SFTJob, attempt: int | None = None) -> dict[str, Any]:
    """Headless Service resolving to rank 0 of the current attempt, where every rank meets.

    Multi-node only. Its selector names the attempt; each launch patches it to the new one.
    """
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(job, rendezvous_service_name(job.metadata.name), "rendezvous"),
        "spec": {
            "clusterIP": "None",
            # Ranks rendezvous before any pod is Ready, so the address must resolve early.
            "publishNotReadyAddresses": True,
            "selector": rendezvous_selector(job, attempt),
            "ports": [{"name": "rendezvous", "port": main_port(job), "targetPort": main_port(job)}],
        },
    }


def main_address(job: SFTJob) -> str:
    if job.spec.resources.nodes == 1:
        return "127.0.0.1"
    namespace = job.metadata.namespace or "default"
    return f"{rendezvous_service_name(job.metadata.name)}.{namespace}.svc"


def default_scratch_storage(spec: SFTJobSpec, model_cache: bool = False) -> str:
    """Scratch space of a pod whose profile sets none (see SCRATCH_BASE_GIB)."""
    copies = int(spec.model.name is not None and not model_cache)
    copies += int(spec.output.claimName is None and spec.method == "full")
    if not copies:
        return f"{SCRATCH_BASE_GIB}Gi"
    billions = model_billions(spec)
    weights = (
        math.ceil(billions * 1e9 * BYTES_PER_PARAMETER / 2**30)
        if billions is not None
        else UNKNOWN_MODEL_GIB
    )
    return f"{SCRATCH_BASE_GIB + copies * weights}Gi"


def scratch_storage(job: SFTJob, pod: PodDefaults) -> str:
    """The pod's ephemeral storage: the profile's, else the default for this job."""
    return pod.ephemeralStorage or default_scratch_storage(job.spec, pod.modelCache is not None)


def _resources(job: SFTJob, pod: PodDefaults) -> dict[str, Any]:
    res = job.spec.resources
    scratch = scratch_storage(job, pod)
    limits: dict[str, str] = {"ephemeral-storage": scratch}
    requests: dict[str, str] = {"ephemeral-storage": scratch}
    if res.gpusPerNode > 0:
        limits[res.gpuResourceName] = str(res.gpusPerNode)
    if res.cpu:
        limits["cpu"] = requests["cpu"] = res.cpu
    if res.memory:
        limits["memory"] = requests["memory"] = res.memory
    return {"limits": limits, "requests": requests}


def _volumes(job: SFTJob, pod: PodDefaults) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    spec = job.spec
    # Every disk-backed emptyDir is bounded: the kubelet evicts a pod that outgrows one.
    scratch = {"sizeLimit": scratch_storage(job, pod)}
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": config_map_name(job.metadata.name)}},
        {"name": "tmp", "emptyDir": dict(scratch)},
    ]
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_MOUNT, "readOnly": True},
        # The root filesystem is read-only; libraries write caches and temp files here.
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    output_source: dict[str, Any] = (
        {"persistentVolumeClaim": {"claimName": spec.output.claimName}}
        if spec.output.claimName
        else {"emptyDir": dict(scratch)}
    )
    volumes.append({"name": "output", **output_source})
    mounts.append({"name": "output", "mountPath": spec.output.path})
    if spec.resources.gpusPerNode > 0 and spec.resources.sharedMemory:
        volumes.append(
            {
                "name": "dshm",
                "emptyDir": {"medium": "Memory", "sizeLimit": spec.resources.sharedMemory},
            }
        )
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    if pod.modelCache is not None:
        # Shared by every job of the profile: a model is downloaded once per cluster.
        volumes.append(
            {
                "name": "model-cache",
                "persistentVolumeClaim": {"claimName": pod.modelCache.claimName},
            }
        )
        mounts.append({"name": "model-cache", "mountPath": pod.modelCache.mountPath})
    for extra in spec.volumes:
        volumes.append(
            {
                "name": f"user-{extra.name}",
                "persistentVolumeClaim": {"claimName": extra.claimName, "readOnly": extra.readOnly},
            }
        )
        mounts.append(
            {"name": f"user-{extra.name}", "mountPath": extra.mountPath, "readOnly": extra.readOnly}
        )
    return volumes, mounts


def _env(job: SFTJob, rank: int, pod: PodDefaults) -> list[dict[str, Any]]:
    spec = job.spec
    hf_home = pod.modelCache.mountPath if pod.modelCache is not None else SCRATCH_HF_HOME
    env: list[dict[str, Any]] = [
        {"name": ENV_CONFIG_PATH, "value": f"{CONFIG_MOUNT}/{CONFIG_KEY}"},
        {"name": ENV_NODE_RANK, "value": str(rank)},
        {"name": ENV_NUM_NODES, "value": str(spec.resources.nodes)},
        {"name": ENV_MAIN_ADDR, "value": main_address(job)},
        {"name": ENV_MAIN_PORT, "value": str(main_port(job))},
        {"name": ENV_TERMINATION_LOG, "value": TERMINATION_LOG},
        # Paths the trainer uses, given as env so any runtime that maps volumes can map them.
        {"name": "SFTJOB_OUTPUT_DIR", "value": spec.output.path},
        {"name": "HOME", "value": "/tmp"},
        {"name": "HF_HOME", "value": hf_home},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]
    if spec.model.path:
        env.append({"name": "SFTJOB_MODEL_PATH", "value": spec.model.path})
    if spec.dataset.path:
        env.append({"name": "SFTJOB_DATASET_PATH", "value": spec.dataset.path})
    if spec.secrets.hfToken is not None:
        env.append(
            {
                "name": "HF_TOKEN",
                "valueFrom": {
                    "secretKeyRef": {
                        "name": spec.secrets.hfToken.name,
                        "key": spec.secrets.hfToken.key,
                    }
                },
            }
        )
    env += credentials_env(spec)  # spec.secrets.s3: the S3 key pair, by secretKeyRef
    env += [{"name": var.name, "value": var.value} for var in spec.env]
    return env


def _affinity(job: SFTJob, pod: PodDefaults) -> dict[str, Any] | None:
    """The profile's affinity, with one rank per machine preferred for a multi-node run."""
    affinity: dict[str, Any] = json.loads(json.dumps(dict(pod.affinity)))  # never aliased
    if job.spec.resources.nodes == 1:
        return affinity or None
    # One rank per machine: two ranks on one node would share its GPUs and network.
    spread = {
        "weight": 100,
        "podAffinityTerm": {
            "topologyKey": "kubernetes.io/hostname",
            "labelSelector": {"matchLabels": {LABEL_JOB: job.metadata.name}},
        },
    }
    anti = affinity.setdefault("podAntiAffinity", {})
    anti.setdefault("preferredDuringSchedulingIgnoredDuringExecution", []).append(spread)
    return affinity


def _security_context(pod: PodDefaults) -> dict[str, Any]:
    """The restricted Pod Security Standard, with no fixed user: the image's numeric USER
    runs unless the profile names ids (OpenShift assigns a user per namespace)."""
    context: dict[str, Any] = {"runAsNonRoot": True}
    ids = {"runAsUser": pod.runAsUser, "runAsGroup": pod.runAsGroup, "fsGroup": pod.fsGroup}
    context.update({key: value for key, value in ids.items() if value is not None})
    context["seccompProfile"] = {"type": "RuntimeDefault"}
    return context


def build_pod(
    job: SFTJob,
    rank: int,
    attempt: int,
    default_image: str = DEFAULT_TRAINER_IMAGE,
    pod: PodDefaults | None = None,
) -> dict[str, Any]:
    """One rank's pod from the effective spec and the profile's pod settings (`pod`)."""
    spec = job.spec
    pod = pod or PodDefaults()
    name = job.metadata.name
    volumes, mounts = _volumes(job, pod)
    labels = {LABEL_RANK: str(rank), LABEL_ATTEMPT: str(attempt)}
    # The job's own queue label wins; else the profile's queue.
    queue = job.metadata.labels.get(KUEUE_QUEUE_LABEL) or pod.queueName
    if queue:
        labels[KUEUE_QUEUE_LABEL] = queue
    gang_labels, gang_annotations = kueue_gang_metadata(name, attempt, spec.resources.nodes, queue)
    labels.update(gang_labels)
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "serviceAccountName": service_account_name(name),
        "terminationGracePeriodSeconds": TERMINATION_GRACE_SECONDS,
        "hostname": f"{name}-r{rank}",
        "securityContext": _security_context(pod),
        "containers": [
            {
                "name": "trainer",
                "image": spec.image or default_image,
                "imagePullPolicy": "IfNotPresent",
                "command": ["python", "-m", "sftjob_trainer"],
                "args": ["--config", f"{CONFIG_MOUNT}/{CONFIG_KEY}"],
                "env": _env(job, rank, pod),
                "resources": _resources(job, pod),
                "volumeMounts": mounts,
                "ports": [{"name": "rendezvous", "containerPort": main_port(job)}],
                "terminationMessagePath": TERMINATION_LOG,
                "terminationMessagePolicy": "FallbackToLogsOnError",
                "securityContext": {
                    "allowPrivilegeEscalation": False,
                    "readOnlyRootFilesystem": True,
                    "capabilities": {"drop": ["ALL"]},
                },
            }
        ],
        "volumes": volumes,
    }
    if spec.resources.nodes > 1:
        pod_spec["subdomain"] = rendezvous_service_name(name)
    if spec.resources.nodeSelector:
        pod_spec["nodeSelector"] = dict(spec.resources.nodeSelector)
    if spec.resources.tolerations:
        pod_spec["tolerations"] = [
            t.model_dump(exclude_none=True) for t in spec.resources.tolerations
        ]
    affinity = _affinity(job, pod)
    if affinity:
        pod_spec["affinity"] = affinity
    if pod.priorityClassName:
        pod_spec["priorityClassName"] = pod.priorityClassName
    metadata = _metadata(job, pod_name(name, attempt, rank), "trainer", **labels)
    if gang_annotations:
        metadata["annotations"] = gang_annotations
    return {"apiVersion": "v1", "kind": "Pod", "metadata": metadata, "spec": pod_spec}


def build_pods(
    job: SFTJob,
    attempt: int,
    default_image: str = DEFAULT_TRAINER_IMAGE,
    pod: PodDefaults | None = None,
) -> list[dict[str, Any]]:
    return [
        build_pod(job, rank, attempt, default_image, pod)
        for rank in range(job.spec.resources.nodes)
    ]


def build_static_children(
    job: SFTJob, trainer_config: dict[str, Any], launch_policy: str | None = None
) -> list[dict[str, Any]]:
    """Children that live as long as the job: config, progress, RBAC, (multi-node) Service."""
    children = [
        build_config_map(job, trainer_config, launch_policy),
        build_progress_config_map(job),
        build_service_account(job),
        build_role(job),
        build_role_binding(job),
    ]
    if job.spec.resources.nodes > 1:
        children.append(build_rendezvous_service(job, trainer_config.get("attempt")))
    return children
