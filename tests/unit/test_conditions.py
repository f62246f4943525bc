"""Condition list updates: transition times, exclusivity and order."""

from __future__ import annotations

from sftjob_operator.api import Condition
from sftjob_operator.conditions import (
    EXCLUSIVE,
    find,
    is_true,
    set_condition,
    set_exclusive,
)

T0 = "2025-01-01T00:00:00Z"
T1 = "2025-01-01T00:05:00Z"
T2 = "2025-01-01T00:10:00Z"


def by_type(conditions: list[Condition]) -> dict[str, Condition]:
    return {c.type: c for c in conditions}


class TestSetCondition:
    def test_adds_a_new_condition_with_every_field(self) -> None:
        out = set_condition([], "Planned", "True", "PlanReady", "ok", T0, 3)
        assert out == [
            Condition(
                type="Planned",
                status="True",
                reason="PlanReady",
                message="ok",
                lastTransitionTime=T0,
                observedGeneration=3,
            )
        ]

    def test_transition_time_kept_when_status_unchanged(self) -> None:
        first = set_condition([], "Running", "True", "Training", "launch 1", T0, 1)
        again = set_condition(first, "Running", "True", "Training", "launch 2", T1, 2)
        (running,) = again
        assert running.lastTransitionTime == T0
        # Reason, message and generation are refreshed even without a flip.
        assert (running.message, running.observedGeneration) == ("launch 2", 2)

    def test_transition_time_moves_when_status_flips(self) -> None:
        first = set_condition([], "Running", "False", "Launched", "", T0, 1)
        flipped = set_condition(first, "Running", "True", "Training", "", T1, 1)
        assert flipped[0].lastTransitionTime == T1
        back = set_condition(flipped, "Running", "False", "Unschedulable", "no GPU", T2, 1)
        assert back[0].lastTransitionTime == T2
        assert back[0].reason == "Unschedulable"

    def test_unknown_to_true_is_a_flip(self) -> None:
        first = set_condition([], "Running", "Unknown", "Waiting", "", T0, 1)
        assert (
            set_condition(first, "Running", "True", "Training", "", T1, 1)[0].lastTransitionTime
            == T1
        )

    def test_order_is_preserved(self) -> None:
        conds: list[Condition] = []
        for kind in ("Planned", "Running", "Failed"):
            conds = set_condition(conds, kind, "False", "Init", "", T0, 1)
        conds = set_condition(conds, "Running", "True", "Training", "", T1, 1)
        assert [c.type for c in conds] == ["Planned", "Running", "Failed"]
        conds = set_condition(conds, "Planned", "True", "PlanReady", "", T1, 1)
        assert [c.type for c in conds] == ["Planned", "Running", "Failed"]
        conds = set_condition(conds, "Suspended", "True", "SuspendedByUser", "", T1, 1)
        assert [c.type for c in conds] == ["Planned", "Running", "Failed", "Suspended"]

    def test_does_not_mutate_the_input(self) -> None:
        original = set_condition([], "Running", "False", "Launched", "", T0, 1)
        snapshot = [c.model_copy() for c in original]
        set_condition(original, "Running", "True", "Training", "", T1, 1)
        assert original == snapshot


class TestSetExclusive:
    def test_clears_other_true_lifecycle_conditions(self) -> None:
        conds = set_condition([], "Planned", "True", "PlanReady", "", T0, 1)
        conds = set_condition(conds, "Running", "True", "Training", "", T0, 1)
        conds = set_condition(conds, "Restarting", "True", "OutOfMemoryShrink", "", T0, 1)
        out = set_exclusive(conds, "Failed", "DataError", "bad rows", T1, 2)
        states = {c.type: c.status for c in out}
        assert states == {
            "Planned": "True",  # not a lifecycle condition: untouched
            "Running": "False",
            "Restarting": "False",
            "Failed": "True",
        }
        conditions = by_type(out)
        assert conditions["Running"].lastTransitionTime == T1
        assert conditions["Planned"].lastTransitionTime == T0
        assert conditions["Failed"].reason == "DataError"
        assert conditions["Failed"].message == "bad rows"

    def test_false_conditions_stay_untouched(self) -> None:
        conds = set_condition([], "Suspended", "False", "Resumed", "spec.suspend is false", T0, 1)
        out = set_exclusive(conds, "Running", "Training", "go", T1, 1)
        suspended = by_type(out)["Suspended"]
        assert (suspended.reason, suspended.lastTransitionTime) == ("Resumed", T0)

    def test_only_one_lifecycle_condition_true_whatever_the_sequence(self) -> None:
        conds: list[Condition] = []
        for i, kind in enumerate(("Running", "Restarting", "Running", "Suspended", "Succeeded")):
            conds = set_exclusive(conds, kind, "R", "", f"2025-01-01T00:0{i}:00Z", 1)
            assert [c.type for c in conds if c.status == "True"] == [kind]
        assert [c.type for c in conds] == ["Running", "Restarting", "Suspended", "Succeeded"]

    def test_setting_true_again_keeps_its_transition_time(self) -> None:
        conds = set_exclusive([], "Running", "Training", "", T0, 1)
        conds = set_exclusive(conds, "Running", "Training", "later", T1, 1)
        assert conds[0].lastTransitionTime == T0

    def test_exclusive_set(self) -> None:
        assert set(EXCLUSIVE) == {"Running", "Succeeded", "Failed", "Suspended", "Restarting"}


class TestLookups:
    def test_find_and_is_true(self) -> None:
        conds = set_condition([], "Running", "False", "Launched", "", T0, 1)
        assert find(conds, "Running") is conds[0]
        assert find(conds, "Failed") is None
        assert is_true(conds, "Running") is False
        assert is_true(conds, "Failed") is False
        assert is_true(set_condition(conds, "Running", "True", "T", "", T1, 1), "Running")
