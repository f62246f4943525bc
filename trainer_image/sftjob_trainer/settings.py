"""The trainer's inputs: the resolved config file and the per-pod rank environment."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from sftjob_operator.api import SFTJobSpec
from sftjob_operator.trainer_config import (
    CONFIG_KIND,
    DEFAULT_MAIN_PORT,
    ENV_CONFIG_PATH,
    ENV_MAIN_ADDR,
    ENV_MAIN_PORT,
    ENV_NODE_RANK,
    ENV_NUM_NODES,
)

from .failures import ConfigError


@dataclass(frozen=True)
class Topology:
    """Where this pod sits in the run; one ConfigMap serves all ranks, so it comes from env."""

    node_rank: int = 0
    num_nodes: int = 1
    processes_per_node: int = 1
    main_addr: str = "127.0.0.1"
    main_port: int = DEFAULT_MAIN_PORT

    @property
    def world_size(self) -> int:
        return self.num_nodes * self.processes_per_node


@dataclass(frozen=True)
class TrainerConfig:
    """The resolved config (see sftjob_operator.trainer_config) with its spec parsed."""

    raw: dict[str, Any]
    spec: SFTJobSpec
    path: Path | None = None
    # The spec as the operator wrote it, before the pod's path overrides: what a checkpoint
    # records, so a runtime that maps volumes elsewhere on each launch still resumes.
    written_spec: dict[str, Any] | None = None

    @property
    def resolved(self) -> dict[str, Any]:
        return self.raw["resolved"]

    @property
    def plan(self) -> dict[str, Any]:
        return self.raw.get("plan") or {}

    @property
    def job_name(self) -> str | None:
        return (self.raw.get("job") or {}).get("name") or None

    @property
    def job_namespace(self) -> str | None:
        return (self.raw.get("job") or {}).get("namespace") or None

    @property
    def job_uid(self) -> str | None:
        return (self.raw.get("job") or {}).get("uid") or None

    @property
    def attempt(self) -> int:
        """The launch this pod belongs to; its progress reports carry it."""
        return int(self.raw.get("attempt") or 1)

    @property
    def output_path(self) -> Path:
        return Path(self.resolved["outputPath"])


# In a pod, the environment is authoritative for paths: the operator sets these from the
# spec, and a runtime that maps volumes elsewhere (the local node) rewrites them.
PATH_OVERRIDES = {
    "SFTJOB_MODEL_PATH": ("spec", "model", "path"),
    "SFTJOB_DATASET_PATH": ("spec", "dataset", "path"),
    "SFTJOB_OUTPUT_DIR": ("resolved", "outputPath"),
}


def _with_pod_paths(raw: dict[str, Any]) -> dict[str, Any]:
    out = json.loads(json.dumps(raw))
    for variable, (section, *keys) in PATH_OVERRIDES.items():
        value = os.environ.get(variable)
        node = out.get(section)
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        # Only replace a path the config already uses (model.path, not a hub model.name).
        if value and isinstance(node, dict) and node.get(keys[-1]):
            node[keys[-1]] = value
    return out


def parse_config(raw: Any, path: Path | None = None) -> TrainerConfig:
    if not isinstance(raw, dict) or raw.get("kind") != CONFIG_KIND:
        raise ConfigError(f"config {path or ''} is not a {CONFIG_KIND} document")
    for key in ("spec", "resolved"):
        if not isinstance(raw.get(key), dict):
            raise ConfigError(f"config {path or ''} has no '{key}' mapping")
    written_spec = json.loads(json.dumps(raw["spec"]))
    raw = _with_pod_paths(raw)
    spec_data = dict(raw["spec"])
    training = dict(spec_data.get("training") or {})
    if training.get("warmupSteps") is not None:
        # The resolved spec lists every default, warmupRatio included; the API's "not both"
        # rule is about what the user wrote, and warmupSteps wins anyway.
        training.pop("warmupRatio", None)
        spec_data["training"] = training
    try:
        spec = SFTJobSpec.model_validate(spec_data)
    except ValidationError as exc:
        raise ConfigError(f"config spec is invalid: {exc.errors()[0]['msg']}") from None
    return TrainerConfig(raw=raw, spec=spec, path=path, written_spec=written_spec)


def load_config(path: Path | str | None = None) -> TrainerConfig:
    """Read the config from `path`, else from $SFTJOB_CONFIG."""
    chosen = path or os.environ.get(ENV_CONFIG_PATH)
    if not chosen:
        raise ConfigError(f"no config: pass --config PATH or set {ENV_CONFIG_PATH}")
    file = Path(chosen)
    try:
        raw = json.loads(file.read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config {file}: {exc.strerror}") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config {file} is not JSON: {exc}") from None
    return parse_config(raw, file)


def _int_env(env: dict[str, str], name: str, default: int) -> int:
    value = env.get(name, "").strip()
    if not value:
        return default
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"{name} must be an integer, got {value!r}") from None


def topology_from_env(config: TrainerConfig, env: dict[str, str] | None = None) -> Topology:
    env = dict(os.environ if env is None else env)
    topology = Topology(
        node_rank=_int_env(env, ENV_NODE_RANK, 0),
        num_nodes=_int_env(env, ENV_NUM_NODES, 1),
        processes_per_node=int(config.resolved.get("processesPerNode", 1)),
        main_addr=env.get(ENV_MAIN_ADDR, "").strip() or "127.0.0.1",
        main_port=_int_env(env, ENV_MAIN_PORT, DEFAULT_MAIN_PORT),
    )
    if not 0 <= topology.node_rank < topology.num_nodes:
        raise ConfigError(
            f"{ENV_NODE_RANK}={topology.node_rank} is outside 0..{topology.num_nodes - 1}"
        )
    return topology
