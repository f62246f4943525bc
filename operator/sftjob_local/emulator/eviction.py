"""pods/{name}/eviction (policy/v1 Eviction, create), as the apiserver serves it.

Source: pkg/registry/core/pod/storage/eviction.go (EvictionREST.Create) and the
pod disruption conditions (KEP-3329, docs "Pod disruption conditions"): the
name in the URL must match the Eviction's; the pod (in any phase) gets the
condition `DisruptionTarget=True`, reason `EvictionByEvictionAPI`, message
`Eviction API: evicting`, then it is deleted with the Eviction's
`deleteOptions` (graceful deletion: the node stops it); the answer is a
Status Success (201). PodDisruptionBudgets are not served by this emulator, so
no budget ever refuses an eviction (a real server may answer 429).
"""

from __future__ import annotations

import copy
from typing import Any

from . import errors
from .core import ApiCore, now
from .resources import ResourceType

EVICTION_CONDITION = {
    "type": "DisruptionTarget",
    "status": "True",
    "reason": "EvictionByEvictionAPI",
    "message": "Eviction API: evicting",
}


def with_condition(conditions: list[dict[str, Any]], cond: dict[str, Any]) -> list[dict[str, Any]]:
    """podutil.UpdatePodCondition: replace the condition of that type (keeping its
    lastTransitionTime when the status is unchanged) or append it."""
    out = []
    found = False
    for old in conditions:
        if old.get("type") == cond["type"]:
            found = True
            new = {**cond, "lastProbeTime": None}
            same = old.get("status") == cond["status"]
            new["lastTransitionTime"] = old.get("lastTransitionTime") if same else now()
            out.append(new)
        else:
            out.append(old)
    if not found:
        out.append({**cond, "lastProbeTime": None, "lastTransitionTime": now()})
    return out


def evict(
    core: ApiCore, rt: ResourceType, namespace: str, name: str, body: Any, dry_run: bool
) -> dict[str, Any]:
    if not isinstance(body, dict) or body.get("kind") not in (None, "Eviction"):
        raise errors.bad_request(f"not a Eviction object: {type(body).__name__}")
    if (body.get("metadata") or {}).get("name") != name:
        raise errors.bad_request("name in URL does not match name in Eviction object")
    pod = core.store.get(("", "pods"), namespace, name)
    if pod is None:
        raise errors.not_found("pods", "", name)
    options = dict(body.get("deleteOptions") or {})
    if not dry_run and not options.get("dryRun"):
        # addConditionAndDeletePod: the condition first (any phase), then the deletion
        new = copy.deepcopy(pod)
        status = new.setdefault("status", {})
        status["conditions"] = with_condition(status.get("conditions") or [], EVICTION_CONDITION)
        if new != pod:
            core.store.put(("", "pods"), new, pod)
        core.delete(rt, namespace, name, options)
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Success",
        "code": 201,
    }
