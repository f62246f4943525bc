"""The local node reports and behaves as a kubelet does: waiting reasons and events,
logs per pod uid and container run, memory limits, evictions, graceful node shutdown.

Expected answers come from the kubelet's source (named in each test) and are checked
only through the API and kubectl, as a user sees them.
"""

from __future__ import annotations

import base64
import os
import subprocess
import time
from pathlib import Path
from typing import Any

import kubernetes
import pytest
from kubernetes.client import CoreV1Api
from local_node_kit import alive, pod_gone, py_pod, wait_for, wait_phase
from sftjob_local.cluster import LocalCluster

pytestmark = pytest.mark.local


def events(core: CoreV1Api, ns: str, pod: str) -> list[tuple[str, str, str, str]]:
    """(reason, message, type, reportingComponent) of the pod's events."""
    return [
        (e.reason, e.message, e.type, e.reporting_component)
        for e in core.list_namespaced_event(ns).items
        if e.involved_object.name == pod
    ]


def container_status(core: CoreV1Api, ns: str, name: str) -> Any:
    statuses = core.read_namespaced_pod(name, ns).status.container_statuses
    return statuses[0] if statuses else None


def waiting_reason(core: CoreV1Api, ns: str, name: str) -> tuple[str, str] | None:
    cs = container_status(core, ns, name)
    if cs is None or cs.state.waiting is None:
        return None
    return cs.state.waiting.reason, cs.state.waiting.message


def log_or_empty(core: CoreV1Api, ns: str, name: str) -> str:
    """The pod's log, or "" while the container has not started (400 waiting to start)."""
    try:
        return core.read_namespaced_pod_log(name, ns)
    except kubernetes.client.ApiException as exc:
        if exc.status == 400:
            return ""
        raise


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def kubectl(cluster: LocalCluster, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}
    return subprocess.run(
        ["kubectl", *args], env=env, capture_output=True, text=True, timeout=30, check=False
    )


# ---------------------------------------------------------------- waiting reasons
def test_missing_secret_in_env_is_create_container_config_error_until_it_exists(
    cluster: LocalCluster, core: CoreV1Api, ns: str
) -> None:
    """pkg/kubelet/kubelet_pods.go makeEnvironmentVariables (`couldn't find key K in
    Secret NS/NAME`, the secret getter's NotFound `secret "NAME" not found`);
    kuberuntime_container.go startContainer: waiting CreateContainerConfigError and
    a Warning event `Failed` "Error: <message>"; the pod worker retries the sync."""
    env = [{"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "later", "key": "token"}}}]
    core.create_namespaced_pod(ns, py_pod("cfg", "import os; print(os.environ['TOKEN'])", env=env))
    reason = wait_for(lambda: waiting_reason(core, ns, "cfg"), what="a waiting reason")
    assert reason == ("CreateContainerConfigError", 'secret "later" not found')
    assert core.read_namespaced_pod("cfg", ns).status.phase == "Pending"
    row = kubectl(cluster, "get", "pod", "cfg", "-n", ns, "--no-headers").stdout.split()
    assert row[:3] == ["cfg", "0/1", "CreateContainerConfigError"], row
    expected = ("Failed", 'Error: secret "later" not found', "Warning", "kubelet")
    wait_for(lambda: expected in events(core, ns, "cfg"), what="the Failed event")

    core.create_namespaced_secret(ns, {"metadata": {"name": "later"}, "data": {"other": b64("x")}})
    missing_key = ("CreateContainerConfigError", f"couldn't find key token in Secret {ns}/later")
    wait_for(lambda: waiting_reason(core, ns, "cfg") == missing_key, what="the missing key")

    core.replace_namespaced_secret(
        "later", ns, {"metadata": {"name": "later"}, "data": {"token": b64("abc")}}
    )
    pod = wait_phase(core, ns, "cfg", "Succeeded", "Failed")
    assert pod.status.phase == "Succeeded"
    assert core.read_namespaced_pod_log("cfg", ns) == "abc\n"


def test_volume_of_a_missing_secret_is_failed_mount_and_container_creating(
    core: CoreV1Api, ns: str
) -> None:
    """pkg/volume/secret/secret.go SetUpAt → the volume manager's event FailedMount
    `MountVolume.SetUp failed for volume "V" : secret "S" not found` (a missing item key:
    pkg/volume/configmap MakePayload's message); the pod stays ContainerCreating until
    the mount works (kubelet WaitForAttachAndMount)."""
    pod = py_pod(
        "vol",
        "print(open('/creds/key').read())",
        volumeMounts=[{"name": "creds", "mountPath": "/creds"}],
    )
    pod["spec"]["volumes"] = [{"name": "creds", "secret": {"secretName": "absent"}}]
    core.create_namespaced_pod(ns, pod)
    expected = (
        "FailedMount",
        'MountVolume.SetUp failed for volume "creds" : secret "absent" not found',
        "Warning",
        "kubelet",
    )
    wait_for(lambda: expected in events(core, ns, "vol"), what="the FailedMount event")
    assert waiting_reason(core, ns, "vol") == ("ContainerCreating", None)
    assert core.read_namespaced_pod("vol", ns).status.phase == "Pending"

    core.create_namespaced_config_map(ns, {"metadata": {"name": "cm"}, "data": {"other": "x"}})
    pod = py_pod("cmvol", "print(1)", volumeMounts=[{"name": "conf", "mountPath": "/conf"}])
    items = [{"key": "wanted", "path": "wanted"}]
    pod["spec"]["volumes"] = [{"name": "conf", "configMap": {"name": "cm", "items": items}}]
    core.create_namespaced_pod(ns, pod)
    expected = (
        "FailedMount",
        'MountVolume.SetUp failed for volume "conf" : '
        "configmap references non-existent config key: wanted",
        "Warning",
        "kubelet",
    )
    wait_for(lambda: expected in events(core, ns, "cmvol"), what="the FailedMount of a key")

    core.create_namespaced_secret(ns, {"metadata": {"name": "absent"}, "data": {"key": b64("k1")}})
    pod = wait_phase(core, ns, "vol", "Succeeded", "Failed")
    assert pod.status.phase == "Succeeded"
    assert core.read_namespaced_pod_log("vol", ns) == "k1\n"


def test_unparsable_image_is_invalid_image_name(core: CoreV1Api, ns: str) -> None:
    """pkg/kubelet/images/image_manager.go EnsureImageExists: applyDefaultImageTag fails →
    event InspectFailed with the message, waiting InvalidImageName with it, and
    kuberuntime's event Failed `Error: InvalidImageName`. The wording of the parse error
    is github.com/distribution/reference ParseNormalizedNamed's (the apiserver accepts
    the name: it checks only that the image is not empty or padded with spaces)."""
    image = "example.invalid/Never-Pulled:1"
    core.create_namespaced_pod(ns, py_pod("img", "print(1)", image=image))
    message = (
        f'Failed to apply default image tag "{image}": couldn\'t parse image name "{image}": '
        "invalid reference format: repository name (Never-Pulled) must be lowercase"
    )
    reason = wait_for(lambda: waiting_reason(core, ns, "img"), what="a waiting reason")
    assert reason == ("InvalidImageName", message)
    want = {
        ("InspectFailed", message, "Warning", "kubelet"),
        ("Failed", "Error: InvalidImageName", "Warning", "kubelet"),
    }
    wait_for(lambda: want <= set(events(core, ns, "img")), what="the image events")
    assert core.read_namespaced_pod("img", ns).status.phase == "Pending"


def test_normal_path_events_and_killing_on_delete(core: CoreV1Api, ns: str) -> None:
    """kuberuntime_container.go startContainer / killContainer and image_manager.go:
    Pulled `Container image "I" already present on machine`, Created `Created container: C`,
    Started `Started container C`, Killing `Stopping container C`; from the kubelet."""
    image = "example.invalid/never-pulled:1"
    code = "import time; print('up', flush=True); time.sleep(60)"
    core.create_namespaced_pod(ns, py_pod("ev", code, restart="Always"))
    wait_for(lambda: log_or_empty(core, ns, "ev") == "up\n", what="the pod's output")
    want = [
        ("Pulled", f'Container image "{image}" already present on machine', "Normal", "kubelet"),
        ("Created", "Created container: main", "Normal", "kubelet"),
        ("Started", "Started container main", "Normal", "kubelet"),
    ]
    wait_for(lambda: set(want) <= set(events(core, ns, "ev")), what="the start events")
    core.delete_namespaced_pod("ev", ns, grace_period_seconds=5)
    killing = ("Killing", "Stopping container main", "Normal", "kubelet")
    wait_for(lambda: killing in events(core, ns, "ev"), what="the Killing event")
    wait_for(lambda: pod_gone(core, ns, "ev"), what="the pod to go")


# ---------------------------------------------------------------- logs
def test_logs_of_a_recreated_pod_are_its_own(core: CoreV1Api, ns: str) -> None:
    """Logs are kept per pod uid (/var/log/pods/<ns>_<pod>_<uid>, kuberuntime
    BuildPodLogsDirectory): a new pod of the same name starts with an empty log."""
    core.create_namespaced_pod(ns, py_pod("again", "print('first pod')"))
    wait_phase(core, ns, "again", "Succeeded")
    core.delete_namespaced_pod("again", ns, grace_period_seconds=0)
    wait_for(lambda: pod_gone(core, ns, "again"), what="the first pod to go")
    core.create_namespaced_pod(ns, py_pod("again", "print('second pod')"))
    wait_phase(core, ns, "again", "Succeeded")
    assert core.read_namespaced_pod_log("again", ns) == "second pod\n"


def test_previous_without_a_restart_is_the_kubelets_error(core: CoreV1Api, ns: str) -> None:
    """kubelet_pods.go validateContainerLogStatus: no lastState.terminated → 400
    `previous terminated container "C" in pod "P" not found`."""
    core.create_namespaced_pod(ns, py_pod("once", "print('only run')"))
    wait_phase(core, ns, "once", "Succeeded")
    with pytest.raises(kubernetes.client.ApiException) as err:
        core.read_namespaced_pod_log("once", ns, previous=True)
    assert err.value.status == 400
    assert 'previous terminated container \\"main\\" in pod \\"once\\" not found' in err.value.body


def test_kubectl_logs_options_previous_since_timestamps_limit_and_follow(
    cluster: LocalCluster, core: CoreV1Api, ns: str
) -> None:
    """`kubectl logs` flags map to PodLogOptions (previous, sinceSeconds, timestamps,
    tailLines, limitBytes, follow); the kubelet's ReadLogs applies them to the CRI
    log of the chosen container run, and a follow ends when that run ends."""
    code = (
        "import os, sys, time\n"
        "marker = os.path.join(sys.argv[1], 'ran')\n"
        "if not os.path.exists(marker):\n"
        "    open(marker, 'w').close(); print('crashed run'); sys.exit(3)\n"
        "print('old line', flush=True); time.sleep(3)\n"
        "print('new line', flush=True); time.sleep(5)\n"
        "print('last line')\n"
    )
    pod = py_pod(
        "opts",
        code,
        "/state",
        restart="OnFailure",
        volumeMounts=[{"name": "state", "mountPath": "/state"}],
    )
    pod["spec"]["volumes"] = [{"name": "state", "emptyDir": {}}]
    core.create_namespaced_pod(ns, pod)
    ns_args = ("-n", ns)

    def current() -> str:
        return kubectl(cluster, "logs", "opts", *ns_args).stdout

    wait_for(lambda: "new line" in current(), timeout=20, what="the second run's new line")
    assert kubectl(cluster, "logs", "opts", "--previous", *ns_args).stdout == "crashed run\n"
    assert kubectl(cluster, "logs", "opts", "--since=2s", *ns_args).stdout == "new line\n"
    assert kubectl(cluster, "logs", "opts", "--tail=1", *ns_args).stdout == "new line\n"
    assert kubectl(cluster, "logs", "opts", "--limit-bytes=3", *ns_args).stdout == "old"
    stamped = kubectl(cluster, "logs", "opts", "--timestamps", *ns_args).stdout.splitlines()
    assert [line.split(" ", 1)[1] for line in stamped] == ["old line", "new line"]
    for line in stamped:
        stamp = line.split(" ", 1)[0]
        assert stamp.startswith("20") and stamp.endswith("Z") and "T" in stamp, stamp
    started = time.monotonic()
    followed = kubectl(cluster, "logs", "-f", "opts", *ns_args)
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout == "old line\nnew line\nlast line\n"
    assert time.monotonic() - started < 10  # it ended with the container
    assert wait_phase(core, ns, "opts", "Succeeded", "Failed").status.phase == "Succeeded"


# ---------------------------------------------------------------- memory limits
ALLOCATE_IN_GRANDCHILD = (
    "import subprocess, sys, time\n"
    "child = 'data = bytes(range(256)) * (200 * 4096); import time; time.sleep(30)'\n"
    "subprocess.Popen([sys.executable, '-c', child]); time.sleep(30)\n"
)


def test_tree_over_its_memory_limit_is_oom_killed(core: CoreV1Api, ns: str) -> None:
    """The whole process tree counts, as in a container's cgroup; the kubelet reports the
    runtime's OOM kill as terminated, reason OOMKilled, exit code 137
    (kuberuntime_container.go toKubeContainerStatus; pod phase Failed under Never)."""
    pod = py_pod("hog", ALLOCATE_IN_GRANDCHILD, resources={"limits": {"memory": "100Mi"}})
    core.create_namespaced_pod(ns, pod)
    pod = wait_phase(core, ns, "hog", "Failed", "Succeeded", timeout=20)
    term = pod.status.container_statuses[0].state.terminated
    assert (pod.status.phase, term.reason, term.exit_code) == ("Failed", "OOMKilled", 137)


def test_oom_killed_container_restarts_with_last_state(core: CoreV1Api, ns: str) -> None:
    code = "data = bytes(range(256)) * (200 * 4096); print('allocated')"
    pod = py_pod("hog2", code, restart="OnFailure", resources={"limits": {"memory": "60Mi"}})
    core.create_namespaced_pod(ns, pod)

    def restarted() -> Any:
        cs = container_status(core, ns, "hog2")
        return cs if cs and cs.restart_count >= 1 and cs.last_state.terminated else None

    cs = wait_for(restarted, timeout=20, what="a restart after the OOM kill")
    assert (cs.last_state.terminated.reason, cs.last_state.terminated.exit_code) == (
        "OOMKilled",
        137,
    )
    core.delete_namespaced_pod("hog2", ns, grace_period_seconds=0)


# ---------------------------------------------------------------- eviction, deletion
def test_eviction_adds_disruption_target_and_deletes_gracefully(
    core: CoreV1Api, ns: str, tmp_path: Path
) -> None:
    """pkg/registry/core/pod/storage/eviction.go addConditionAndDeletePod: condition
    DisruptionTarget=True, reason EvictionByEvictionAPI, message `Eviction API: evicting`,
    then the deletion with the Eviction's deleteOptions: SIGTERM, SIGKILL after the grace."""
    marker = tmp_path / "signals"
    code = (
        "import os, signal, sys, time\n"
        "def note(*_): open(sys.argv[1], 'a').write('TERM\\n')\n"
        "signal.signal(signal.SIGTERM, note)\n"
        "print(os.getpid(), flush=True)\n"
        "while True: time.sleep(0.1)\n"
    )
    core.create_namespaced_pod(ns, py_pod("evictee", code, str(marker), restart="Always"))
    pid = int(wait_for(lambda: log_or_empty(core, ns, "evictee"), what="the pid"))
    eviction = {
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": "evictee", "namespace": ns},
        "deleteOptions": {"gracePeriodSeconds": 2},
    }
    started = time.monotonic()
    core.create_namespaced_pod_eviction("evictee", ns, eviction)
    pod = core.read_namespaced_pod("evictee", ns)
    assert pod.metadata.deletion_timestamp is not None
    cond = {c.type: c for c in pod.status.conditions}["DisruptionTarget"]
    assert (cond.status, cond.reason, cond.message) == (
        "True",
        "EvictionByEvictionAPI",
        "Eviction API: evicting",
    )
    wait_for(lambda: marker.exists() and marker.read_text() == "TERM\n", what="SIGTERM")
    # the condition survives the node's status updates while the pod terminates
    conditions = {c.type for c in core.read_namespaced_pod("evictee", ns).status.conditions}
    assert "DisruptionTarget" in conditions
    wait_for(lambda: pod_gone(core, ns, "evictee"), timeout=10, what="the evicted pod to go")
    assert time.monotonic() - started >= 1.5  # the grace period was given
    wait_for(lambda: not alive(pid), timeout=5, what="the process to be killed")


def test_graceful_node_shutdown_marks_pods_terminated_by_kubelet(tmp_path: Path) -> None:
    """pkg/kubelet/nodeshutdown/nodeshutdown_manager_linux.go (graceful node shutdown,
    opt-in as shutdownGracePeriod is on a kubelet): phase Failed, reason Terminated,
    message `Pod was terminated in response to imminent node shutdown.` and
    DisruptionTarget=True, reason TerminationByKubelet."""
    with LocalCluster(workdir=tmp_path / "wd", graceful_shutdown=True) as c:
        client = kubernetes.config.new_client_from_config(config_file=str(c.kubeconfig))
        api = CoreV1Api(client)
        code = "import time; print('up', flush=True); time.sleep(60)"
        api.create_namespaced_pod("default", py_pod("victim", code, restart="Always"))
        wait_for(lambda: log_or_empty(api, "default", "victim") == "up\n")
        emulator = c.emulator  # its store outlives the stop: what the node reported last
    stored = emulator.core.store.get(("", "pods"), "default", "victim")
    status = stored["status"]
    assert (status["phase"], status["reason"], status["message"]) == (
        "Failed",
        "Terminated",
        "Pod was terminated in response to imminent node shutdown.",
    )
    cond = {c["type"]: c for c in status["conditions"]}["DisruptionTarget"]
    assert (cond["status"], cond["reason"]) == ("True", "TerminationByKubelet")
