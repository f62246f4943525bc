"""`run_local_up` in the foreground, as `sftjob local up` runs it: a real
subprocess, driven with kubectl and stopped with SIGINT."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from local_node_kit import alive, wait_for
from sftjob_local.node_dns import etc_hosts_writable

pytestmark = pytest.mark.local
MANAGES_ETC_HOSTS = etc_hosts_writable()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
    return subprocess.run(
        ["kubectl", *args], env=env, input=stdin, capture_output=True, text=True, timeout=20
    )


class LocalUp:
    """`sftjob local up` as a subprocess on a fixed port and workdir (restartable)."""

    def __init__(self, workdir: Path, *flags: str) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.flags = flags
        self.kubeconfig = workdir / "kubeconfig"
        self.proc: subprocess.Popen[str] | None = None
        self.banner = ""

    def start(self, *flags: str) -> LocalUp:
        """Start it (with `flags` for this start only) and read its banner."""
        args = ["local", "up", "--port", str(self.port), "--workdir", str(self.workdir)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "sftjob_operator.cli", *args, *self.flags, *flags],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        lines = []
        assert self.proc.stdout is not None
        for line in self.proc.stdout:  # the banner is printed once everything is up
            lines.append(line)
            if "kubectl get pods" in line:
                break
        self.banner = "".join(lines)
        assert "kubectl get pods" in self.banner, self.banner
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout=20)
        self.proc = None
        return code

    def kill_if_running(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def create(self, obj: dict) -> dict:
        done = kubectl(
            self.kubeconfig, "create", "--validate=false", "-o", "json", "-f", "-",
            stdin=json.dumps(obj),
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    def get(self, *args: str) -> dict | None:
        got = kubectl(self.kubeconfig, "get", *args, "-o", "json")
        if got.returncode != 0:
            assert "NotFound" in got.stderr, got.stderr
            return None
        return json.loads(got.stdout)


def sleeper_pod(name: str, labels: dict[str, str] | None = None) -> dict:
    """A pod that prints its PID and sleeps two minutes: something to find, kill and restart."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {
                    "name": "main",
                    "image": "never-pulled",
                    "command": [
                        "python",
                        "-c",
                        "import os, time; print('PID', os.getpid(), flush=True); time.sleep(120)",
                    ],  # fmt: skip
                }
            ],
        },
    }


def test_local_up_serves_kubectl_and_stops_on_sigint_killing_pods(tmp_path: Path) -> None:
    up = LocalUp(tmp_path / "wd", "--gpus", "1")
    try:
        proc = up.start().proc
        assert proc is not None
        kubeconfig = up.kubeconfig
        assert f"export KUBECONFIG={kubeconfig}" in up.banner, up.banner
        assert f":{up.port}" in up.banner

        got = kubectl(kubeconfig, "get", "pods")
        assert got.returncode == 0, got.stderr
        assert kubectl(kubeconfig, "get", "nodes", "-o", "name").stdout.strip() == "node/local-node"

        pod = sleeper_pod("long", labels={"app": "long"})
        created = kubectl(
            kubeconfig, "create", "--validate=false", "-f", "-", stdin=json.dumps(pod)
        )
        assert created.returncode == 0, created.stderr

        def pid() -> int | None:
            out = kubectl(kubeconfig, "logs", "long").stdout
            return int(out.split()[1]) if out.startswith("PID") else None

        svc = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "long-svc"},
            "spec": {"clusterIP": "None", "selector": {"app": "long"}, "ports": [{"port": 80}]},
        }
        created = kubectl(
            kubeconfig, "create", "--validate=false", "-f", "-", stdin=json.dumps(svc)
        )
        assert created.returncode == 0, created.stderr

        pod_pid = wait_for(pid, timeout=15, interval=0.2, what="pod pid in kubectl logs")
        # the Service name is published in this node's /etc/hosts block (where writable)
        block = f"pid={proc.pid} "
        if MANAGES_ETC_HOSTS:
            wait_for(
                lambda: (
                    block in Path("/etc/hosts").read_text()
                    and "long-svc.default.svc.cluster.local" in Path("/etc/hosts").read_text()
                ),
                what="the node's /etc/hosts block",
            )
        assert alive(pod_pid)
        phase = kubectl(kubeconfig, "get", "pod", "long", "-o", "jsonpath={.status.phase}")
        assert phase.stdout == "Running"

        started = time.monotonic()
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - started < 10
        assert not alive(pod_pid), "pod processes must die with the local control plane"
        assert block not in Path("/etc/hosts").read_text(), "the node must remove its block"
    finally:
        up.kill_if_running()


def test_sigkill_of_local_up_kills_the_pod_tree_and_restart_cleans_up(tmp_path: Path) -> None:
    """A pod's processes die with the node, even when the node is SIGKILLed (each
    container's supervisor kills its tree when its lifeline pipe closes); on the next
    start the node kills processes recorded in pod folders and removes the folders of
    pods that no longer exist (the kubelet's cleanupOrphanedPodDirs)."""
    up = LocalUp(tmp_path / "wd")
    workdir, kubeconfig = up.workdir, up.kubeconfig
    grand = "import os, time; print('PID', os.getpid(), flush=True); time.sleep(120)"
    child = (
        "import os, subprocess, sys, time; print('PID', os.getpid(), flush=True); "
        f"subprocess.Popen([sys.executable, '-c', {grand!r}]); time.sleep(120)"
    )
    main = (
        "import os, subprocess, sys, time; print('PID', os.getpid(), flush=True); "
        f"subprocess.Popen([sys.executable, '-c', {child!r}]); time.sleep(120)"
    )
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "tree"},
        "spec": {
            "restartPolicy": "Never",
            "containers": [
                {"name": "main", "image": "never-pulled", "command": ["python", "-c", main]}
            ],  # fmt: skip
        },
    }
    proc = up.start().proc
    assert proc is not None
    try:
        created = kubectl(
            kubeconfig, "create", "--validate=false", "-f", "-", stdin=json.dumps(pod)
        )
        assert created.returncode == 0, created.stderr

        def pids() -> list[int] | None:
            out = kubectl(kubeconfig, "logs", "tree").stdout.split()
            found = [int(out[i + 1]) for i, word in enumerate(out[:-1]) if word == "PID"]
            return found if len(found) == 3 else None

        tree = wait_for(pids, timeout=20, interval=0.2, what="three PIDs in kubectl logs")
        assert all(alive(p) for p in tree)
        pod_dirs = list((workdir / "pods" / "default").glob("tree-*"))
        assert len(pod_dirs) == 1
        proc.kill()
        proc.wait(timeout=5)
        wait_for(
            lambda: not any(alive(p) for p in tree), timeout=5, what="the pod tree to be killed"
        )
    finally:
        up.kill_if_running()

    # a process recorded in a pod folder that survived (its supervisor died too)
    ghost_dir = workdir / "pods" / "default" / "ghost-12345678"
    (ghost_dir / "procs").mkdir(parents=True)
    ghost = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True
    )
    try:
        with open(f"/proc/{ghost.pid}/stat") as fh:
            starttime = fh.read().rsplit(")", 1)[1].split()[19]
        (ghost_dir / "procs" / "main-0.pid").write_text(f"{ghost.pid} {starttime}\n")
        # --ephemeral: a cluster that lost its state, so the pod is gone and its folder orphaned
        proc = up.start("--ephemeral").proc
        assert proc is not None
        try:
            assert ghost.wait(timeout=5) == -signal.SIGKILL
            assert not ghost_dir.exists()
            assert not pod_dirs[0].exists(), "the folder of a pod that no longer exists stays"
        finally:
            proc.send_signal(signal.SIGINT)
            proc.wait(timeout=15)
    finally:
        if ghost.poll() is None:
            ghost.kill()
            ghost.wait()


def test_a_restarted_local_cluster_keeps_its_credentials(tmp_path: Path) -> None:
    """The admin token and signing key (<workdir>/secrets) and the CA (<workdir>/pki) are kept: a kubeconfig (and a
    service-account token) from before a restart still work after it; a stranger's does not."""
    from sftjob_local.cluster import LocalCluster

    workdir, port = tmp_path / "wd", free_port()
    saved = tmp_path / "kubeconfig-before"
    with LocalCluster(workdir=workdir, port=port) as first:
        saved.write_text(first.kubeconfig.read_text())
        assert kubectl(saved, "get", "ns", "default", "-o", "name").returncode == 0
        token = first.emulator.access.authority.issue(
            {"metadata": {"name": "default", "namespace": "default", "uid": "x"}},
            ["https://kubernetes.default.svc.cluster.local"],
            600,
        )[0]
    with LocalCluster(workdir=workdir, port=port) as second:
        got = kubectl(saved, "get", "ns", "default", "-o", "name")
        assert got.returncode == 0 and got.stdout.strip() == "namespace/default", got.stderr
        # Same signing key: the token verifies (it names a uid that no longer exists, so it
        # does not authenticate, exactly as for a re-created ServiceAccount).
        assert second.emulator.access.authority.verify(token) is not None
        denied = kubectl(saved, "get", "ns", "--token", "not-a-token")
        assert denied.returncode != 0 and "Unauthorized" in denied.stderr, denied.stderr


# ---------------------------------------------------------------- restarts (state.db)


def sleeper_pid(up: LocalUp) -> int:
    def pid() -> int | None:
        pod = up.get("pod", "sleeper")
        out = kubectl(up.kubeconfig, "logs", "sleeper").stdout
        running = pod is not None and pod["status"].get("phase") == "Running"
        return int(out.split()[1]) if running and out.startswith("PID") else None

    return int(wait_for(pid, timeout=20, interval=0.2, what="the sleeper running"))


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_local_up_restarted_on_its_workdir_keeps_objects_and_history(
    tmp_path: Path, sig: int
) -> None:
    up = LocalUp(tmp_path / "wd")
    pod_pid = None
    try:
        up.start()
        assert f"state: {up.workdir / 'state.db'}" in up.banner, up.banner
        settings = up.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "settings"}, "data": {"k": "v"}})  # fmt: skip
        pod = up.create(sleeper_pod("sleeper"))
        pod_pid = sleeper_pid(up)
        events = up.get("events", "--field-selector", "involvedObject.name=sleeper")
        assert events and events["items"], "the node records events about the pod"
        code = up.stop(sig)
        assert code == (0 if sig == signal.SIGTERM else -signal.SIGKILL)

        up.start()
        kept = up.get("configmap", "settings")
        assert kept is not None, "the ConfigMap must survive the restart"
        assert kept["metadata"]["uid"] == settings["metadata"]["uid"]
        assert kept["metadata"]["resourceVersion"] == settings["metadata"]["resourceVersion"]
        after = up.get("events", "--field-selector", "involvedObject.name=sleeper")
        assert after is not None
        before_uids = {e["metadata"]["uid"] for e in events["items"]}
        assert before_uids <= {e["metadata"]["uid"] for e in after["items"]}

        def lost() -> dict | None:
            current = up.get("pod", "sleeper")
            return current if current and current["status"]["phase"] == "Failed" else None

        failed = wait_for(lost, timeout=20, interval=0.2, what="the sleeper reported Failed")
        assert failed["metadata"]["uid"] == pod["metadata"]["uid"]
        state = failed["status"]["containerStatuses"][0]["state"]["terminated"]
        assert (state["reason"], state["exitCode"]) == ("ContainerStatusUnknown", 137), state
        assert up.stop() == 0
    finally:
        up.kill_if_running()
        if pod_pid is not None and alive(pod_pid):  # SIGKILL: reaping orphans is not this test's
            os.kill(pod_pid, signal.SIGKILL)


def test_local_up_ephemeral_starts_empty_every_time(tmp_path: Path) -> None:
    up = LocalUp(tmp_path / "wd", "--ephemeral")
    try:
        up.start()
        assert "in memory (--ephemeral)" in up.banner, up.banner
        up.create({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "gone"}})
        assert up.stop() == 0
        up.start()
        assert up.get("configmap", "gone") is None
        assert up.stop() == 0
        assert not (up.workdir / "state.db").exists()
    finally:
        up.kill_if_running()


def test_second_local_up_on_the_same_workdir_is_refused(tmp_path: Path) -> None:
    up = LocalUp(tmp_path / "wd")
    try:
        up.start()
        other = subprocess.run(
            [
                sys.executable,
                "-m",
                "sftjob_operator.cli",
                "local",
                "up",
                "--port",
                str(free_port()),
                "--workdir",
                str(up.workdir),
            ],  # fmt: skip
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert other.returncode == 1, other.stdout + other.stderr
        assert "in use by another local control plane" in other.stderr
        assert up.get("namespace", "default") is not None  # the first one is unaffected
    finally:
        up.kill_if_running()
