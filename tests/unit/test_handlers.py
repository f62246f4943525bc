"""The Kopf wiring: nothing that makes Kopf add a finalizer or keep per-object state."""

from __future__ import annotations

import kopf
import pytest
from sftjob_operator import handlers
from sftjob_operator.children import LABEL_JOB


def test_no_handler_needs_a_finalizer_or_a_diff() -> None:
    registry = kopf.get_default_registry()
    # Change handlers (create/update/resume/delete) keep diff-base and progress annotations
    # and may need a finalizer; timers and daemons always add one (kopf/on.py).
    assert registry._changing._handlers == []
    assert registry._spawning._handlers == []
    watched = {h.selector.any_name for h in registry._watching._handlers}
    indexed = {h.selector.any_name for h in registry._indexing._handlers}
    # Profiles and namespaces: what a job's policy is resolved from (read-only).
    assert watched == indexed == {"sftjobs", "pods", "configmaps", "sftprofiles", "namespaces"}
    for handler in registry._watching._handlers + registry._indexing._handlers:
        if handler.selector.any_name in ("pods", "configmaps"):
            assert handler.labels == {LABEL_JOB: kopf.PRESENT}


def test_kopf_keeps_no_diff_base() -> None:
    storage = handlers.NoDiffBase()
    body = kopf.Body({"metadata": {"name": "x"}, "spec": {"a": 1}})
    assert storage.build(body=body) == {}
    assert storage.fetch(body=body) is None


def test_require_profile_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SFTJOB_REQUIRE_PROFILE", raising=False)
    assert handlers.require_profile() is False
    for value, expected in [("true", True), ("1", True), ("TRUE", True), ("false", False)]:
        monkeypatch.setenv("SFTJOB_REQUIRE_PROFILE", value)
        assert handlers.require_profile() is expected
