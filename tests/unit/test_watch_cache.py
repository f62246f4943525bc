"""The watch cache (children by job label, deletes, expectations) and the timed-pass schedule."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sftjob_operator.children import LABEL_JOB
from sftjob_operator.pass_schedule import next_timed_pass
from sftjob_operator.watch_cache import WatchCache, contains_merge_patch


def job(name: str = "j", uid: str = "u1", status: dict | None = None) -> dict:
    return {
        "metadata": {"name": name, "namespace": "ns", "uid": uid, "managedFields": [{"x": 1}]},
        "spec": {},
        "status": status or {},
    }


def pod(name: str, job_name: str = "j", **metadata: object) -> dict:
    return {
        "metadata": {"name": name, "namespace": "ns", "labels": {LABEL_JOB: job_name}, **metadata}
    }


def test_children_are_found_by_their_job_label_and_deletes_drop_them() -> None:
    cache = WatchCache()
    assert cache.on_job_event(None, job()) == "ns/j"
    assert cache.on_child_event("Pod", "ADDED", pod("j-a1-r0")) == "ns/j"
    assert cache.on_child_event("Pod", "ADDED", pod("other-a1-r0", "other")) == "ns/other"
    assert (
        cache.on_child_event("Pod", "ADDED", {"metadata": {"name": "x", "namespace": "ns"}}) is None
    )
    assert [p["metadata"]["name"] for p in cache.job_pods("ns", "j")] == ["j-a1-r0"]
    cache.on_child_event("Pod", "DELETED", pod("j-a1-r0"))
    assert cache.job_pods("ns", "j") == []
    config = {"metadata": {"name": "j-config", "namespace": "ns", "labels": {LABEL_JOB: "j"}}}
    cache.on_child_event("ConfigMap", "ADDED", {**config, "data": {"k": "v"}})
    assert cache.config_map("ns", "j-config")["data"] == {"k": "v"}
    assert "managedFields" not in cache.job("ns/j")["metadata"]


def test_reads_are_copies() -> None:
    cache = WatchCache()
    cache.on_job_event(None, job())
    cache.job("ns/j")["status"]["phase"] = "Mutated"
    assert cache.job("ns/j")["status"] == {}


def test_a_deleted_event_of_an_older_incarnation_keeps_the_new_job() -> None:
    cache = WatchCache()
    cache.on_job_event("ADDED", job(uid="new"))
    cache.on_job_event("DELETED", job(uid="old"))
    assert cache.job_uid("ns", "j") == "new"
    cache.on_job_event("DELETED", job(uid="new"))
    assert cache.job("ns/j") is None


def test_a_job_waits_until_the_watch_shows_its_own_writes() -> None:
    now = [100.0]
    cache = WatchCache(expectation_timeout=10, clock=lambda: now[0])
    cache.on_job_event(None, job())
    cache.expect_child({"kind": "Pod", **pod("j-a1-r0")})
    cache.expect_job_status("ns", "j", {"attempts": 1, "phase": "Pending"})
    assert cache.unsettled("ns/j") == 10
    cache.on_child_event("Pod", "ADDED", pod("j-a1-r0"))
    assert cache.unsettled("ns/j") is not None  # the status is not there yet
    cache.on_job_event("MODIFIED", job(status={"attempts": 1, "phase": "Pending", "plan": {}}))
    assert cache.unsettled("ns/j") is None


def test_an_expectation_the_watch_never_meets_times_out() -> None:
    now = [100.0]
    cache = WatchCache(expectation_timeout=10, clock=lambda: now[0])
    cache.on_job_event(None, job())
    cache.expect_job_status("ns", "j", {"phase": "Running"})
    now[0] = 105.0
    assert cache.unsettled("ns/j") == 5
    now[0] = 111.0
    assert cache.unsettled("ns/j") is None


def test_a_deleted_pod_is_expected_gone_or_terminating() -> None:
    cache = WatchCache()
    cache.on_job_event(None, job())
    cache.on_child_event("Pod", "ADDED", pod("j-a1-r0"))
    cache.expect_pod_gone("ns", "j-a1-r0")
    assert cache.unsettled("ns/j") is not None
    cache.on_child_event(
        "Pod", "MODIFIED", pod("j-a1-r0", deletionTimestamp="2026-01-01T00:00:00Z")
    )
    assert cache.unsettled("ns/j") is None


def test_merge_patch_containment() -> None:
    assert contains_merge_patch({"a": 1, "b": {"c": 2, "d": 3}}, {"b": {"c": 2}})
    assert not contains_merge_patch({"a": 1}, {"a": 2})
    assert contains_merge_patch({"a": 1}, {"gone": None})
    # Deletions are not checked: the server may default a deleted field again.
    assert contains_merge_patch({"a": 1}, {"a": None})
    assert contains_merge_patch({"l": [1, 2]}, {"l": [1, 2]})
    assert not contains_merge_patch({"l": [1, 2, 3]}, {"l": [1, 2]})


NOW = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)


def stamp(seconds_ago: float) -> str:
    return (NOW - timedelta(seconds=seconds_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")


def test_ttl_and_deadline_schedule_a_pass() -> None:
    finished = {"phase": "Succeeded", "completionTime": stamp(10)}
    assert (
        next_timed_pass({"spec": {"ttlSecondsAfterFinished": 60}, "status": finished}, NOW) == 50.2
    )
    assert next_timed_pass({"spec": {}, "status": finished}, NOW) is None
    running = {"phase": "Running", "startTime": stamp(30)}
    assert next_timed_pass({"spec": {"activeDeadlineSeconds": 100}, "status": running}, NOW) == 70.2
    # Just past: due now; long past: the pass that ran saw it, no spinning.
    assert next_timed_pass({"spec": {"activeDeadlineSeconds": 29}, "status": running}, NOW) == 0.2
    assert next_timed_pass({"spec": {"activeDeadlineSeconds": 10}, "status": running}, NOW) is None
    suspended = {"phase": "Suspended", "startTime": stamp(30)}
    assert (
        next_timed_pass({"spec": {"activeDeadlineSeconds": 100}, "status": suspended}, NOW) is None
    )


def test_a_deleted_field_the_server_defaults_again_does_not_hold_the_job() -> None:
    """A status patch that nulls a CRD-defaulted field (measuredPlan.estimate defaults to
    false) is shown by the watch with the default, not without the field."""
    from sftjob_operator.watch_cache import contains_merge_patch

    stored = {"measuredPlan": {"totalSteps": 8, "estimate": False}}
    assert contains_merge_patch(stored, {"measuredPlan": {"totalSteps": 8, "estimate": None}})
    assert not contains_merge_patch(stored, {"measuredPlan": {"totalSteps": 9, "estimate": None}})


def test_profiles_and_namespace_labels_are_kept_for_the_policy() -> None:
    cache = WatchCache()
    profile = {"metadata": {"name": "tenant", "managedFields": [{"x": 1}]}, "spec": {"a": 1}}
    cache.on_profile_event(None, profile)
    cache.on_profile_event("ADDED", {"metadata": {"name": "other"}, "spec": {}})
    [first, second] = cache.profiles()
    assert (first["metadata"]["name"], second["metadata"]["name"]) == ("other", "tenant")
    assert "managedFields" not in second["metadata"]
    second["spec"]["a"] = 2  # a read is a copy
    assert cache.profiles()[1]["spec"] == {"a": 1}
    cache.on_profile_event("DELETED", {"metadata": {"name": "other"}})
    assert [p["metadata"]["name"] for p in cache.profiles()] == ["tenant"]

    # A namespace the watch has not shown is unknown (None), not "no labels".
    assert cache.namespace_labels("team-a") is None
    cache.on_namespace_event(None, {"metadata": {"name": "team-a"}})
    assert cache.namespace_labels("team-a") == {}
    cache.on_namespace_event("MODIFIED", {"metadata": {"name": "team-a", "labels": {"p": "x"}}})
    assert cache.namespace_labels("team-a") == {"p": "x"}
    cache.on_namespace_event("DELETED", {"metadata": {"name": "team-a"}})
    assert cache.namespace_labels("team-a") is None
    assert cache.sizes()["profiles"] == 1 and cache.sizes()["namespaces"] == 0
