"""How the operator scales: N SFTJobs applied at once on the API emulator.

    .venv/bin/python bench/operator_scale.py --jobs 200

Starts the emulator (no node: pods stay Pending, which is all this measures), the
operator as its own process, creates N jobs from 8 client threads, and reports the
seconds until every job has a plan and its pod, and the operator's peak memory
(VmHWM). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import kubernetes
import yaml
from sftjob_local.emulator import EmulatorThread

ROOT = Path(__file__).resolve().parents[1]
GROUP, VERSION, PLURAL = "tuning.sftjob.dev", "v1alpha1", "sftjobs"


def job(name: str) -> dict:
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


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sftjob-scale-"))
    with EmulatorThread(log_dir=work / "logs") as server:
        kubeconfig = server.write_kubeconfig(work / "kubeconfig", "default")
        api = kubernetes.config.new_client_from_config(str(kubeconfig))
        crd = yaml.safe_load((ROOT / "crds" / "sftjob.yaml").read_text())
        kubernetes.client.ApiextensionsV1Api(api).create_custom_resource_definition(crd)
        env = {**os.environ, "KUBECONFIG": str(kubeconfig)}
        operator = subprocess.Popen(
            [sys.executable, "-m", "sftjob_operator.cli", "operator", "-A", "--standalone"],
            env=env,
            stdout=(work / "operator.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        try:
            time.sleep(3)  # operator start-up is not what is measured
            custom = kubernetes.client.CustomObjectsApi(api)
            core = kubernetes.client.CoreV1Api(api)
            started = time.monotonic()
            with ThreadPoolExecutor(8) as pool:
                list(
                    pool.map(
                        lambda i: custom.create_namespaced_custom_object(
                            GROUP, VERSION, "default", PLURAL, job(f"scale-{i:04d}")
                        ),
                        range(args.jobs),
                    )
                )
            created = time.monotonic() - started
            planned = pods = 0
            while time.monotonic() - started < args.timeout:
                items = custom.list_namespaced_custom_object(GROUP, VERSION, "default", PLURAL)[
                    "items"
                ]
                planned = sum(1 for i in items if (i.get("status") or {}).get("plan"))
                pods = len(core.list_namespaced_pod("default").items)
                if planned == args.jobs and pods == args.jobs:
                    break
                time.sleep(0.5)
            elapsed = time.monotonic() - started
            print(
                json.dumps(
                    {
                        "jobs": args.jobs,
                        "create_s": round(created, 1),
                        "all_planned_and_pods_s": round(elapsed, 1),
                        "planned": planned,
                        "pods": pods,
                        "operator_peak_rss_mib": round(peak_rss_mib(operator.pid), 1),
                        "cpus": os.cpu_count(),
                    }
                )
            )
            return 0 if planned == args.jobs and pods == args.jobs else 1
        finally:
            operator.terminate()
            operator.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
