"""30 operator crash-restart cycles (kill -9 at random points) while jobs live their lives.

The test plays the kubelet (binds pods to a node, runs them, stops deleted ones after a
short SIGTERM grace) and the trainer (progress reports, termination messages). Jobs of
one and two ranks are created throughout; each gets retried failures injected (an
evicted pod, an out-of-memory rank), so relaunches happen while the operator is killed:
at random moments, right after it creates a pod (mid-launch, mid-relaunch) and right
after it changes a job's status (between the status write and its event).

Afterwards, and all along for the pods:
- no duplicate pod: never two live pods of one rank of one attempt, never live pods of
  two attempts of one job at once (a terminating pod still runs: it counts);
- no stuck job: every job reaches Succeeded;
- final step = plan: the plan is the spec's arithmetic, and the progress the status
  shows at the end is that many steps;
- restarts counted right: status.restarts is the number of failures injected (each
  one the retry policy retries);
- events counted right: one Planned, one Launched, and one Warning event per restart
  with the restart's reason, for each job.

Seeded (printed; SFTJOB_STRESS_SEED=N replays the same choices); about 2-3 minutes.
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import stress_kit as kit
from operator_harness import LIVENESS_PORT, Cluster, start_operator, tiny_job, wait_for

pytestmark = [pytest.mark.operator, pytest.mark.timeout(480)]

CYCLES = int(os.environ.get("SFTJOB_STRESS_CYCLES", "30"))
JOBS = 8
# How long a crash trigger waits for its moment before killing anyway.
TRIGGER_WAIT = 2.0
# The failures injected and the reason the retry policy gives the restart each causes
# (its Restarting condition and Warning event).
RETRIED_FAILURES = {"Evicted": "PodLost", "OutOfMemory": "OutOfMemoryShrink"}
# The events each job gets exactly once (core/v1 Event reasons) ...
ONCE_PER_JOB_EVENTS = ("Planned",)
# ... and exactly once per launch (attempt): the first launch and every relaunch.
ONCE_PER_LAUNCH_EVENTS = ("Launched",)
# How a crash point is chosen in each cycle (weights): killed while starting up, at a
# random moment once up, right after it creates a pod, right after it changes a status.
TRIGGERS = {"startup": 1, "timer": 3, "pod-created": 3, "status-changed": 3}


def planned_steps(manifest: dict[str, Any]) -> int:
    """The run's steps by the Trainer's own arithmetic (what the trainer reports as max_steps)."""
    from sftjob_operator.api import parse_sftjob
    from sftjob_operator.plan import plan_for

    total = plan_for(parse_sftjob(manifest).spec).totalSteps
    assert total is not None
    return total


@dataclass
class JobScript:
    """One job's life as the test drives it, and what it injected."""

    name: str
    nodes: int
    failures: list[tuple[str, int]]  # (failure, rank), injected in this order
    manifest: dict[str, Any]
    total_steps: int
    uid: str | None = None
    injected: list[str] = field(default_factory=list)
    acted: set[int] = field(default_factory=set)
    running_since: dict[int, float] = field(default_factory=dict)
    train_seconds: float = 0.5
    # Created in this crash cycle, this long after the operator was started in it.
    create_cycle: int = 0
    create_offset: float = 0.0
    finished: bool = False
    log: list[str] = field(default_factory=list)


class Driver(threading.Thread):
    """The kubelet and the trainers: creates the jobs on schedule and drives their pods."""

    def __init__(self, cluster: Cluster, scripts: list[JobScript], seed: int):
        super().__init__(daemon=True, name="stress-driver")
        import random

        self.cluster, self.scripts = cluster, scripts
        self.rng = random.Random(seed)
        self.kubelet = kit.Kubelet(cluster, self.rng)
        self.stopping = threading.Event()
        self.errors: list[str] = []
        self.started = time.monotonic()
        # Set by the crash loop: jobs arrive spread over the cycles, whatever the machine's speed.
        self.cycle = 0
        self.cycle_started = time.monotonic()

    def run(self) -> None:
        while not self.stopping.is_set():
            try:
                self._round()
            except Exception as exc:  # noqa: BLE001  (reported by the test, not lost)
                self.errors.append(repr(exc))
                if len(self.errors) > 20:
                    return
            time.sleep(0.1)

    def _round(self) -> None:
        elapsed = time.monotonic() - self.started
        for script in self.scripts:
            due = (script.create_cycle, script.create_offset)
            if script.uid is None and (self.cycle, time.monotonic() - self.cycle_started) >= due:
                created = self.cluster.create_job(script.manifest)
                script.uid = created["metadata"]["uid"]
                script.log.append(f"{elapsed:6.1f}s created")
        pods = self.cluster.pods()
        self.kubelet.step(pods)
        for script in self.scripts:
            if script.uid is not None and not script.finished:
                self._act(script, pods)

    def _act(self, script: JobScript, pods: list[dict[str, Any]]) -> None:
        """Once every rank of the newest attempt runs: inject the next failure, or finish."""
        ranks_by_attempt: dict[int, dict[int, dict[str, Any]]] = {}
        for pod in pods:
            labels = pod["metadata"].get("labels") or {}
            if labels.get(kit.LABEL_JOB) != script.name or script.uid not in kit.owner_uids(pod):
                continue
            if pod["metadata"].get("deletionTimestamp"):
                continue
            attempt, rank = int(labels[kit.LABEL_ATTEMPT]), int(labels[kit.LABEL_RANK])
            ranks_by_attempt.setdefault(attempt, {})[rank] = pod
        if not ranks_by_attempt:
            return
        attempt = max(ranks_by_attempt)
        ranks = ranks_by_attempt[attempt]
        if attempt in script.acted:
            return
        running = len(ranks) == script.nodes and all(
            (p.get("status") or {}).get("phase") == "Running" for p in ranks.values()
        )
        if not running:
            script.running_since.pop(attempt, None)
            return
        since = script.running_since.setdefault(attempt, time.monotonic())
        if time.monotonic() - since < script.train_seconds:
            return
        script.acted.add(attempt)
        elapsed = time.monotonic() - self.started
        if script.failures:
            failure, rank = script.failures.pop(0)
            step = self.rng.randint(1, script.total_steps - 1)
            kit.report_progress(self.cluster, script.name, step, script.total_steps, attempt)
            pod = ranks[rank]["metadata"]["name"]
            if failure == "Evicted":
                self.cluster.set_pod(pod, "Failed", exit_code=137, pod_reason="Evicted")
            else:
                self.cluster.fail_pod(pod, failure, "CUDA out of memory", step=step)
            script.injected.append(failure)
            script.log.append(
                f"{elapsed:6.1f}s attempt {attempt}: {failure} on {pod} at step {step}"
            )
        else:
            kit.report_progress(
                self.cluster, script.name, script.total_steps, script.total_steps, attempt
            )
            for rank in self.rng.sample(sorted(ranks), len(ranks)):
                self.cluster.set_pod(ranks[rank]["metadata"]["name"], "Succeeded")
            script.finished = True
            script.log.append(f"{elapsed:6.1f}s attempt {attempt}: all ranks Succeeded")


def make_scripts(rng: Any) -> list[JobScript]:
    scripts = []
    for index in range(JOBS):
        nodes = rng.choice((1, 2))
        name = f"crash{index}-n{nodes}"
        manifest = tiny_job(name, resources={"nodes": nodes}, retry={"maxRestarts": 6})
        count = rng.randint(1, 3)
        # An out-of-memory relaunch halves the micro-batch (4 -> 2): at most one per job.
        kinds = (
            ["OutOfMemory"] + ["Evicted"] * (count - 1)
            if rng.random() < 0.4
            else ["Evicted"] * count
        )
        rng.shuffle(kinds)
        failures = [(kind, rng.randrange(nodes)) for kind in kinds]
        script = JobScript(name, nodes, failures, manifest, planned_steps(manifest))
        script.train_seconds = rng.uniform(0.3, 2.0)
        # Jobs arrive until a few cycles before the last: their relaunches meet crashes too.
        script.create_cycle = index * max(CYCLES - 6, 0) // JOBS
        script.create_offset = rng.uniform(0.0, 3.0)
        scripts.append(script)
    return scripts


def kill_at_a_random_point(
    cycle: int,
    rng: Any,
    kubeconfig: Path,
    logs: Path,
    pods: kit.PodLedger,
    jobs: kit.JobLedger,
) -> str:
    """Start the operator, kill -9 it at a point chosen by `rng`; say where."""
    pods_before, statuses_before = pods.added, jobs.status_changes
    process = start_operator(kubeconfig, logs / f"operator-{cycle:02d}.log")
    spawned = time.monotonic()
    trigger = rng.choices(list(TRIGGERS), weights=list(TRIGGERS.values()))[0]
    try:
        if trigger == "startup":
            time.sleep(rng.uniform(0.2, 2.5))
        else:
            # Up = its liveness endpoint answers (operator_harness starts it with --liveness).
            if not kit.wait_ready(LIVENESS_PORT, 60):
                raise AssertionError(f"cycle {cycle}: the operator's liveness probe never answered")
            if trigger == "timer":
                time.sleep(rng.uniform(0.0, 1.2))
            elif trigger == "pod-created":
                if not pods.wait_added(pods_before, TRIGGER_WAIT):
                    trigger += f" (none in {TRIGGER_WAIT}s)"
            else:
                if not jobs.wait_status_change(statuses_before, TRIGGER_WAIT):
                    trigger += f" (none in {TRIGGER_WAIT}s)"
    finally:
        process.kill()  # SIGKILL: no cleanup, no last write
        process.wait()
    return f"cycle {cycle:2d}: {trigger}, killed {time.monotonic() - spawned:.2f}s after start"


def test_thirty_crash_restart_cycles(
    cluster: Cluster, emulator: tuple[Any, Path], tmp_path: Path
) -> None:
    _, kubeconfig = emulator
    rng, seed = kit.seeded_rng("test_thirty_crash_restart_cycles")
    scripts = make_scripts(rng)
    pods, jobs = kit.PodLedger(), kit.JobLedger()
    watchers = [kit.watch_pods(cluster, pods), kit.watch_jobs(cluster, jobs.on_event)]
    driver = Driver(cluster, scripts, rng.randrange(2**32))
    crashes: list[str] = []
    final: subprocess.Popen[bytes] | None = None
    started = time.monotonic()
    try:
        driver.start()
        for cycle in range(CYCLES):
            driver.cycle, driver.cycle_started = cycle, time.monotonic()
            crashes.append(kill_at_a_random_point(cycle, rng, kubeconfig, tmp_path, pods, jobs))
            time.sleep(rng.uniform(0.0, 0.3))  # down for a moment: the kubelet goes on
        chaos_seconds = time.monotonic() - started
        final = start_operator(kubeconfig, tmp_path / "operator-final.log")
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not driver.errors:
            if all(s.uid for s in scripts) and all(
                (kit.try_job(cluster, s.name) or {}).get("status", {}).get("phase") in kit.TERMINAL
                for s in scripts
            ):
                break
            time.sleep(0.5)
        time.sleep(2.0)  # late writes (a duplicate pod, a second event) would show by now
        problems = check_outcome(cluster, scripts, pods)
    finally:
        driver.stopping.set()
        driver.join(10)
        for watcher in watchers:
            watcher.stop()
        if final is not None:
            final.terminate()
            try:
                final.wait(15)
            except subprocess.TimeoutExpired:
                final.kill()
                final.wait()
    summary = "\n".join(
        [f"seed {seed}; {CYCLES} crashes in {chaos_seconds:.0f}s; operator logs in {tmp_path}"]
        + crashes
        + [f"{s.name}: " + "; ".join(s.log) for s in scripts]
    )
    print(summary)
    assert not driver.errors, f"the test's kubelet failed: {driver.errors[:3]}\n{summary}"
    assert not problems, "\n".join(problems) + "\n\n" + summary


def check_outcome(cluster: Cluster, scripts: list[JobScript], pods: kit.PodLedger) -> list[str]:
    """Every broken promise, each naming its job (and rank, attempt or event)."""
    problems = [str(v) for v in pods.violations]
    for script in scripts:
        name = script.name
        job = kit.try_job(cluster, name)
        if job is None or script.uid is None:
            problems.append(f"{name}: missing (uid {script.uid})")
            continue
        status = job.get("status") or {}
        if status.get("phase") != "Succeeded":
            conditions = [
                (c["type"], c["status"], c.get("reason")) for c in status.get("conditions") or []
            ]
            problems.append(
                f"{name}: stuck in phase {status.get('phase')} (attempts {status.get('attempts')}, "
                f"restarts {status.get('restarts')}, conditions {conditions}, "
                f"still to inject {script.failures}, finished by the test: {script.finished})"
            )
        planned = (status.get("plan") or {}).get("totalSteps")
        if planned != script.total_steps:
            problems.append(
                f"{name}: plan totalSteps {planned}, the spec's arithmetic gives {script.total_steps}"
            )
        try:
            wait_for(
                lambda name=name, total=script.total_steps: (
                    kit.recorded_progress(cluster.job(name))[0] == total
                ),
                10,
                f"{name}'s final progress",
            )
        except AssertionError:
            problems.append(
                f"{name}: final progress (step, totalSteps) {kit.recorded_progress(cluster.job(name))}, "
                f"plan {script.total_steps}"
            )
        expected_reasons = [RETRIED_FAILURES[f] for f in script.injected]
        if status.get("restarts", 0) != len(expected_reasons):
            problems.append(
                f"{name}: status.restarts {status.get('restarts', 0)}, injected {len(expected_reasons)} "
                f"retried failures {script.injected} (attempts {status.get('attempts')}, "
                f"lastFailure {status.get('lastFailure')})"
            )
        events = kit.job_events(cluster, name, script.uid)
        counts = Counter()
        warnings: Counter[str] = Counter()
        for event in events:
            counts[event["reason"]] += kit.event_count(event)
            if event.get("type") == "Warning":
                warnings[event["reason"]] += kit.event_count(event)
        for reason in ONCE_PER_JOB_EVENTS:
            if counts[reason] != 1:
                problems.append(f"{name}: {counts[reason]} {reason} event(s), expected 1")
        launches = len(expected_reasons) + 1
        for reason in ONCE_PER_LAUNCH_EVENTS:
            if counts[reason] != launches:
                problems.append(
                    f"{name}: {counts[reason]} {reason} event(s), expected one per launch "
                    f"({launches})"
                )
        if warnings != Counter(expected_reasons):
            problems.append(
                f"{name}: Warning events {dict(warnings)}, expected one per restart "
                f"{dict(Counter(expected_reasons))}"
            )
    return problems
