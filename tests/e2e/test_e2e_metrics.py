"""Issue 23: the operator's Prometheus metrics during a real training run.

A tiny full fine-tune runs (the real trainer, reporting through its progress ConfigMap)
while the test scrapes the operator's /metrics as Prometheus would: the job's
`sftjob_step` advances (two increasing values seen while it runs), its total, phase and
loss follow, no MFU series on a CPU (no known peak), and every series of the job is gone
once the job is deleted.

Both modes (conftest.py): on the local control plane the operator's metrics port is
DemoEnvironment's `metrics_port`; on a real cluster the page is read through the API
server's proxy to the operator pod (port `metrics` of deploy/base/operator.yaml), which
needs `get` on pods/proxy in its namespace (SFTJOB_E2E_OPERATOR_NAMESPACE, default
sftjob-system).
"""

from __future__ import annotations

import time
import urllib.error
from collections.abc import Callable

import pytest
from e2e_harness import E2ECluster, wait_for
from metrics_kit import job_samples

pytestmark = pytest.mark.e2e

# 96 rows, micro-batch 4 x accumulation 2: 12 steps an epoch, 2 epochs; a report a second.
TINY = {"spec": {"training": {"maxLength": 64, "loggingSteps": 1}, "progressIntervalSeconds": 1}}


def operator_serves(cluster: E2ECluster) -> Callable[[], bool]:
    def answers() -> bool:
        try:
            return bool(cluster.operator_metrics())
        except urllib.error.URLError as exc:
            raise AssertionError(f"not serving yet: {exc.reason}") from None

    return answers


@pytest.mark.timeout(300)
def test_step_advances_on_the_operators_metrics_and_the_series_go_with_the_job(
    cluster: E2ECluster,
) -> None:
    name = cluster.name("metrics")
    # The operator serves /metrics once it has started (a few seconds on a busy machine,
    # and this may be the first test of the module's fresh control plane); a connection
    # refused before then is not yet an answer, as Prometheus would just scrape again.
    wait_for(operator_serves(cluster), cluster.seconds(90), "the operator's /metrics")
    cluster.submit(cluster.job_manifest("tiny-cpu.yaml", name, TINY))

    def scrape() -> dict[str, float]:
        return job_samples(cluster.operator_metrics(), cluster.namespace, name)

    # Every distinct sftjob_step value seen while the job ran, in order.
    steps: list[float] = []
    seen_running = False
    deadline = time.monotonic() + cluster.seconds(200)
    while time.monotonic() < deadline:
        series = scrape()
        if series.get("sftjob_phase:Running") == 1:
            seen_running = True
            step = series.get("sftjob_step")
            if step is not None and (not steps or step != steps[-1]):
                steps.append(step)
        if series.get("sftjob_phase:Succeeded") == 1 or series.get("sftjob_phase:Failed") == 1:
            break
        time.sleep(0.2)
    status = cluster.status(name)
    assert status.get("phase") == "Succeeded", cluster.describe(name)
    total = status["plan"]["totalSteps"]
    assert total == 24

    print("sftjob_step while Running:", steps)
    assert seen_running, "never saw sftjob_phase{phase=Running} = 1"
    assert len(steps) >= 2, f"sftjob_step did not advance while Running: {steps}"
    assert steps == sorted(steps) and len(set(steps)) == len(steps), steps
    assert steps[0] < total, steps  # seen mid-run, not only the final report

    final = wait_for(
        lambda: (s := scrape()).get("sftjob_step") == total and s, 30, "the final step"
    )
    assert final["sftjob_total_steps"] == total
    assert final["sftjob_phase:Succeeded"] == 1 and final["sftjob_phase:Running"] == 0
    assert final["sftjob_loss"] == pytest.approx(status["progress"]["loss"])
    assert final["sftjob_tokens_per_second"] > 0
    assert final["sftjob_attempts"] == 1 and final["sftjob_restarts"] == 0
    assert "sftjob_eta_seconds" not in final  # only while Running
    # A CPU has no known bf16 peak: no MFU rather than a guess (status and metrics alike).
    assert "mfu" not in status["progress"]
    assert "sftjob_model_flops_utilization_ratio" not in final

    cluster.kubectl("delete", "sftjob", name, "--wait=false")
    wait_for(lambda: scrape() == {}, cluster.seconds(60), f"every series of {name} gone")
