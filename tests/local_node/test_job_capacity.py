"""An SFTJob asking for more nodes than the local cluster has room for: the
operator (a real process, as in the e2e tier) creates one pod per rank, the
local scheduler binds as many as the node's pod capacity allows and leaves the
rest Pending/Unschedulable; no trainer process starts for those.

Expected message: kube-scheduler v1.32 (noderesources/fit.go `Too many pods`,
framework/types.go FitError.Error, DefaultPreemption's suffix).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import yaml
from local_node_kit import wait_for
from sftjob_local.demo import DemoEnvironment

pytestmark = pytest.mark.local

ROOT = Path(__file__).resolve().parents[2]
RANKS = 5
MAX_PODS = 2


def kubectl(env: DemoEnvironment, *args: str) -> str:
    result = subprocess.run(
        ["kubectl", *args], env=env.env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.timeout(240)
def test_job_wider_than_the_node_leaves_extra_ranks_unschedulable(tmp_path: Path) -> None:
    with DemoEnvironment(tmp_path / "cluster", max_pods=MAX_PODS) as env:
        env.prepare_data()  # the ranks that run wait for the others at the rendezvous
        job = yaml.safe_load((ROOT / "deploy/examples/tiny-lora-2node.yaml").read_text())
        job["metadata"]["name"] = "wide"
        job["spec"]["resources"]["nodes"] = RANKS
        job["spec"]["output"]["claimName"] = "wide-output"
        env.create_claims(["wide-output"])
        manifest = tmp_path / "wide.yaml"
        manifest.write_text(yaml.safe_dump(job))
        kubectl(env, "apply", "-f", str(manifest))

        def pods() -> list[dict]:
            items = json.loads(kubectl(env, "get", "pods", "-o", "json"))["items"]
            return [p for p in items if p["metadata"]["name"].startswith("wide-")]

        def settled() -> list[dict] | None:
            current = pods()
            bound = [p for p in current if p["spec"].get("nodeName")]
            waiting = [
                p
                for p in current
                if any(
                    c["type"] == "PodScheduled" and c.get("reason") == "Unschedulable"
                    for c in p["status"].get("conditions") or []
                )
            ]
            ok = len(current) == RANKS and len(bound) == MAX_PODS
            return current if ok and len(waiting) == RANKS - MAX_PODS else None

        current = wait_for(settled, timeout=120, interval=0.5, what="ranks bound or unschedulable")
        message = (
            "0/1 nodes are available: 1 Too many pods. "
            "preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod."
        )
        ns = env.namespace
        started = {p.name.rsplit("-", 1)[0] for p in (env.workdir / "pods" / ns).iterdir()}
        for pod in current:
            name = pod["metadata"]["name"]
            if pod["spec"].get("nodeName"):
                assert name in started
                continue
            cond = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
            assert (cond["status"], cond["message"]) == ("False", message)
            assert pod["status"]["phase"] == "Pending"
            assert not pod["status"].get("containerStatuses")
            assert name not in started, f"{name} got a pod folder: a process was started"
            assert not (env.workdir / "logs" / ns / name).exists()
        assert len(started) == MAX_PODS
        events = json.loads(kubectl(env, "get", "events", "-o", "json"))["items"]
        assert any(e["reason"] == "FailedScheduling" and e["message"] == message for e in events), (
            events
        )
        kubectl(env, "delete", "sftjob", "wide", "--wait=false")
