"""`sftjob logs` and `sftjob plot`, the real CLI in a subprocess, against the local control
plane: pods run as processes on the local node and their logs are served by pods/log.

No operator runs here: each test creates an SFTJob, sets the status the operator would
(attempts, phase) and creates pods labelled and owned as children.build_pod makes them,
whose trainer container is a small Python program. That is the cheapest way to have the
logs of two ranks and two attempts; tests/e2e/test_e2e_logs_plot.py runs the real trainer.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml
from kubernetes.client import CoreV1Api, CustomObjectsApi
from local_node_kit import py_pod, wait_for, wait_phase
from sftjob_local.cluster import LocalCluster
from sftjob_local.demo import _token_kubeconfig
from sftjob_operator.api import GROUP, PLURAL, VERSION
from sftjob_operator.children import LABEL_ATTEMPT, LABEL_JOB, LABEL_RANK, pod_name
from sftjob_operator.kube import LOG_READER_PERMISSIONS
from sftjob_operator.log_target import TRAINER_CONTAINER

pytestmark = pytest.mark.local

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "deploy" / "examples" / "tiny-lora-2node.yaml"


@pytest.fixture(scope="module")
def custom(cluster: LocalCluster) -> CustomObjectsApi:
    """The SFTJob CRD registered, and a client for SFTJobs."""
    api = kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig))
    crd = yaml.safe_load((ROOT / "crds" / "sftjob.yaml").read_text())
    try:
        kubernetes.client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
    except kubernetes.client.ApiException as exc:
        if exc.status != 409:
            raise
    client = CustomObjectsApi(api)
    wait_for(lambda: _served(client), what="the SFTJob CRD served")
    return client


def _served(custom: CustomObjectsApi) -> bool:
    try:
        custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)
    except kubernetes.client.ApiException:
        return False
    return True


def sftjob(
    cluster: LocalCluster, *args: str, kubeconfig: Path | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "sftjob_operator.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "KUBECONFIG": str(kubeconfig or cluster.kubeconfig)},
    )


def create_job(custom: CustomObjectsApi, ns: str, name: str, **status: Any) -> dict[str, Any]:
    """The two-node example as `name`, with the status the operator would have written."""
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["metadata"] = {"name": name, "namespace": ns}
    job = custom.create_namespaced_custom_object(GROUP, VERSION, ns, PLURAL, manifest)
    if status:
        job = custom.patch_namespaced_custom_object_status(
            GROUP, VERSION, ns, PLURAL, name, {"status": status}
        )
    return dict(job)


def create_rank_pod(
    core: CoreV1Api,
    job: dict[str, Any],
    attempt: int,
    rank: int,
    code: str,
    **container: Any,
) -> str:
    """A pod of the job as the operator labels and owns them; its trainer runs `code`."""
    name = pod_name(job["metadata"]["name"], attempt, rank)
    pod = py_pod(name, code, **container)
    pod["spec"]["containers"][0]["name"] = TRAINER_CONTAINER
    pod["metadata"]["labels"] = {
        LABEL_JOB: job["metadata"]["name"],
        LABEL_ATTEMPT: str(attempt),
        LABEL_RANK: str(rank),
    }
    pod["metadata"]["ownerReferences"] = [
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "SFTJob",
            "name": job["metadata"]["name"],
            "uid": job["metadata"]["uid"],
            "controller": True,
        }
    ]
    core.create_namespaced_pod(job["metadata"]["namespace"], pod)
    return name


def say(text: str) -> str:
    return f"print({text!r}, flush=True)"


# ------------------------------------------------------------------------ sftjob logs


def test_logs_reads_the_chosen_rank_of_the_current_attempt(
    cluster: LocalCluster, core: CoreV1Api, custom: CustomObjectsApi, ns: str
) -> None:
    job = create_job(custom, ns, "two", attempts=2, launchedAttempt=2, phase="Running")
    pods = [
        create_rank_pod(core, job, 1, 0, say("attempt 1 rank 0")),
        create_rank_pod(core, job, 2, 0, say("attempt 2 rank 0") + ";" + say("last line")),
        create_rank_pod(core, job, 2, 1, say("attempt 2 rank 1")),
    ]
    for pod in pods:
        wait_phase(core, ns, pod, "Succeeded")

    result = sftjob(cluster, "logs", "two", "-n", ns)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "attempt 2 rank 0\nlast line\n"
    assert result.stderr.splitlines()[0] == (
        "logs of pod two-a2-r0 (rank 0 of 2, attempt 2 of 2, Succeeded)"
    )

    result = sftjob(cluster, "logs", "two", "-n", ns, "--rank", "1")
    assert (result.returncode, result.stdout) == (0, "attempt 2 rank 1\n"), result.stderr

    result = sftjob(cluster, "logs", "two", "-n", ns, "--attempt", "1")
    assert (result.returncode, result.stdout) == (0, "attempt 1 rank 0\n"), result.stderr

    result = sftjob(cluster, "logs", "two", "-n", ns, "--tail", "1")
    assert (result.returncode, result.stdout) == (0, "last line\n"), result.stderr


def test_logs_says_why_there_is_nothing_to_read(
    cluster: LocalCluster, core: CoreV1Api, custom: CustomObjectsApi, ns: str
) -> None:
    result = sftjob(cluster, "logs", "absent", "-n", ns)
    assert result.returncode == 1
    assert f"error: no SFTJob 'absent' in namespace {ns!r}" in result.stderr

    job = create_job(custom, ns, "waits", attempts=1, launchedAttempt=1, phase="Pending")
    # More GPUs than the node has: the scheduler leaves it Pending, Unschedulable.
    gpus = {"limits": {"nvidia.com/gpu": "8"}}
    pod = create_rank_pod(core, job, 1, 0, say("never"), resources=gpus)
    wait_for(
        lambda: any(
            c.reason == "Unschedulable"
            for c in core.read_namespaced_pod(pod, ns).status.conditions or []
        ),
        what="the pod Unschedulable",
    )
    result = sftjob(cluster, "logs", "waits", "-n", ns)
    assert result.returncode == 1, result.stdout
    assert "error: pod waits-a1-r0 has not started yet (pod phase Pending; Unschedulable: " in (
        result.stderr
    )

    result = sftjob(cluster, "logs", "waits", "-n", ns, "--rank", "2")
    assert result.returncode == 1
    assert "rank 2 is out of range: job waits runs 2 rank(s), --rank 0 to 1" in result.stderr


def test_follow_waits_for_the_pod_then_streams_until_it_ends(
    cluster: LocalCluster, core: CoreV1Api, custom: CustomObjectsApi, ns: str
) -> None:
    job = create_job(custom, ns, "live", attempts=1, launchedAttempt=1, phase="Pending")
    # Started before the pod exists: it waits, saying why, then streams.
    follow = subprocess.Popen(
        [sys.executable, "-m", "sftjob_operator.cli", "logs", "live", "-n", ns, "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
    )
    try:
        assert follow.stdout is not None and follow.stderr is not None
        assert follow.stderr.readline() == (
            "waiting: rank 0 of job live (attempt 1) is not there yet (phase Pending)\n"
        )
        code = "import time\nfor i in range(10):\n    print(f'step {i}', flush=True)\n    time.sleep(0.5)"
        pod = create_rank_pod(core, job, 1, 0, code)
        first = follow.stdout.readline()
        # The first line arrives while the pod still runs: streamed, not read at the end.
        assert first == "step 0\n"
        assert core.read_namespaced_pod(pod, ns).status.phase == "Running"
        # Read on from the same buffered reader (communicate() would skip its buffer).
        rest = follow.stdout.read()
        follow.wait(timeout=30)
        errors = follow.stderr.read()
    finally:
        follow.kill()
    assert follow.returncode == 0, errors
    assert first + rest == "".join(f"step {i}\n" for i in range(10))
    # Maybe a "not started yet" line first: the pod was created, its process not yet run.
    assert errors.splitlines()[-1] == "logs of pod live-a1-r0 (rank 0 of 2, attempt 1, Running)"


def test_ctrl_c_stops_a_follow_quietly(
    cluster: LocalCluster, core: CoreV1Api, custom: CustomObjectsApi, ns: str
) -> None:
    job = create_job(custom, ns, "long", attempts=1, launchedAttempt=1, phase="Running")
    pod = create_rank_pod(core, job, 1, 0, "import time\nprint('up', flush=True)\ntime.sleep(60)")
    wait_phase(core, ns, pod, "Running")
    # Python turns SIGINT into KeyboardInterrupt, as in a terminal, unless it started with
    # SIGINT ignored (a shell's background job, which CI may be): so say it explicitly.
    as_in_a_terminal = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv[0] = 'sftjob'; runpy.run_module('sftjob_operator.cli', run_name='__main__')"
    )
    follow = subprocess.Popen(
        [sys.executable, "-c", as_in_a_terminal, "logs", "long", "-n", ns, "-f"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)},
    )
    try:
        assert follow.stdout is not None
        assert follow.stdout.readline() == "up\n"
        follow.send_signal(signal.SIGINT)
        _, errors = follow.communicate(timeout=15)
    finally:
        follow.kill()
        core.delete_namespaced_pod(pod, ns, grace_period_seconds=0)
    assert follow.returncode == 0
    assert "Traceback" not in errors and "KeyboardInterrupt" not in errors, errors


# ------------------------------------------------------------------------ permissions


@pytest.fixture
def reader_kubeconfig(
    cluster: LocalCluster, core: CoreV1Api, ns: str, tmp_path: Path
) -> Iterator[Any]:
    """A kubeconfig for a ServiceAccount holding `rules` in `ns`; its context's namespace
    is `ns`, so no -n is needed."""

    def make(account: str, rules: list[dict[str, Any]]) -> Path:
        api = kubernetes.config.new_client_from_config(config_file=str(cluster.kubeconfig))
        rbac = kubernetes.client.RbacAuthorizationV1Api(api)
        core.create_namespaced_service_account(ns, {"metadata": {"name": account}})
        rbac.create_namespaced_role(ns, {"metadata": {"name": account}, "rules": rules})
        binding = {
            "metadata": {"name": account},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": account},
            "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": ns}],
        }
        rbac.create_namespaced_role_binding(ns, binding)
        path = tmp_path / f"{account}-kubeconfig"
        return Path(_token_kubeconfig(cluster.kubeconfig, api, ns, account, path))

    yield make


def rules_of(permissions: dict[tuple[str, str], set[str]]) -> list[dict[str, Any]]:
    return [
        {"apiGroups": [group], "resources": [resource], "verbs": sorted(verbs)}
        for (group, resource), verbs in permissions.items()
    ]


def test_the_documented_permissions_are_enough_and_pods_log_is_needed(
    cluster: LocalCluster,
    core: CoreV1Api,
    custom: CustomObjectsApi,
    ns: str,
    reader_kubeconfig: Any,
) -> None:
    job = create_job(custom, ns, "mine", attempts=1, launchedAttempt=1, phase="Running")
    wait_phase(core, ns, create_rank_pod(core, job, 1, 0, say("hello")), "Succeeded")

    reader = reader_kubeconfig("log-reader", rules_of(LOG_READER_PERMISSIONS))
    # No -n: the namespace is the kubeconfig context's, as for kubectl.
    result = sftjob(cluster, "logs", "mine", kubeconfig=reader)
    assert (result.returncode, result.stdout) == (0, "hello\n"), result.stderr

    without_log = {k: v for k, v in LOG_READER_PERMISSIONS.items() if k != ("", "pods/log")}
    denied = reader_kubeconfig("no-log", rules_of(without_log))
    result = sftjob(cluster, "logs", "mine", kubeconfig=denied)
    assert result.returncode == 1
    # The API server's own words first, then what to grant.
    lines = result.stderr.splitlines()
    assert lines[1].startswith('error: pods "mine-a1-r0" is forbidden: User '), lines
    assert 'cannot get resource "pods/log"' in result.stderr
    assert f"sftjob logs needs, in namespace {ns}: get on sftjobs.tuning.sftjob.dev, " in (
        result.stderr
    )


# ------------------------------------------------------------------------ sftjob plot


def test_plot_refuses_a_job_without_history_and_draws_one_with_it(
    cluster: LocalCluster, custom: CustomObjectsApi, ns: str, tmp_path: Path
) -> None:
    from PIL import Image

    create_job(custom, ns, "curve", attempts=1, phase="Running")
    out = tmp_path / "loss.png"
    result = sftjob(cluster, "plot", "curve", "-n", ns, "-o", str(out))
    assert result.returncode == 1
    assert "error: job curve has no loss history yet (phase Running)" in result.stderr
    assert not out.exists()

    history = [
        {"step": s, "loss": 3.0 / s, "learningRate": 1e-4 * (9 - s) / 8} for s in range(1, 9)
    ]
    custom.patch_namespaced_custom_object_status(
        GROUP,
        VERSION,
        ns,
        PLURAL,
        "curve",
        {
            "status": {
                "phase": "Succeeded",
                "progress": {"step": 8, "totalSteps": 8, "history": history},
            }
        },
    )
    result = sftjob(cluster, "plot", "curve", "-n", ns, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"wrote {out}: 8 points, steps 1 to 8\n"
    with Image.open(out) as image:
        assert image.format == "PNG" and image.size == (800, 600)
