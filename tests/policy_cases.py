"""The shared case table of issue 21: one tenant profile, one compliant job, and the ways a
tenant may try to break the profile, each with the rule and the job field it must be refused on.

Data and tiny helpers only, so every tier asks the same questions of its own component:
- tests/unit/test_policy.py: `policy.resolve` gives exactly (rule, field) for each case;
- tests/unit/test_cli_profile.py: `sftjob plan --profile` gives the same verdict;
- the operator e2e (a tenant ServiceAccount applies each case; Failed/PolicyViolation, no pod);
- the admission tests (a ValidatingAdmissionPolicy refuses what it can at `kubectl apply`).

A case is a JSON merge patch (RFC 7386: a mapping merges, `None` deletes, anything else
replaces, lists included) on the base job's *spec*. `job_spec(case)` applies it;
`job_manifest(name, namespace, case)` wraps the spec in a whole SFTJob document.

The base job is the tiny CPU LoRA run the local control plane can actually run (as in
deploy/examples/tiny-cpu.yaml: model and data from the PVC `sftjob-demo-data` that the e2e
conftest fills, gpusPerNode 0). It sets no output claim (each e2e job brings its own) and no
Secret reference (the Secret would have to exist): see `COMPLIANT_VARIANTS` for those.

The cluster the cases run against holds `PROFILES` (the tenant profile and a second one that
does not select the tenant namespace) and a tenant namespace labelled `TENANT_NAMESPACE_LABELS`.
The tenant profile's defaults need, in that namespace, the PVC `MODEL_CACHE_CLAIM`
(ReadWriteMany; mounted as the HF cache); its nodeSelector `kubernetes.io/os: linux` matches
the local node.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import yaml

API_VERSION = "tuning.sftjob.dev/v1alpha1"

# The image the operator runs when neither the job nor the profile names one
# (children.DEFAULT_TRAINER_IMAGE); the local node records it and never pulls it.
TRAINER_IMAGE = "ghcr.io/sftjob/sftjob-trainer:0.1.0"
# An allowlist entry pinned by digest: only this exact reference matches it.
PINNED_DIGEST = "sha256:" + "a" * 64
PINNED_IMAGE = f"registry.example.com/ml/trainer@{PINNED_DIGEST}"

TENANT_PROFILE_NAME = "tenant-lora"
OTHER_PROFILE_NAME = "research-only"
POOL_LABEL = "tuning.sftjob.dev/pool"
TENANT_NAMESPACE_LABELS: dict[str, str] = {POOL_LABEL: "tenant"}
MODEL_CACHE_CLAIM = "sftjob-model-cache"
ALLOWED_SECRET = "hf-token"

TENANT_PROFILE_YAML = f"""\
apiVersion: {API_VERSION}
kind: SFTProfile
metadata:
  name: {TENANT_PROFILE_NAME}
spec:
  namespaceSelector:
    matchLabels:
      {POOL_LABEL}: tenant
  defaults:
    image: {TRAINER_IMAGE}
    nodeSelector:
      kubernetes.io/os: linux
    tolerations:
      - key: tuning.sftjob.dev/gpu-pool
        operator: Exists
        effect: NoSchedule
    queueName: tenant-queue
    cpuPerGpu: "1"
    memoryPerGpu: 4Gi
    ephemeralStoragePerGpu: 2Gi
    modelCache:
      claimName: {MODEL_CACHE_CLAIM}
    env:
      - name: HF_HUB_OFFLINE
        value: "1"
    activeDeadlineSeconds: 1800
  limits:
    allowedImages:
      - ghcr.io/sftjob/sftjob-trainer
      - {PINNED_IMAGE}
    allowedMethods: [lora, qlora]
    maxNodes: 2
    maxGpusPerJob: 2
    maxActiveDeadlineSeconds: 3600
    allowedModelSources:
      - /data/
      - Qwen/
      - s3://tenant-datasets/
    allowedSecretNames: [{ALLOWED_SECRET}]
    protectedEnv: [HTTPS_PROXY]
    allowRemoteCode: false
    allowedExtraArgs: [neftune_noise_alpha]
    allowSchedulingOverrides: false
"""

OTHER_PROFILE_YAML = f"""\
apiVersion: {API_VERSION}
kind: SFTProfile
metadata:
  name: {OTHER_PROFILE_NAME}
spec:
  namespaceSelector:
    matchLabels:
      {POOL_LABEL}: research
  limits:
    maxNodes: 4
"""

BASE_JOB_SPEC: dict[str, Any] = {
    "model": {"path": "/data/tiny-model"},
    "dataset": {"path": "/data/chat.jsonl", "format": "messages", "limit": 32},
    "method": "lora",
    "training": {
        "perDeviceTrainBatchSize": 4,
        "gradientAccumulationSteps": 2,
        "numTrainEpochs": 1,
        "maxLength": 64,
        "loggingSteps": 1,
        "saveSteps": 4,
    },
    "resources": {"nodes": 1, "gpusPerNode": 0},
    "volumes": [{"name": "data", "claimName": "sftjob-demo-data", "mountPath": "/data"}],
    "progressIntervalSeconds": 1,
}


@dataclass(frozen=True)
class PolicyCase:
    name: str  # a short id, usable as a pytest id and in a job name
    patch: dict[str, Any]  # JSON merge patch on the base job's spec
    rule: str  # PolicyViolation.rule expected, the only violation
    field: str  # PolicyViolation.field expected


def _env(*names: str) -> dict[str, Any]:
    """A patch setting spec.env: an allowed variable first, so the refused one is env[1]."""
    return {
        "env": [{"name": "TENANT_FLAG", "value": "1"}] + [{"name": n, "value": "x"} for n in names]
    }


def _model_name(name: str) -> dict[str, Any]:
    return {"model": {"path": None, "name": name}}


CASES: tuple[PolicyCase, ...] = (
    # images
    PolicyCase("image-other-registry", {"image": "docker.io/evil/trainer:1"}, "limits.allowedImages", "spec.image"),
    PolicyCase("image-prefix-boundary", {"image": "ghcr.io/sftjob/sftjob-trainer-evil:1"}, "limits.allowedImages", "spec.image"),
    PolicyCase("image-prefix-host-trick", {"image": "ghcr.io/sftjob/sftjob-trainer.evil.example.com/x:1"}, "limits.allowedImages", "spec.image"),
    PolicyCase("image-digest-mismatch", {"image": "registry.example.com/ml/trainer@sha256:" + "b" * 64}, "limits.allowedImages", "spec.image"),
    PolicyCase("image-tag-of-pinned-repo", {"image": "registry.example.com/ml/trainer:latest"}, "limits.allowedImages", "spec.image"),
    # secrets
    PolicyCase("secret-not-allowed", {"secrets": {"hfToken": {"name": "other-team-token"}}}, "limits.allowedSecretNames", "spec.secrets.hfToken.name"),
    PolicyCase("s3-secret-not-allowed", {"secrets": {"s3": {"name": "other-team-s3"}}}, "limits.allowedSecretNames", "spec.secrets.s3.name"),
    # env: built in (the operator's own, token and code redirection), the profile's, defaults.env
    PolicyCase("env-hf-endpoint", _env("HF_ENDPOINT"), "protectedEnv", "spec.env[1].name"),
    PolicyCase("env-s3-endpoint", _env("AWS_ENDPOINT_URL"), "protectedEnv", "spec.env[1].name"),
    PolicyCase("env-s3-key", _env("AWS_SECRET_ACCESS_KEY"), "protectedEnv", "spec.env[1].name"),
    PolicyCase("env-hf-token", _env("HF_TOKEN"), "protectedEnv", "spec.env[1].name"),
    PolicyCase("env-hub-token-legacy", _env("HUGGING_FACE_HUB_TOKEN"), "protectedEnv", "spec.env[1].name"),
    PolicyCase("env-home", _env("HOME"), "protectedEnv", "spec.env[1].name"),
    PolicyCase("env-hf-home", _env("HF_HOME"), "protectedEnv", "spec.env[1].name"),
    PolicyCase("env-sftjob-config", _env("SFTJOB_CONFIG"), "protectedEnv", "spec.env[1].name"),
    PolicyCase("env-sftjob-prefix", _env("SFTJOB_REPORT"), "protectedEnv", "spec.env[1].name"),
    PolicyCase("env-pythonpath", _env("PYTHONPATH"), "protectedEnv", "spec.env[1].name"),
    PolicyCase("env-ld-preload", _env("LD_PRELOAD"), "protectedEnv", "spec.env[1].name"),
    PolicyCase("env-kubernetes-service-host", _env("KUBERNETES_SERVICE_HOST"), "protectedEnv", "spec.env[1].name"),
    PolicyCase("env-ca-bundle", _env("REQUESTS_CA_BUNDLE"), "protectedEnv", "spec.env[1].name"),
    PolicyCase("env-profile-protected", _env("HTTPS_PROXY"), "limits.protectedEnv", "spec.env[1].name"),
    PolicyCase("env-profile-default", _env("HF_HUB_OFFLINE"), "defaults.env", "spec.env[1].name"),
    # caps
    PolicyCase("nodes-over-cap", {"resources": {"nodes": 3}}, "limits.maxNodes", "spec.resources.nodes"),
    PolicyCase("gpus-over-cap", {"resources": {"gpusPerNode": 3}}, "limits.maxGpusPerJob", "spec.resources.gpusPerNode"),
    PolicyCase("gpus-over-cap-across-nodes", {"resources": {"nodes": 2, "gpusPerNode": 2}}, "limits.maxGpusPerJob", "spec.resources.gpusPerNode"),
    PolicyCase("deadline-over-cap", {"activeDeadlineSeconds": 7200}, "limits.maxActiveDeadlineSeconds", "spec.activeDeadlineSeconds"),
    # training
    PolicyCase("method-full", {"method": "full"}, "limits.allowedMethods", "spec.method"),
    PolicyCase("trust-remote-code", {"model": {"trustRemoteCode": True}}, "limits.allowRemoteCode", "spec.model.trustRemoteCode"),
    PolicyCase("extra-arg-not-allowed", {"training": {"extraArgs": {"report_to": "wandb"}}}, "limits.allowedExtraArgs", "spec.training.extraArgs[report_to]"),
    # model and data sources
    PolicyCase("model-name-outside-sources", _model_name("evil-org/model"), "limits.allowedModelSources", "spec.model.name"),
    PolicyCase("model-name-org-boundary", _model_name("Qwen-evil/model"), "limits.allowedModelSources", "spec.model.name"),
    PolicyCase("model-path-outside-sources", {"model": {"path": "/secrets/model"}}, "limits.allowedModelSources", "spec.model.path"),
    PolicyCase("model-path-traversal", {"model": {"path": "/data/../secrets/model"}}, "limits.allowedModelSources", "spec.model.path"),
    PolicyCase("tokenizer-outside-sources", {"model": {"tokenizer": "evil-org/tokenizer"}}, "limits.allowedModelSources", "spec.model.tokenizer"),
    PolicyCase("dataset-uri-outside-sources", {"dataset": {"path": None, "uri": "https://evil.example.com/data.jsonl"}}, "limits.allowedModelSources", "spec.dataset.uri"),
    PolicyCase("dataset-uri-dot-dot", {"dataset": {"path": None, "uri": "s3://tenant-datasets/../other-bucket/x.jsonl"}}, "limits.allowedModelSources", "spec.dataset.uri"),
    PolicyCase("dataset-name-outside-sources", {"dataset": {"path": None, "name": "evil-org/data"}}, "limits.allowedModelSources", "spec.dataset.name"),
    PolicyCase("dataset-path-outside-sources", {"dataset": {"path": "/secrets/chat.jsonl"}}, "limits.allowedModelSources", "spec.dataset.path"),
    # scheduling
    PolicyCase("node-selector-override", {"resources": {"nodeSelector": {"kubernetes.io/os": "windows"}}}, "limits.allowSchedulingOverrides", "spec.resources.nodeSelector[kubernetes.io/os]"),
    PolicyCase("extra-toleration", {"resources": {"tolerations": [{"operator": "Exists"}]}}, "limits.allowSchedulingOverrides", "spec.resources.tolerations[0]"),
    # profile selection
    PolicyCase("profile-not-selecting-namespace", {"profile": OTHER_PROFILE_NAME}, "profile", "spec.profile"),
    PolicyCase("profile-unknown", {"profile": "no-such-profile"}, "profile", "spec.profile"),
)  # fmt: skip

# Patches the tenant profile allows (no violation): the edges of each limit.
COMPLIANT_VARIANTS: dict[str, dict[str, Any]] = {
    "image-allowed-tag": {"image": "ghcr.io/sftjob/sftjob-trainer:0.2.0"},
    "image-pinned-digest": {"image": PINNED_IMAGE},
    "secret-allowed": {"secrets": {"hfToken": {"name": ALLOWED_SECRET}}},
    "s3-secret-allowed": {"secrets": {"s3": {"name": ALLOWED_SECRET}}},
    "env-own-variable": {"env": [{"name": "TENANT_FLAG", "value": "1"}]},
    "env-trainer-test-hook": {"env": [{"name": "SFTJOB_TEST_SLEEP_PER_STEP", "value": "0.5"}]},
    "nodes-at-cap": {"resources": {"nodes": 2}},
    "gpus-at-cap": {"resources": {"nodes": 1, "gpusPerNode": 2}},
    "deadline-at-cap": {"activeDeadlineSeconds": 3600},
    "extra-arg-allowed": {"training": {"extraArgs": {"neftune_noise_alpha": 5}}},
    "model-name-allowed-org": {"model": {"path": None, "name": "Qwen/Qwen2.5-0.5B"}},
    "dataset-uri-allowed": {"dataset": {"path": None, "uri": "s3://tenant-datasets/chat.jsonl"}},
    "node-selector-extra-key": {"resources": {"nodeSelector": {"tuning.sftjob.dev/zone": "a"}}},
    "node-selector-same-value": {"resources": {"nodeSelector": {"kubernetes.io/os": "linux"}}},
    "profile-named": {"profile": TENANT_PROFILE_NAME},
}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch; returns a new value, `target` is left as it was."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def job_spec(case: PolicyCase | None = None) -> dict[str, Any]:
    """The base job's spec with the case's patch applied (the base job itself for None)."""
    return merge_patch(BASE_JOB_SPEC, case.patch if case else {})


def job_manifest(name: str, namespace: str, case: PolicyCase | None = None) -> dict[str, Any]:
    return {
        "apiVersion": API_VERSION,
        "kind": "SFTJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": job_spec(case),
    }


def profile_documents() -> list[dict[str, Any]]:
    """The SFTProfiles of the cluster the cases run against (fresh copies)."""
    return [yaml.safe_load(TENANT_PROFILE_YAML), yaml.safe_load(OTHER_PROFILE_YAML)]


def cases_by_name() -> dict[str, PolicyCase]:
    return {case.name: case for case in CASES}
