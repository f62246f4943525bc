"""The trainer's progress report: its wire format, validation, and the status it yields.

Rank 0 cannot write the SFTJob's status (the phase, attempts, restarts and conditions
there drive the operator). It merge-patches a report into its job's progress ConfigMap
(children.build_progress_config_map), the one object its Role lets it write. The operator
reads that report, keeps only what a progress report may say, and folds it into
`status.progress`, `status.measuredPlan` and `status.speedPlan`. Everything else is
ignored, with a reason.

Data keys of the ConfigMap (all strings, as ConfigMap data is):
  jobUid        the uid of the SFTJob the trainer runs for (a re-created job's is new)
  attempt       the launch the reporting pod belongs to (status.attempts at its launch)
  progress      JSON object, fields of api.Progress
  measuredPlan  JSON object, fields of api.Plan
  speedPlan     JSON object, fields of api.SpeedPlanStatus (levers: known switch names only)

A report for another job uid, or another attempt than the job's current one (an old
launch's pod still stopping), is ignored: the status describes the current run only.
Pure: no API calls; reconciler.py reads the ConfigMap and sends the patch.
"""

from __future__ import annotations

import json
import logging
import math
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any, get_args

from pydantic import BaseModel

from .advice import ROWS_OVER_MAX_LENGTH, over_length_advisory
from .api import (
    Advisory,
    Plan,
    Progress,
    ProgressPoint,
    SFTJobStatus,
    SpeedPlanStatus,
    SpeedPreset,
    SpeedSpec,
)
from .plan import PACKED_ESTIMATES

log = logging.getLogger(__name__)

KEY_JOB_UID = "jobUid"
KEY_ATTEMPT = "attempt"
KEY_PROGRESS = "progress"
KEY_MEASURED_PLAN = "measuredPlan"
KEY_SPEED_PLAN = "speedPlan"
REPORT_KEYS = (KEY_JOB_UID, KEY_ATTEMPT, KEY_PROGRESS, KEY_MEASURED_PLAN, KEY_SPEED_PLAN)

# A full report is under 6 KiB (the speed plan's reasons included); anything far larger is not one, and must not grow the status.
MAX_REPORT_BYTES = 16 * 1024
MAX_TEXT = 64  # eta, summary, updateTime, datasetSizeSource
MAX_NOTES = 16
MAX_NOTE = 256
# Far beyond any real run, small enough for every client's integer type.
MAX_COUNT = 2**53


class Invalid(ValueError):
    """One value of the report that cannot go into the status; the message says why."""


def encode_report(
    *,
    job_uid: str | None,
    attempt: int,
    progress: Mapping[str, Any] | None = None,
    measured_plan: Mapping[str, Any] | None = None,
    speed_plan: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The ConfigMap data the trainer merge-patches in (only the parts it has)."""
    data = {KEY_JOB_UID: job_uid or "", KEY_ATTEMPT: str(attempt)}
    for key, part in (
        (KEY_PROGRESS, progress),
        (KEY_MEASURED_PLAN, measured_plan),
        (KEY_SPEED_PLAN, speed_plan),
    ):
        if part is not None:
            data[key] = json.dumps(dict(part), sort_keys=True)
    return data


# --------------------------------------------------------------------------- values


def _count(value: Any) -> int:
    # bool is an int in Python, never in a report.
    if isinstance(value, bool) or not isinstance(value, int):
        raise Invalid(f"{value!r} is not a whole number")
    if not 0 <= value <= MAX_COUNT:
        raise Invalid(f"{value} is out of range 0..{MAX_COUNT}")
    return value


def _positive(value: Any) -> int:
    count = _count(value)
    if count < 1:
        raise Invalid(f"{value} is not positive")
    return count


def _number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Invalid(f"{value!r} is not a number")
    if not math.isfinite(value) or abs(value) > 1e30:
        raise Invalid(f"{value!r} is not a finite number")
    return value


def _non_negative(value: Any) -> float:
    number = _number(value)
    if number < 0:
        raise Invalid(f"{value} is negative")
    return number


def _percent(value: Any) -> float:
    number = _number(value)
    if not 0 <= number <= 100:
        raise Invalid(f"{value} is out of range 0..100")
    return number


def _ratio(value: Any) -> float:
    number = _number(value)
    if not 0 <= number <= 1:
        raise Invalid(f"{value} is out of range 0..1")
    return number


def _text(value: Any) -> str:
    if not isinstance(value, str):
        raise Invalid(f"{value!r} is not a string")
    if len(value) > MAX_TEXT:
        raise Invalid(f"is {len(value)} characters, more than {MAX_TEXT}")
    return value


def _timestamp(value: Any) -> str:
    text = _text(value)
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError as exc:
        raise Invalid(f"{value!r} is not an RFC 3339 time") from exc
    if parsed.tzinfo is None or "T" not in text:
        raise Invalid(f"{value!r} is not an RFC 3339 time (date, time and offset)")
    return text


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Invalid(f"{value!r} is not true or false")
    return value


def _notes(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise Invalid("is not a list of strings")
    if len(value) > MAX_NOTES or any(len(v) > MAX_NOTE for v in value):
        raise Invalid(f"holds more than {MAX_NOTES} notes or a note over {MAX_NOTE} characters")
    return value


def _operators_only(value: Any) -> Any:
    raise Invalid("is the operator's (kept from the reports it saw), not the trainer's")


def _packed_estimate(value: Any) -> str:
    if value not in PACKED_ESTIMATES:
        raise Invalid(f"{value!r} is not one of {', '.join(PACKED_ESTIMATES)}")
    return str(value)


# The levers a speed plan may name: the switches of spec.training.speed.
LEVER_NAMES = frozenset(name for name in SpeedSpec.model_fields if name != "preset")
LEVER_FIELDS = {"name", "on", "reason"}


def _preset(value: Any) -> str:
    if value not in get_args(SpeedPreset):
        raise Invalid(f"{value!r} is not one of {', '.join(get_args(SpeedPreset))}")
    return str(value)


def _levers(value: Any) -> list[dict[str, Any]]:
    """Each lever once, by a known name, with on and a bounded reason; else none of them."""
    if not isinstance(value, list) or len(value) > len(LEVER_NAMES):
        raise Invalid(f"is not a list of at most {len(LEVER_NAMES)} levers")
    levers = []
    for item in value:
        if not isinstance(item, dict) or set(item) - LEVER_FIELDS or "name" not in item:
            raise Invalid(f"{item!r} is not a lever ({', '.join(sorted(LEVER_FIELDS))})")
        if item["name"] not in LEVER_NAMES:
            raise Invalid(f"{item['name']!r} is not a speed lever")
        reason = item.get("reason", "")
        if not isinstance(reason, str) or len(reason) > MAX_NOTE:
            raise Invalid(f"{item['name']}: the reason is not a string of at most {MAX_NOTE}")
        levers.append({"name": item["name"], "on": _flag(item.get("on")), "reason": reason})
    names = [lever["name"] for lever in levers]
    if len(set(names)) != len(names):
        raise Invalid("names a lever twice")
    return levers


Rule = Callable[[Any], Any]

PROGRESS_RULES: dict[str, Rule] = {
    "step": _count,
    "totalSteps": _count,
    "epoch": _non_negative,
    "percent": _percent,
    "loss": _number,
    "learningRate": _non_negative,
    "gradNorm": _non_negative,
    "tokensPerSecond": _non_negative,
    "etaSeconds": _count,
    "eta": _text,
    "summary": _text,
    "updateTime": _timestamp,
    "evalLoss": _number,
    "bestEvalLoss": _number,
    "lossDisplay": _text,  # the operator's: displayed() writes it over the trainer's
    "history": _operators_only,
    "mfu": _ratio,
}
PROGRESS_REQUIRED = ("step",)

PLAN_RULES: dict[str, Rule] = {
    "datasetSize": _count,
    "datasetSizeSource": _text,
    "worldSize": _positive,
    "effectiveBatchSize": _positive,
    "perDeviceTrainBatchSize": _positive,
    "gradientAccumulationSteps": _positive,
    "stepsPerEpoch": _count,
    "totalSteps": _count,
    "epochs": _non_negative,
    "warmupSteps": _count,
    "estimate": _flag,
    "measured": _flag,
    "notes": _notes,
    "rowsTruncated": _count,
    "rowsDropped": _count,
    "packedEstimate": _packed_estimate,
}
PLAN_REQUIRED = (
    "worldSize",
    "effectiveBatchSize",
    "perDeviceTrainBatchSize",
    "gradientAccumulationSteps",
)
SPEED_PLAN_RULES: dict[str, Rule] = {
    "preset": _preset,
    "perDeviceTrainBatchSize": _positive,
    "gradientAccumulationSteps": _positive,
    "gradientCheckpointing": _flag,
    "attention": _text,
    "compile": _flag,
    "levers": _levers,
}
SPEED_PLAN_REQUIRED = ("levers",)
# The rules must cover the status models exactly: a field added to api.py needs a rule.
assert set(PROGRESS_RULES) == set(Progress.model_fields)
assert set(PLAN_RULES) == set(Plan.model_fields)
assert set(SPEED_PLAN_RULES) == set(SpeedPlanStatus.model_fields)


def _validated_object(
    key: str, raw: str, rules: Mapping[str, Rule], required: tuple[str, ...], ignored: list[str]
) -> dict[str, Any] | None:
    """The object under `key` with every valid field; None when a required one is not."""
    try:
        value = json.loads(raw)
    except ValueError as exc:
        ignored.append(f"{key}: not JSON ({exc})")
        return None
    if not isinstance(value, dict):
        ignored.append(f"{key}: not a JSON object")
        return None
    kept: dict[str, Any] = {}
    for field, item in value.items():
        rule = rules.get(field)
        if rule is None:
            ignored.append(f"{key}.{field}: not a field of {key}")
        elif item is not None:  # null: the trainer does not know it (yet)
            try:
                kept[field] = rule(item)
            except Invalid as exc:
                ignored.append(f"{key}.{field}: {exc}")
    missing = [field for field in required if field not in kept]
    if missing:
        ignored.append(f"{key}: ignored, no valid {', '.join(missing)}")
        return None
    return kept


# --------------------------------------------------------------------------- reports


@dataclass(frozen=True)
class Report:
    """What of one report may reach the status, and why the rest may not.

    `stale` says why a whole report is set aside without being wrong (another attempt's,
    another job's); `ignored` names what is wrong in it (a field out of bounds, a forged key).
    """

    progress: dict[str, Any] | None = None
    measured_plan: dict[str, Any] | None = None
    ignored: tuple[str, ...] = ()
    speed_plan: dict[str, Any] | None = None
    stale: str | None = None


def parse_report(data: Mapping[str, str] | None, *, job_uid: str | None, attempt: int) -> Report:
    """Validate the progress ConfigMap's data for the job `job_uid` at launch `attempt`."""
    if not data:
        return Report()
    size = sum(len(k) + len(v if isinstance(v, str) else "") for k, v in data.items())
    if size > MAX_REPORT_BYTES:
        return Report(ignored=(f"report ignored: {size} bytes, more than {MAX_REPORT_BYTES}",))
    ignored = [
        f"{key}: not part of a progress report ({', '.join(REPORT_KEYS)})"
        for key in data
        if key not in REPORT_KEYS
    ]
    reported_uid = data.get(KEY_JOB_UID)
    if job_uid and reported_uid != job_uid:
        stale = f"report for job uid {reported_uid!r}, not {job_uid!r}"
        return Report(ignored=tuple(ignored), stale=stale)
    try:
        reported_attempt = int(data.get(KEY_ATTEMPT, ""))
    except ValueError:
        ignored.append(f"report ignored: attempt {data.get(KEY_ATTEMPT)!r} is not a number")
        return Report(ignored=tuple(ignored))
    if reported_attempt != attempt:
        stale = f"report from attempt {reported_attempt}, not the current {attempt}"
        return Report(ignored=tuple(ignored), stale=stale)
    parts: dict[str, dict[str, Any] | None] = {}
    for key, rules, required in (
        (KEY_PROGRESS, PROGRESS_RULES, PROGRESS_REQUIRED),
        (KEY_MEASURED_PLAN, PLAN_RULES, PLAN_REQUIRED),
        (KEY_SPEED_PLAN, SPEED_PLAN_RULES, SPEED_PLAN_REQUIRED),
    ):
        raw = data.get(key)
        parts[key] = (
            _validated_object(key, raw, rules, required, ignored) if isinstance(raw, str) else None
        )
    return Report(
        progress=parts[KEY_PROGRESS],
        measured_plan=parts[KEY_MEASURED_PLAN],
        speed_plan=parts[KEY_SPEED_PLAN],
        ignored=tuple(ignored),
    )


def loss_display(loss: float) -> str:
    """The loss to 4 significant digits: printer columns cannot round a number."""
    return f"{loss:.4g}"


def progress_summary(step: int, total_steps: int | None) -> str:
    """`12/200 (6%)` for the Progress column; `12/?` while the total is unknown."""
    if not total_steps:
        return f"{step}/?"
    return f"{step}/{total_steps} ({math.floor(100 * step / total_steps)}%)"


def displayed(progress: dict[str, Any] | None) -> dict[str, Any] | None:
    """The progress with the column texts the operator derives from its numbers."""
    if progress is None:
        return None
    shown = dict(progress)
    shown.pop("lossDisplay", None)
    if "loss" in progress:
        shown["lossDisplay"] = loss_display(progress["loss"])
    shown["summary"] = progress_summary(progress["step"], progress.get("totalSteps"))
    return shown


# status.progress.history: a whole run's curve in a few KiB (a point is ~110 bytes of JSON).
HISTORY_POINTS = 50
HISTORY_FIELDS = tuple(ProgressPoint.model_fields)


def _significant(value: Any) -> Any:
    return float(f"{value:.4g}") if isinstance(value, float) else value


def history_point(progress: Mapping[str, Any]) -> dict[str, Any]:
    """The curve's point for one report: its step and figures, to 4 significant digits."""
    return {k: _significant(progress[k]) for k in HISTORY_FIELDS if progress.get(k) is not None}


def with_point(
    history: list[dict[str, Any]], point: dict[str, Any], limit: int = HISTORY_POINTS
) -> list[dict[str, Any]]:
    """The history with `point`, at most `limit` points spread over the whole run.

    A point of a step already there replaces it (an eval loss arrives after the train
    loss of its step); points past it go (a restart resumed from an earlier checkpoint
    and trains those steps again). The steps from the first to the newest are cut into at
    most `limit - 1` equal buckets (a width that doubles as the run grows) and each keeps
    its first point, the newest point besides: evenly spread over the whole run, old and
    recent alike, and a doubled width keeps a subset of the points kept before.
    """
    points = [p for p in history if p["step"] < point["step"]] + [point]
    first = points[0]["step"]
    width = 1
    while (point["step"] - first) // width + 1 > limit - 1:
        width *= 2
    kept: dict[int, dict[str, Any]] = {}
    for earlier in points[:-1]:
        kept.setdefault((earlier["step"] - first) // width, earlier)
    return [*kept.values(), point]


def merged_patch(report_patch: dict[str, Any], operator_patch: dict[str, Any]) -> dict[str, Any]:
    """The pass's status patch: the operator's fields win, and its progress fields (an ETA
    cleared) merge into the report's progress rather than replace it."""
    merged = {**report_patch, **operator_patch}
    if "progress" in report_patch and "progress" in operator_patch:
        merged["progress"] = {**report_patch["progress"], **operator_patch["progress"]}
    return merged


def _replacing(fields: Mapping[str, Any], new: dict[str, Any]) -> dict[str, Any]:
    # A merge patch merges objects: null removes a field the previous report had.
    return {field: new.get(field) for field in fields}


def status_patch(report: Report, status: SFTJobStatus | None) -> dict[str, Any]:
    """The merge patch that puts the report into the status; empty when nothing changes."""
    status = status or SFTJobStatus()
    patch: dict[str, Any] = {}
    for key, model, new in (
        ("progress", Progress, displayed(report.progress)),
        ("measuredPlan", Plan, report.measured_plan),
        ("speedPlan", SpeedPlanStatus, report.speed_plan),
    ):
        if new is None:
            continue
        old = getattr(status, key)
        if key == "progress":
            before = [_dumped(p) for p in (old.history or [])] if old is not None else []
            new = {**new, "history": with_point(before, history_point(new))}
        # The status reads back with the model's defaults filled in: compare like with like.
        if old is None or _dumped(model.model_validate(new)) != _dumped(old):
            patch[key] = _replacing(model.model_fields, new)
    if report.measured_plan is not None:
        advisories = _with_over_length_advisory(status.advisories, report.measured_plan)
        if advisories is not None:
            patch["advisories"] = advisories
    return patch


def _with_over_length_advisory(
    current: list[Advisory], measured: dict[str, Any]
) -> list[dict[str, Any]] | None:
    """status.advisories with the measured rows-over-maxLength warning; None if unchanged.

    Checked on every report, not only a changed one: a spec edit re-plans and rewrites the
    advisories from the spec alone, and the next pass puts the measured warning back.
    """
    kept = [a for a in current if a.code != ROWS_OVER_MAX_LENGTH]
    advisory = over_length_advisory(Plan.model_validate(measured))
    wanted = kept + ([advisory] if advisory is not None else [])
    if [_dumped(a) for a in wanted] == [_dumped(a) for a in current]:
        return None
    return [_dumped(a) for a in wanted]


def _dumped(model: BaseModel) -> dict[str, Any]:
    return model.model_dump(mode="json", exclude_none=True)


class IgnoredLog:
    """Logs what a job's report had ignored, once per distinct reason set, not every pass."""

    def __init__(self, size: int = 4096):
        self.size = size
        self.last: OrderedDict[tuple[str, str], Report] = OrderedDict()

    def note(self, namespace: str, name: str, report: Report) -> None:
        key = (namespace, name)
        previous = self.last.pop(key, None)
        self.last[key] = report
        while len(self.last) > self.size:
            self.last.popitem(last=False)
        if previous is not None and (previous.ignored, previous.stale) == (
            report.ignored,
            report.stale,
        ):
            return
        for reason in report.ignored:
            log.warning("progress report of %s/%s: %s", namespace, name, reason)
        if report.stale:
            log.debug("progress report of %s/%s set aside: %s", namespace, name, report.stale)


IGNORED_LOG = IgnoredLog()


def fold(
    data: Mapping[str, str] | None,
    job: tuple[str, str, str | None],
    attempt: int,
    status: SFTJobStatus | None,
    phase: str | None = "Running",
) -> dict[str, Any]:
    """The status patch for the report in `data` if it is from `attempt` of `job`.

    `job` is (namespace, name, uid); `status` the job's status before this pass's patch;
    `phase` the job's phase after it: a report's ETA reaches only a Running job's status
    (the last report of a run that failed or was suspended still has one).
    Empty when the report changes nothing; what was ignored is logged (once while the
    report stays as it is).
    """
    namespace, name, uid = job
    report = parse_report(data, job_uid=uid, attempt=attempt)
    IGNORED_LOG.note(namespace, name, report)
    if phase != "Running" and report.progress is not None:
        kept = {k: v for k, v in report.progress.items() if k not in ("eta", "etaSeconds")}
        report = replace(report, progress=kept)
    return status_patch(report, status)
