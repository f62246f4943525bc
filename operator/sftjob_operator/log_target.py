"""Pure choice of the pod whose trainer log `sftjob logs` prints, or why there is none.

The operator names pods `<job>-a<attempt>-r<rank>` and labels them with the job, the
attempt and the rank (children.py); only the pods whose controller ownerReference names
the job's uid are its own (a previous job of the same name may have left pods behind).
An attempt's pods are deleted when the next attempt launches, so only the current
attempt (`status.attempts`) normally has pods to read.

Jobs and pods are plain dicts in the API's camelCase, as kube.py returns them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from .pod_state import owned_by, pod_attempt, pod_phase, pod_rank, start_blocker

# The container children.build_pod runs the trainer in (a pod may carry injected sidecars).
TRAINER_CONTAINER = "trainer"

# Conditions that say why a job has no running pod, in the order they explain it best.
_WHY_NO_POD = (
    ("Failed", "True"),
    ("Suspended", "True"),
    ("ChildrenCreated", "False"),
    ("Running", "False"),
    ("Restarting", "True"),
)


class NoLogs(Exception):
    """No log to read, with what to do about it.

    `may_come` is true when waiting can help (a pod not created or not started yet):
    `sftjob logs -f` then waits instead of giving up.
    """

    def __init__(self, message: str, *, may_come: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.may_come = may_come


@dataclass(frozen=True)
class LogTarget:
    """The pod to read: its name, and which rank of how many, of which attempt."""

    pod: str
    rank: int
    ranks: int
    attempt: int
    attempts: int
    phase: str

    def describe(self) -> str:
        attempt = f"attempt {self.attempt}" + (f" of {self.attempts}" if self.attempts > 1 else "")
        return f"pod {self.pod} (rank {self.rank} of {self.ranks}, {attempt}, {self.phase})"


def job_missing(name: str, namespace: str) -> str:
    return (
        f"no SFTJob {name!r} in namespace {namespace!r}: `kubectl get sft -n {namespace}` "
        "lists its jobs; -n NAMESPACE (or --context) reads another namespace"
    )


def rank_count(job: dict[str, Any]) -> int:
    """Ranks of the run: one pod per node (spec.resources.nodes, 1 by default)."""
    resources = (job.get("spec") or {}).get("resources") or {}
    try:
        return max(1, int(resources.get("nodes") or 1))
    except (TypeError, ValueError):
        return 1


def job_phase(job: dict[str, Any]) -> str:
    return str((job.get("status") or {}).get("phase") or "Pending")


def finished(job: dict[str, Any]) -> bool:
    """Succeeded or Failed: no pod of it will start any more."""
    return job_phase(job) in ("Succeeded", "Failed")


def why_no_pod(job: dict[str, Any]) -> str:
    """The condition that tells why no trainer runs ("reason: message"), or ""."""
    conditions = (job.get("status") or {}).get("conditions") or []
    for kind, status in _WHY_NO_POD:
        for condition in conditions:
            if condition.get("type") == kind and condition.get("status") == status:
                reason = condition.get("reason") or kind
                message = condition.get("message") or ""
                return f"{reason}: {message}" if message else str(reason)
    return ""


def _phase_and_why(job: dict[str, Any]) -> str:
    why = why_no_pod(job)
    return f"phase {job_phase(job)}" + (f"; {why}" if why else "")


def container_started(pod: dict[str, Any], container: str = TRAINER_CONTAINER) -> bool:
    """Whether the container ran at least once, so the node holds a log of it."""
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        if status.get("name") != container:
            continue
        state = status.get("state") or {}
        last = status.get("lastState") or {}
        return "running" in state or "terminated" in state or "terminated" in last
    return False


def choose_pod(
    job: dict[str, Any],
    pods: Iterable[dict[str, Any]],
    rank: int = 0,
    attempt: int | None = None,
) -> LogTarget:
    """The pod of `rank` in `attempt` (default: the current one) whose log can be read.

    Raises NoLogs saying why there is none and what to do.
    """
    name = job["metadata"]["name"]
    status = job.get("status") or {}
    ranks = rank_count(job)
    if not 0 <= rank < ranks:
        raise NoLogs(
            f"rank {rank} is out of range: job {name} runs {ranks} rank(s), "
            f"--rank 0{f' to {ranks - 1}' if ranks > 1 else ''}"
        )
    attempts = int(status.get("attempts") or 0)
    if attempts == 0:
        if finished(job):  # refused before its launch (policy, spec): no pod will come
            raise NoLogs(f"job {name} never ran a pod ({_phase_and_why(job)})")
        raise NoLogs(f"job {name} has no pod yet ({_phase_and_why(job)})", may_come=True)
    chosen = attempts if attempt is None else attempt
    if not 1 <= chosen <= attempts:
        raise NoLogs(
            f"job {name} has no attempt {chosen}: it has had {attempts} attempt(s), "
            f"--attempt 1{f' to {attempts}' if attempts > 1 else ''}"
        )
    uid = job["metadata"].get("uid")
    ours = [p for p in pods if owned_by(p, uid) and pod_attempt(p) == chosen]
    found = next((p for p in ours if pod_rank(p) == rank), None)
    if found is None:
        raise _missing_pod(job, chosen, attempts, rank, ranks)
    pod_name = found["metadata"]["name"]
    if not container_started(found):
        blocker = start_blocker(found)
        why = f"{blocker.reason}: {blocker.message}" if blocker else _phase_and_why(job)
        raise NoLogs(
            f"pod {pod_name} has not started yet (pod phase {pod_phase(found)}; {why})",
            may_come=not finished(job),
        )
    return LogTarget(pod_name, rank, ranks, chosen, attempts, pod_phase(found))


def _missing_pod(job: dict[str, Any], chosen: int, attempts: int, rank: int, ranks: int) -> NoLogs:
    """Why the pod of `rank` in attempt `chosen` is not there."""
    name = job["metadata"]["name"]
    status = job.get("status") or {}
    who = f"rank {rank}" if ranks > 1 else "the pod"
    if chosen < attempts:
        failure = status.get("lastFailure") or {}
        ended = ""
        if failure.get("attempt") == chosen and failure.get("reason"):
            ended = f"; it ended with {failure['reason']}: {failure.get('message') or ''}"
        return NoLogs(
            f"the pods of attempt {chosen} of job {name} were deleted when attempt "
            f"{chosen + 1} launched{ended.rstrip(': ')}. The operator keeps only the current "
            f"attempt's pods: `sftjob logs {name}` reads attempt {attempts}; "
            f"`kubectl describe sft {name}` lists the events of earlier attempts"
        )
    launched = status.get("launchedAttempt")
    if launched is not None and int(launched) < attempts:
        wait = status.get("nextAttemptTime")
        return NoLogs(
            f"attempt {attempts} of job {name} is being launched ({_phase_and_why(job)}): "
            "its pods are created once the previous attempt's pods are gone"
            + (f" and the retry backoff ends at {wait}" if wait else ""),
            may_come=True,
        )
    if finished(job):
        return NoLogs(
            f"{who} of job {name} (attempt {chosen}) is gone; the job finished "
            f"({_phase_and_why(job)}) and its pods were deleted"
        )
    return NoLogs(
        f"{who} of job {name} (attempt {chosen}) is not there yet ({_phase_and_why(job)})",
        may_come=True,
    )
