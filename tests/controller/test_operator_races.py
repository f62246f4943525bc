"""Create-then-delete races, and create/delete/create cycles of one name.

(a) 100 jobs, each deleted 0 to 1.5 s after its creation (0 included, the delays spread
evenly and shuffled, ten races at a time): 5 s after its delete nothing of a job may
remain or still be written: no pod, no ConfigMap, ServiceAccount, Role, RoleBinding or
Service (found by the job-name label AND by an ownerReference to the job's uid), and no
request that writes for it (status patch, child create, event) may reach the API server.
Writes to a job that is gone answer 404 and change nothing a watch could see, so the
test counts them where they arrive: at the API server (stress_kit.RequestTap).

The emulator's garbage collector deletes a job's dependents when the job is removed;
objects created afterwards with an ownerReference to the vanished uid are never
collected there (a real cluster's collector would delete them after looking the owner
up): anything the operator creates after the delete therefore shows as a survivor, and
each survivor says whether its create came before or after the delete.

(b) 20 create/delete/create cycles of one name, each earlier job deleted 0 to 1.2 s after
its creation or once its pod runs (always so for the one just before the last, whose
pod, terminating, is still there under the same name when the last job arrives; the
test's kubelet stops a deleted pod 0.5-2.5 s later): the last job (another spec) keeps its own plan, its phase only moves
forward (watched from its creation until it has run for a few seconds), and it owns
every pod and child carrying its name: no pod of an earlier job is adopted (so it has one
attempt, no restart, no failure, one Planned and one Launched event).
"""

from __future__ import annotations

import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import stress_kit as kit
from operator_harness import Cluster, tiny_job, wait_for

pytestmark = [pytest.mark.operator, pytest.mark.timeout(300)]

RACES = 100
MAX_DELAY = 1.5
CONCURRENT = 10
# What the issue allows: nothing of a deleted job survives it by more than this.
SURVIVAL_BOUND = 5.0
# How long past the bound the test keeps listening for a ghost's writes.
GHOST_WATCH = 4.0
CYCLES = 20


def warm_up(cluster: Cluster) -> None:
    """The operator must be watching already, or it never sees the racing jobs at all."""
    cluster.create_job(tiny_job("warm"))
    wait_for(lambda: cluster.pods("warm"), 30, "the warm-up job's pod")


@dataclass
class Race:
    name: str
    delay: float
    uid: str = ""
    created_at: float = 0.0
    deleted_at: float = 0.0


def writes_for(request: kit.Request, name: str, uid: str) -> bool:
    """Whether `request` writes something for job `name`/`uid` (the job, a child, an event)."""
    addressed = request.sftjob()
    if addressed is not None:
        return addressed[0] == name
    body = request.body if isinstance(request.body, dict) else {}
    meta = body.get("metadata") or {}
    if (meta.get("labels") or {}).get(kit.LABEL_JOB) == name or uid in kit.owner_uids(body):
        return True
    return (body.get("involvedObject") or {}).get("uid") == uid


def created_name(request: kit.Request) -> str:
    meta = (request.body or {}).get("metadata") or {} if isinstance(request.body, dict) else {}
    return f"{request.parts[-1]}/{meta.get('name') or meta.get('generateName')}"


def test_create_then_delete_races(
    cluster: Cluster, emulator: tuple[Any, Path], operator_process: object
) -> None:
    server, _ = emulator
    rng, seed = kit.seeded_rng("test_create_then_delete_races")
    warm_up(cluster)
    delays = [MAX_DELAY * i / (RACES - 1) for i in range(RACES)]
    rng.shuffle(delays)
    races = [Race(f"race{i:03d}", delay) for i, delay in enumerate(delays)]

    def run(race: Race) -> None:
        created = cluster.create_job(tiny_job(race.name))
        race.uid, race.created_at = created["metadata"]["uid"], time.monotonic()
        time.sleep(race.delay)
        cluster.delete_job(race.name)
        race.deleted_at = time.monotonic()

    with kit.RequestTap(server) as tap:
        with ThreadPoolExecutor(CONCURRENT) as pool:
            list(pool.map(run, races))
        # Every race's bound has passed; a ghost's next writes would arrive meanwhile.
        time.sleep(max(0.0, max(r.deleted_at for r in races) + SURVIVAL_BOUND - time.monotonic()))
        time.sleep(GHOST_WATCH)
        checked_at = time.monotonic()
        children = kit.all_children(cluster)
        remaining = {j["metadata"]["name"]: j for j in cluster.jobs()}
        requests = list(tap.records)

    problems = []
    for race in races:
        label = f"{race.name} (uid {race.uid}, deleted {race.delay:.2f}s after its create)"
        if race.name in remaining:
            meta = remaining[race.name]["metadata"]
            problems.append(
                f"{label}: the job still exists {checked_at - race.deleted_at:.1f}s after its "
                f"delete (deletionTimestamp {meta.get('deletionTimestamp')}, finalizers "
                f"{meta.get('finalizers')})"
            )
        survivors = kit.children_of(children, race.name, race.uid)
        if survivors:
            creates = {
                created_name(r): r.at - race.deleted_at
                for r in requests
                if r.method == "POST" and r.status == 201 and writes_for(r, race.name, race.uid)
            }
            problems.append(
                f"{label}: {survivors} still exist {checked_at - race.deleted_at:.1f}s after "
                f"the delete; their creates came at (s after the delete) "
                f"{ {k: round(v, 2) for k, v in creates.items()} }"
            )
        late = [
            f"{r.method} {r.path} -> {r.status} at +{r.at - race.deleted_at:.1f}s"
            for r in requests
            if r.at > race.deleted_at + SURVIVAL_BOUND and writes_for(r, race.name, race.uid)
        ]
        if late:
            problems.append(
                f"{label}: {len(late)} write(s) more than {SURVIVAL_BOUND:.0f}s after the "
                f"delete, the first: {late[:3]}"
            )
    broken = len({p.split(" ", 1)[0] for p in problems})
    assert not problems, f"seed {seed}: {broken} of {RACES} races left something\n" + "\n".join(
        problems
    )


def test_create_delete_create_cycles_of_one_name(
    cluster: Cluster, emulator: tuple[Any, Path], operator_process: object
) -> None:
    rng, seed = kit.seeded_rng("test_create_delete_create_cycles_of_one_name")
    name = "phoenix"
    warm_up(cluster)
    jobs = kit.JobLedger()
    pods = kit.PodLedger()
    watchers = [
        kit.watch_jobs(cluster, jobs.on_event, field_selector=f"metadata.name={name}"),
        kit.watch_pods(cluster, pods),
    ]
    # Every pod is bound and run; a deleted one keeps running for its SIGTERM checkpoint
    # (0.5-2.5 s) before it is gone: pods of the job just deleted may still be there, under
    # the same names, when the next job of that name is created.
    kubelet = kit.KubeletThread(kit.Kubelet(cluster, rng, stop_delay=(0.5, 2.5)))
    kubelet.start()
    earlier: list[str] = []
    try:
        for cycle in range(CYCLES):
            # Earlier jobs plan 8 or 16 steps; the last one plans 24.
            created = cluster.create_job(tiny_job(name, training={"numTrainEpochs": 1 + cycle % 2}))
            earlier.append(created["metadata"]["uid"])
            if cycle == CYCLES - 1 or rng.random() < 0.3:
                # Deleted while its pod runs: that pod, terminating, is still there (same
                # name, same labels) when the next job of this name arrives.
                wait_for(
                    lambda uid=earlier[-1]: any(
                        uid in kit.owner_uids(p) and p["status"].get("phase") == "Running"
                        for p in cluster.live_pods(name)
                    ),
                    30,
                    f"cycle {cycle}: a running pod of {earlier[-1]}",
                )
            else:
                time.sleep(rng.uniform(0.0, 1.2))  # planned, launched, or not yet seen
            cluster.delete_job(name)
            wait_for(
                lambda uid=earlier[-1]: (
                    (kit.try_job(cluster, name) or {}).get("metadata", {}).get("uid") != uid
                ),
                15,
                f"cycle {cycle}: job {earlier[-1]} gone",
            )
        pods_before = {p["metadata"]["uid"] for p in pods.pods.values()}
        last = cluster.create_job(tiny_job(name, training={"numTrainEpochs": 3}))
        uid = last["metadata"]["uid"]
        wait_for(
            lambda: (
                (cluster.job(name).get("status") or {}).get("phase") == "Running"
                and any(uid in kit.owner_uids(p) for p in cluster.live_pods(name))
            ),
            30,
            f"the last {name} ({uid}) Running with a pod of its own",
        )
        time.sleep(4.0)  # a ghost of an earlier job would write within its 2 s ticks
        final = cluster.job(name)
        history = [h for h in jobs.history.get(name, []) if h["uid"] == uid]
        children = kit.all_children(cluster)
        events = kit.job_events(cluster, name, uid)
        live_pods = [p for p in cluster.pods(name)]
    finally:
        kubelet.stop()
        for watcher in watchers:
            watcher.stop()

    problems = [f"the test's kubelet failed: {e}" for e in kubelet.errors[:3]]
    plans = [(h["status"].get("plan") or {}).get("totalSteps") for h in history]
    if set(plans) - {None, 24}:
        problems.append(f"the last job's plan totalSteps went through {plans}; its spec gives 24")
    phases = [h["status"].get("phase") for h in history if h["type"] != "DELETED"]
    moves = [p for i, p in enumerate(phases) if i == 0 or p != phases[i - 1]]
    order = [None, "Pending", "Running"]
    if any(p not in order for p in moves) or moves != sorted(moves, key=order.index):
        problems.append(f"the last job's phase flapped: {moves}")
    status = final.get("status") or {}
    if (status.get("attempts"), status.get("restarts", 0), status.get("lastFailure")) != (
        1,
        0,
        None,
    ):
        problems.append(
            f"the last job's attempts/restarts/lastFailure are {status.get('attempts')}, "
            f"{status.get('restarts')}, {status.get('lastFailure')}: expected 1, 0, none"
        )
    for pod in live_pods:
        owners = kit.owner_uids(pod)
        if owners != {uid} or pod["metadata"]["uid"] in pods_before:
            problems.append(
                f"pod {pod['metadata']['name']} (owners {owners}) is not the last job's own: "
                f"earlier jobs {[u for u in earlier if u in owners]}"
            )
    for kind, obj in children:
        labels = obj["metadata"].get("labels") or {}
        if labels.get(kit.LABEL_JOB) == name and kit.owner_uids(obj) != {uid}:
            problems.append(
                f"{kind}/{obj['metadata']['name']} carries {name}'s label but is owned by "
                f"{kit.owner_uids(obj)}, not the last job {uid}"
            )
    reasons = Counter(e["reason"] for e in events for _ in range(kit.event_count(e)))
    if reasons["Planned"] != 1 or reasons["Launched"] != 1:
        problems.append(
            f"the last job's events: {dict(reasons)}; expected one Planned, one Launched"
        )
    header = f"seed {seed}; the last {name} is {uid}; the {len(earlier)} before it ended with {earlier[-1]}"
    assert not problems, header + "\n" + "\n".join(problems)
