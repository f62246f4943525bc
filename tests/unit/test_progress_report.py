"""The trainer's progress report: what of it may reach the status, and the patch it yields."""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from sftjob_operator.api import Plan, Progress, SFTJobStatus
from sftjob_operator.lifecycle import status_after
from sftjob_operator.progress_report import (
    HISTORY_POINTS,
    MAX_REPORT_BYTES,
    IgnoredLog,
    displayed,
    encode_report,
    fold,
    history_point,
    loss_display,
    merged_patch,
    parse_report,
    progress_summary,
    status_patch,
    with_point,
)

UID = "0b9c1e7a-1111-4222-8333-444455556666"

PROGRESS: dict[str, Any] = {
    "step": 30,
    "totalSteps": 120,
    "epoch": 0.75,
    "percent": 25.0,
    "loss": 1.5,
    "learningRate": 2e-4,
    "gradNorm": None,
    "tokensPerSecond": 1234.5,
    "etaSeconds": 200,
    "eta": "3m20s",
    "summary": "30/120",
    "updateTime": "2026-01-02T03:04:05Z",
}
PLAN: dict[str, Any] = {
    "worldSize": 2,
    "effectiveBatchSize": 16,
    "perDeviceTrainBatchSize": 4,
    "gradientAccumulationSteps": 2,
    "datasetSize": 960,
    "datasetSizeSource": "measured",
    "stepsPerEpoch": 60,
    "totalSteps": 120,
    "epochs": 2.0,
    "warmupSteps": 4,
    "estimate": False,
    "measured": True,
    "notes": ["measured by the trainer after preparing the data"],
}


def report(attempt: int = 1, uid: str | None = UID, **extra: str) -> dict[str, str]:
    data = encode_report(job_uid=uid, attempt=attempt, progress=PROGRESS, measured_plan=PLAN)
    return {**data, **extra}


def with_progress(**changes: Any) -> dict[str, str]:
    return {**report(), "progress": json.dumps({**PROGRESS, **changes})}


class TestParse:
    def test_a_trainer_report_round_trips(self) -> None:
        parsed = parse_report(report(), job_uid=UID, attempt=1)
        assert parsed.ignored == () and parsed.stale is None
        assert parsed.progress == {k: v for k, v in PROGRESS.items() if v is not None}
        assert parsed.measured_plan == PLAN
        # What passes is what the status models accept.
        Progress.model_validate(parsed.progress)
        Plan.model_validate(parsed.measured_plan)

    def test_no_report_yet(self) -> None:
        assert parse_report(None, job_uid=UID, attempt=1).progress is None
        assert parse_report({}, job_uid=UID, attempt=1).measured_plan is None

    def test_controller_owned_keys_are_ignored_with_a_reason(self) -> None:
        forged = report(
            phase="Succeeded",
            restarts="0",
            attempts="7",
            conditions='[{"type": "Succeeded", "status": "True"}]',
        )
        parsed = parse_report(forged, job_uid=UID, attempt=1)
        assert parsed.progress is not None and parsed.measured_plan is not None
        for key in ("phase", "restarts", "attempts", "conditions"):
            assert any(
                reason.startswith(f"{key}: not part of a progress report")
                for reason in parsed.ignored
            )
        patch = status_patch(parsed, SFTJobStatus())
        assert set(patch) == {"progress", "measuredPlan"}

    def test_fields_outside_the_models_are_dropped(self) -> None:
        data = with_progress(phase="Succeeded")
        data["measuredPlan"] = json.dumps({**PLAN, "restarts": 0})
        parsed = parse_report(data, job_uid=UID, attempt=1)
        assert "phase" not in (parsed.progress or {})
        assert "restarts" not in (parsed.measured_plan or {})
        assert "progress.phase: not a field of progress" in parsed.ignored
        assert "measuredPlan.restarts: not a field of measuredPlan" in parsed.ignored

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("totalSteps", -1),
            ("totalSteps", 2.5),
            ("totalSteps", True),
            ("totalSteps", "120"),
            ("totalSteps", 2**60),
            ("percent", 101),
            ("percent", -0.1),
            ("loss", "NaN"),
            ("learningRate", -1e-4),
            ("gradNorm", 1e40),
            ("tokensPerSecond", [1]),
            ("etaSeconds", -5),
            ("eta", "x" * 65),
            ("summary", {"a": 1}),
            ("updateTime", "yesterday"),
            ("updateTime", "2026-01-02T03:04:05"),
            ("updateTime", "2026-01-02"),
            ("mfu", 1.2),
            ("mfu", -0.01),
            ("mfu", "0.4"),
            ("mfu", True),
        ],
    )
    def test_an_invalid_field_is_dropped_and_the_rest_kept(self, field: str, value: Any) -> None:
        parsed = parse_report(with_progress(**{field: value}), job_uid=UID, attempt=1)
        assert parsed.progress is not None
        assert field not in parsed.progress
        assert parsed.progress["step"] == 30
        assert [r for r in parsed.ignored if r.startswith(f"progress.{field}: ")]

    def test_non_finite_numbers_from_json_are_refused(self) -> None:
        # Python's json reads NaN and Infinity; neither is valid in an API object.
        data = {**report(), "progress": '{"step": 3, "loss": NaN, "gradNorm": Infinity}'}
        parsed = parse_report(data, job_uid=UID, attempt=1)
        assert parsed.progress == {"step": 3}
        assert len(parsed.ignored) == 2

    def test_progress_without_a_valid_step_is_ignored_whole(self) -> None:
        for step in (None, -3, "3"):
            parsed = parse_report(with_progress(step=step), job_uid=UID, attempt=1)
            assert parsed.progress is None
            assert "progress: ignored, no valid step" in parsed.ignored
            assert parsed.measured_plan == PLAN

    def test_plan_without_its_batch_figures_is_ignored_whole(self) -> None:
        data = {**report(), "measuredPlan": json.dumps({**PLAN, "worldSize": 0})}
        parsed = parse_report(data, job_uid=UID, attempt=1)
        assert parsed.measured_plan is None and parsed.progress is not None
        assert "measuredPlan: ignored, no valid worldSize" in parsed.ignored

    @pytest.mark.parametrize(
        "notes", [["x" * 257], ["n"] * 17, "one note", [1]], ids=["long", "many", "str", "int"]
    )
    def test_plan_notes_are_bounded(self, notes: Any) -> None:
        data = {**report(), "measuredPlan": json.dumps({**PLAN, "notes": notes})}
        parsed = parse_report(data, job_uid=UID, attempt=1)
        assert parsed.measured_plan is not None and "notes" not in parsed.measured_plan

    @pytest.mark.parametrize("raw", ["not json", "[1, 2]", '"text"'])
    def test_values_that_are_not_json_objects(self, raw: str) -> None:
        parsed = parse_report({**report(), "progress": raw}, job_uid=UID, attempt=1)
        assert parsed.progress is None and parsed.measured_plan == PLAN
        assert any(r.startswith("progress: not") for r in parsed.ignored)

    def test_an_oversized_report_is_ignored_whole(self) -> None:
        data = report(padding="x" * MAX_REPORT_BYTES)
        parsed = parse_report(data, job_uid=UID, attempt=1)
        assert parsed.progress is None and parsed.measured_plan is None
        assert parsed.ignored[0].startswith("report ignored: ")

    def test_another_attempts_report_is_set_aside(self) -> None:
        # A relaunch: the old attempt's pod may still be stopping, or its report still there.
        for attempt in (1, 3):
            parsed = parse_report(report(attempt=attempt), job_uid=UID, attempt=2)
            assert parsed.progress is None and parsed.measured_plan is None
            assert parsed.stale == f"report from attempt {attempt}, not the current 2"
        parsed = parse_report(report(attempt=2), job_uid=UID, attempt=2)
        assert parsed.progress is not None

    def test_an_unreadable_attempt_is_ignored(self) -> None:
        parsed = parse_report({**report(), "attempt": "two"}, job_uid=UID, attempt=2)
        assert parsed.progress is None
        assert parsed.ignored == ("report ignored: attempt 'two' is not a number",)

    def test_another_jobs_report_is_set_aside(self) -> None:
        # A job re-created under the same name: the old job's ConfigMap may linger.
        for uid in ("someone-else", None):
            parsed = parse_report(report(uid=uid), job_uid=UID, attempt=1)
            assert parsed.progress is None and parsed.stale is not None


class TestStatusPatch:
    def test_first_report_sets_both_replacing_every_field(self) -> None:
        patch = status_patch(parse_report(report(), job_uid=UID, attempt=1), None)
        # Every field of the models is named: null removes one the last report had.
        assert set(patch["progress"]) == set(Progress.model_fields)
        assert set(patch["measuredPlan"]) == set(Plan.model_fields)
        assert patch["progress"]["gradNorm"] is None and patch["progress"]["step"] == 30

    def test_nothing_when_the_status_already_says_it(self) -> None:
        parsed = parse_report(report(), job_uid=UID, attempt=1)
        status = SFTJobStatus.model_validate(
            {"attempts": 1, **status_patch(parsed, SFTJobStatus())}  # what the operator wrote
        )
        assert status_patch(parsed, status) == {}

    def test_only_the_part_that_changed(self) -> None:
        before = parse_report(report(), job_uid=UID, attempt=1)
        status = SFTJobStatus.model_validate(
            {"progress": before.progress, "measuredPlan": before.measured_plan}
        )
        after = parse_report(with_progress(step=31, summary="31/120"), job_uid=UID, attempt=1)
        patch = status_patch(after, status)
        assert list(patch) == ["progress"]
        assert patch["progress"]["step"] == 31

    def test_a_plan_relying_on_defaults_compares_equal(self) -> None:
        minimal = {k: PLAN[k] for k in ("worldSize", "effectiveBatchSize")} | {
            "perDeviceTrainBatchSize": 4,
            "gradientAccumulationSteps": 2,
        }
        data = {**report(), "measuredPlan": json.dumps(minimal)}
        parsed = parse_report(data, job_uid=UID, attempt=1)
        status = SFTJobStatus.model_validate({"measuredPlan": minimal})
        assert "measuredPlan" not in status_patch(parsed, status)

    def test_a_stale_or_empty_report_changes_nothing(self) -> None:
        status = SFTJobStatus.model_validate({"attempts": 2, "progress": {"step": 5}})
        assert status_patch(parse_report(report(attempt=1), job_uid=UID, attempt=2), status) == {}
        assert status_patch(parse_report(None, job_uid=UID, attempt=2), status) == {}


class TestFold:
    def test_folds_the_current_attempt_and_logs_what_was_ignored_once(
        self, caplog: pytest.LogCaptureFixture
    ) -> None:
        status = SFTJobStatus.model_validate({"phase": "Running", "attempts": 1})
        forged = report(phase="Succeeded")
        caplog.set_level(logging.WARNING, logger="sftjob_operator.progress_report")
        patch = fold(forged, ("ns", "fold-once", UID), 1, status)
        assert set(patch) == {"progress", "measuredPlan"}
        assert "phase" not in patch
        again = fold(forged, ("ns", "fold-once", UID), 1, status)
        assert again == patch
        warnings = [r.getMessage() for r in caplog.records]
        assert warnings == [
            "progress report of ns/fold-once: phase: not part of a progress report "
            "(jobUid, attempt, progress, measuredPlan, speedPlan)"
        ]

    def test_the_log_memory_is_bounded(self) -> None:
        memory = IgnoredLog(size=3)
        for index in range(10):
            memory.note("ns", f"job-{index}", parse_report(report(x="1"), job_uid=UID, attempt=1))
        assert len(memory.last) == 3


def test_encode_sends_only_what_the_trainer_has() -> None:
    data = encode_report(job_uid=UID, attempt=4, progress={"step": 1})
    assert data == {"jobUid": UID, "attempt": "4", "progress": '{"step": 1}'}


class TestRowsOverMaxLength:
    """Rows the trainer truncated or dropped reach the status as counts and a warning."""

    def over_length(self, truncated: int, dropped: int) -> dict[str, str]:
        plan = {**PLAN, "rowsTruncated": truncated, "rowsDropped": dropped}
        return encode_report(job_uid=UID, attempt=1, progress=PROGRESS, measured_plan=plan)

    def test_counts_and_a_warning_reach_the_status(self) -> None:
        parsed = parse_report(self.over_length(3, 1), job_uid=UID, attempt=1)
        assert parsed.ignored == ()
        patch = status_patch(parsed, None)
        assert patch["measuredPlan"]["rowsTruncated"] == 3
        assert patch["measuredPlan"]["rowsDropped"] == 1
        [advisory] = patch["advisories"]
        assert advisory["code"] == "RowsOverMaxLength"
        assert advisory["field"] == "spec.training.maxLength"
        assert "4 rows longer than maxLength" in advisory["message"]
        assert "3 truncated" in advisory["message"] and "1 dropped" in advisory["message"]

    def test_the_warning_joins_the_spec_advisories_once(self) -> None:
        spec_advice = {
            "code": "LearningRateOutOfRange",
            "severity": "Warning",
            "field": "spec.training.learningRate",
            "message": "m",
        }
        parsed = parse_report(self.over_length(2, 0), job_uid=UID, attempt=1)
        patch = status_patch(parsed, SFTJobStatus.model_validate({"advisories": [spec_advice]}))
        assert [a["code"] for a in patch["advisories"]] == [
            "LearningRateOutOfRange",
            "RowsOverMaxLength",
        ]
        applied = SFTJobStatus.model_validate({**patch})
        # The same report again changes nothing.
        assert status_patch(parsed, applied) == {}

    def test_no_warning_when_every_row_fits(self) -> None:
        parsed = parse_report(self.over_length(0, 0), job_uid=UID, attempt=1)
        assert "advisories" not in status_patch(parsed, None)

    def test_counts_out_of_range_are_ignored(self) -> None:
        parsed = parse_report(self.over_length(-1, 0), job_uid=UID, attempt=1)
        assert any("rowsTruncated" in reason for reason in parsed.ignored)


def test_eval_losses_pass_into_the_progress() -> None:
    parsed = parse_report(with_progress(evalLoss=2.5, bestEvalLoss=2.25), job_uid=UID, attempt=1)
    assert parsed.ignored == ()
    assert parsed.progress is not None
    assert (parsed.progress["evalLoss"], parsed.progress["bestEvalLoss"]) == (2.5, 2.25)


SPEED_PLAN: dict[str, Any] = {
    "preset": "exact",
    "perDeviceTrainBatchSize": 4,
    "gradientAccumulationSteps": 4,
    "gradientCheckpointing": False,
    "attention": "sdpa",
    "compile": False,
    "levers": [
        {"name": "dataWorkers", "on": True, "reason": "2 DataLoader workers collate"},
        {"name": "compile", "on": False, "reason": "preset exact: it changes numbers"},
    ],
}


def with_speed_plan(**changes: Any) -> dict[str, str]:
    data = encode_report(job_uid=UID, attempt=1, speed_plan={**SPEED_PLAN, **changes})
    return {**report(), **data}


class TestSpeedPlan:
    """status.speedPlan: what the pod decided to run, validated as the rest of the report."""

    def test_the_trainers_speed_plan_reaches_the_status(self) -> None:
        parsed = parse_report(with_speed_plan(), job_uid=UID, attempt=1)
        assert parsed.ignored == ()
        assert parsed.speed_plan == SPEED_PLAN
        patch = fold(with_speed_plan(), ("ns", "speed", UID), 1, None)
        assert patch["speedPlan"] == SPEED_PLAN
        written = SFTJobStatus.model_validate({"speedPlan": patch["speedPlan"]}).speedPlan
        assert written is not None and written.levers[0].name == "dataWorkers"
        assert written.levers[0].on and written.attention == "sdpa"
        # Once in the status, the same report changes nothing.
        status = SFTJobStatus.model_validate({"speedPlan": SPEED_PLAN})
        assert "speedPlan" not in fold(with_speed_plan(), ("ns", "speed", UID), 1, status)

    @pytest.mark.parametrize(
        ("levers", "why"),
        [
            ([{"name": "rmRf", "on": True, "reason": ""}], "'rmRf' is not a speed lever"),
            ([{"name": "compile", "on": "yes", "reason": ""}], "not true or false"),
            ([{"name": "compile", "on": True, "reason": "x" * 257}], "at most 256"),
            ([{"name": "compile", "on": True, "phase": "Succeeded"}], "is not a lever"),
            ([{"name": "compile", "on": True}] * 2, "names a lever twice"),
            # One more than there are levers (13 of them since fp8Matmuls).
            ([{"name": "compile", "on": True}] * 14, "at most 13 levers"),
            ("compile", "is not a list"),
        ],
    )
    def test_bad_levers_are_refused_with_a_reason(self, levers: Any, why: str) -> None:
        parsed = parse_report(with_speed_plan(levers=levers), job_uid=UID, attempt=1)
        # Without valid levers the plan says nothing trustworthy: ignored whole.
        assert parsed.speed_plan is None
        assert any(why in reason for reason in parsed.ignored), parsed.ignored
        assert parsed.progress is not None  # the rest of the report still counts

    @pytest.mark.parametrize(
        ("field", "value"),
        [
            ("preset", "fastest"),
            ("perDeviceTrainBatchSize", 0),
            ("gradientCheckpointing", "false"),
            ("attention", "a" * 65),
            ("compile", 1),
        ],
    )
    def test_a_bad_field_is_dropped_and_the_levers_kept(self, field: str, value: Any) -> None:
        parsed = parse_report(with_speed_plan(**{field: value}), job_uid=UID, attempt=1)
        assert parsed.speed_plan is not None and field not in parsed.speed_plan
        assert parsed.speed_plan["levers"] == SPEED_PLAN["levers"]
        assert any(reason.startswith(f"speedPlan.{field}:") for reason in parsed.ignored)


# --------------------------------------------------------------------- columns


@pytest.mark.parametrize(
    ("loss", "shown"),
    [
        (4.67442512512207, "4.674"),
        (0.000123456, "0.0001235"),
        (12.0, "12"),
        (1234567.0, "1.235e+06"),
        (-0.5, "-0.5"),
    ],
)
def test_loss_display_has_4_significant_digits(loss: float, shown: str) -> None:
    assert loss_display(loss) == shown


@pytest.mark.parametrize(
    ("step", "total", "shown"),
    [
        (12, 200, "12/200 (6%)"),
        (199, 200, "199/200 (99%)"),
        (200, 200, "200/200 (100%)"),
        (0, 120, "0/120 (0%)"),
        (5, None, "5/?"),
        (5, 0, "5/?"),
    ],
)
def test_progress_summary(step: int, total: int | None, shown: str) -> None:
    assert progress_summary(step, total) == shown


def test_the_status_gets_the_column_texts_the_operator_derives() -> None:
    forged = with_progress(loss=4.67442512512207, lossDisplay="0.0001", summary="30/120")
    patch = status_patch(parse_report(forged, job_uid=UID, attempt=1), SFTJobStatus())
    assert patch["progress"]["lossDisplay"] == "4.674"
    assert patch["progress"]["loss"] == 4.67442512512207  # the number stays for tools
    assert patch["progress"]["summary"] == "30/120 (25%)"
    without_loss = with_progress(loss=None, lossDisplay="1.0")
    patch = status_patch(parse_report(without_loss, job_uid=UID, attempt=1), SFTJobStatus())
    assert patch["progress"]["lossDisplay"] is None  # a merge patch removes the old text


def test_displayed_of_no_progress_is_none() -> None:
    assert displayed(None) is None


class TestNoEtaUnlessRunning:
    @pytest.mark.parametrize("phase", ["Suspended", "Failed", "Succeeded", "Restarting"])
    def test_the_report_eta_does_not_reach_a_job_that_is_not_running(self, phase: str) -> None:
        patch = fold(report(), ("ml", "demo", UID), 1, SFTJobStatus(), phase)
        assert patch["progress"]["eta"] is None and patch["progress"]["etaSeconds"] is None
        assert patch["progress"]["step"] == 30

    def test_a_running_job_shows_the_report_eta(self) -> None:
        patch = fold(report(), ("ml", "demo", UID), 1, SFTJobStatus(), "Running")
        assert (patch["progress"]["eta"], patch["progress"]["etaSeconds"]) == ("3m20s", 200)

    def test_an_unchanged_report_still_clears_the_eta_the_status_has(self) -> None:
        running = fold(report(), ("ml", "demo", UID), 1, SFTJobStatus(), "Running")
        status = SFTJobStatus.model_validate({"attempts": 1, **running})
        assert fold(report(), ("ml", "demo", UID), 1, status, "Running") == {}
        failed = fold(report(), ("ml", "demo", UID), 1, status, "Failed")
        assert failed["progress"]["eta"] is None


def test_merged_patch_merges_progress_and_the_operator_wins() -> None:
    report_patch = {"progress": {"step": 30, "eta": "3m20s"}, "measuredPlan": {"worldSize": 2}}
    operator_patch = {"phase": "Failed", "progress": {"eta": None, "etaSeconds": None}}
    assert merged_patch(report_patch, operator_patch) == {
        "progress": {"step": 30, "eta": None, "etaSeconds": None},
        "measuredPlan": {"worldSize": 2},
        "phase": "Failed",
    }
    assert merged_patch({}, operator_patch) == operator_patch
    assert merged_patch(report_patch, {}) == report_patch


# --------------------------------------------------------------------- history


def test_a_history_point_is_the_reports_figures_to_4_significant_digits() -> None:
    point = history_point({**PROGRESS, "loss": 4.67442512512207, "evalLoss": 5.123456})
    assert point == {
        "step": 30,
        "loss": 4.674,
        "learningRate": 0.0002,
        "tokensPerSecond": 1234.0,
        "evalLoss": 5.123,
    }  # no gradNorm: the report has none


def test_a_point_of_the_same_step_replaces_it_and_a_resumed_run_drops_later_ones() -> None:
    history = [{"step": s, "loss": 2.0} for s in (10, 20, 30)]
    assert with_point(history, {"step": 30, "loss": 1.9, "evalLoss": 2.1})[-1] == {
        "step": 30,
        "loss": 1.9,
        "evalLoss": 2.1,
    }
    assert [p["step"] for p in with_point(history, {"step": 15})] == [10, 15]


def test_a_long_run_keeps_a_bounded_curve_from_first_to_last_step() -> None:
    history: list[dict[str, Any]] = []
    for step in range(1, 2001):
        point = {
            "step": step,
            "loss": 3.0 / step**0.5 + 0.123456789,
            "learningRate": 2e-4 * (1 - step / 2001),
            "gradNorm": 1.23456789,
            "tokensPerSecond": 12345.6789,
            "evalLoss": 2.3456789,
        }
        history = with_point(history, history_point(point))
        assert len(history) <= HISTORY_POINTS
    steps = [p["step"] for p in history]
    assert steps[0] == 1 and steps[-1] == 2000 and steps == sorted(steps)
    assert len(history) > HISTORY_POINTS // 2  # thinned, not emptied
    gaps = {b - a for a, b in zip(steps[:-2], steps[1:-1], strict=True)}
    assert len(gaps) == 1  # evenly spread over the run (the newest point aside)
    assert len(json.dumps(history)) < 6 * 1024  # a few KiB in the object, whatever the run


def test_the_status_history_grows_with_each_new_step_and_not_on_a_repeated_pass() -> None:
    status = SFTJobStatus(attempts=1)
    for step, loss in ((1, 2.5), (2, 2.25), (2, 2.25), (3, 2.0)):
        data = with_progress(step=step, loss=loss)
        patch = status_patch(parse_report(data, job_uid=UID, attempt=1), status)
        status = status_after(status, patch)
    assert status.progress is not None and status.progress.history is not None
    assert [(p.step, p.loss) for p in status.progress.history] == [(1, 2.5), (2, 2.25), (3, 2.0)]
    again = parse_report(with_progress(step=3, loss=2.0), job_uid=UID, attempt=1)
    assert status_patch(again, status) == {}


def test_a_report_cannot_write_the_history() -> None:
    forged = with_progress(history=[{"step": 1, "loss": 0.0}])
    parsed = parse_report(forged, job_uid=UID, attempt=1)
    assert parsed.progress is not None and "history" not in parsed.progress
    assert any(reason.startswith("progress.history:") for reason in parsed.ignored)


def test_model_flops_utilization_reaches_the_progress_as_a_ratio() -> None:
    parsed = parse_report(with_progress(mfu=0.4123), job_uid=UID, attempt=1)
    assert parsed.progress is not None and parsed.progress["mfu"] == 0.4123
    assert status_patch(parsed, None)["progress"]["mfu"] == 0.4123
    # Unknown (a CPU run reports null): nothing ignored, and the status has none.
    cpu = parse_report(with_progress(mfu=None), job_uid=UID, attempt=1)
    assert cpu.ignored == () and cpu.progress is not None and "mfu" not in cpu.progress
    assert status_patch(cpu, None)["progress"]["mfu"] is None
