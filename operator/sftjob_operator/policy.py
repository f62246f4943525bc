"""Profiles applied to jobs: which profile, the effective spec, and what breaks the policy.

Pure: no API calls. The operator gives it the job's spec, its namespace's labels and the
SFTProfiles it has seen; `sftjob plan --profile` gives it the same from files, so both say
the same verdict.

Order: the profile is selected (the job's `spec.profile`, else the only profile selecting
the namespace), the profile's defaults are merged under the job's spec, and the limits are
checked against what the job itself asked for *and* the effective spec (an image the
profile fills in must be allowed too). Every violation names the rule
(`limits.allowedImages`) and the job field (`spec.image`) and says what to do.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .api import SFTJobSpec
from .profile_api import LabelSelector, ModelCacheSpec, SFTProfile

# Env names the operator sets in every trainer pod (children._env) or that redirect where
# the token goes (HF_ENDPOINT) or what code runs (PYTHONPATH, LD_PRELOAD): no tenant may set
# them, with or without a profile.
OPERATOR_ENV: frozenset[str] = frozenset()  # filled by the implementation


@dataclass(frozen=True)
class PolicyViolation:
    rule: str  # the profile rule, e.g. "limits.allowedImages", or "protectedEnv" (built in)
    field: str  # the job field, e.g. "spec.image", "spec.env[2].name"
    message: str  # what is wrong and what to do

    def __str__(self) -> str:
        return f"{self.field}: {self.message} (rule {self.rule})"


@dataclass(frozen=True)
class PodDefaults:
    """Pod settings only a profile gives (tenants have no field for them)."""

    affinity: Mapping[str, Any] = field(default_factory=dict)
    priorityClassName: str | None = None
    queueName: str | None = None
    ephemeralStorage: str | None = None  # per pod: request, and the scratch emptyDirs' limit
    modelCache: ModelCacheSpec | None = None
    runAsUser: int | None = None
    runAsGroup: int | None = None
    fsGroup: int | None = None

    def to_json(self) -> dict[str, Any]:
        raise NotImplementedError

    @classmethod
    def from_json(cls, data: Mapping[str, Any] | None) -> PodDefaults:
        raise NotImplementedError


@dataclass(frozen=True)
class Resolution:
    profile: SFTProfile | None
    spec: SFTJobSpec  # the effective spec: what runs
    pod: PodDefaults
    from_profile: list[tuple[str, Any]]  # (job field path, value) the profile filled in
    violations: list[PolicyViolation]

    def effective_status(self) -> dict[str, Any] | None:
        """status.effective (api.EffectiveStatus as JSON), None when no profile applies."""
        raise NotImplementedError


def selector_matches(selector: LabelSelector, labels: Mapping[str, str]) -> bool:
    raise NotImplementedError


def resolve(
    spec: SFTJobSpec,
    namespace: str,
    namespace_labels: Mapping[str, str],
    profiles: Sequence[SFTProfile],
    require_profile: bool = False,
) -> Resolution:
    """The effective spec of a job and every way it breaks its profile (or the built-ins)."""
    raise NotImplementedError
