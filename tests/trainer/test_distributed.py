"""Two "nodes" of one CPU process each, launched like two pods, rendezvous on loopback."""

from __future__ import annotations

import ast
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from sftjob_operator.plan import plan_for
from sftjob_trainer.settings import load_config


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_pods(config, tmp_path, **extra_env: str) -> list[subprocess.Popen]:
    """Two launchers, as the operator's two pods would run them."""
    port = str(free_port())
    pods = []
    for rank in (0, 1):
        env = {
            **os.environ,
            "SFTJOB_NODE_RANK": str(rank),
            "SFTJOB_NUM_NODES": "2",
            # A hostname, as the headless Service gives: the launcher resolves it first.
            "SFTJOB_MAIN_ADDR": "localhost",
            "SFTJOB_MAIN_PORT": port,
            "SFTJOB_TERMINATION_LOG": str(tmp_path / f"termination-{rank}"),
            **extra_env,
        }
        pods.append(
            subprocess.Popen(
                [sys.executable, "-m", "sftjob_trainer", "--config", str(config)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    return pods


def outcomes(tmp_path) -> list[dict]:
    return [json.loads((tmp_path / f"termination-{rank}").read_text()) for rank in (0, 1)]


def test_two_nodes_train_with_world_size_two(make_config, tmp_path):
    config = make_config(
        {"method": "lora", "dataset": {"limit": 40}, "resources": {"nodes": 2, "gpusPerNode": 0}}
    )
    pods = start_pods(config, tmp_path)
    logs = [pod.communicate(timeout=180)[0] for pod in pods]
    assert [pod.returncode for pod in pods] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    assert "--multi_gpu" in logs[1] and "--machine_rank 1" in logs[1]

    planned = plan_for(load_config(config).spec)
    assert planned.worldSize == 2 and planned.totalSteps == 5  # ceil(ceil(40/4)/2)
    for outcome in outcomes(tmp_path):
        assert outcome["reason"] == "Completed"
        assert outcome["step"] == planned.totalSteps
        assert "on 2 process(es) (MULTI_CPU)" in outcome["message"]

    # Rank 0 alone reports; its measured plan sees both ranks.
    reports = [
        json.loads(line)
        for line in (tmp_path / "output" / "progress.jsonl").read_text().splitlines()
    ]
    measured = next(r["measuredPlan"] for r in reports if "measuredPlan" in r)
    assert measured["worldSize"] == 2 and measured["effectiveBatchSize"] == 8
    assert measured["totalSteps"] == planned.totalSteps
    assert (tmp_path / "output" / "final" / "adapter_model.safetensors").is_file()


def test_sigterm_stops_both_ranks_at_the_same_step_and_they_resume(make_config, tmp_path):
    # Ranks that stopped at different steps would hang in the next collective: they agree.
    config = make_config({"dataset": {"limit": 80}, "resources": {"nodes": 2, "gpusPerNode": 0}})
    planned = plan_for(load_config(config).spec).totalSteps
    progress = tmp_path / "output" / "progress.jsonl"
    pods = start_pods(config, tmp_path, SFTJOB_TEST_SLEEP_PER_STEP="0.3")
    deadline = time.monotonic() + 120
    while not (progress.exists() and len(progress.read_text().splitlines()) >= 2):
        assert all(pod.poll() is None for pod in pods), "a pod exited before the signal"
        assert time.monotonic() < deadline
        time.sleep(0.1)
    for pod in pods:
        pod.send_signal(signal.SIGTERM)
    logs = [pod.communicate(timeout=120)[0] for pod in pods]
    assert [pod.returncode for pod in pods] == [14, 14], logs[0][-3000:]
    stopped = {o["step"] for o in outcomes(tmp_path)}
    assert len(stopped) == 1 and 0 < min(stopped) < planned
    assert (tmp_path / "output" / "checkpoints" / f"checkpoint-{min(stopped)}").is_dir()

    pods = start_pods(config, tmp_path)
    logs = [pod.communicate(timeout=180)[0] for pod in pods]
    assert [pod.returncode for pod in pods] == [0, 0], logs[0][-3000:]
    for outcome in outcomes(tmp_path):
        assert outcome["step"] == planned
        assert f"resumed from checkpoint-{min(stopped)}" in outcome["message"]


def logged_steps(log: str) -> list[dict[str, float]]:
    """The trainer's per-step log lines ({'loss': '5.951', ...}) from rank 0's output."""
    steps = []
    for line in log.splitlines():
        if line.startswith("{'loss'"):
            steps.append({k: float(v) for k, v in ast.literal_eval(line).items()})
    return steps


def test_two_nodes_compiled_with_static_batches_count_the_same_tokens(make_config, tmp_path):
    # The padding each rank adds is summed over both ranks and taken out of TRL's count:
    # the compiled static run logs the same tokens and losses as the uncompiled one.
    lever_lines: dict[str, list[str]] = {}

    def train(speed: dict, extra: dict, folder: str) -> list[dict[str, float]]:
        work = tmp_path / folder
        work.mkdir()
        training = {
            "packing": True,
            "maxLength": 64,
            "perDeviceTrainBatchSize": 2,
            "gradientAccumulationSteps": 2,
            "speed": {"lightMetrics": "off", **speed},
            "extraArgs": extra,
        }
        spec = {
            "dataset": {"limit": 40},
            "resources": {"nodes": 2, "gpusPerNode": 0},
            "training": training,
            "output": {"path": str(work / "output")},
        }
        # Blank: the launcher then points the kernel cache at the job's output.
        pods = start_pods(make_config(spec), work, TORCHINDUCTOR_CACHE_DIR="")
        logs = [pod.communicate(timeout=240)[0] for pod in pods]
        assert [pod.returncode for pod in pods] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
        lever_lines[folder] = [line for line in logs[0].splitlines() if "speed dataWorkers" in line]
        return logged_steps(logs[0])

    eager = {"torch_compile_backend": "eager"}
    compiled = train({"compile": "on"}, eager, "compiled")
    # lightMetrics: tokens counted on the host, summed over the ranks once per log; with
    # dataWorkers, as on a GPU by default: the static batches are collated in workers.
    lean = train({"compile": "on", "lightMetrics": "on", "dataWorkers": "on"}, eager, "lean")
    plain = train({"compile": "off"}, {}, "plain")
    assert any("dataWorkers: on" in line for line in lever_lines["lean"]), lever_lines
    assert len(compiled) == len(lean) == len(plain) >= 3
    for ours, light, reference in zip(compiled, lean, plain, strict=True):
        assert ours["num_tokens"] == light["num_tokens"] == reference["num_tokens"]
        assert ours["loss"] == pytest.approx(reference["loss"], rel=2e-3)
        assert light["loss"] == pytest.approx(reference["loss"], rel=2e-3)
        assert "entropy" in ours and "entropy" not in light
