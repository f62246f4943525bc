"""`sftjob get`, `sftjob status` and `sftjob watch`: the real command, as a process, with a
kubeconfig, against the local control plane (or a real cluster, SFTJOB_E2E_KUBECONFIG).

No operator runs here: the jobs' statuses are written through the status subresource as
the operator would write them, which is all these read-only views look at. The commands
the README's "From the terminal" shows are run here as written (NAME: a job's name).
"""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kubernetes
import pytest
import yaml

pytestmark = [pytest.mark.local, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
GROUP, VERSION, PLURAL = "tuning.sftjob.dev", "v1alpha1", "sftjobs"
MERGE = "application/merge-patch+json"

# What the README's "From the terminal" block shows; each is run below.
README_GET = "sftjob get"
README_GET_WIDE = "sftjob get -A -o wide"
README_GET_YAML = "sftjob get NAME -o yaml"
README_STATUS = "sftjob status NAME"
README_WATCH_ALL = "sftjob watch -A"
README_WATCH_FINISHED = "sftjob watch --until-finished"
README_WATCH_TIMEOUT = "sftjob watch --timeout 10"

RUNNING_STATUS: dict[str, Any] = {
    "phase": "Running",
    "plan": {
        "effectiveBatchSize": 4,
        "perDeviceTrainBatchSize": 2,
        "gradientAccumulationSteps": 2,
        "totalSteps": 8,
        "worldSize": 1,
        "datasetSize": 32,
    },
    "progress": {
        "step": 3,
        "totalSteps": 8,
        "summary": "3/8 (37%)",
        "loss": 2.31567891,
        "lossDisplay": "2.316",
        "eta": "41s",
        "history": [
            {"step": 1, "loss": 2.9},
            {"step": 2, "loss": 2.6},
            {"step": 3, "loss": 2.316},
        ],
    },
    "conditions": [
        {
            "type": "Running",
            "status": "True",
            "reason": "PodsRunning",
            "message": "1 of 1 ranks running",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }
    ],
}


class Views:
    """Runs `sftjob` as a user would: its own process, a kubeconfig whose context names the
    test namespace (so -n is not needed, as with kubectl)."""

    def __init__(self, cluster: Any, workdir: Path) -> None:
        self.cluster = cluster
        self.namespace = cluster.namespace
        self.kubeconfig = self.context_kubeconfig(
            yaml.safe_load(Path(cluster.kubeconfig).read_text()), workdir / "user-kubeconfig"
        )

    def context_kubeconfig(self, config: dict[str, Any], path: Path) -> Path:
        config = copy.deepcopy(config)
        current = next(c for c in config["contexts"] if c["name"] == config["current-context"])
        current["context"]["namespace"] = self.namespace
        path.write_text(yaml.safe_dump(config))
        return path

    def env(self, kubeconfig: Path | None = None) -> dict[str, str]:
        return {
            **os.environ,
            "KUBECONFIG": str(kubeconfig or self.kubeconfig),
            "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), *sys.path]),
        }

    def argv(self, command: str, name: str = "") -> list[str]:
        args = command.replace("NAME", name).split()
        assert args[0] == "sftjob"
        return [sys.executable, "-m", "sftjob_operator.cli", *args[1:]]

    def run(
        self, command: str, name: str = "", kubeconfig: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(command, name),
            env=self.env(kubeconfig),
            capture_output=True,
            text=True,
            timeout=60,
        )

    def start(self, command: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            self.argv(command),
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    def path(self, name: str = "", sub: str = "") -> str:
        base = f"/apis/{GROUP}/{VERSION}/namespaces/{self.namespace}/{PLURAL}"
        return base + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    def create(self, name: str, status: dict[str, Any] | None = None) -> dict[str, Any]:
        job = yaml.safe_load((ROOT / "deploy" / "examples" / "tiny-cpu.yaml").read_text())
        job["metadata"] = {"name": name, "namespace": self.namespace}
        created = self.cluster.ok("POST", self.path(), job)
        if status:
            self.set_status(name, status)
        return dict(created)

    def set_status(self, name: str, status: dict[str, Any]) -> None:
        self.cluster.ok("PATCH", self.path(name, "status"), {"status": status}, content_type=MERGE)

    def delete(self, name: str) -> None:
        self.cluster.request("DELETE", self.path(name))


@pytest.fixture(scope="module")
def views(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Views]:
    crd = yaml.safe_load((ROOT / "crds" / "sftjob.yaml").read_text())
    crd_path = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{crd['metadata']['name']}"

    def settled() -> bool:  # not half-deleted by another module's teardown
        status, body = cluster.request("GET", crd_path)
        return status == 404 or not (body.get("metadata") or {}).get("deletionTimestamp")

    cluster.wait_for(settled, 60)
    created = cluster.request("GET", crd_path)[0] == 404
    if created:
        cluster.ok("POST", "/apis/apiextensions.k8s.io/v1/customresourcedefinitions", crd)
    cluster.wait_for(lambda: cluster.request("GET", f"/apis/{GROUP}/{VERSION}")[0] == 200, 30)
    yield Views(cluster, tmp_path_factory.mktemp("views"))
    if created:
        cluster.request("DELETE", crd_path)


@pytest.fixture
def job_name(views: Views, uniq: str) -> Iterator[str]:
    name = f"view-{uniq}"
    yield name
    views.delete(name)


def test_get_lists_the_namespace_of_the_context_with_the_operators_texts(
    views: Views, job_name: str
) -> None:
    views.create(job_name, RUNNING_STATUS)
    result = views.run(README_GET)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["NAME", "PHASE", "PROGRESS", "LOSS", "ETA"]
    (row,) = [line for line in lines if line.startswith(job_name + " ")]
    # PROGRESS, LOSS (4 significant digits, not 2.31567891), ETA, BATCH, STEPS, METHOD, GPUS
    assert row.split()[1:10] == ["Running", "3/8", "(37%)", "2.316", "41s", "4", "8", "full", "0"]

    wide = views.run(README_GET_WIDE)
    assert wide.returncode == 0, wide.stderr
    (row,) = [line for line in wide.stdout.splitlines() if f" {job_name} " in line]
    assert row.split()[0] == views.namespace and "/data/tiny-model" in row

    one = views.run(README_GET_YAML, job_name)
    assert one.returncode == 0, one.stderr
    assert yaml.safe_load(one.stdout)["status"]["progress"]["lossDisplay"] == "2.316"


def test_get_and_status_of_a_missing_job_name_the_namespace(views: Views, uniq: str) -> None:
    for command in (README_STATUS, "sftjob get NAME"):
        result = views.run(command, f"missing-{uniq}")
        assert result.returncode == 1
        assert f'"missing-{uniq}" not found in namespace "{views.namespace}"' in result.stderr
        assert "sftjob get -A" in result.stderr
        assert "Traceback" not in result.stderr


def test_status_shows_conditions_plan_curve_and_the_jobs_events(
    views: Views, job_name: str
) -> None:
    job = views.create(job_name, RUNNING_STATUS)
    event = {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{job_name}.launch", "namespace": views.namespace},
        "involvedObject": {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "SFTJob",
            "name": job_name,
            "namespace": views.namespace,
            "uid": job["metadata"]["uid"],
        },
        "type": "Normal",
        "reason": "Launched",
        "message": "attempt 1: 1 pod",
        "firstTimestamp": "2026-01-01T00:00:00Z",
        "lastTimestamp": "2026-01-01T00:00:00Z",
        "count": 1,
        "source": {"component": "sftjob-operator"},
    }
    views.cluster.ok("POST", f"/api/v1/namespaces/{views.namespace}/events", event)
    result = views.run(README_STATUS, job_name)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "PodsRunning" in out and "1 of 1 ranks running" in out
    assert "Launched" in out and "attempt 1: 1 pod" in out
    assert "totalSteps" in out and "ETA:       41s" in out
    chart = out.split("Loss curve:")[1].split("Events")[0]
    assert "step" in chart and "┤" in chart  # plotext's axis, a drawn chart
    assert "\x1b[" not in out  # no colour codes into a pipe

    views.set_status(job_name, {"progress": {"history": None}})
    bare = views.run(README_STATUS, job_name)
    assert "no loss history yet" in bare.stdout and "┤" not in bare.stdout


def test_watch_sees_a_change_made_after_it_started_through_one_watch(
    views: Views, job_name: str
) -> None:
    requests: list[tuple[str, str, dict[str, str]]] = []
    if views.cluster.emulated:

        def observe(user: str, method: str, path: str, query: Any) -> None:
            if method == "GET" and path.endswith(f"/namespaces/{views.namespace}/{PLURAL}"):
                requests.append((method, path, dict(query)))

        views.cluster.emulator.emulator.request_observers.append(observe)
    views.create(job_name, {"phase": "Pending"})
    try:
        watcher = views.start(README_WATCH_TIMEOUT)
        time.sleep(4)  # it has listed and is watching (a process start is about a second)
        views.set_status(job_name, RUNNING_STATUS)
        out, err = watcher.communicate(timeout=60)
    finally:
        if views.cluster.emulated:
            views.cluster.emulator.emulator.request_observers.remove(observe)
    assert watcher.returncode == 0, err
    tables = [t for t in out.split("\n\n") if t.strip()]
    # One table per change into a pipe: first the job Pending, then Running at 3/8.
    first = next(line for line in tables[0].splitlines() if line.startswith(job_name))
    last = next(line for line in tables[-1].splitlines() if line.startswith(job_name))
    assert first.split()[1] == "Pending"
    assert last.split()[1:5] == ["Running", "3/8", "(37%)", "2.316"]
    assert "\x1b[" not in out  # no cursor movement when not on a terminal
    if views.cluster.emulated:
        lists = [q for _, _, q in requests if q.get("watch") != "true"]
        watches = [q for _, _, q in requests if q.get("watch") == "true"]
        assert len(lists) == 1, requests  # never polled by listing again
        assert watches and all(q.get("resourceVersion") for q in watches), requests


def test_watch_until_finished_and_ctrl_c(views: Views, job_name: str) -> None:
    views.create(job_name, {**RUNNING_STATUS, "phase": "Succeeded"})
    for other in views.cluster.ok("GET", views.path())["items"]:
        if other["metadata"]["name"] != job_name:
            views.set_status(other["metadata"]["name"], {"phase": "Failed"})
    done = views.run(README_WATCH_FINISHED)
    assert done.returncode == 0, done.stderr
    assert job_name in done.stdout

    watcher = views.start(README_WATCH_ALL)
    assert watcher.stdout is not None
    shown = ""
    while job_name not in shown:  # the first table is out: it is watching now
        line = watcher.stdout.readline()
        assert line, "sftjob watch ended before it showed the job"
        shown += line
    watcher.send_signal(signal.SIGINT)
    out, err = watcher.communicate(timeout=30)
    assert watcher.returncode == 0 and err == "", err  # quietly: no traceback


def reader_kubeconfig(views: Views, uniq: str, *, bound: bool) -> Path:
    """A user holding the README's reader ClusterRole in the namespace (or nothing)."""
    cluster, namespace = views.cluster, views.namespace
    readme = (ROOT / "README.md").read_text().split("## From the terminal", 1)[1]
    role = yaml.safe_load(readme.split("```yaml\n", 1)[1].split("```", 1)[0])
    role["metadata"]["name"] = f"sftjob-reader-{uniq}"
    account = f"reader-{uniq}"
    cluster.ok(
        "POST", f"/api/v1/namespaces/{namespace}/serviceaccounts", {"metadata": {"name": account}}
    )
    if bound:
        cluster.ok("POST", "/apis/rbac.authorization.k8s.io/v1/clusterroles", role)
        cluster.ok(
            "POST",
            f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}/rolebindings",
            {
                "metadata": {"name": account},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": role["metadata"]["name"],
                },
                "subjects": [{"kind": "ServiceAccount", "name": account, "namespace": namespace}],
            },
        )
    token = cluster.ok(
        "POST",
        f"/api/v1/namespaces/{namespace}/serviceaccounts/{account}/token",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": {}},
    )["status"]["token"]
    config = yaml.safe_load(Path(views.kubeconfig).read_text())
    current = next(c for c in config["contexts"] if c["name"] == config["current-context"])
    user = next(u for u in config["users"] if u["name"] == current["context"]["user"])
    user["user"] = {"token": token}
    path = views.kubeconfig.with_name(f"kubeconfig-{account}")
    path.write_text(yaml.safe_dump(config))
    return path


def test_the_readme_reader_role_is_enough_and_needed(
    views: Views, job_name: str, uniq: str
) -> None:
    views.create(job_name, RUNNING_STATUS)
    reader = reader_kubeconfig(views, uniq, bound=True)
    for command in (README_GET, README_STATUS, "sftjob watch --timeout 2"):
        result = views.run(command, job_name, kubeconfig=reader)
        assert result.returncode == 0, (command, result.stderr)
        assert job_name in result.stdout, command
    nobody = reader_kubeconfig(views, uniq + "x", bound=False)
    refused = views.run(README_GET, kubeconfig=nobody)
    assert refused.returncode == 1
    assert refused.stderr.startswith("Error from server (Forbidden):"), refused.stderr
    assert "Traceback" not in refused.stderr


def test_an_expired_version_is_told_apart_so_watch_lists_again(views: Views) -> None:
    """410 Gone (as an ERROR event) becomes WatchExpired, on which `sftjob watch` re-lists."""
    views.cluster.require_emulator("a version the server has forgotten, on demand")
    from sftjob_local.emulator import EmulatorThread
    from sftjob_operator.kube import JobReader, WatchExpired, user_api_client

    with EmulatorThread(history_size=2) as server:
        kubeconfig = server.write_kubeconfig(views.kubeconfig.with_name("small-history"))
        client, namespace = user_api_client(str(kubeconfig))
        crd = yaml.safe_load((ROOT / "crds" / "sftjob.yaml").read_text())
        kubernetes.client.ApiextensionsV1Api(client).create_custom_resource_definition(crd)
        jobs = kubernetes.client.CustomObjectsApi(client)
        job = yaml.safe_load((ROOT / "deploy" / "examples" / "tiny-cpu.yaml").read_text())
        job["metadata"] = {"name": "early", "namespace": namespace}
        first = jobs.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, job)
        version = first["metadata"]["resourceVersion"]
        for index in range(4):  # each a new version, pushing the job's out of the history
            jobs.patch_namespaced_custom_object_status(
                GROUP, VERSION, namespace, PLURAL, "early", {"status": {"attempts": index}}
            )
        reader = JobReader(client)
        with pytest.raises(WatchExpired):
            for _ in reader.watch_jobs(namespace, version, 5):
                pass
        # What `sftjob watch` does then: list again, and watch from the list's version.
        listed, fresh = reader.list_jobs(namespace)
        assert [j["metadata"]["name"] for j in listed] == ["early"] and int(fresh) > int(version)


def test_kubeconfig_and_context_flags_pick_the_cluster_and_namespace(
    views: Views, job_name: str, tmp_path: Path
) -> None:
    views.create(job_name, RUNNING_STATUS)
    config = yaml.safe_load(views.kubeconfig.read_text())
    current = next(c for c in config["contexts"] if c["name"] == config["current-context"])
    # The current context looks elsewhere; the context named `views` is the test namespace.
    config["contexts"].append({"name": "views", "context": dict(current["context"])})
    current["context"]["namespace"] = "default"
    path = tmp_path / "two-contexts"
    path.write_text(yaml.safe_dump(config))
    absent = tmp_path / "absent"
    args = ["--kubeconfig", str(path), "--context", "views"]
    picked = views.run(" ".join(["sftjob get", *args]), kubeconfig=absent)
    assert picked.returncode == 0, picked.stderr
    assert any(line.startswith(job_name + " ") for line in picked.stdout.splitlines())
    other = views.run(f"sftjob get --kubeconfig {path}", kubeconfig=absent)
    assert job_name not in other.stdout
    missing = views.run(f"sftjob get --kubeconfig {path} --context nope", kubeconfig=absent)
    assert missing.returncode == 1 and "nope" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_watch_redraws_in_place_on_a_terminal(views: Views, job_name: str) -> None:
    import pty

    views.create(job_name, RUNNING_STATUS)
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        views.argv("sftjob watch --timeout 3"),
        env=views.env(),
        stdin=terminal,
        stdout=terminal,
        stderr=terminal,
    )
    os.close(terminal)
    output = b""
    try:
        while True:
            try:
                chunk = os.read(controller, 4096)
            except OSError:  # the terminal closed: the process has ended
                break
            if not chunk:
                break
            output += chunk
    finally:
        os.close(controller)
    assert process.wait(timeout=30) == 0, output
    # Cursor home and clear screen before the table: redrawn, not scrolled.
    assert output.startswith(b"\x1b[H\x1b[2J"), output[:80]
    assert job_name.encode() in output
