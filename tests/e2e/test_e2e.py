"""SFTJobs end to end: kubectl apply → operator → trainer pods → status, on one cluster.

Each test runs its own tiny jobs (32-64 rows, maxLength 64) so the tier stays within a
few minutes on two CPU cores. See conftest.py for the local and real-cluster modes.
"""

from __future__ import annotations

import re
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from e2e_harness import (
    E2ECluster,
    condition,
    merge,
    processes_matching,
    termination_report,
    wait_for,
)

pytestmark = pytest.mark.e2e

TINY: dict[str, Any] = {
    "spec": {"training": {"maxLength": 64, "loggingSteps": 1}, "progressIntervalSeconds": 1}
}


def tiny(rows: int, **spec: Any) -> dict[str, Any]:
    return merge(TINY, {"spec": merge({"dataset": {"limit": rows}}, spec)})


def merge_spec(spec: dict[str, Any]) -> dict[str, Any]:
    return merge(TINY, {"spec": spec})


def env_list(**values: str) -> list[dict[str, str]]:
    return [{"name": k, "value": v} for k, v in values.items()]


def assert_finished_at_plan(status: dict[str, Any]) -> int:
    total = status["plan"]["totalSteps"]
    assert status["phase"] == "Succeeded"
    assert condition(status, "Succeeded")["status"] == "True"
    assert status["progress"]["step"] == total, status["progress"]
    assert status["measuredPlan"]["totalSteps"] == total, status["measuredPlan"]
    return int(total)


def resumed_checkpoint(log: str) -> int:
    """The checkpoint step the trainer says it resumed from (worker summary line)."""
    found = re.findall(r"resumed from checkpoint-(\d+)", log)
    assert found, f"no 'resumed from checkpoint-N' in the log:\n{log[-3000:]}"
    return int(found[-1])


# --------------------------------------------------------------------------- 1


@pytest.mark.timeout(240)
def test_single_node_full_fine_tune_succeeds(cluster: E2ECluster) -> None:
    name = cluster.name("single")
    # 48 rows, micro-batch 4 x accumulation 2 = 8 per step: 6 steps per epoch, 2 epochs.
    cluster.submit(cluster.job_manifest("tiny-cpu.yaml", name, tiny(48)))

    status = cluster.wait_phase(name, "Succeeded", timeout=150)

    assert status["plan"]["totalSteps"] == 12
    assert status["plan"]["datasetSize"] == 48
    assert_finished_at_plan(status)
    assert status["measuredPlan"]["datasetSize"] == 48
    assert status["attempts"] == 1 and status.get("restarts", 0) == 0
    assert status["outputPath"] == "/output"
    assert condition(status, "Failed").get("status") != "True"

    assert cluster.pod_names(name) == [f"{name}-a1-r0"]
    pod = cluster.pod(f"{name}-a1-r0")
    assert pod["status"]["phase"] == "Succeeded"
    report = termination_report(pod)
    assert report.get("reason") == "Completed", report
    assert report.get("step") == 12, report
    # The local node maps volumes to host folders, so the pod sees the claim's folder.
    output = cluster.output_dir(name)
    where = str(output) if output is not None else "/output"
    assert f"saved to {where}/final (step 12)" in cluster.logs(f"{name}-a1-r0")
    if output is not None:
        final = output / "final"
        files = {p.name for p in final.iterdir()}
        assert {"config.json", "model.safetensors", "tokenizer.json"} <= files, files
        assert (final / "model.safetensors").stat().st_size > 10_000


# --------------------------------------------------------------------------- 2


@pytest.mark.timeout(240)
def test_two_node_lora_is_one_distributed_run(cluster: E2ECluster) -> None:
    name = cluster.name("twonode")
    # 64 rows, 4 x 2 accumulation x 2 ranks = 16 per step: 4 steps per epoch, 2 epochs.
    cluster.submit(cluster.job_manifest("tiny-lora-2node.yaml", name, tiny(64)))

    status = cluster.wait_phase(name, "Succeeded", timeout=150)

    assert status["plan"]["worldSize"] == 2
    assert status["plan"]["totalSteps"] == 8
    assert status["measuredPlan"]["worldSize"] == 2
    assert status["measuredPlan"]["effectiveBatchSize"] == 16
    assert_finished_at_plan(status)

    pods = cluster.pods(name)
    assert [p["metadata"]["name"] for p in pods] == [f"{name}-a1-r0", f"{name}-a1-r1"]
    assert [p["status"]["phase"] for p in pods] == ["Succeeded", "Succeeded"]
    assert cluster.exists("service", f"{name}-rdzv")

    # Rank 1 joined rank 0's run: accelerate launched it as machine 1 of 2 and its worker
    # trained the same 8 steps in a 2-process group (not a second 1-process run).
    log = cluster.logs(f"{name}-a1-r1")
    assert "--num_machines 2" in log and "--machine_rank 1" in log, log[-3000:]
    assert re.search(r"worker: Completed: trained 8/8 steps on 2 process\(es\)", log), log[-3000:]
    assert termination_report(pods[1]).get("reason") == "Completed"

    output = cluster.output_dir(name)
    if output is not None:
        files = {p.name for p in (output / "final").iterdir()}
        assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files


# --------------------------------------------------------------------------- 3


@pytest.mark.timeout(300)
def test_killed_pod_is_relaunched_and_resumes_from_checkpoint(cluster: E2ECluster) -> None:
    name = cluster.name("killed")
    # 64 rows / 8 per step = 8 steps per epoch, 2 epochs = 16 steps, half a second each.
    spec = tiny(
        64,
        training={"saveSteps": 2},
        env=env_list(SFTJOB_TEST_SLEEP_PER_STEP="0.5"),
    )
    cluster.submit(cluster.job_manifest("tiny-cpu.yaml", name, spec))

    cluster.wait_step(name, 3, timeout=150)
    cluster.kubectl("delete", "pod", f"{name}-a1-r0", "--wait=false")

    relaunched = cluster.wait_job(
        name, lambda s: s.get("attempts") == 2, timeout=150, what="attempt 2"
    )
    assert relaunched["restarts"] == 1
    assert relaunched["lastFailure"]["reason"] in ("PodLost", "Interrupted"), relaunched
    assert relaunched["lastFailure"]["attempt"] == 1

    # Progress must never go back to the start once the new launch reports.
    lowest: list[int] = []

    def done(status: dict[str, Any]) -> bool:
        progress = status.get("progress") or {}
        if status.get("attempts") == 2 and status.get("phase") in ("Running", "Succeeded"):
            lowest.append(int(progress.get("step") or 0))
        if status.get("phase") == "Failed":
            raise AssertionError(f"job failed: {status}")
        return status.get("phase") == "Succeeded"

    status = cluster.wait_job(name, done, timeout=180, what="Succeeded after the relaunch")
    total = assert_finished_at_plan(status)
    assert total == 16
    assert status["attempts"] == 2 and status["restarts"] == 1

    log = cluster.logs(f"{name}-a2-r0")
    checkpoint = resumed_checkpoint(log)
    # Killed at step >= 3 with saveSteps 2: a checkpoint at step 2 at least, and the
    # SIGTERM handler may have saved one at the step it stopped at.
    assert 2 <= checkpoint < total, checkpoint
    assert re.search(rf"resuming from \S*/checkpoints/checkpoint-{checkpoint}\b", log), log
    assert lowest and min(lowest) >= 2, f"progress went back to {min(lowest or [0])}"
    report = termination_report(cluster.pod(f"{name}-a2-r0"))
    assert report.get("reason") == "Completed" and report.get("step") == total, report


# --------------------------------------------------------------------------- 4


@pytest.mark.timeout(300)
def test_out_of_memory_relaunches_with_smaller_micro_batch(cluster: E2ECluster) -> None:
    name = cluster.name("oom")
    # 32 rows / (4 x 2) = 4 steps, one epoch; the hook fails any micro-batch above 2.
    spec = tiny(
        32,
        training={
            "numTrainEpochs": 1,
            "perDeviceTrainBatchSize": 4,
            "gradientAccumulationSteps": 2,
        },
        env=env_list(SFTJOB_TEST_OOM_ABOVE_BATCH="2"),
    )
    cluster.submit(cluster.job_manifest("tiny-cpu.yaml", name, spec))

    status = cluster.wait_phase(name, "Succeeded", timeout=240)

    assert status["plan"]["effectiveBatchSize"] == 8
    assert status["plan"]["totalSteps"] == 4
    assert status["attempts"] == 2 and status["restarts"] == 1
    assert status["lastFailure"]["reason"] == "OutOfMemory"
    assert status["lastFailure"]["attempt"] == 1
    assert status["effectiveTraining"] == {
        "perDeviceTrainBatchSize": 2,
        "gradientAccumulationSteps": 4,
    }
    measured = status["measuredPlan"]
    assert measured["perDeviceTrainBatchSize"] == 2
    assert measured["gradientAccumulationSteps"] == 4
    assert measured["effectiveBatchSize"] == status["plan"]["effectiveBatchSize"]
    assert_finished_at_plan(status)

    first = cluster.pod(f"{name}-a1-r0")
    assert first["status"]["phase"] == "Failed"
    assert termination_report(first).get("reason") == "OutOfMemory"
    assert termination_report(cluster.pod(f"{name}-a2-r0")).get("reason") == "Completed"


# --------------------------------------------------------------------------- 5


@pytest.mark.timeout(240)
def test_malformed_row_fails_with_data_error_and_no_retry(cluster: E2ECluster) -> None:
    name = cluster.name("malformed")
    # malformed-chat.jsonl: 6 rows, row 3 has a `bot` role.
    spec = merge_spec(
        {"dataset": {"path": "/data/malformed-chat.jsonl", "format": "messages", "limit": None}}
    )
    cluster.submit(cluster.job_manifest("tiny-cpu.yaml", name, spec))

    status = cluster.wait_phase(name, "Failed", timeout=150)

    failed = condition(status, "Failed")
    assert failed["status"] == "True"
    assert failed["reason"] == "DataError", failed
    assert "row 3" in failed["message"], failed["message"]
    assert status["lastFailure"]["reason"] == "DataError"
    # Not retried, now or on the next reconcile passes.
    time.sleep(3 * cluster.seconds(1))
    status = cluster.status(name)
    assert status["phase"] == "Failed"
    assert status["attempts"] == 1 and status.get("restarts", 0) == 0
    assert cluster.pod_names(name) == [f"{name}-a1-r0"]
    report = termination_report(cluster.pod(f"{name}-a1-r0"))
    assert report.get("reason") == "DataError" and "row 3" in report.get("message", ""), report


# --------------------------------------------------------------------------- 6


@pytest.mark.timeout(120)
def test_invalid_specs_are_rejected_without_pods(cluster: E2ECluster) -> None:
    # The CRD's schema and its cross-field rules (CEL) reject these at kubectl apply: nothing
    # is stored.
    for base, spec, field in (
        ("zerobatch", {"training": {"perDeviceTrainBatchSize": 0}}, "perDeviceTrainBatchSize"),
        ("sgd", {"method": "sgd", "lora": None}, "method"),
        ("fullwithlora", {"lora": {"r": 8}}, "spec.lora"),
    ):
        name = cluster.name(base)
        job = cluster.job_manifest("tiny-cpu.yaml", name, merge_spec(spec))
        result = cluster.apply(job)
        assert result.returncode != 0, f"{name} was accepted: {result.stdout}"
        assert field in result.stderr, result.stderr
        assert not cluster.exists("sftjob", name)
        assert cluster.pod_names(name) == []

    # Passes the CRD, breaks a rule only the typed model states (extraArgs is free-form):
    # Failed/InvalidSpec, no pods.
    name = cluster.name("extralr")
    job = cluster.job_manifest(
        "tiny-cpu.yaml", name, merge_spec({"training": {"extraArgs": {"learning_rate": 0.1}}})
    )
    cluster.submit(job)

    status = cluster.wait_phase(name, "Failed", timeout=60)
    failed = condition(status, "Failed")
    assert failed["status"] == "True"
    assert failed["reason"] == "InvalidSpec"
    assert "spec.training.extraArgs" in failed["message"], failed["message"]
    assert "learning_rate" in failed["message"], failed["message"]
    assert condition(status, "Planned").get("status") == "False"
    time.sleep(3 * cluster.seconds(1))  # a few reconcile passes: still nothing launched
    assert cluster.pod_names(name) == []
    assert cluster.status(name).get("attempts", 0) == 0
    assert not cluster.exists("configmap", f"{name}-config")


# --------------------------------------------------------------------------- 7


@pytest.mark.timeout(300)
def test_suspend_and_resume_from_checkpoint(cluster: E2ECluster) -> None:
    name = cluster.name("suspend")
    spec = tiny(
        64,
        training={"saveSteps": 2},
        env=env_list(SFTJOB_TEST_SLEEP_PER_STEP="0.5"),
    )
    cluster.submit(cluster.job_manifest("tiny-cpu.yaml", name, spec))

    cluster.wait_step(name, 3, timeout=150)
    cluster.patch_spec(name, {"suspend": True})

    status = cluster.wait_phase(name, "Suspended", timeout=60)
    assert condition(status, "Suspended")["status"] == "True"
    cluster.wait_no_pods(name, timeout=90)
    status = cluster.status(name)
    assert status["phase"] == "Suspended"
    assert status["attempts"] == 1
    stopped_at = status["progress"]["step"]
    assert 3 <= stopped_at < status["plan"]["totalSteps"], status["progress"]
    # Suspended stays suspended: no new launch while spec.suspend is true.
    time.sleep(3 * cluster.seconds(1))
    assert cluster.pod_names(name) == []
    assert cluster.status(name)["phase"] == "Suspended"

    cluster.patch_spec(name, {"suspend": False})
    status = cluster.wait_phase(name, "Succeeded", timeout=180)

    total = assert_finished_at_plan(status)
    assert total == 16
    assert status.get("restarts", 0) == 0, status  # a suspension is not a failure
    assert condition(status, "Suspended")["status"] == "False"
    last = status["attempts"]
    # Only the last launch's pod is left; the earlier ones were deleted.
    assert cluster.pod_names(name) == [f"{name}-a{last}-r0"], cluster.pod_names(name)
    checkpoint = resumed_checkpoint(cluster.logs(f"{name}-a{last}-r0"))
    assert 2 <= checkpoint < total, checkpoint

    # Resuming launches once: the unsuspend's event pass and the timer pass must not
    # both start a run (a stale status in the second pass once made attempt 3).
    assert last == 2, status


# --------------------------------------------------------------------------- 8


@pytest.mark.timeout(240)
def test_deleting_a_running_job_stops_it_and_removes_children(cluster: E2ECluster) -> None:
    name = cluster.name("deleted")
    spec = tiny(64, env=env_list(SFTJOB_TEST_SLEEP_PER_STEP="1"))
    cluster.submit(cluster.job_manifest("tiny-lora-2node.yaml", name, spec))
    cluster.wait_step(name, 1, timeout=150)

    children = [
        ("pod", f"{name}-a1-r0"),
        ("pod", f"{name}-a1-r1"),
        ("configmap", f"{name}-config"),
        ("serviceaccount", f"{name}-trainer"),
        ("role", f"{name}-trainer"),
        ("rolebinding", f"{name}-trainer"),
        ("service", f"{name}-rdzv"),
    ]
    for kind, child in children:
        assert cluster.exists(kind, child), f"{kind} {child} missing before the deletion"

    # The pods' folders on the local node are <workdir>/pods/<namespace>/<pod>-<uid>/;
    # every trainer process of the job has its config path there on its command line.
    marker = f"/pods/{cluster.namespace}/{name}-a1-r"
    if cluster.local is not None:
        running = processes_matching(marker)
        assert len(running) >= 4, running  # per rank: launcher, accelerate, worker

    started = time.monotonic()
    cluster.kubectl("delete", "sftjob", name, "--wait=true", "--timeout=60s")
    assert not cluster.exists("sftjob", name)

    def gone() -> list[str]:
        left = [f"{k}/{c}" for k, c in children if cluster.exists(k, c)]
        assert not left, left
        return ["all gone"]

    wait_for(gone, cluster.seconds(90), f"the children of {name} to be deleted")

    if cluster.local is not None:
        # Far less than the pods' 120 s grace period: SIGTERM stops the trainer at the
        # next step boundary.
        wait_for(
            lambda: not processes_matching(marker),
            60 - (time.monotonic() - started),
            f"the trainer processes of {name} to exit",
        )
        output = cluster.output_dir(name)
        assert output is not None
        assert not (output / "final").exists(), "a deleted job finished its training"


# --------------------------------------------------------------------------- 9


def trainer_token(cluster: E2ECluster, pod: dict[str, Any]) -> str:
    """The token the trainer pod authenticates with: on the local node, the very file mounted
    into the pod (<pod folder>/serviceaccount/token, see sftjob_local.node_sa); on a real
    cluster, a new token of the same ServiceAccount (same identity, same RBAC)."""
    if cluster.local is not None:
        meta = pod["metadata"]
        folder = f"{meta['name']}-{meta['uid'][:8]}"
        path = cluster.local.workdir / "pods" / cluster.namespace / folder / "serviceaccount"
        return (path / "token").read_text()
    return cluster.kubectl("create", "token", pod["spec"]["serviceAccountName"]).strip()


@pytest.mark.timeout(240)
def test_a_trainer_pods_token_reaches_only_its_own_job(cluster: E2ECluster, tmp_path: Path) -> None:
    name = cluster.name("scoped")
    spec = tiny(48, env=env_list(SFTJOB_TEST_SLEEP_PER_STEP="1"))
    cluster.submit(cluster.job_manifest("tiny-cpu.yaml", name, spec))
    cluster.wait_step(name, 1, timeout=150)  # the trainer reported progress with its token
    pod = cluster.pod(f"{name}-a1-r0")
    assert pod["spec"]["serviceAccountName"] == f"{name}-trainer"

    config = yaml.safe_load(cluster.kubeconfig.read_text())
    context = next(c for c in config["contexts"] if c["name"] == config["current-context"])
    config["users"] = [
        {"name": context["context"]["user"], "user": {"token": trainer_token(cluster, pod)}}
    ]
    kubeconfig = tmp_path / "trainer-kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(config))
    env = {**cluster.env, "KUBECONFIG": str(kubeconfig)}

    def as_trainer(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["kubectl", "-n", cluster.namespace, *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    # Its Role (children.build_role): get and patch its job's progress ConfigMap, no more.
    assert as_trainer("get", "configmap", f"{name}-progress", "-o", "name").returncode == 0
    user = f"system:serviceaccount:{cluster.namespace}:{name}-trainer"
    forged = '{"status": {"phase": "Succeeded", "restarts": 0}}'
    for args, what in [
        # The status holds what the operator acts on: the trainer cannot write it. (kubectl
        # reads the object before it patches; the PATCH itself: test_trainer_channel.py.)
        (
            ("patch", "sftjob", name, "--subresource=status", "--type=merge", "-p", forged),
            'cannot get resource "sftjobs/status" in API group "tuning.sftjob.dev"',
        ),
        (("get", "sftjob", name), 'cannot get resource "sftjobs" in API group "tuning.sftjob.dev"'),
        (("get", "sftjobs"), 'cannot list resource "sftjobs" in API group "tuning.sftjob.dev"'),
        (("get", "sftjob", f"{name}-other"), 'cannot get resource "sftjobs"'),
        (("get", "pods"), 'cannot list resource "pods" in API group ""'),
        (("get", "secret", "anything"), 'cannot get resource "secrets" in API group ""'),
        (("get", "configmap", f"{name}-config"), 'cannot get resource "configmaps"'),
        (("delete", "sftjob", name, "--wait=false"), 'cannot delete resource "sftjobs"'),
    ]:
        result = as_trainer(*args)
        assert result.returncode != 0, (args, result.stdout)
        assert "Forbidden" in result.stderr and f'User "{user}" {what}' in result.stderr, (
            args,
            result.stderr,
        )
    assert cluster.exists("sftjob", name)


# --------------------------------------------------------------------------- sftjob status

# Set to a folder to keep the captured `sftjob status` text (docs/screenshots: see README).
SCREENSHOT_DIR_ENV = "SFTJOB_SCREENSHOT_DIR"


@pytest.mark.timeout(240)
def test_sftjob_status_draws_the_curve_of_a_finished_job(cluster: E2ECluster) -> None:
    """`sftjob status` (the real command, the user's kubeconfig) on a job that trained for
    real: the Succeeded condition, the measured plan, the loss and eval loss curve drawn
    from status.progress.history, and the operator's Events."""
    import os
    import sys

    name = cluster.name("status")
    # 80 rows, a fifth held out: 64 train rows, 8 per step, 2 epochs = 16 steps, eval every 4.
    spec = tiny(80, dataset={"eval": {"fraction": 0.2, "seed": 1}}, training={"evalSteps": 4})
    cluster.submit(cluster.job_manifest("tiny-cpu.yaml", name, spec))
    status = cluster.wait_phase(name, "Succeeded", timeout=180)
    assert_finished_at_plan(status)

    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "sftjob_operator.cli", "status", name, "-n", cluster.namespace],
        env={
            **os.environ,
            "KUBECONFIG": str(cluster.kubeconfig),
            "PYTHONPATH": os.pathsep.join([str(root / "operator"), *sys.path]),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"Phase:\s+Succeeded", out) and re.search(r"ETA:\s+-", out)
    assert re.search(r"Succeeded\s+True", out), out
    assert re.search(r"totalSteps\s+16\s+16", out), out  # planned and measured
    chart = out.split("Loss curve:")[1].split("Events (")[0]
    assert "no loss history" not in chart
    assert "loss" in chart and "eval loss" in chart and "┤" in chart
    ticks = chart.strip().splitlines()[-2].split()
    assert ticks[-1] == "16", chart  # the x axis runs to the last step
    events = out.split("Events (")[1]
    assert "Normal" in events, events
    keep = os.environ.get(SCREENSHOT_DIR_ENV)
    if keep:
        Path(keep).mkdir(parents=True, exist_ok=True)
        # The job's run id varies per run; the screenshot shows the example's name.
        (Path(keep) / "sftjob-status.txt").write_text(out.replace(name, "tiny-full"))
