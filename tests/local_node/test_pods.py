"""Pods run as real local processes on the local node, observed only through the API."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest
from kubernetes.client import CoreV1Api
from local_node_kit import alive, ensure_claim, pod_gone, py_pod, wait_for, wait_phase
from sftjob_local.cluster import LocalCluster

pytestmark = pytest.mark.local


def test_node_is_registered_with_gpu_capacity(core: CoreV1Api) -> None:
    node = core.read_node("local-node")
    assert node.status.capacity["nvidia.com/gpu"] == "2"
    assert node.status.allocatable["nvidia.com/gpu"] == "2"
    assert {c.type: c.status for c in node.status.conditions}["Ready"] == "True"


def test_succeeded_pod_reports_exit_code_logs_and_termination_message(
    core: CoreV1Api, ns: str
) -> None:
    # The message path is passed as the *container* path: the node must rewrite it.
    code = (
        "import sys; print('hello from the pod'); "
        "open(sys.argv[1], 'w').write('{\"reason\": \"done\"}')"
    )
    core.create_namespaced_pod(ns, py_pod("ok", code, "/dev/termination-log"))
    pod = wait_phase(core, ns, "ok", "Succeeded", "Failed")
    assert pod.status.phase == "Succeeded"
    cs = pod.status.container_statuses[0]
    term = cs.state.terminated
    assert (term.exit_code, term.reason) == (0, "Completed")
    assert term.message == '{"reason": "done"}'
    assert cs.image == "example.invalid/never-pulled:1"
    assert pod.status.pod_ip.startswith("127.0.") and pod.status.pod_ip != "127.0.0.1"
    assert pod.status.host_ip == "127.0.0.1"
    assert pod.spec.node_name == "local-node"
    assert pod.status.start_time is not None
    conditions = {c.type: c.status for c in pod.status.conditions}
    assert conditions["PodScheduled"] == "True" and conditions["Ready"] == "False"
    assert "hello from the pod" in core.read_namespaced_pod_log("ok", ns)


def test_failed_pod_reports_exit_code_and_message_from_env_path(core: CoreV1Api, ns: str) -> None:
    code = (
        "import os, sys; "
        "open(os.environ['TERMINATION_MESSAGE_PATH'], 'w').write('x' * 5000); sys.exit(3)"
    )
    core.create_namespaced_pod(ns, py_pod("bad", code))
    pod = wait_phase(core, ns, "bad", "Failed", "Succeeded")
    assert pod.status.phase == "Failed"
    term = pod.status.container_statuses[0].state.terminated
    assert (term.exit_code, term.reason) == (3, "Error")
    assert term.message == "x" * 4096  # capped like the kubelet


def test_fallback_to_logs_on_error_uses_the_log_tail(core: CoreV1Api, ns: str) -> None:
    code = "import sys\nfor i in range(200): print(f'line {i}')\nsys.exit(1)"
    pod = py_pod("fallback", code, terminationMessagePolicy="FallbackToLogsOnError")
    core.create_namespaced_pod(ns, pod)
    pod = wait_phase(core, ns, "fallback", "Failed", "Succeeded")
    message = pod.status.container_statuses[0].state.terminated.message
    assert message.endswith("line 199\n")
    assert "line 119\n" not in message  # only the last 80 lines
    assert len(message.encode()) <= 2048


def test_env_from_secret_configmap_downward_api_and_expansion(core: CoreV1Api, ns: str) -> None:
    core.create_namespaced_secret(
        ns,
        {
            "metadata": {"name": "creds"},
            "data": {"token": base64.b64encode(b"s3cr3t").decode()},
        },
    )
    core.create_namespaced_config_map(
        ns, {"metadata": {"name": "settings"}, "data": {"lr": "0.001", "EXTRA": "from-envfrom"}}
    )
    env = [
        {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "token"}}},
        {"name": "LR", "valueFrom": {"configMapKeyRef": {"name": "settings", "key": "lr"}}},
        {
            "name": "MISSING_OK",
            "valueFrom": {"configMapKeyRef": {"name": "nope", "key": "k", "optional": True}},
        },
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "POD_UID", "valueFrom": {"fieldRef": {"fieldPath": "metadata.uid"}}},
        {"name": "APP", "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['app']"}}},
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "NODE", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}},
        {
            "name": "GPU_LIMIT",
            "valueFrom": {"resourceFieldRef": {"resource": "limits.nvidia.com/gpu"}},
        },
        {"name": "GREETING", "value": "hi $(POD_NAME), $$(POD_NAME) stays"},
    ]
    code = "import os, json; print('ENV=' + json.dumps(dict(os.environ)))"
    pod = py_pod("envs", code, "$(LR)", env=env, envFrom=[{"configMapRef": {"name": "settings"}}])
    pod["spec"]["containers"][0]["resources"] = {"limits": {"nvidia.com/gpu": "1"}}
    core.create_namespaced_pod(ns, pod)
    pod = wait_phase(core, ns, "envs", "Succeeded", "Failed")
    logs = core.read_namespaced_pod_log("envs", ns)
    got = json.loads(logs.split("ENV=", 1)[1].splitlines()[0])
    assert got["TOKEN"] == "s3cr3t"
    assert got["LR"] == "0.001" and got["EXTRA"] == "from-envfrom"
    assert "MISSING_OK" not in got
    assert (got["POD_NAME"], got["POD_NS"], got["APP"]) == ("envs", ns, "envs")
    assert got["POD_UID"] == pod.metadata.uid
    assert got["POD_IP"] == pod.status.pod_ip
    assert got["NODE"] == "local-node"
    assert got["GPU_LIMIT"] == "1"
    assert got["GREETING"] == "hi envs, $(POD_NAME) stays"
    assert got["CUDA_VISIBLE_DEVICES"] in ("0", "1")
    assert os.path.isfile(got["KUBECONFIG"])


def test_missing_configmap_waits_then_runs_once_created(core: CoreV1Api, ns: str) -> None:
    env = [{"name": "V", "valueFrom": {"configMapKeyRef": {"name": "late", "key": "v"}}}]
    core.create_namespaced_pod(ns, py_pod("waits", "import os; print(os.environ['V'])", env=env))

    def waiting_reason() -> str | None:
        st = core.read_namespaced_pod("waits", ns).status
        cs = st.container_statuses or []
        return cs and cs[0].state.waiting and cs[0].state.waiting.reason

    assert wait_for(waiting_reason, what="config error") == "CreateContainerConfigError"
    assert core.read_namespaced_pod("waits", ns).status.phase == "Pending"
    core.create_namespaced_config_map(ns, {"metadata": {"name": "late"}, "data": {"v": "arrived"}})
    assert wait_phase(core, ns, "waits", "Succeeded", "Failed").status.phase == "Succeeded"
    assert "arrived" in core.read_namespaced_pod_log("waits", ns)


def test_configmap_secret_volumes_and_pvc_shared_across_pods(
    core: CoreV1Api, ns: str, cluster: LocalCluster
) -> None:
    core.create_namespaced_config_map(
        ns, {"metadata": {"name": "cfg"}, "data": {"config.json": '{"a": 1}', "other": "o"}}
    )
    core.create_namespaced_secret(
        ns, {"metadata": {"name": "sec"}, "data": {"key": base64.b64encode(b"k3y").decode()}}
    )
    volumes = [
        {
            "name": "cfg",
            "configMap": {"name": "cfg", "items": [{"key": "config.json", "path": "c.json"}]},
        },  # fmt: skip
        {"name": "sec", "secret": {"secretName": "sec", "defaultMode": 0o400}},
        {"name": "ckpt", "persistentVolumeClaim": {"claimName": "checkpoints"}},
    ]
    mounts = [
        {"name": "cfg", "mountPath": "/etc/sft"},
        {"name": "sec", "mountPath": "/var/run/secret-key", "readOnly": True},
        {"name": "ckpt", "mountPath": "/ckpt"},
    ]
    # Container paths anywhere in command/args/env (even inside the -c code) are
    # rewritten to the real folders; `--dir=/ckpt` shows the prefix rule.
    writer = (
        "import os, sys, json\n"
        "cfg = json.load(open('/etc/sft/c.json'))\n"
        "assert not os.path.exists('/etc/sft/other')\n"
        "key = open(os.environ['KEY_FILE']).read()\n"
        "mode = oct(os.stat(os.environ['KEY_FILE']).st_mode & 0o777)\n"
        "out = sys.argv[1].split('=', 1)[1]\n"
        "open(os.path.join(out, 'step-1'), 'w').write(f'{cfg[\"a\"]}:{key}:{mode}')\n"
    )
    pod = py_pod(
        "writer",
        writer,
        "--dir=/ckpt",
        env=[{"name": "KEY_FILE", "value": "/var/run/secret-key/key"}],
        volumeMounts=mounts,
    )
    pod["spec"]["volumes"] = volumes
    ensure_claim(core, ns, "checkpoints")
    core.create_namespaced_pod(ns, pod)
    assert wait_phase(core, ns, "writer", "Succeeded", "Failed").status.phase == "Succeeded", (
        core.read_namespaced_pod_log("writer", ns)
    )
    # A second pod (as after a restart) sees the checkpoint through the same claim.
    reader = py_pod(
        "reader",
        "import sys; print('GOT', open(sys.argv[1]).read())",
        "/ckpt/step-1",
        volumeMounts=[mounts[2]],
    )
    reader["spec"]["volumes"] = [volumes[2]]
    core.create_namespaced_pod(ns, reader)
    wait_phase(core, ns, "reader", "Succeeded", "Failed")
    assert "GOT 1:k3y:0o400" in core.read_namespaced_pod_log("reader", ns)
    assert (cluster.workdir / "pvc" / ns / "checkpoints" / "step-1").is_file()
    # The claim bound when its first pod was scheduled (WaitForFirstConsumer).
    claim = core.read_namespaced_persistent_volume_claim("checkpoints", ns)
    assert claim.status.phase == "Bound"
    assert claim.spec.volume_name == f"pvc-{claim.metadata.uid}"
    assert claim.metadata.annotations["volume.kubernetes.io/selected-node"] == "local-node"


def test_init_container_runs_first_and_working_dir_maps_into_the_mount(
    core: CoreV1Api, ns: str
) -> None:
    # workingDir inside a mount: the process runs in the mounted folder, so a
    # relative path reaches the init container's file
    pod = py_pod(
        "init",
        "print('MAIN', open('ready').read())",
        workingDir="/scratch",
        volumeMounts=[{"name": "scratch", "mountPath": "/scratch"}],
    )
    pod["spec"]["volumes"] = [{"name": "scratch", "emptyDir": {}}]
    pod["spec"]["initContainers"] = [
        {
            "name": "prepare",
            "image": "busybox",
            "command": ["python3", "-c", "import sys; open(sys.argv[1], 'w').write('prepared')"],
            "args": ["/scratch/ready"],
            "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}],
        }
    ]
    core.create_namespaced_pod(ns, pod)
    pod = wait_phase(core, ns, "init", "Succeeded", "Failed")
    assert pod.status.phase == "Succeeded"
    assert pod.status.init_container_statuses[0].state.terminated.exit_code == 0
    assert "MAIN prepared" in core.read_namespaced_pod_log("init", ns)


def test_restart_policy_on_failure_restarts_until_success(core: CoreV1Api, ns: str) -> None:
    # Fails on the first run, succeeds on the second: the emptyDir marker
    # survives container restarts (same pod).
    code = (
        "import os, sys\n"
        "marker = os.path.join(sys.argv[1], 'ran-once')\n"
        "if not os.path.exists(marker):\n"
        "    open(marker, 'w').close(); print('first run fails'); sys.exit(2)\n"
        "print('second run succeeds')\n"
    )
    pod = py_pod(
        "flaky",
        code,
        "/state",
        restart="OnFailure",
        volumeMounts=[{"name": "state", "mountPath": "/state"}],
    )
    pod["spec"]["volumes"] = [{"name": "state", "emptyDir": {}}]
    core.create_namespaced_pod(ns, pod)
    pod = wait_phase(core, ns, "flaky", "Succeeded", "Failed")
    cs = pod.status.container_statuses[0]
    assert pod.status.phase == "Succeeded"
    assert cs.restart_count == 1
    assert cs.last_state.terminated.exit_code == 2
    # like the kubelet: the current run's log, the earlier one with --previous
    assert core.read_namespaced_pod_log("flaky", ns) == "second run succeeds\n"
    previous = core.read_namespaced_pod_log("flaky", ns, previous=True)
    assert previous == "first run fails\n"


def test_restart_policy_never_does_not_restart(core: CoreV1Api, ns: str) -> None:
    core.create_namespaced_pod(ns, py_pod("once", "import sys; sys.exit(5)"))
    pod = wait_phase(core, ns, "once", "Failed", "Succeeded")
    time.sleep(0.5)  # a restart would have happened by now (backoff 0.2 s)
    pod = core.read_namespaced_pod("once", ns)
    assert pod.status.phase == "Failed"
    assert pod.status.container_statuses[0].restart_count == 0


def _running_pid(core: CoreV1Api, ns: str, name: str) -> int:
    def pid() -> int | None:
        for line in core.read_namespaced_pod_log(name, ns).splitlines():
            if line.startswith("PID "):
                return int(line.split()[1])
        return None

    return wait_for(pid, what=f"{name} to print its pid")


def test_delete_sends_sigterm_then_finishes_deletion(
    core: CoreV1Api, ns: str, tmp_path: os.PathLike[str]
) -> None:
    marker = os.path.join(tmp_path, "got-sigterm")
    code = (
        "import os, signal, sys, time\n"
        "def bye(*_):\n"
        "    open(sys.argv[1], 'w').write('SIGTERM'); sys.exit(0)\n"
        "signal.signal(signal.SIGTERM, bye)\n"
        "print('PID', os.getpid(), flush=True)\n"
        "time.sleep(60)\n"
    )
    core.create_namespaced_pod(ns, py_pod("sleeper", code, marker))
    wait_phase(core, ns, "sleeper", "Running")
    pid = _running_pid(core, ns, "sleeper")
    assert alive(pid)
    started = time.monotonic()
    core.delete_namespaced_pod("sleeper", ns, grace_period_seconds=5)
    wait_for(lambda: pod_gone(core, ns, "sleeper"), timeout=5, what="pod deletion")
    assert time.monotonic() - started < 5  # it exited on SIGTERM, no wait for the grace period
    assert Path(marker).read_text() == "SIGTERM"
    assert not alive(pid)


def test_delete_kills_process_ignoring_sigterm_after_grace_period(core: CoreV1Api, ns: str) -> None:
    code = (
        "import os, signal, time, subprocess, sys\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print('PID', os.getpid(), flush=True); print('CHILD', child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    core.create_namespaced_pod(ns, py_pod("stubborn", code))
    wait_phase(core, ns, "stubborn", "Running")
    pid = _running_pid(core, ns, "stubborn")
    child = int(
        wait_for(
            lambda: (
                "CHILD " in core.read_namespaced_pod_log("stubborn", ns)
                and core.read_namespaced_pod_log("stubborn", ns).split("CHILD ")[1].split()[0]
            )
        )  # fmt: skip
    )
    started = time.monotonic()
    core.delete_namespaced_pod("stubborn", ns, grace_period_seconds=1)
    time.sleep(0.5)
    assert alive(pid), "killed before the grace period ended"
    wait_for(lambda: pod_gone(core, ns, "stubborn"), timeout=6, what="pod deletion")
    assert time.monotonic() - started >= 1
    assert not alive(pid)
    assert not alive(child), "the process group (child processes) must die too"


def test_active_deadline_fails_the_pod(core: CoreV1Api, ns: str) -> None:
    pod = py_pod("slow", "import time; time.sleep(60)")
    pod["spec"]["activeDeadlineSeconds"] = 1
    pod["spec"]["terminationGracePeriodSeconds"] = 1
    core.create_namespaced_pod(ns, pod)
    pod = wait_phase(core, ns, "slow", "Failed", "Succeeded", timeout=10)
    assert pod.status.reason == "DeadlineExceeded"
    assert pod.status.container_statuses[0].state.terminated.exit_code == 128 + 15
