"""A training job survives a restart of the local control plane, as it survives a control
plane restart (etcd keeps the objects) and the loss of its node on a real cluster.

The control plane here is `sftjob local up`, a process of its own on a fixed port and
workdir (so the operator's kubeconfig stays valid), with the operator as another process
that keeps running throughout. Mid-training the control plane is stopped and started again
on the same workdir, once with SIGTERM and, while the relaunch trains, once with SIGKILL;
each time:

- the SFTJob, its pods and its events are the same objects (uids kept: state.db);
- the node reports the pod whose processes died with it as a kubelet does after a reboot
  (Failed, container terminated with ContainerStatusUnknown, exit code 137);
- the operator, whose watches end with 410 Expired and relist, relaunches that lost pod
  from the newest checkpoint and the job ends Succeeded at its planned total steps.

Local mode only: a test cannot restart a real cluster's control plane.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from e2e_harness import E2ECluster, condition, merge, processes_matching, terminated, wait_for
from sftjob_local.demo import DemoEnvironment

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        bool(os.environ.get("SFTJOB_E2E_KUBECONFIG")),
        reason="restarts the local control plane; a real cluster's cannot be restarted here",
    ),
]

BANNER_END = "kubectl get pods"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RestartableEnvironment(DemoEnvironment):
    """`DemoEnvironment` whose control plane is a `sftjob local up` process that can be
    stopped and started again while the operator process keeps running."""

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, port=free_port())
        self.control_plane: subprocess.Popen[bytes] | None = None
        self.control_plane_log = self.workdir / "control-plane.log"

    @property
    def kubeconfig(self) -> Path:
        return self.workdir / "kubeconfig"

    def __enter__(self) -> RestartableEnvironment:
        super().__enter__()
        return self

    def _start_control_plane(self) -> None:
        self.start_control_plane()

    def close(self) -> None:
        super().close()  # the operator
        if self.control_plane is not None:
            self.stop_control_plane(signal.SIGTERM)

    def start_control_plane(self) -> None:
        assert self.control_plane is None
        offset = self.control_plane_log.stat().st_size if self.control_plane_log.exists() else 0
        with self.control_plane_log.open("ab") as log:
            self.control_plane = subprocess.Popen(
                [sys.executable, "-m", "sftjob_operator.cli", "local", "up"]
                + ["--port", str(self.port), "--workdir", str(self.workdir)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

        def banner() -> bool:
            assert self.control_plane is not None
            if self.control_plane.poll() is not None:
                raise RuntimeError(f"local up exited:\n{self.log_since(offset)}")
            return BANNER_END in self.log_since(offset)

        wait_for(banner, 60, "the local control plane to be up", interval=0.2)

    def stop_control_plane(self, sig: int) -> None:
        assert self.control_plane is not None
        self.control_plane.send_signal(sig)
        try:
            self.control_plane.wait(timeout=30)
        finally:
            if self.control_plane.poll() is None:
                self.control_plane.kill()
                self.control_plane.wait()
            self.control_plane = None

    def log_since(self, offset: int) -> str:
        with self.control_plane_log.open("rb") as log:
            log.seek(offset)
            return log.read().decode(errors="replace")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RestartableEnvironment]:
    workdir = tmp_path_factory.mktemp("e2e-restart") / "cluster"
    with RestartableEnvironment(workdir) as environment:
        environment.prepare_data()
        try:
            yield environment
        finally:
            for name in ("operator.log", "control-plane.log"):
                log = workdir / name
                if log.exists():  # shown by pytest when a test failed
                    print(f"{name}, last lines:\n{log.read_text(errors='replace')[-4000:]}")


def job_events(cluster: E2ECluster, name: str) -> dict[str, str]:
    """uid → reason of the Events about the SFTJob `name`."""
    items = cluster.get_json("events", "--field-selector", f"involvedObject.name={name}")["items"]
    return {e["metadata"]["uid"]: e["reason"] for e in items if e["involvedObject"]["kind"] == "SFTJob"}  # fmt: skip


def complete_checkpoints(output: Path) -> list[int]:
    """Steps of the checkpoints written in full (the trainer resumes only from those)."""
    found = []
    for folder in (output / "checkpoints").glob("checkpoint-*"):
        if (folder / "trainer_state.json").is_file():
            found.append(int(folder.name.rsplit("-", 1)[1]))
    return sorted(found)


def restart_control_plane(
    env: RestartableEnvironment, cluster: E2ECluster, name: str, attempt: int, sig: int
) -> int:
    """Stop the control plane with `sig` while attempt `attempt` trains, start it again, and
    check what must have been kept and what the node must report. Returns the newest complete
    checkpoint once the attempt's processes were gone: the one the relaunch must resume from."""
    job = cluster.job(name)
    events = job_events(cluster, name)
    assert events, "the operator records Events about the job"
    pod_name = f"{name}-a{attempt}-r0"
    pod = cluster.pod(pod_name)
    assert pod["status"]["phase"] == "Running", pod["status"]

    env.stop_control_plane(sig)
    marker = f"/pods/{cluster.namespace}/{pod_name}-"
    # Even after SIGKILL the trainer dies with the node (each container's supervisor kills
    # its tree when the node's pipe closes): nothing trains on next to the relaunch.
    wait_for(lambda: not processes_matching(marker), 10, "the trainer processes to be gone")
    output = cluster.output_dir(name)
    assert output is not None
    newest = max(complete_checkpoints(output))
    env.start_control_plane()
    restarted = time.monotonic()

    # The same objects: the job, the pod and the events recorded before the restart.
    after = cluster.job(name)
    assert after["metadata"]["uid"] == job["metadata"]["uid"]
    assert after["metadata"]["creationTimestamp"] == job["metadata"]["creationTimestamp"]
    events_after = job_events(cluster, name)
    assert events.items() <= events_after.items(), (events, events_after)
    lost = wait_for(
        lambda: (p := cluster.pod(pod_name))["status"]["phase"] == "Failed" and p,
        30,
        f"the node to report {pod_name} Failed",
    )
    assert lost["metadata"]["uid"] == pod["metadata"]["uid"]
    state = terminated(lost)
    assert (state.get("reason"), state.get("exitCode")) == ("ContainerStatusUnknown", 137), state

    # The operator relaunches promptly once the API is back: a tick that failed while it
    # was down is retried after seconds, not after Kopf's default 60 s handler backoff.
    status = cluster.wait_job(
        name, lambda s: s.get("attempts") == attempt + 1, timeout=40, what="the relaunch"
    )
    assert time.monotonic() - restarted < 40
    assert status["lastFailure"]["reason"] == "PodLost", status["lastFailure"]
    assert status["lastFailure"]["attempt"] == attempt
    assert "PodLost" in job_events(cluster, name).values()
    return newest


def resumed_from(cluster: E2ECluster, pod_name: str) -> int:
    """The checkpoint the trainer of `pod_name` said it resumes from, as it starts."""
    log = cluster.logs(pod_name)
    found = [int(n) for n in re.findall(r"resuming from \S*/checkpoints/checkpoint-(\d+)\b", log)]
    assert found, f"no 'resuming from .../checkpoint-N' in the log of {pod_name}:\n{log[-3000:]}"
    return found[-1]


@pytest.mark.timeout(480)
def test_job_survives_sigterm_and_sigkill_of_the_control_plane_and_ends_at_the_plan(
    env: RestartableEnvironment,
) -> None:
    cluster = E2ECluster(env.kubeconfig, env.namespace, local=env)
    name = cluster.name("restart")
    # 64 rows / 8 per step = 8 steps per epoch, 2 epochs = 16 steps, half a second each;
    # a checkpoint every 2 steps.
    spec = merge(
        {"spec": {"training": {"maxLength": 64, "loggingSteps": 1}, "progressIntervalSeconds": 1}},
        {
            "spec": {
                "dataset": {"limit": 64},
                "training": {"saveSteps": 2},
                "env": [{"name": "SFTJOB_TEST_SLEEP_PER_STEP", "value": "0.5"}],
            }
        },
    )
    cluster.submit(cluster.job_manifest("tiny-cpu.yaml", name, spec))
    output = cluster.output_dir(name)
    assert output is not None

    # 1. SIGTERM while attempt 1 trains, once it has a checkpoint.
    cluster.wait_step(name, 3, timeout=180)
    wait_for(lambda: complete_checkpoints(output), 30, "a first checkpoint")
    first = restart_control_plane(env, cluster, name, attempt=1, sig=signal.SIGTERM)

    # 2. SIGKILL while attempt 2 trains, once it wrote a checkpoint of its own (and went
    #    one step further, so that checkpoint is complete).
    newer = wait_for(
        lambda: [n for n in complete_checkpoints(output) if n > first],
        180,
        "a checkpoint written by attempt 2",
    )
    cluster.wait_job(
        name,
        lambda s: s.get("attempts") == 2 and (s.get("progress") or {}).get("step", 0) > newer[0],
        timeout=60,
        what="attempt 2 past its checkpoint",
    )
    second = restart_control_plane(env, cluster, name, attempt=2, sig=signal.SIGKILL)
    assert second > first

    def done(status: dict[str, Any]) -> bool:
        if status.get("phase") == "Failed":
            raise AssertionError(f"job failed: {status}")
        return status.get("phase") == "Succeeded"

    status = cluster.wait_job(name, done, timeout=240, what="Succeeded after the restarts")
    total = status["plan"]["totalSteps"]
    assert total == 16
    assert status["progress"]["step"] == total, status["progress"]
    assert status["measuredPlan"]["totalSteps"] == total, status["measuredPlan"]
    assert condition(status, "Succeeded")["status"] == "True"
    assert (status["attempts"], status["restarts"]) == (3, 2), status

    # Each relaunch resumed from the newest checkpoint there was, never from the start.
    assert resumed_from(cluster, f"{name}-a2-r0") == first >= 2
    assert resumed_from(cluster, f"{name}-a3-r0") == second < total
