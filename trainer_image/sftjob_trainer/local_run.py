"""`sftjob run -f sftjob.yaml`: the same trainer, on this machine, without a cluster.

Each SFTJob in the file is planned (plan and advisories printed as `sftjob plan`
does), resolved into the trainer config the operator would put in its ConfigMap,
and run through the pod entrypoint (`python -m sftjob_trainer`), one launcher per
node on 127.0.0.1. Progress goes to the console.

Where results go: `spec.output.path` when the manifest sets it and it is writable
here; otherwise WORKDIR/<name>/output (the default `/output` is a path inside the
pod, not one to write on a workstation). WORKDIR defaults to ./.sftjob-run and also
holds the resolved config and the termination message.

Stopping: SIGTERM or SIGINT (Ctrl-C) to `sftjob run` is passed on to each launcher, as
a pod's SIGTERM reaches its launcher: the workers save a checkpoint at the end of the
step and every process exits; `sftjob run` then exits 14 (Interrupted) with the pod's
termination message, and the next run resumes. The launchers run in their own session,
so a terminal's Ctrl-C reaches them only this way (not also through accelerate's agent,
which would kill the workers 30 s later). A second signal stops everything at once.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from sftjob_operator.api import SFTJob, SpecError
from sftjob_operator.documents import sftjobs_in
from sftjob_operator.presentation import format_plan, plan_report
from sftjob_operator.trainer_config import build_trainer_config

from .config_map import FINAL_DIR
from .failures import EXIT_INTERRUPTED, REASONS_BY_CODE

DEFAULT_WORKDIR = Path(".sftjob-run")
EXIT_INVALID_SPEC = 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Stopped(Exception):
    """A stop signal arrived before any launcher ran: nothing to checkpoint."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)


def _stop_now(signum: int, frame: object) -> None:
    raise Stopped(signum)


@contextlib.contextmanager
def stop_signals_to(launchers: list[subprocess.Popen[bytes]], name: str) -> Iterator[list[int]]:
    """While the block runs, SIGTERM/SIGINT go on to the (running) launchers.

    The first signal is passed on as it came (each launcher hands it to its workers,
    which checkpoint and stop); a second kills the launchers' process groups. Yields the
    signals received, so no launcher is started after one.
    """
    received: list[int] = []

    def pass_on(signum: int, frame: object) -> None:
        received.append(signum)
        first = len(received) == 1
        if first:
            print(
                f"\n{name}: {signal.Signals(signum).name}: saving a checkpoint at the end of "
                "this step, then stopping (signal again to stop at once, without one)",
                file=sys.stderr,
                flush=True,
            )
        for launcher in launchers:
            if launcher.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                if first:
                    os.kill(launcher.pid, signum)
                else:
                    os.killpg(launcher.pid, signal.SIGKILL)

    previous = {stop: signal.signal(stop, pass_on) for stop in STOP_SIGNALS}
    try:
        yield received
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".sftjob-write-test"
        probe.write_text("")
        probe.unlink()
        return True
    except OSError:
        return False


def output_path_for(job: SFTJob, workdir: Path) -> Path:
    if "path" in job.spec.output.model_fields_set and _writable(Path(job.spec.output.path)):
        return Path(job.spec.output.path)
    return workdir / (job.metadata.name or "sftjob") / "output"


def _gpu_available() -> bool:
    try:
        import torch

        return bool(torch.cuda.is_available())
    except ImportError:
        return False


def local_config(job: SFTJob, output: Path, dataset_size: int | None) -> dict[str, Any]:
    config = build_trainer_config(job, dataset_size=dataset_size)
    config["spec"]["output"]["path"] = str(output)
    config["resolved"]["outputPath"] = str(output)
    # No API server here: the progress reporter falls back to the console.
    config["job"]["name"] = None
    # Without a uid, the manifest's name is the run's identity for the checkpoints it owns.
    config["job"]["manifestName"] = job.metadata.name or "sftjob"
    return config


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_job(job: SFTJob, *, workdir: Path, dataset_size: int | None) -> int:
    name = job.metadata.name or "sftjob"
    print(format_plan(plan_report(job, dataset_size)), flush=True)
    if job.spec.resources.gpusPerNode > 0 and not _gpu_available():
        print(
            f"error: {name} asks for {job.spec.resources.gpusPerNode} GPU(s) per node and this "
            "machine has none: set resources.gpusPerNode: 0 to run it on the CPU",
            file=sys.stderr,
        )
        return 12  # ConfigError, as the trainer would report it
    run_dir = workdir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    output = output_path_for(job, workdir)
    config_path = run_dir / "config.json"
    config_path.write_text(json.dumps(local_config(job, output, dataset_size), indent=2))
    nodes = job.spec.resources.nodes
    port = str(_free_port())
    print(f"\nrunning {name}: {nodes} node(s) on this machine, output in {output}", flush=True)
    launchers: list[subprocess.Popen[bytes]] = []
    with stop_signals_to(launchers, name) as received:
        for rank in range(nodes):
            if received:
                break
            env = {
                **os.environ,
                "SFTJOB_REPORT": "console",
                "SFTJOB_NODE_RANK": str(rank),
                "SFTJOB_NUM_NODES": str(nodes),
                "SFTJOB_MAIN_ADDR": "127.0.0.1",
                "SFTJOB_MAIN_PORT": port,
                "SFTJOB_TERMINATION_LOG": str(run_dir / f"termination-log-{rank}"),
            }
            (run_dir / f"termination-log-{rank}").unlink(missing_ok=True)  # a previous run's
            # Only rank 0 talks to the console; the others' logs go next to the config.
            sink = None if rank == 0 else (run_dir / f"node-{rank}.log").open("w")
            launchers.append(
                subprocess.Popen(
                    [sys.executable, "-m", "sftjob_trainer", "--config", str(config_path)],
                    env=env,
                    stdout=sink,
                    stderr=subprocess.STDOUT if sink else None,
                    # Signals reach the launcher from here only (see the module docstring).
                    start_new_session=True,
                )
            )
        # A launcher killed by a signal (a second Ctrl-C) exits as the kubelet reports a
        # killed container: 128 + the signal's number.
        codes = [launcher.wait() for launcher in launchers]
        codes = [code if code >= 0 else 128 - code for code in codes]
    if not launchers:
        raise Stopped(received[0])
    code = next((c for c in codes if c != 0), 0)
    summary = run_dir / "termination-log-0"
    outcome = json.loads(summary.read_text()) if summary.exists() else {}
    if code == 0:
        print(f"\n{name}: done. Model saved in {output / FINAL_DIR}")
    else:
        killed = "Interrupted" if code > 128 else "InternalError"
        reason = outcome.get("reason") or REASONS_BY_CODE.get(code, killed)
        verb = "stopped" if reason == "Interrupted" else "failed"
        print(
            f"\n{name}: {verb} ({reason}, exit {code}): {outcome.get('message', '')}",
            file=sys.stderr,
        )
        print(f"checkpoints (resumed on the next run): {output / 'checkpoints'}", file=sys.stderr)
    return code


def run_file(path: Path, *, workdir: Path | None = None, dataset_size: int | None = None) -> int:
    """Run every SFTJob in `path` locally; the first non-zero exit code, else 0."""
    workdir = Path(workdir) if workdir is not None else DEFAULT_WORKDIR
    try:
        text = Path(path).read_text() if str(path) != "-" else sys.stdin.read()
        jobs = sftjobs_in(text, source=str(path))
    except OSError as exc:
        print(f"error: cannot read {path}: {exc.strerror}", file=sys.stderr)
        return EXIT_INVALID_SPEC
    except SpecError as exc:
        print(f"error: {path}: invalid SFTJob:", file=sys.stderr)
        for error in exc.errors:
            print(f"  {error}", file=sys.stderr)
        return EXIT_INVALID_SPEC
    if not jobs:
        print(f"error: {path}: no SFTJob documents found", file=sys.stderr)
        return EXIT_INVALID_SPEC
    previous = {stop: signal.signal(stop, _stop_now) for stop in STOP_SIGNALS}
    try:
        for job in jobs:
            try:
                code = run_job(job, workdir=workdir, dataset_size=dataset_size)
            except SpecError as exc:
                print(f"error: {path}: {exc}", file=sys.stderr)
                return EXIT_INVALID_SPEC
            if code != 0:
                return code
    except Stopped as stop:
        # As a pod stopped before training: Interrupted, nothing to save.
        print(f"\nstopped by {stop} before training (Interrupted)", file=sys.stderr)
        return EXIT_INTERRUPTED
    finally:
        for stop_signal, handler in previous.items():
            signal.signal(stop_signal, handler)
    return 0
