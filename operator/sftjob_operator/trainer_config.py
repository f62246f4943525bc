"""The resolved trainer config: exactly what will run, as the pods read it.

The operator writes it into the job's ConfigMap (key `config.json`) and `sftjob run`
hands it straight to the trainer. It holds the spec with every default filled in,
the values derived from it (learning rate by method, bf16 by hardware, LoRA
settings), the plan, and the run identity. Per-pod facts (rank, rendezvous address)
are not in it: they come from each pod's environment (see ENV_* below), so one
ConfigMap serves every rank.
"""

from __future__ import annotations

import hashlib
from typing import Any

from .api import API_VERSION, SFTJob, SFTJobSpec
from .plan import plan_for

CONFIG_KIND = "ResolvedTrainerConfig"
CONFIG_KEY = "config.json"
# Beside it in the same ConfigMap, read by the operator only (the trainer reads CONFIG_KEY):
# the profile's verdict frozen at the first launch (launch_policy.LaunchPolicy).
POLICY_KEY = "policy.json"

# Environment each training pod gets; the trainer's launcher reads these.
ENV_CONFIG_PATH = "SFTJOB_CONFIG"
ENV_NODE_RANK = "SFTJOB_NODE_RANK"
ENV_NUM_NODES = "SFTJOB_NUM_NODES"
ENV_MAIN_ADDR = "SFTJOB_MAIN_ADDR"
ENV_MAIN_PORT = "SFTJOB_MAIN_PORT"
ENV_TERMINATION_LOG = "SFTJOB_TERMINATION_LOG"
# Fallback when a pod does not say (sftjob run); the operator gives each job its own port.
DEFAULT_MAIN_PORT = 29500


def build_trainer_config(
    job: SFTJob,
    *,
    attempt: int = 1,
    per_device: int | None = None,
    accumulation: int | None = None,
    dataset_size: int | None = None,
) -> dict[str, Any]:
    """The resolved config for `job`; per_device/accumulation override after OOM shrink.

    The plan is computed from the ORIGINAL spec: auto-shrink keeps the effective batch,
    so the optimizer steps do not change.
    """
    spec = job.spec
    plan = plan_for(spec, dataset_size)
    effective_spec = _with_batch(spec, per_device, accumulation)
    training = effective_spec.training
    lora = effective_spec.lora_settings
    return {
        "apiVersion": API_VERSION,
        "kind": CONFIG_KIND,
        "job": {
            "name": job.metadata.name,
            "namespace": job.metadata.namespace or "default",
            "uid": job.metadata.uid,
            "generation": job.metadata.generation,
        },
        "attempt": attempt,
        # The spec as the user wrote it (plus defaults); batch sizes in effect after an OOM
        # shrink live in "resolved", which is what the trainer runs.
        "spec": _spec_document(spec),
        "resolved": {
            "method": effective_spec.method,
            "learningRate": effective_spec.learning_rate,
            "bf16": effective_spec.bf16,
            "useCpu": effective_spec.resources.gpusPerNode == 0,
            "nodes": effective_spec.resources.nodes,
            "processesPerNode": effective_spec.resources.processes_per_node,
            "worldSize": effective_spec.resources.world_size,
            "perDeviceTrainBatchSize": training.perDeviceTrainBatchSize,
            "gradientAccumulationSteps": training.gradientAccumulationSteps,
            "lora": lora.model_dump(mode="json") if lora else None,
            "outputPath": effective_spec.output.path,
            "progressIntervalSeconds": effective_spec.progressIntervalSeconds,
        },
        "plan": plan.model_dump(mode="json"),
    }


def _spec_document(spec: SFTJobSpec) -> dict[str, Any]:
    document = spec.model_dump(mode="json")
    if spec.training.warmupSteps is not None:
        # Both filled in would break the "warmupRatio or warmupSteps" rule on re-parsing.
        document["training"].pop("warmupRatio", None)
    return document


def main_port(job: SFTJob) -> int:
    """A rendezvous port per job, so jobs sharing a host network (the local node) never clash."""
    digest = hashlib.sha256(f"{job.metadata.namespace}/{job.metadata.name}".encode()).digest()
    return 20000 + int.from_bytes(digest[:2], "big") % 10000


def _with_batch(spec: SFTJobSpec, per_device: int | None, accumulation: int | None) -> SFTJobSpec:
    if per_device is None and accumulation is None:
        return spec
    training = spec.training.model_copy(
        update={
            "perDeviceTrainBatchSize": per_device or spec.training.perDeviceTrainBatchSize,
            "gradientAccumulationSteps": accumulation or spec.training.gradientAccumulationSteps,
        }
    )
    return spec.model_copy(update={"training": training})
