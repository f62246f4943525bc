"""When a job needs a pass that no event will bring: its deadline or its TTL. Pure.

Every change to a job or its pods queues a pass through the watch; only the clock's own
moments do not: `activeDeadlineSeconds` running out and `ttlSecondsAfterFinished` expiring.
`next_timed_pass` says how long until the next of those (the controller takes the earlier of
it and the pass's own `Outcome.requeue_after`).
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

FINISHED_PHASES = ("Succeeded", "Failed")

# A pass lands this long after the moment, so timestamps truncated to the second and the
# pass's own clock reading never put it a hair before the moment it was scheduled for.
MARGIN_SECONDS = 0.2
# A moment further in the past than this was already seen by the pass that just ran (which
# acted on it, or decided it no longer applies): scheduling it again would spin.
PAST_TOLERANCE_SECONDS = 2.0


def _seconds_since(stamp: str | None, now: datetime) -> float | None:
    if not stamp:
        return None
    try:
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
    except ValueError:
        return None
    return (now - moment).total_seconds()


def _until(limit: float, elapsed: float | None) -> float | None:
    if elapsed is None:
        return None
    remaining = limit - elapsed
    if remaining < -PAST_TOLERANCE_SECONDS:
        return None
    return max(remaining, 0.0) + MARGIN_SECONDS


def next_timed_pass(body: Mapping[str, Any], now: datetime) -> float | None:
    """Seconds until the job's deadline or TTL is due; None when neither is pending."""
    spec = body.get("spec") or {}
    status = body.get("status") or {}
    if status.get("phase") in FINISHED_PHASES:
        ttl = spec.get("ttlSecondsAfterFinished")
        if ttl is None:
            return None
        return _until(float(ttl), _seconds_since(status.get("completionTime"), now))
    deadline = spec.get("activeDeadlineSeconds")
    if not deadline or status.get("phase") == "Suspended":
        return None
    return _until(float(deadline), _seconds_since(status.get("startTime"), now))


def earliest(*delays: float | None) -> float | None:
    known = [d for d in delays if d is not None]
    return min(known) if known else None
