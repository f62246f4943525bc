"""What a job's profile decided at its first launch, frozen for the rest of the run.

Pure. `policy.resolve` answers from the profile as it is now; a running job must not
change when an admin edits its profile (the issue: "a profile change never rewrites a
running job; it applies to new launches"). So at the first launch the operator keeps,
beside the effective spec in the job's ConfigMap (`config.json`), this document under
`POLICY_KEY`: the pod settings only a profile gives (`policy.PodDefaults`), the
deadline bounds the live edits of the run are held to, and `status.effective`.
Relaunches and resumes build their pods from it, never from the profile of the day.

The trainer reads only `config.json` (settings.load_config); this key is the operator's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .policy import PodDefaults, Resolution
from .trainer_config import POLICY_KEY

__all__ = ["POLICY_KEY", "DeadlineEdit", "LaunchPolicy", "deadline_after_edit"]


@dataclass(frozen=True)
class LaunchPolicy:
    """The profile's verdict a run keeps. The empty one: no profile applied."""

    pod: PodDefaults = field(default_factory=PodDefaults)
    # limits.maxActiveDeadlineSeconds: a live edit may not raise the deadline above it.
    max_deadline_seconds: int | None = None
    # The deadline of a job that sets none (defaults.activeDeadlineSeconds, else the cap).
    default_deadline_seconds: int | None = None
    # status.effective (api.EffectiveStatus as JSON); None without a profile.
    effective: Mapping[str, Any] | None = None

    @classmethod
    def from_resolution(cls, resolution: Resolution) -> LaunchPolicy:
        profile = resolution.profile
        if profile is None:
            return cls(pod=resolution.pod, effective=resolution.effective_status())
        cap = profile.spec.limits.maxActiveDeadlineSeconds
        default = profile.spec.defaults.activeDeadlineSeconds
        if cap is not None and (default is None or default > cap):
            default = cap
        return cls(
            pod=resolution.pod,
            max_deadline_seconds=cap,
            default_deadline_seconds=default,
            effective=resolution.effective_status(),
        )

    def to_json(self) -> str:
        return json.dumps(
            {
                "pod": self.pod.to_json(),
                "maxActiveDeadlineSeconds": self.max_deadline_seconds,
                "defaultActiveDeadlineSeconds": self.default_deadline_seconds,
                "effective": self.effective,
            },
            indent=2,
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str | None) -> LaunchPolicy:
        """The frozen policy; a run launched before profiles existed has none (empty)."""
        if not text:
            return cls()
        data = json.loads(text)
        return cls(
            pod=PodDefaults.from_json(data.get("pod")),
            max_deadline_seconds=data.get("maxActiveDeadlineSeconds"),
            default_deadline_seconds=data.get("defaultActiveDeadlineSeconds"),
            effective=data.get("effective"),
        )


@dataclass(frozen=True)
class DeadlineEdit:
    """The deadline a run keeps after a live edit, and why an edit was refused (or None)."""

    seconds: int | None
    refused: str | None = None


def deadline_after_edit(
    edited: int | None, launched: int | None, policy: LaunchPolicy
) -> DeadlineEdit:
    """activeDeadlineSeconds of a launched run whose job now says `edited`.

    The deadline is one of the fields a user may change on a running job
    (lifecycle.MUTABLE_FIELDS); under a profile with a cap it may only stay within it, so a
    tenant cannot outlive the cap by editing the job after its launch. Removing the
    deadline means the profile's default again, as it did at launch; raising it above the
    cap is refused and the launched value kept.
    """
    if edited is None:
        return DeadlineEdit(policy.default_deadline_seconds)
    cap = policy.max_deadline_seconds
    if cap is not None and edited > cap:
        message = (
            f"spec.activeDeadlineSeconds: {edited}s is above the profile's cap of {cap}s "
            f"(rule limits.maxActiveDeadlineSeconds); the run keeps {launched}s"
        )
        return DeadlineEdit(launched, message)
    return DeadlineEdit(edited)
