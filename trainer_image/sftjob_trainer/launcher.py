"""The pod's entrypoint process: start one training process per device, report the outcome.

`launch_command` is pure: the topology in, the argv out, so every topology is
tested without launching. One process in the whole run starts the worker
directly (no rendezvous to set up, signals reach it straight away); anything
larger goes through `accelerate launch` (torchrun underneath).

CPU runs: `accelerate launch --cpu --num_processes 2` silently runs ONE process,
so CPU jobs use `--multi_gpu` with `--mixed_precision no --dynamo_backend no`
and SFTConfig(use_cpu=True), which makes torch.distributed use gloo. Measured
here with 2 nodes x 1 process on 127.0.0.1.

The workers write their outcome (reason, message, step) to per-rank files; this
process picks the most specific one and writes it to the pod's termination log,
so the operator sees "OutOfMemory" rather than "accelerate exited with 1".
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from sftjob_operator.trainer_config import ENV_CONFIG_PATH

from .failures import (
    ConfigError,
    Interrupted,
    Outcome,
    TrainerFailure,
    classify,
    most_specific,
    write_outcome,
)
from .settings import Topology, load_config, topology_from_env
from .speed import keep_compiled_kernels

log = logging.getLogger("sftjob_trainer.launcher")

ENV_WORKER_REPORT_DIR = "SFTJOB_WORKER_REPORT_DIR"
ENV_DNS_TIMEOUT = "SFTJOB_DNS_TIMEOUT_SECONDS"
WORKER_MODULE = "sftjob_trainer.worker"
FSDP_CONFIG_NAME = "accelerate-fsdp.yaml"


def fsdp_config_yaml(*, activation_checkpointing: bool) -> str:
    """accelerate config for FSDP v2, full shard, one wrap unit per transformer layer.

    Flat text on purpose (one topology, one small file); the per-run numbers
    (processes, machines, rank, rendezvous) are passed on the command line.
    """
    return "\n".join(
        [
            "compute_environment: LOCAL_MACHINE",
            "distributed_type: FSDP",
            "fsdp_config:",
            "  fsdp_version: 2",
            "  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP",
            "  fsdp_reshard_after_forward: true",
            "  fsdp_offload_params: false",
            "  fsdp_state_dict_type: FULL_STATE_DICT",
            "  fsdp_cpu_ram_efficient_loading: false",
            f"  fsdp_activation_checkpointing: {str(activation_checkpointing).lower()}",
            "mixed_precision: 'no'",
            "",
        ]
    )


def launch_command(
    topology: Topology,
    config_path: Path | str,
    *,
    use_cpu: bool,
    distributed: str = "ddp",
    fsdp_config_path: Path | str | None = None,
    python: str = sys.executable,
) -> list[str]:
    """The argv that starts this node's training processes."""
    worker = ["-m", WORKER_MODULE, "--config", str(config_path)]
    if topology.world_size == 1 and distributed != "fsdp":
        return [python, *worker]
    command = [
        python,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        str(topology.world_size),  # accelerate counts processes over ALL machines
        "--num_machines",
        str(topology.num_nodes),
        "--machine_rank",
        str(topology.node_rank),
        "--main_process_ip",
        topology.main_addr,
        "--main_process_port",
        str(topology.main_port),
        "--dynamo_backend",
        "no",
        # Precision is SFTConfig's bf16 flag; the launcher must not set a second one.
        "--mixed_precision",
        "no",
    ]
    if distributed == "fsdp":
        if fsdp_config_path is None:
            raise ValueError("fsdp needs the accelerate config file path")
        command += ["--config_file", str(fsdp_config_path)]
    else:
        # --multi_gpu also on CPU: --cpu ignores --num_processes (runs one process).
        command += ["--multi_gpu"]
    if topology.num_nodes > 1:
        # Every pod starts on its own; static rendezvous waits for the others.
        command += ["--rdzv_backend", "static"]
    return [*command, *worker]


def resolve_main_addr(address: str, timeout: float = 120.0) -> str:
    """An IP for the rendezvous address; retried while cluster DNS catches up."""
    try:
        ipaddress.ip_address(address)
        return address
    except ValueError:
        pass
    deadline = time.monotonic() + timeout
    delay = 0.5
    while True:
        try:
            return socket.gethostbyname(address)
        except OSError as exc:
            if time.monotonic() >= deadline:
                raise ConfigError(
                    f"rendezvous address {address} does not resolve after {timeout:.0f}s: {exc}"
                ) from None
            time.sleep(delay)
            delay = min(delay * 2, 5.0)


def read_worker_reports(folder: Path) -> list[Outcome]:
    outcomes = []
    for file in sorted(folder.glob("rank-*.json")):
        try:
            outcomes.append(Outcome.from_json(file.read_text()))
        except (OSError, ValueError, KeyError):
            continue
    return outcomes


def final_outcome(returncode: int, reports: list[Outcome], interrupted: bool) -> Outcome:
    """What the pod reports: the most specific worker report, else the exit status."""
    failures = [r for r in reports if r.reason != "Completed"]
    chosen = most_specific(failures)
    if chosen is not None:
        return chosen
    if returncode == 0 and reports:
        return max(reports, key=lambda r: r.step or 0)
    if returncode == 0:
        return Outcome("Completed", "training finished")
    if interrupted:
        return Outcome("Interrupted", "stopped by SIGTERM before the workers reported")
    return Outcome(
        "InternalError", f"training processes exited with code {returncode} without a report"
    )


def worker_env(base_env: dict[str, str], output: Path, reports: Path) -> dict[str, str]:
    """The workers' environment: the pod's, plus where to report and to keep kernels.

    Compiled kernels (torch.compile, flex attention) go to the output volume unless the
    pod sets TORCHINDUCTOR_CACHE_DIR: /tmp dies with the pod, and a resumed attempt would
    compile for minutes again.
    """
    env = {**base_env, ENV_WORKER_REPORT_DIR: str(reports)}
    keep_compiled_kernels(str(output), env)
    return env


def run(config_path: Path | str | None = None, *, env: dict[str, str] | None = None) -> int:
    """Launch this node's workers, wait, write the termination message; the exit code."""
    base_env = dict(os.environ if env is None else env)
    try:
        config = load_config(config_path or base_env.get(ENV_CONFIG_PATH))
        topology = topology_from_env(config, base_env)
        if topology.world_size > 1:
            timeout = float(base_env.get(ENV_DNS_TIMEOUT) or 120)
            topology = Topology(
                node_rank=topology.node_rank,
                num_nodes=topology.num_nodes,
                processes_per_node=topology.processes_per_node,
                main_addr=resolve_main_addr(topology.main_addr, timeout),
                main_port=topology.main_port,
            )
    except TrainerFailure as exc:
        outcome = classify(exc)
        write_outcome(outcome)
        print(f"sftjob-trainer: {outcome.reason}: {outcome.message}", file=sys.stderr)
        return outcome.exit_code

    assert config.path is not None
    fsdp_path = None
    with tempfile.TemporaryDirectory(prefix="sftjob-launch-") as scratch:
        if config.spec.distributed == "fsdp":
            fsdp_path = Path(scratch) / FSDP_CONFIG_NAME
            fsdp_path.write_text(
                fsdp_config_yaml(
                    activation_checkpointing=config.spec.training.gradientCheckpointing
                )
            )
        reports = Path(scratch) / "reports"
        reports.mkdir()
        command = launch_command(
            topology,
            config.path.resolve(),
            use_cpu=bool(config.resolved.get("useCpu")),
            distributed=config.spec.distributed,
            fsdp_config_path=fsdp_path,
        )
        child_env = worker_env(base_env, config.output_path, reports)
        print("sftjob-trainer: " + " ".join(command), file=sys.stderr, flush=True)
        returncode, interrupted = _run_forwarding_signals(command, child_env, reports)
        outcome = final_outcome(returncode, read_worker_reports(reports), interrupted)
    write_outcome(outcome)
    print(
        f"sftjob-trainer: {outcome.reason}: {outcome.message}"
        + (f" (step {outcome.step})" if outcome.step is not None else ""),
        file=sys.stderr,
        flush=True,
    )
    return outcome.exit_code


def _worker_pids(reports: Path | None) -> list[int]:
    pids = []
    for file in sorted(reports.glob("pid-*")) if reports else []:
        try:
            pids.append(int(file.read_text()))
        except (OSError, ValueError):
            continue
    return pids


def _run_forwarding_signals(
    command: list[str], env: dict[str, str], reports: Path | None = None
) -> tuple[int, bool]:
    """Run `command`; SIGTERM/SIGINT go on to the workers so they can checkpoint first.

    The signal goes to the worker processes themselves (they record their pids), not to
    accelerate/torchrun: its agent would SIGKILL them 30 s later, and saving a large
    model's checkpoint can take longer. The pod's grace period is the only limit then.
    """
    received: list[int] = []
    process = subprocess.Popen(command, env=env)

    def forward(signum: int, frame: object) -> None:
        received.append(signum)
        targets = _worker_pids(reports) or [process.pid]
        for pid in targets:
            try:
                os.kill(pid, signum)
            except ProcessLookupError:
                continue

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        returncode = process.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return returncode, bool(received)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m sftjob_trainer",
        description="Run one SFTJob node: launch the training processes for this pod.",
    )
    parser.add_argument(
        "--config", type=Path, default=None, help=f"resolved config (default ${ENV_CONFIG_PATH})"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return run(args.config)
    except (Interrupted, KeyboardInterrupt):
        return write_and_code(Outcome("Interrupted", "interrupted before launch"))


def write_and_code(outcome: Outcome) -> int:
    write_outcome(outcome)
    return outcome.exit_code
