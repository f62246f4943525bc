"""What the local node reports, when it starts, for pods whose processes died with its
previous instance: the kubelet's statuses after a reboot (pure functions; node.py applies them).

A pod bound to this node that is not terminal, that this node instance is not running, and
whose status shows a previous instance started its containers (a container running or
terminated, now or before) lost its processes when that instance stopped. Then:

* ``restartPolicy: Never``: the kubelet cannot run it again, and cannot find its containers.
  It terminates the pod as ``TerminatePod`` in pkg/kubelet/status/status_manager.go does:
  every container without a terminated state gets the kubelet's state for a container it
  cannot locate (pkg/kubelet/kubelet_pods.go, convertToAPIContainerStatuses, and
  TerminatePod)::

      terminated: {reason: ContainerStatusUnknown, exitCode: 137,
                   message: The container could not be located when the pod was terminated}

  (containers of a pod that never finished initializing keep waiting, and of the init
  containers only those with evidence of a start are terminated: ``hasPodInitialized`` and
  ``initializedContainers`` there), the phase becomes Failed, and Ready/ContainersReady
  become False with reason PodFailed (pkg/kubelet/status/generate.go,
  generate*ConditionForTerminalPhase).
* ``Always`` / ``OnFailure``: the kubelet starts the containers again; so does the local
  node (``lost_on_reboot`` is False and the pod gets a new worker).

A pod no container of which ever started (Pending, waiting) is simply started.
"""

from __future__ import annotations

import copy
from typing import Any

Obj = dict[str, Any]

UNKNOWN_REASON = "ContainerStatusUnknown"
UNKNOWN_MESSAGE = "The container could not be located when the pod was terminated"
UNKNOWN_EXIT_CODE = 137  # the kubelet's "this indicates an error" code
TERMINAL_PHASES = ("Succeeded", "Failed")

__all__ = ["lost_on_reboot", "ran_before", "terminated_after_reboot"]


def _statuses(status: Obj, field: str) -> list[Obj]:
    return [dict(s) for s in status.get(field) or [] if isinstance(s, dict)]


def _ever_left_waiting(container: Obj) -> bool:
    """Evidence that a container started once: not waiting now, or terminated before."""
    state = container.get("state") or {}
    last = container.get("lastState") or {}
    return "waiting" not in state or "terminated" in last


def ran_before(pod: Obj) -> bool:
    """Whether the pod's status shows that some container of it was started by a node."""
    status = pod.get("status") or {}
    containers = _statuses(status, "initContainerStatuses") + _statuses(status, "containerStatuses")
    return any(
        "running" in (c.get("state") or {})
        or "terminated" in (c.get("state") or {})
        or "terminated" in (c.get("lastState") or {})
        for c in containers
    )


def lost_on_reboot(pod: Obj) -> bool:
    """A non-terminal, restartPolicy Never pod whose containers a previous node instance ran."""
    spec = pod.get("spec") or {}
    phase = (pod.get("status") or {}).get("phase")
    return (
        phase not in TERMINAL_PHASES
        and (spec.get("restartPolicy") or "Always") == "Never"
        and ran_before(pod)
    )


def _has_initialized(pod: Obj, status: Obj) -> bool:
    # status_manager.go hasPodInitialized
    if not (pod.get("spec") or {}).get("initContainers"):
        return True
    if any(_ever_left_waiting(c) for c in _statuses(status, "containerStatuses")):
        return True
    inits = _statuses(status, "initContainerStatuses")
    if inits:
        last = inits[-1]
        for state in (last.get("lastState") or {}, last.get("state") or {}):
            terminated = state.get("terminated")
            if terminated is not None and terminated.get("exitCode") == 0:
                return True
    return False


def _initialized_prefix(inits: list[Obj]) -> int:
    # status_manager.go initializedContainers: all but the trailing never-started ones (>= 1)
    for i in range(len(inits) - 1, -1, -1):
        if _ever_left_waiting(inits[i]):
            return i + 1
    return 1 if inits else 0


def _unknown(container: Obj) -> Obj:
    if "terminated" in (container.get("state") or {}):
        return container
    return {
        **container,
        "state": {
            "terminated": {
                "reason": UNKNOWN_REASON,
                "message": UNKNOWN_MESSAGE,
                "exitCode": UNKNOWN_EXIT_CODE,
            }
        },
        "ready": False,
        "started": False,
    }


def terminated_after_reboot(pod: Obj, now: str) -> Obj:
    """The pod's status once the node has terminated it after losing its containers."""
    status = copy.deepcopy(pod.get("status") or {})
    if _has_initialized(pod, status) and status.get("containerStatuses"):
        status["containerStatuses"] = [_unknown(c) for c in _statuses(status, "containerStatuses")]
    inits = _statuses(status, "initContainerStatuses")
    if inits:
        cut = _initialized_prefix(inits)
        status["initContainerStatuses"] = [_unknown(c) for c in inits[:cut]] + inits[cut:]
    status["phase"] = "Failed"
    conditions = [c for c in status.get("conditions") or [] if isinstance(c, dict)]
    for kind in ("ContainersReady", "Ready"):
        old = next((c for c in conditions if c.get("type") == kind), None)
        new = {
            "type": kind,
            "status": "False",
            "reason": "PodFailed",
            "lastProbeTime": None,
            "lastTransitionTime": (
                old.get("lastTransitionTime") if old and old.get("status") == "False" else now
            ),
        }
        if old is None:
            conditions.append(new)
        else:
            conditions[conditions.index(old)] = new
    status["conditions"] = conditions
    return status
