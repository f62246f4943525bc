"""The shared case table itself is sound: every job it builds is a valid SFTJob, so a
refusal in any tier is the policy's, never a schema error."""

from __future__ import annotations

import pytest
from policy_cases import (
    CASES,
    COMPLIANT_VARIANTS,
    job_manifest,
    merge_patch,
    profile_documents,
)
from sftjob_operator.api import parse_sftjob, parse_spec
from sftjob_operator.profile_api import SFTProfile


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_case_is_a_valid_sftjob(case) -> None:  # type: ignore[no-untyped-def]
    parse_sftjob(job_manifest("policy-case", "tenant", case))


@pytest.mark.parametrize("patch", COMPLIANT_VARIANTS.values(), ids=list(COMPLIANT_VARIANTS))
def test_every_compliant_variant_is_a_valid_spec(patch) -> None:  # type: ignore[no-untyped-def]
    parse_spec(merge_patch(job_manifest("b", "tenant")["spec"], patch))


def test_case_names_are_unique_and_there_are_enough() -> None:
    names = [case.name for case in CASES]
    assert len(names) == len(set(names))
    assert len(CASES) >= 30


def test_merge_patch_merges_deletes_and_replaces_lists() -> None:
    target = {"a": {"b": 1, "c": 2}, "l": [1, 2]}
    assert merge_patch(target, {"a": {"b": None, "d": 3}, "l": [3]}) == {
        "a": {"c": 2, "d": 3},
        "l": [3],
    }
    assert target == {"a": {"b": 1, "c": 2}, "l": [1, 2]}


def test_profiles_are_typed_profiles() -> None:
    names = [SFTProfile.model_validate(d).metadata.name for d in profile_documents()]
    assert names == ["tenant-lora", "research-only"]
