"""`sftjob logs -f` and `sftjob plot` on a real training job: the operator, the trainer
pod and the CLI in its own process, with the kubeconfig the tests use for kubectl.

One tiny single-node job (24 rows, 6 steps) keeps it as cheap as the tier allows.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_harness import E2ECluster
from PIL import Image, ImageStat

pytestmark = pytest.mark.e2e

TINY = {
    "spec": {
        "dataset": {"limit": 24},
        "training": {"maxLength": 64, "loggingSteps": 1, "numTrainEpochs": 2},
        "progressIntervalSeconds": 1,
    }
}


def sftjob_command(cluster: E2ECluster, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sftjob_operator.cli",
        *args,
        "-n",
        cluster.namespace,
        "--kubeconfig",
        str(cluster.kubeconfig),
    ]


@pytest.mark.timeout(300)
def test_logs_follow_the_trainer_to_its_end_and_plot_draws_its_curves(
    cluster: E2ECluster, tmp_path: Path
) -> None:
    name = cluster.name("logsplot")
    cluster.submit(cluster.job_manifest("tiny-cpu.yaml", name, TINY))

    # Started at once: it waits for the pod, then streams until the trainer ends.
    follow = subprocess.run(
        sftjob_command(cluster, "logs", name, "-f"),
        capture_output=True,
        text=True,
        timeout=cluster.seconds(200),
        env=os.environ,
    )
    assert follow.returncode == 0, follow.stderr
    pod = f"{name}-a1-r0"
    assert f"logs of pod {pod} (rank 0 of 1, attempt 1, " in follow.stderr
    # The trainer's last words: the model saved, after every step.
    assert "saved to " in follow.stdout and "/final (step " in follow.stdout, follow.stdout[-2000:]

    cluster.wait_phase(name, "Succeeded", timeout=cluster.seconds(60))
    # The whole log: what kubectl logs prints of the finished pod.
    assert follow.stdout == cluster.logs(pod)

    png = tmp_path / "loss.png"
    history = cluster.status(name)["progress"]["history"]
    plot = subprocess.run(
        sftjob_command(cluster, "plot", name, "-o", str(png)),
        capture_output=True,
        text=True,
        timeout=60,
        env=os.environ,
    )
    assert plot.returncode == 0, plot.stderr
    assert len(history) >= 2, history
    first, last = history[0]["step"], history[-1]["step"]
    assert plot.stdout == f"wrote {png}: {len(history)} points, steps {first} to {last}\n"
    with Image.open(png) as image:
        assert image.format == "PNG" and image.size == (800, 600)
        assert ImageStat.Stat(image.convert("L")).var[0] > 100  # not a blank page
