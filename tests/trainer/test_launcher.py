"""The launch command for each topology, and how the pod's outcome is chosen (no launching)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from sftjob_trainer.failures import ConfigError, Outcome
from sftjob_trainer.launcher import (
    final_outcome,
    fsdp_config_yaml,
    launch_command,
    resolve_main_addr,
    worker_env,
)
from sftjob_trainer.settings import Topology, load_config, topology_from_env


def flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def test_single_process_runs_the_worker_directly():
    command = launch_command(Topology(), "/cfg.json", use_cpu=True, python="py")
    assert command == ["py", "-m", "sftjob_trainer.worker", "--config", "/cfg.json"]


def test_two_cpu_nodes_use_multi_gpu_mode_with_one_process_each():
    topology = Topology(
        node_rank=1, num_nodes=2, processes_per_node=1, main_addr="10.0.0.5", main_port=29511
    )
    command = launch_command(topology, "/cfg.json", use_cpu=True, python="py")
    assert command[:3] == ["py", "-m", "accelerate.commands.launch"]
    # --cpu would silently run ONE process; --multi_gpu + use_cpu really runs gloo ranks.
    assert "--cpu" not in command and "--multi_gpu" in command
    assert flag(command, "--num_processes") == "2"
    assert flag(command, "--num_machines") == "2"
    assert flag(command, "--machine_rank") == "1"
    assert flag(command, "--main_process_ip") == "10.0.0.5"
    assert flag(command, "--main_process_port") == "29511"
    assert flag(command, "--mixed_precision") == "no"
    assert flag(command, "--dynamo_backend") == "no"
    assert command[-4:] == ["-m", "sftjob_trainer.worker", "--config", "/cfg.json"]


def test_gpu_nodes_count_processes_over_all_machines():
    topology = Topology(node_rank=0, num_nodes=2, processes_per_node=4)
    command = launch_command(topology, "/cfg.json", use_cpu=False, python="py")
    assert flag(command, "--num_processes") == "8"
    assert flag(command, "--num_machines") == "2"


def test_fsdp_uses_the_config_file_instead_of_multi_gpu():
    topology = Topology(num_nodes=1, processes_per_node=4)
    command = launch_command(
        topology, "/cfg.json", use_cpu=False, distributed="fsdp", fsdp_config_path="/tmp/f.yaml"
    )
    assert flag(command, "--config_file") == "/tmp/f.yaml"
    assert "--multi_gpu" not in command
    with pytest.raises(ValueError):
        launch_command(topology, "/cfg.json", use_cpu=False, distributed="fsdp")


def test_fsdp_config_is_v2_full_shard_per_transformer_layer():
    config = yaml.safe_load(fsdp_config_yaml(activation_checkpointing=True))
    assert config["distributed_type"] == "FSDP"
    fsdp = config["fsdp_config"]
    assert fsdp["fsdp_version"] == 2
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_reshard_after_forward"] is True  # FSDP2's name for FULL_SHARD
    assert fsdp["fsdp_activation_checkpointing"] is True


def test_topology_from_env(make_config):
    config = load_config(make_config())
    env = {
        "SFTJOB_NODE_RANK": "1",
        "SFTJOB_NUM_NODES": "3",
        "SFTJOB_MAIN_ADDR": "job-0.job",
        "SFTJOB_MAIN_PORT": "1234",
    }
    assert topology_from_env(config, env) == Topology(1, 3, 1, "job-0.job", 1234)
    assert topology_from_env(config, {}) == Topology(0, 1, 1, "127.0.0.1", 29500)
    with pytest.raises(ConfigError, match="outside 0..1"):
        topology_from_env(config, {"SFTJOB_NODE_RANK": "2", "SFTJOB_NUM_NODES": "2"})
    with pytest.raises(ConfigError, match="must be an integer"):
        topology_from_env(config, {"SFTJOB_NODE_RANK": "one"})


def test_main_addr_resolves_to_an_ip():
    assert resolve_main_addr("10.1.2.3") == "10.1.2.3"
    assert resolve_main_addr("localhost") == "127.0.0.1"
    with pytest.raises(ConfigError, match="does not resolve"):
        resolve_main_addr("no-such-host.invalid", timeout=0.2)


def test_pod_outcome_prefers_the_most_specific_worker_report():
    # Rank 1 ran out of memory; torchrun then stopped rank 0, which saw a SIGTERM.
    reports = [Outcome("Interrupted", "sigterm", 3), Outcome("OutOfMemory", "oom", 3)]
    assert final_outcome(1, reports, interrupted=False).reason == "OutOfMemory"
    assert (
        final_outcome(0, [Outcome("Completed", "ok", 9)], interrupted=False).reason == "Completed"
    )
    silent = final_outcome(-9, [], interrupted=False)
    assert (silent.reason, silent.exit_code) == ("InternalError", 1)
    assert "code -9" in silent.message
    assert final_outcome(143, [], interrupted=True).exit_code == 14


def test_workers_keep_compiled_kernels_on_the_output_volume(tmp_path: Path) -> None:
    env = worker_env({"PATH": "/bin"}, tmp_path / "out", tmp_path / "reports")
    assert env["TORCHINDUCTOR_CACHE_DIR"] == str(
        tmp_path / "out" / ".sftjob-cache" / "torchinductor"
    )
    assert env["TRITON_CACHE_DIR"] == str(tmp_path / "out" / ".sftjob-cache" / "triton")
    assert env["PATH"] == "/bin" and env["SFTJOB_WORKER_REPORT_DIR"] == str(tmp_path / "reports")
    # A cache the platform set for the pod wins; a blank one does not count.
    own = worker_env({"TORCHINDUCTOR_CACHE_DIR": "/cache"}, tmp_path, tmp_path)
    assert own["TORCHINDUCTOR_CACHE_DIR"] == "/cache"
    blank = worker_env({"TORCHINDUCTOR_CACHE_DIR": ""}, tmp_path, tmp_path)
    assert blank["TORCHINDUCTOR_CACHE_DIR"].endswith("torchinductor")
