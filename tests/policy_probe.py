"""Wait until the operator's cache holds a profile and a namespace's labels (tests only).

The operator reads SFTProfiles and namespace labels from its watch cache, which lags the
API by the watch's latency: a job created right after its profile may be resolved before
the operator has seen the profile. A test that must not race that creates a probe job that
breaks only the tenant profile and is suspended (so it never launches either way): it is
refused with PolicyViolation once the operator sees the profile and the namespace's labels,
and merely Suspended before. Each probe is deleted; a Suspended one is retried.
"""

from __future__ import annotations

import time
from typing import Any

import kubernetes
from kubernetes.client import ApiClient
from policy_cases import API_VERSION, job_spec, merge_patch

GROUP, VERSION = API_VERSION.split("/")
PLURAL = "sftjobs"
# Allowed without a profile; refused by the tenant profile's limits.allowedMethods.
PROBE_PATCH: dict[str, Any] = {"method": "full", "suspend": True}


def wait_until_policy_is_seen(api: ApiClient, namespace: str, timeout: float = 60) -> int:
    """Probes until one is refused by policy; how many it took."""
    custom = kubernetes.client.CustomObjectsApi(api)
    deadline = time.monotonic() + timeout
    tries = 0
    while time.monotonic() < deadline:
        tries += 1
        name = f"policy-probe-{tries}"
        body = {
            "apiVersion": API_VERSION,
            "kind": "SFTJob",
            "metadata": {"name": name, "namespace": namespace},
            "spec": merge_patch(job_spec(), PROBE_PATCH),
        }
        custom.create_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, body)
        phase, reason = _decided(custom, namespace, name, deadline)
        custom.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        if (phase, reason) == ("Failed", "PolicyViolation"):
            return tries
        time.sleep(0.5)
    raise AssertionError(f"the operator never applied the profile to namespace {namespace}")


def _decided(
    custom: Any, namespace: str, name: str, deadline: float
) -> tuple[str | None, str | None]:
    """The probe's phase once the operator decided (Failed or Suspended), and the reason."""
    while time.monotonic() < deadline:
        job = custom.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        status = job.get("status") or {}
        if status.get("phase") in ("Failed", "Suspended"):
            failed = [c for c in status.get("conditions") or [] if c["type"] == "Failed"]
            return status["phase"], failed[0]["reason"] if failed else None
        time.sleep(0.1)
    return None, None
