"""How the operator scales: N SFTJobs applied at once on the API emulator, then steady state.

    PYTHONPATH=operator:trainer_image .venv/bin/python bench/operator_scale.py --jobs 1000

The API emulator runs as its own process (as an apiserver would: its CPU is not the
benchmark's), with no node, so pods stay Pending (scheduling and running them is not what is
measured). The operator runs as another process, authenticated as deploy/'s ServiceAccount
under deploy/'s ClusterRole; the emulator counts that account's requests.

Measured:
- apply-to-pod: for each job, from its create returning to its pod appearing on a watch
  the benchmark holds (p50, p99, max); every job planned, one pod each, none lost;
- the operator's peak RSS (VmHWM) and "Connection pool is full" warnings in its log;
- steady state: over --steady seconds with every job Pending, the operator's API requests
  per second (by verb) and its CPU; the safety resync is shortened (--resync) so that the
  window includes resyncs of all N jobs;
- status writes per job (PATCH .../status) for the whole run.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import kubernetes
import yaml

ROOT = Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "tuning.sftjob.dev", "v1alpha1", "sftjobs"
OPERATOR_USER = "system:serviceaccount:sftjob-system:sftjob-operator"
LABEL_JOB = "sftjob.dev/job-name"


def job(name: str) -> dict[str, Any]:
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "SFTJob",
        "metadata": {"name": name},
        "spec": {
            "model": {"path": "/data/tiny-model"},
            "dataset": {"path": "/data/chat.jsonl", "limit": 64},
            "resources": {"gpusPerNode": 0},
        },
    }


# ----------------------------------------------------------------------------- emulator side


def request_kind(method: str, path: str, query: Any) -> str:
    """ "GET sftjobs", "PATCH sftjobs/status", "WATCH pods", ... from a request line."""
    parts = [p for p in path.split("/") if p]
    if "namespaces" in parts:
        rest = parts[parts.index("namespaces") + 2 :]
    elif parts[:1] == ["api"]:
        rest = parts[2:]
    else:
        rest = parts[3:]
    resource = rest[0] if rest else "?"
    if len(rest) >= 3:
        resource += "/" + rest[2]
    verb = method
    if method == "GET":
        verb = (
            "WATCH" if query.get("watch") in ("true", "1") else "GET" if len(rest) > 1 else "LIST"
        )
    return f"{verb} {resource}"


def serve_emulator(workdir: Path) -> int:
    """Child process: the emulator; the operator's request counts go to counts.json."""
    from sftjob_local.emulator import EmulatorThread

    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def observe(user: str, method: str, path: str, query: Any) -> None:
        if user == OPERATOR_USER:
            kind = request_kind(method, path, query)
            with lock:
                counts[kind] += 1

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with EmulatorThread(log_dir=workdir / "logs") as server:
        assert server.emulator is not None
        server.emulator.request_observers.append(observe)
        server.write_kubeconfig(workdir / "kubeconfig.tmp", "default")
        (workdir / "kubeconfig.tmp").rename(workdir / "kubeconfig")
        while not stop.wait(0.25):
            with lock:
                snapshot = {"at": time.time(), "counts": dict(counts)}
            (workdir / "counts.tmp").write_text(json.dumps(snapshot))
            (workdir / "counts.tmp").rename(workdir / "counts.json")
    return 0


def read_counts(workdir: Path) -> dict[str, int]:
    time.sleep(0.6)  # the emulator writes them every 0.25 s
    return dict(json.loads((workdir / "counts.json").read_text())["counts"])


# ----------------------------------------------------------------------------- operator side


def proc_status(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


class PodWatch(threading.Thread):
    """First time each job's pod is seen, from a watch (monotonic seconds)."""

    def __init__(self, api: kubernetes.client.ApiClient) -> None:
        super().__init__(daemon=True)
        self.core = kubernetes.client.CoreV1Api(api)
        self.seen: dict[str, float] = {}
        self.ready = threading.Event()

    def run(self) -> None:
        version = self.core.list_namespaced_pod("default").metadata.resource_version
        self.ready.set()
        try:
            while True:
                stream = kubernetes.watch.Watch().stream(
                    self.core.list_namespaced_pod,
                    "default",
                    label_selector=LABEL_JOB,
                    resource_version=version,
                    timeout_seconds=600,
                    # Plain JSON: building a V1Pod per event (~9 ms) would make this watch,
                    # not the operator, what the latency measures.
                    deserialize=False,
                )
                for event in stream:
                    metadata = event["object"]["metadata"]
                    version = metadata["resourceVersion"]
                    name = (metadata.get("labels") or {}).get(LABEL_JOB)
                    if name and name not in self.seen:
                        self.seen[name] = time.monotonic()
        except Exception:  # the emulator stops at the end of the run
            return


def parse_time(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00"))


def diff(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0)}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--steady", type=float, default=60, help="steady-state window (s)")
    parser.add_argument("--resync", type=float, default=30, help="operator safety resync (s)")
    parser.add_argument("--clients", type=int, default=8, help="threads creating jobs")
    parser.add_argument(
        "--operator-path",
        help="run the operator from this source dir (e.g. another checkout's operator/)",
    )
    parser.add_argument("--profile", type=Path, help="cProfile the operator into this file")
    parser.add_argument("--emulator-process", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.emulator_process:
        return serve_emulator(args.emulator_process)

    from sftjob_local.demo import install_operator_account

    work = Path(tempfile.mkdtemp(prefix="sftjob-scale-"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    emulator = subprocess.Popen(
        [sys.executable, __file__, "--emulator-process", str(work)],
        env=env,
        stdout=(work / "emulator.log").open("wb"),
        stderr=subprocess.STDOUT,
    )
    operator = None
    try:
        deadline = time.monotonic() + 60
        while not (work / "kubeconfig").exists():
            if emulator.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "emulator.log").read_text()[-2000:])
            time.sleep(0.1)
        kubeconfig = work / "kubeconfig"
        api = kubernetes.config.new_client_from_config(str(kubeconfig))
        api.configuration.connection_pool_maxsize = args.clients + 4
        crd = yaml.safe_load((ROOT / "crds" / "sftjob.yaml").read_text())
        kubernetes.client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
        operator_kubeconfig = install_operator_account(kubeconfig, work / "operator-kubeconfig")
        operator = subprocess.Popen(
            [sys.executable, "-m", "sftjob_operator.cli", "operator", "-A", "--standalone"],
            env={
                **env,
                **(
                    {"PYTHONPATH": f"{args.operator_path}{os.pathsep}{env['PYTHONPATH']}"}
                    if args.operator_path
                    else {}
                ),
                "KUBECONFIG": str(operator_kubeconfig),
                "SFTJOB_RESYNC_SECONDS": str(args.resync),
            },
            stdout=(work / "operator.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        watch = PodWatch(api)
        watch.start()
        watch.ready.wait(30)
        # Operator start-up is not what is measured: wait for its three watches.
        # (An operator that polls has only the first; give the others 10 s.)
        deadline = time.monotonic() + 120
        while "WATCH sftjobs" not in read_counts(work):
            if operator.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError((work / "operator.log").read_text()[-2000:])
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not all(
            w in read_counts(work) for w in ("WATCH pods", "WATCH configmaps")
        ):
            pass
        time.sleep(1)
        operator_cpu_ready = cpu_seconds(operator.pid)
        emulator_cpu_ready = cpu_seconds(emulator.pid)
        custom = kubernetes.client.CustomObjectsApi(api)
        created: dict[str, float] = {}

        def create(index: int) -> None:
            name = f"scale-{index:04d}"
            custom.create_namespaced_custom_object(GROUP, VERSION, "default", PLURAL, job(name))
            created[name] = time.monotonic()

        spy = None
        if args.profile:  # py-spy (pip install py-spy) sampling the operator's fan-out
            spy = subprocess.Popen(
                ["py-spy", "record", "--gil", "-p", str(operator.pid), "-d", "20", "-r", "100"]
                + ["-f", "raw", "-o", str(args.profile)]
            )
        started = time.monotonic()
        with ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(create, range(args.jobs)))
        create_seconds = time.monotonic() - started
        planned = 0
        while time.monotonic() - started < args.timeout:
            if len(watch.seen) >= args.jobs:
                items = custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)
                planned = sum(1 for i in items["items"] if (i.get("status") or {}).get("plan"))
                if planned == args.jobs:
                    break
            time.sleep(1.0)
        all_done_seconds = time.monotonic() - started
        latencies = [watch.seen[n] - t for n, t in created.items() if n in watch.seen]
        fanout_counts = read_counts(work)
        if spy is not None:
            spy.wait()
        fanout_cpu = cpu_seconds(operator.pid) - operator_cpu_ready
        emulator_fanout_cpu = cpu_seconds(emulator.pid) - emulator_cpu_ready

        time.sleep(5)  # let the last events settle before the steady window
        before, cpu_before = read_counts(work), cpu_seconds(operator.pid)
        time.sleep(args.steady)
        after, cpu_after = read_counts(work), cpu_seconds(operator.pid)
        steady = diff(after, before)
        steady_total = sum(steady.values())

        core = kubernetes.client.CoreV1Api(api)
        pods = core.list_namespaced_pod("default", label_selector=LABEL_JOB).items
        pods_per_job = Counter((p.metadata.labels or {}).get(LABEL_JOB) for p in pods)
        items = custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)["items"]
        phases = Counter((i.get("status") or {}).get("phase") for i in items)
        # Cross-check from the API's own timestamps (whole seconds): pod creation - job creation.
        job_created = {i["metadata"]["name"]: i["metadata"]["creationTimestamp"] for i in items}
        server_latencies = [
            (p.metadata.creation_timestamp - parse_time(job_created[name])).total_seconds()
            for p in pods
            if (name := (p.metadata.labels or {}).get(LABEL_JOB)) in job_created
        ]
        log = (work / "operator.log").read_text(errors="replace")
        status_writes = after.get("PATCH sftjobs/status", 0)
        result = {
            "jobs": args.jobs,
            "create_s": round(create_seconds, 1),
            "all_planned_and_pods_s": round(all_done_seconds, 1),
            "apply_to_pod_s": {
                "p50": round(statistics.median(latencies), 3) if latencies else None,
                "p99": round(percentile(latencies, 0.99), 3) if latencies else None,
                "max": round(max(latencies), 3) if latencies else None,
            },
            "apply_to_pod_by_creation_timestamps_s": {
                "p50": statistics.median(server_latencies) if server_latencies else None,
                "p99": percentile(server_latencies, 0.99) if server_latencies else None,
            },
            "planned": planned,
            "jobs_with_one_pod": sum(1 for n in created if pods_per_job.get(n) == 1),
            "pods": len(pods),
            "phases": dict(phases),
            "operator_peak_rss_mib": round(proc_status(operator.pid, "VmHWM"), 1),
            "operator_rss_mib": round(proc_status(operator.pid, "VmRSS"), 1),
            "operator_cpu_s_fanout": round(fanout_cpu, 1),
            "emulator_cpu_s_fanout": round(emulator_fanout_cpu, 1),
            "fanout_requests": fanout_counts,
            "steady_window_s": args.steady,
            "resync_s": args.resync,
            "steady_requests_per_s": round(steady_total / args.steady, 2),
            "steady_requests": steady,
            "steady_cpu_percent_of_a_core": round(100 * (cpu_after - cpu_before) / args.steady, 1),
            "status_writes_per_job": round(status_writes / args.jobs, 2),
            "pool_full_warnings": log.count("Connection pool is full"),
            "operator_errors": log.count(" ERROR "),
            "cpus": os.cpu_count(),
            "loadavg": os.getloadavg(),
            "workdir": str(work),
        }
        print(json.dumps(result, indent=1))
        ok = planned == args.jobs and result["jobs_with_one_pod"] == args.jobs
        return 0 if ok else 1
    finally:
        if operator is not None:
            operator.terminate()
            operator.wait(timeout=30)
        emulator.terminate()
        emulator.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
