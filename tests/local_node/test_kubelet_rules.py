"""The pure rules behind the kubelet behaviour of the local node: image references,
CRI log records, which container run `pods/<name>/log` reads, log options, process trees."""

from __future__ import annotations

import pytest
from sftjob_local.node_logs import (
    LogOptions,
    choose_instance,
    instance_running,
    parse_options,
    parse_time,
    render,
)
from sftjob_local.node_spec import image_reference_problem, memory_limit_bytes
from sftjob_local.node_supervisor import descendants, rfc3339nano, split_records


@pytest.mark.parametrize(
    ("image", "problem"),
    [
        ("busybox", None),
        ("ghcr.io/org/trainer:1.2", None),
        ("localhost:5000/x@sha256:" + "a" * 64, None),
        # the messages users see in `kubectl describe` of real clusters
        ("my image", "invalid reference format"),
        ("registry.hub.docker.com/library//nginx:latest", "invalid reference format"),
        (
            "busyBOX",
            "invalid reference format: repository name (library/busyBOX) must be lowercase",
        ),
        (
            "hfhugs/unsloth-gemma-3-4b-it-GGUF:Q4_K_XL",
            "invalid reference format: repository name (hfhugs/unsloth-gemma-3-4b-it-GGUF) must be lowercase",
        ),
        ("x/" + "a" * 300, "invalid reference format: repository name must not be more than 255 characters"),
    ],
)  # fmt: skip
def test_image_reference_problem_follows_the_reference_library(image: str, problem: str) -> None:
    """github.com/distribution/reference ParseNormalizedNamed / regexp.go."""
    assert image_reference_problem(image) == problem


def test_memory_limit_bytes() -> None:
    assert memory_limit_bytes({"resources": {"limits": {"memory": "64Mi"}}}) == 64 * 2**20
    assert memory_limit_bytes({"resources": {"limits": {"memory": "1G"}}}) == 10**9
    assert memory_limit_bytes({"resources": {"requests": {"memory": "1G"}}}) == 0


def test_split_records_cuts_lines_partials_and_long_lines() -> None:
    records, rest = split_records(b"one\ntwo\nthr", final=False)
    assert (records, rest) == ([(b"one", False), (b"two", False)], b"thr")
    records, rest = split_records(rest + b"ee", final=True)
    assert (records, rest) == ([(b"three", True)], b"")
    records, rest = split_records(b"x" * (16 * 1024 + 3) + b"\n", final=False)
    assert [(len(t), p) for t, p in records] == [(16 * 1024, True), (3, False)]


def test_rfc3339nano_drops_trailing_zeros_like_go() -> None:
    assert rfc3339nano(0.5) == "1970-01-01T00:00:00.5Z"
    assert rfc3339nano(1.0) == "1970-01-01T00:00:01Z"
    assert abs(parse_time(rfc3339nano(1234.123456789)) - 1234.123456789) < 1e-6


def test_render_applies_tail_since_and_timestamps_to_cri_records() -> None:
    data = (
        b"2026-01-01T00:00:01Z stdout F a\n"
        b"2026-01-01T00:00:02Z stderr P b\n"
        b"2026-01-01T00:00:03Z stderr F c\n"
        b"not a record\n"
    )
    assert render(data, LogOptions()) == b"a\nbc\nnot a record\n"
    assert render(data, LogOptions(tail_lines=2)) == b"c\nnot a record\n"
    since = parse_time("2026-01-01T00:00:02Z")
    assert render(data, LogOptions(since=since)) == b"bc\nnot a record\n"
    assert render(data, LogOptions(timestamps=True, tail_lines=4)).startswith(
        b"2026-01-01T00:00:01Z a\n2026-01-01T00:00:02Z b2026-01-01T00:00:03Z c\n"
    )


def test_log_options_validation_as_the_apiserver() -> None:
    """pkg/apis/core/validation ValidatePodLogOptions."""
    _, causes = parse_options({"tailLines": "-1", "limitBytes": "0"}, now=0)
    assert [c["field"] for c in causes] == ["tailLines", "limitBytes"]
    _, causes = parse_options({"sinceSeconds": "5", "sinceTime": "2026-01-01T00:00:00Z"}, now=0)
    assert causes and "at most one of" in causes[0]["message"]
    opts, causes = parse_options({"sinceSeconds": "5", "timestamps": "true"}, now=100)
    assert not causes and opts.since == 95 and opts.timestamps


def _pod(status: dict) -> dict:
    return {"metadata": {"name": "p", "uid": "u"}, "status": {"containerStatuses": [status]}}


def test_choose_instance_follows_the_kubelets_container_log_status() -> None:
    """pkg/kubelet/kubelet_pods.go validateContainerLogStatus."""
    running = _pod({"name": "c", "containerID": "local://u/c/2", "state": {"running": {}},
                    "lastState": {"terminated": {"containerID": "local://u/c/1"}}})  # fmt: skip
    assert choose_instance(running, "c", previous=False) == (2, None)
    assert choose_instance(running, "c", previous=True) == (1, None)
    backoff = _pod({"name": "c", "state": {"waiting": {"reason": "CrashLoopBackOff"}},
                    "lastState": {"terminated": {"containerID": "local://u/c/0"}}})  # fmt: skip
    assert choose_instance(backoff, "c", previous=False) == (0, None)
    fresh = _pod({"name": "c", "state": {"waiting": {"reason": "CreateContainerConfigError"}}})
    assert choose_instance(fresh, "c", previous=False) == (
        None,
        'container "c" in pod "p" is waiting to start: CreateContainerConfigError',
    )
    assert choose_instance(fresh, "c", previous=True) == (
        None,
        'previous terminated container "c" in pod "p" not found',
    )
    assert instance_running(running, "u", "c", 2)
    assert not instance_running(running, "u", "c", 1)
    assert not instance_running(running, "other-uid", "c", 2)


def test_descendants_follow_parent_links() -> None:
    table = {
        10: (1, "S", 10, 0, 0),
        11: (10, "S", 11, 0, 0),
        12: (11, "S", 11, 0, 0),
        13: (12, "S", 13, 0, 0),  # called setsid: still a descendant
        20: (1, "S", 20, 0, 0),
    }
    assert descendants(10, table) == {11, 12, 13}
    assert descendants(20, table) == set()
