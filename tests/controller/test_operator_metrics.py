"""The operator's /metrics, scraped over HTTP while it runs a job (issue 23): the job's
series follow its progress and vanish once the job is deleted."""

from __future__ import annotations

import urllib.request

import pytest
import stress_kit as kit
from metrics_kit import job_samples
from operator_harness import METRICS_PORT, Cluster, tiny_job, wait_for

pytestmark = [pytest.mark.operator, pytest.mark.timeout(120)]


def scrape_job(cluster: Cluster, name: str) -> dict[str, float]:
    """The job's samples on the operator's /metrics, by name (phase series as name:phase)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{METRICS_PORT}/metrics", timeout=5) as reply:
        return job_samples(reply.read().decode(), cluster.namespace, name)


def test_job_series_follow_progress_and_vanish_on_delete(
    cluster: Cluster, operator_process
) -> None:
    cluster.create_job(tiny_job("watched"))
    [pod] = wait_for(lambda: cluster.live_pods("watched"), 20, "the job's pod")
    cluster.set_pod(pod["metadata"]["name"], "Running")
    wait_for(
        lambda: scrape_job(cluster, "watched").get("sftjob_phase:Running") == 1,
        20,
        "sftjob_phase Running = 1",
    )

    seen_steps = []
    for step in (2, 5):
        kit.report_progress(cluster, "watched", step, total_steps=8)
        series = wait_for(
            lambda step=step: (
                (s := scrape_job(cluster, "watched")).get("sftjob_step") == step and s
            ),
            20,
            f"sftjob_step {step}",
        )
        seen_steps.append(series["sftjob_step"])
        assert series["sftjob_total_steps"] == 8
        assert series["sftjob_loss"] == pytest.approx(1.0 / (1 + step))
        assert series["sftjob_phase:Running"] == 1 and series["sftjob_phase:Pending"] == 0
    assert seen_steps == [2, 5]

    cluster.delete_job("watched")
    wait_for(lambda: scrape_job(cluster, "watched") == {}, 20, "the job's series gone")
