"""deploy/policy/ is what sftjob_operator.profile_admission generates from policy.py."""

from __future__ import annotations

from pathlib import Path

import yaml
from sftjob_operator import policy, profile_admission
from sftjob_operator.profile_api import SFTProfile

ROOT = Path(__file__).resolve().parents[2]
POLICY_DIR = ROOT / "deploy" / "policy"
REGENERATE = "run `python -m sftjob_operator.profile_admission deploy/policy`"


def _variable(name: str) -> str:
    variables = profile_admission.policy_manifest()["spec"]["variables"]
    return next(v["expression"] for v in variables if v["name"] == name)


def test_the_committed_policy_is_the_generated_one() -> None:
    committed = (POLICY_DIR / profile_admission.POLICY_FILE).read_text()
    assert committed == profile_admission.to_yaml(profile_admission.policy_manifest()), REGENERATE


def test_each_example_profile_has_its_generated_binding() -> None:
    profiles = profile_admission.example_profiles(ROOT / "deploy" / "examples")
    for profile in profiles:
        path = POLICY_DIR / f"binding-{profile.metadata.name}.yaml"
        assert path.exists(), REGENERATE
        expected = profile_admission.to_yaml(profile_admission.binding_manifest(profile))
        assert path.read_text() == expected, REGENERATE
    named = {f"binding-{p.metadata.name}.yaml" for p in profiles}
    stale = {p.name for p in POLICY_DIR.glob("binding-*.yaml")} - named - {"binding-template.yaml"}
    assert not stale, f"bindings of profiles that are gone: {stale}"


def test_the_binding_template_has_the_generated_shape() -> None:
    """The documented template is binding_manifest() of a profile named PROFILE."""
    template = yaml.safe_load((POLICY_DIR / "binding-template.yaml").read_text())
    selector = template["spec"]["matchResources"]["namespaceSelector"]
    profile = SFTProfile.model_validate(
        {"metadata": {"name": "PROFILE"}, "spec": {"namespaceSelector": selector}}
    )
    assert template == profile_admission.binding_manifest(profile)


def test_the_policy_protects_every_env_name_the_operator_protects() -> None:
    """The built-in list and its reasons come from policy.PROTECTED_ENV_REASONS, and the
    SFTJOB_ prefix rule with its test-hook exception from the same constants."""
    table = _variable("operatorEnv")
    for name, reason in policy.PROTECTED_ENV_REASONS.items():
        assert f"'{name}': '{reason.replace(chr(39), chr(92) + chr(39))}'" in table
    assert set(policy.OPERATOR_ENV) == set(policy.PROTECTED_ENV_REASONS)
    protected = _variable("builtinProtected")
    assert f"n.startsWith('{policy.OPERATOR_ENV_PREFIX}')" in protected
    assert f"!n.startsWith('{policy.TRAINER_TEST_HOOK_PREFIX}')" in protected


def test_every_validation_prints_a_policy_violation() -> None:
    """Each message ends with `(rule <rule>)` of a rule policy.py reports."""
    rules = {
        "limits.allowedImages",
        "limits.allowedMethods",
        "limits.allowedModelSources",
        "limits.allowRemoteCode",
        "limits.maxNodes",
        "limits.maxGpusPerJob",
        "limits.allowSchedulingOverrides",
        "limits.allowedSecretNames",
        "protectedEnv",
        "limits.protectedEnv",
        "defaults.env",
        "limits.allowedExtraArgs",
        "limits.maxActiveDeadlineSeconds",
    }
    validations = profile_admission.policy_manifest()["spec"]["validations"]
    found = {v["messageExpression"].rsplit("(rule ", 1)[1].rstrip("')") for v in validations}
    assert found == rules
