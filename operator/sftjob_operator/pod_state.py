"""Pure reading of a pod as the API reports it: its attempt, rank, phase and states.

Pods are plain dicts in the API's camelCase (what `kube.py` returns); nothing here
talks to the API.
"""

from __future__ import annotations

from typing import Any

from .children import LABEL_ATTEMPT, LABEL_RANK


def pod_attempt(pod: dict[str, Any]) -> int:
    try:
        return int(pod["metadata"]["labels"][LABEL_ATTEMPT])
    except (KeyError, ValueError):
        return 0


def pod_rank(pod: dict[str, Any]) -> int:
    try:
        return int(pod["metadata"]["labels"][LABEL_RANK])
    except (KeyError, ValueError):
        return -1


def pod_phase(pod: dict[str, Any]) -> str:
    return str((pod.get("status") or {}).get("phase") or "Pending")


def terminated_state(pod: dict[str, Any]) -> dict[str, Any]:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        state = status.get("state") or {}
        if "terminated" in state:
            return dict(state["terminated"])
    return {}


def unschedulable_message(pod: dict[str, Any]) -> str | None:
    for condition in (pod.get("status") or {}).get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("reason") == "Unschedulable":
            return str(condition.get("message") or "no node fits the pod")
    return None


def is_live(pod: dict[str, Any]) -> bool:
    """Pending or Running and not being deleted."""
    return pod_phase(pod) in ("Pending", "Running") and not pod["metadata"].get("deletionTimestamp")


def owned_by(obj: dict[str, Any], uid: str | None) -> bool:
    """Whether `obj`'s controller ownerReference names the object with `uid`.

    Names and labels repeat when a job is re-created under the same name; only the uid
    tells this job's children from a previous one's (or from a user's object).
    """
    if not uid:
        return False
    references = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("controller") and r.get("uid") == uid for r in references)
