"""Conformance probes: watch streams (order, resume, 410, bookmarks, timeouts, filtered views)."""

from __future__ import annotations

import threading
import time

import pytest

pytestmark = [pytest.mark.local, pytest.mark.timeout(60)]


def cm_path(ns: str, name: str = "") -> str:
    return f"/api/v1/namespaces/{ns}/configmaps" + (f"/{name}" if name else "")


def merge(cluster, path, patch):
    return cluster.ok("PATCH", path, patch, content_type="application/merge-patch+json")


def test_watch_from_list_version_sees_added_modified_deleted_in_order(cluster, ns, uniq):
    listing = cluster.ok("GET", cm_path(ns))
    since = listing["metadata"]["resourceVersion"]
    name = f"w-{uniq}"
    cluster.ok("POST", cm_path(ns), {"metadata": {"name": name, "labels": {"w": uniq}}})
    merge(cluster, cm_path(ns, name), {"data": {"x": "1"}})
    cluster.ok("DELETE", cm_path(ns, name))
    events = cluster.watch(
        cm_path(ns), {"resourceVersion": since, "labelSelector": f"w={uniq}"}, max_events=3
    )
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
    assert versions == sorted(versions) and len(set(versions)) == 3
    assert events[1]["object"]["data"] == {"x": "1"}


def test_watch_without_version_starts_with_synthetic_added(cluster, ns, uniq):
    cluster.ok("POST", cm_path(ns), {"metadata": {"name": f"s-{uniq}", "labels": {"s": uniq}}})
    events = cluster.watch(cm_path(ns), {"labelSelector": f"s={uniq}"}, max_events=1)
    assert events[0]["type"] == "ADDED" and events[0]["object"]["metadata"]["name"] == f"s-{uniq}"


def test_watch_resumes_after_a_given_version(cluster, ns, uniq):
    name = f"r-{uniq}"
    created = cluster.ok("POST", cm_path(ns), {"metadata": {"name": name}})
    first = merge(cluster, cm_path(ns, name), {"data": {"n": "1"}})
    merge(cluster, cm_path(ns, name), {"data": {"n": "2"}})
    events = cluster.watch(
        cm_path(ns),
        {
            "resourceVersion": first["metadata"]["resourceVersion"],
            "fieldSelector": f"metadata.name={name}",
        },
        max_events=1,
    )
    assert events[0]["type"] == "MODIFIED" and events[0]["object"]["data"] == {"n": "2"}
    assert (
        created["metadata"]["resourceVersion"] != events[0]["object"]["metadata"]["resourceVersion"]
    )


def test_watch_from_a_too_old_version_is_410_expired_in_stream(cluster, ns):
    events = cluster.watch(cm_path(ns), {"resourceVersion": "1"}, max_events=1)
    assert events[0]["type"] == "ERROR"
    status = events[0]["object"]
    assert status["kind"] == "Status" and status["code"] == 410 and status["reason"] == "Expired"


def test_watch_timeout_closes_the_stream_with_a_bookmark(cluster, ns):
    since = cluster.ok("GET", cm_path(ns))["metadata"]["resourceVersion"]
    started = time.monotonic()
    events = cluster.watch(
        cm_path(ns),
        {
            "resourceVersion": since,
            "timeoutSeconds": "2",
            "allowWatchBookmarks": "true",
            "labelSelector": "nothing=here",
        },
        timeout=20,
    )
    elapsed = time.monotonic() - started
    assert 1.5 <= elapsed < 10
    bookmarks = [e for e in events if e["type"] == "BOOKMARK"]
    assert bookmarks, events
    assert bookmarks[-1]["object"]["kind"] == "ConfigMap"
    assert int(bookmarks[-1]["object"]["metadata"]["resourceVersion"]) >= int(since)


def test_watch_timeout_without_bookmarks_sends_none(cluster, ns):
    since = cluster.ok("GET", cm_path(ns))["metadata"]["resourceVersion"]
    events = cluster.watch(
        cm_path(ns),
        {"resourceVersion": since, "timeoutSeconds": "1", "labelSelector": "nothing=here"},
        timeout=20,
    )
    assert [e for e in events if e["type"] == "BOOKMARK"] == []


def test_filtered_watch_sees_objects_enter_and_leave_the_selection(cluster, ns, uniq):
    name = f"f-{uniq}"
    since = cluster.ok("POST", cm_path(ns), {"metadata": {"name": name, "labels": {"f": "off"}}})[
        "metadata"
    ]["resourceVersion"]
    merge(cluster, cm_path(ns, name), {"metadata": {"labels": {"f": uniq}}})
    merge(cluster, cm_path(ns, name), {"data": {"a": "b"}})
    merge(cluster, cm_path(ns, name), {"metadata": {"labels": {"f": "off"}}})
    events = cluster.watch(
        cm_path(ns), {"resourceVersion": since, "labelSelector": f"f={uniq}"}, max_events=3
    )
    assert [e["type"] for e in events] == ["ADDED", "MODIFIED", "DELETED"]
    assert (
        events[2]["object"]["metadata"]["labels"]["f"] == "off"
    )  # the state that left the selection


def test_live_watch_delivers_events_as_they_happen(cluster, ns, uniq):
    name = f"live-{uniq}"
    since = cluster.ok("GET", cm_path(ns))["metadata"]["resourceVersion"]
    received: list = []
    reader = threading.Thread(
        target=lambda: received.extend(
            cluster.watch(
                cm_path(ns),
                {"resourceVersion": since, "fieldSelector": f"metadata.name={name}"},
                max_events=2,
            )
        )
    )
    reader.start()
    time.sleep(0.3)
    cluster.ok("POST", cm_path(ns), {"metadata": {"name": name}})
    cluster.ok("DELETE", cm_path(ns, name))
    reader.join(15)
    assert [e["type"] for e in received] == ["ADDED", "DELETED"]
