"""Pure updates of a status.conditions list, per the Kubernetes API conventions.

A condition's lastTransitionTime moves only when its status flips; reason, message
and observedGeneration are refreshed on every update.
"""

from __future__ import annotations

from typing import Literal

from .api import Condition

Status = Literal["True", "False", "Unknown"]

PLANNED = "Planned"
RUNNING = "Running"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
RESTARTING = "Restarting"
SPEC_CHANGE_IGNORED = "SpecChangeIgnored"

# Conditions that describe where the run is; setting one True clears the others.
EXCLUSIVE = (RUNNING, SUCCEEDED, FAILED, SUSPENDED, RESTARTING)


def find(conditions: list[Condition], kind: str) -> Condition | None:
    return next((c for c in conditions if c.type == kind), None)


def is_true(conditions: list[Condition], kind: str) -> bool:
    found = find(conditions, kind)
    return found is not None and found.status == "True"


def set_condition(
    conditions: list[Condition],
    kind: str,
    status: Status,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> list[Condition]:
    current = find(conditions, kind)
    transition = now if current is None or current.status != status else current.lastTransitionTime
    updated = Condition(
        type=kind,
        status=status,
        reason=reason,
        message=message,
        lastTransitionTime=transition,
        observedGeneration=generation,
    )
    out = [c for c in conditions if c.type != kind]
    index = next((i for i, c in enumerate(conditions) if c.type == kind), len(out))
    out.insert(index, updated)
    return out


def set_exclusive(
    conditions: list[Condition],
    kind: str,
    reason: str,
    message: str,
    now: str,
    generation: int | None,
) -> list[Condition]:
    """Set `kind` True and every other lifecycle condition that is True to False."""
    out = set_condition(conditions, kind, "True", reason, message, now, generation)
    for other in EXCLUSIVE:
        if other != kind and is_true(out, other):
            out = set_condition(out, other, "False", reason, message, now, generation)
    return out


def transitions(before: list[Condition], after: list[Condition]) -> list[Condition]:
    """The conditions of `after` whose status or reason differs from `before` (new ones too),
    in `after`'s order: each is one transition, told once as an Event."""
    return [
        c
        for c in after
        if (old := find(before, c.type)) is None or (old.status, old.reason) != (c.status, c.reason)
    ]
