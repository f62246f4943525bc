"""The admission side of SFTProfiles: a ValidatingAdmissionPolicy that refuses at
``kubectl apply`` what the operator would refuse with Failed/PolicyViolation, where the job
alone (and its profile, as the binding's param) can tell.

`policy_manifest()` is deploy/policy/profile-limits-policy.yaml and `binding_manifest(profile)`
the binding one profile needs (deploy/policy/binding-<profile>.yaml); both are generated from
`policy.py`'s own tables (the built-in protected env names and their reasons, the SFTJOB_
prefix rule, the image and source prefix rule), and tests/unit/test_profile_admission_policy.py
keeps the committed files equal to them. Regenerate with
``python -m sftjob_operator.profile_admission deploy/policy``.

Every validation's message is what `policy.PolicyViolation` prints for the same violation:
``<field>: <message> (rule <rule>)``. The policy runs once per binding, that is per
profile; a binding selects the namespaces its profile selects, and its matchCondition skips a
job whose ``spec.profile`` names another profile. Only the first failing validation is in the
refusal; the operator lists them all.

What stays with the operator (README, "Refusing jobs at `kubectl apply`"): which profile a job gets when the namespace
has several or none, a ``spec.profile`` naming a profile that does not exist or does not
select the namespace (a policy sees one profile at a time, the bound one), and the image the
operator runs when neither the job nor the profile names one (the operator's --image).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import yaml

from .api import GROUP, PLURAL, VERSION
from .policy import OPERATOR_ENV_PREFIX, PROTECTED_ENV_REASONS, TRAINER_TEST_HOOK_PREFIX
from .profile_api import PROFILE_KIND, SFTProfile

POLICY_NAME = "sftjob-profile-limits"
POLICY_FILE = "profile-limits-policy.yaml"
ADMISSION_API = "admissionregistration.k8s.io/v1"


def _quote(text: str) -> str:
    """A CEL string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _cel_map(entries: dict[str, str]) -> str:
    lines = ",\n".join(f"  {_quote(k)}: {_quote(v)}" for k, v in sorted(entries.items()))
    return "{\n" + lines + "\n}"


def _prefix_allows(entry: str, value: str) -> str:
    """CEL for policy.prefix_allows: equal, or a prefix ending at / : or @ (both sides)."""
    boundary = f"{value}.substring({entry}.size(), {entry}.size() + 1) in ['/', ':', '@']"
    return (
        f"({value} == {entry} || ({entry} != '' && {value}.startsWith({entry}) && "
        f"({entry}.endsWith('/') || {entry}.endsWith(':') || {entry}.endsWith('@') || "
        f"{boundary})))"
    )


def _violation(field: str, message: str, rule: str) -> str:
    """A messageExpression printing `field: message (rule rule)` (PolicyViolation.__str__);
    `field` and `message` are CEL string expressions."""
    return f"{field} + ': ' + {message} + ' (rule {rule})'"


PROFILE = "params.metadata.name"
LIMITS = "variables.limits"


def _secret_name_validation(field: str) -> dict[str, str]:
    """limits.allowedSecretNames for the Secret reference spec.secrets.<field>."""
    ref = f"object.spec.secrets.{field}"
    return {
        "expression": f"!has(object.spec.secrets) || !has({ref}) || "
        f"!{LIMITS}.?allowedSecretNames.hasValue() || "
        f"{ref}.name in {LIMITS}.allowedSecretNames",
        "messageExpression": _violation(
            f"'spec.secrets.{field}.name'",
            f"'Secret ' + {ref}.name + ' is not one SFTProfile ' + "
            f"{PROFILE} + ' lets jobs read: ' + ({LIMITS}.allowedSecretNames.size() > 0 ? "
            f"'use one of ' + {LIMITS}.allowedSecretNames.join(', ') : "
            f"'remove spec.secrets.{field}')",
            "limits.allowedSecretNames",
        ),
    }


def _variables() -> list[dict[str, str]]:
    image_allowed = "e.contains('@sha256:') ? variables.image == e : " + _prefix_allows(
        "e", "variables.image"
    )
    source_allowed = (
        "!('..' in s.value.split('/')) && "
        f"{LIMITS}.allowedModelSources.exists(e, {_prefix_allows('e', 's.value')})"
    )
    sources = ",\n".join(
        f"  {{'field': 'spec.{part}.{name}', 'value': object.spec.?{part}.?{name}.orValue('')}}"
        for part, name in (
            ("model", "name"),
            ("model", "path"),
            ("model", "tokenizer"),
            ("dataset", "name"),
            ("dataset", "path"),
            ("dataset", "uri"),
        )
    )
    pinned = "variables.defaults.?nodeSelector.orValue({})"
    allowed_args = f"{LIMITS}.?allowedExtraArgs"
    return [
        {"name": "limits", "expression": "params.spec.?limits.orValue({})"},
        {"name": "defaults", "expression": "params.spec.?defaults.orValue({})"},
        {
            "name": "image",
            "expression": "object.spec.?image.orValue(variables.defaults.?image.orValue(''))",
        },
        {
            "name": "imageAllowed",
            "expression": f"variables.image == '' || {LIMITS}.?allowedImages.orValue([]).size() "
            f"== 0 || {LIMITS}.allowedImages.exists(e, {image_allowed})",
        },
        {
            "name": "badSources",
            "expression": f"{LIMITS}.?allowedModelSources.orValue([]).size() == 0 ? [] : "
            f"[\n{sources}\n].filter(s, s.value != '' && !({source_allowed}))",
        },
        {
            "name": "nodes",
            "expression": "object.spec.?resources.?nodes.orValue(1)",
        },
        {
            "name": "gpusPerNode",
            "expression": "object.spec.?resources.?gpusPerNode.orValue(1)",
        },
        {
            "name": "overriddenKeys",
            "expression": f"{LIMITS}.?allowSchedulingOverrides.orValue(false) ? [] : "
            f"object.spec.?resources.?nodeSelector.orValue({{}}).filter(k, k in {pinned} && "
            f"{pinned}[k] != object.spec.resources.nodeSelector[k])",
        },
        {
            "name": "addedTolerations",
            "expression": f"{LIMITS}.?allowSchedulingOverrides.orValue(false) ? [] : "
            "object.spec.?resources.?tolerations.orValue([]).filter(t, "
            "!(t in variables.defaults.?tolerations.orValue([])))",
        },
        {"name": "envNames", "expression": "object.spec.?env.orValue([]).map(e, e.name)"},
        {"name": "operatorEnv", "expression": _cel_map(PROTECTED_ENV_REASONS)},
        {
            "name": "builtinProtected",
            "expression": "variables.envNames.filter(n, n in variables.operatorEnv || "
            f"(n.startsWith('{OPERATOR_ENV_PREFIX}') && "
            f"!n.startsWith('{TRAINER_TEST_HOOK_PREFIX}')))",
        },
        {
            "name": "profileProtected",
            "expression": f"variables.envNames.filter(n, n in {LIMITS}.?protectedEnv.orValue([]))",
        },
        {
            "name": "profileEnv",
            "expression": "variables.defaults.?env.orValue([])",
        },
        {
            "name": "profileEnvSet",
            "expression": "variables.envNames.filter(n, variables.profileEnv.exists(e, "
            "e.name == n))",
        },
        {
            "name": "badExtraArgs",
            "expression": f"!{allowed_args}.hasValue() ? [] : "
            "object.spec.?training.?extraArgs.orValue({}).filter(k, "
            f"!(k in {LIMITS}.allowedExtraArgs))",
        },
    ]


def _validations() -> list[dict[str, str]]:
    first_source = "variables.badSources[0]"
    bad_key = "variables.overriddenKeys[0]"
    added = "variables.addedTolerations[0]"
    env_index = "string(variables.envNames.indexOf({name}))"
    builtin = "variables.builtinProtected[0]"
    profile_env = "variables.profileEnvSet[0]"
    extra = "variables.badExtraArgs[0]"
    deadline_cap = f"{LIMITS}.?maxActiveDeadlineSeconds"
    return [
        {
            "expression": "variables.imageAllowed",
            "messageExpression": _violation(
                "'spec.image'",
                '(has(object.spec.image) ? "the job\'s" : "the profile\'s default") + '
                f"' image ' + variables.image + ' is not allowed by SFTProfile ' + {PROFILE} + "
                f"': set spec.image to an image starting with one of ' + "
                f"{LIMITS}.allowedImages.join(', ')",
                "limits.allowedImages",
            ),
        },
        {
            "expression": f"{LIMITS}.?allowedMethods.orValue([]).size() == 0 || "
            f"object.spec.?method.orValue('lora') in {LIMITS}.allowedMethods",
            "messageExpression": _violation(
                "'spec.method'",
                f"'method ' + object.spec.method + ' is not allowed by SFTProfile ' + {PROFILE} "
                f"+ ': use one of ' + {LIMITS}.allowedMethods.join(', ')",
                "limits.allowedMethods",
            ),
        },
        {
            "expression": "variables.badSources.size() == 0",
            "messageExpression": _violation(
                f"{first_source}.field",
                f"{first_source}.value + ' is not a source SFTProfile ' + {PROFILE} + "
                f"' allows: load from one starting with ' + "
                f"{LIMITS}.allowedModelSources.join(', ') + "
                f"('..' in {first_source}.value.split('/') ? \" (without '..')\" : '')",
                "limits.allowedModelSources",
            ),
        },
        {
            "expression": "!object.spec.?model.?trustRemoteCode.orValue(false) || "
            f"{LIMITS}.?allowRemoteCode.orValue(false)",
            "messageExpression": _violation(
                "'spec.model.trustRemoteCode'",
                f"'SFTProfile ' + {PROFILE} + ' does not allow model code from the hub: set "
                "spec.model.trustRemoteCode to false'",
                "limits.allowRemoteCode",
            ),
        },
        {
            "expression": f"!{LIMITS}.?maxNodes.hasValue() || variables.nodes <= {LIMITS}.maxNodes",
            "messageExpression": _violation(
                "'spec.resources.nodes'",
                f"string(variables.nodes) + ' nodes is more than SFTProfile ' + {PROFILE} + "
                f"' allows (' + string({LIMITS}.maxNodes) + '): set spec.resources.nodes to at "
                f"most ' + string({LIMITS}.maxNodes)",
                "limits.maxNodes",
            ),
        },
        {
            "expression": f"!{LIMITS}.?maxGpusPerJob.hasValue() || "
            f"variables.nodes * variables.gpusPerNode <= {LIMITS}.maxGpusPerJob",
            "messageExpression": _violation(
                "'spec.resources.gpusPerNode'",
                "string(variables.nodes) + ' nodes x ' + string(variables.gpusPerNode) + "
                "' GPUs = ' + string(variables.nodes * variables.gpusPerNode) + "
                f"' GPUs is more than SFTProfile ' + {PROFILE} + ' allows (' + "
                f"string({LIMITS}.maxGpusPerJob) + '): lower spec.resources.gpusPerNode or "
                "spec.resources.nodes'",
                "limits.maxGpusPerJob",
            ),
        },
        {
            "expression": "variables.overriddenKeys.size() == 0",
            "messageExpression": _violation(
                f"'spec.resources.nodeSelector[' + {bad_key} + ']'",
                f"'SFTProfile ' + {PROFILE} + ' pins ' + {bad_key} + '=' + "
                f"variables.defaults.nodeSelector[{bad_key}] + ' (its node pool) and lets no "
                f"job change it: remove ' + {bad_key} + ' from spec.resources.nodeSelector'",
                "limits.allowSchedulingOverrides",
            ),
        },
        {
            "expression": "variables.addedTolerations.size() == 0",
            "messageExpression": _violation(
                "'spec.resources.tolerations[' + "
                f"string(object.spec.resources.tolerations.indexOf({added})) + ']'",
                f"'SFTProfile ' + {PROFILE} + \" lets no job add tolerations (it adds its node "
                "pool's own): remove it from spec.resources.tolerations\"",
                "limits.allowSchedulingOverrides",
            ),
        },
        _secret_name_validation("hfToken"),
        _secret_name_validation("s3"),
        {
            "expression": "variables.builtinProtected.size() == 0",
            "messageExpression": _violation(
                f"'spec.env[' + {env_index.format(name=builtin)} + '].name'",
                f"{builtin} + ' is protected (' + ({builtin} in variables.operatorEnv ? "
                f"variables.operatorEnv[{builtin}] : "
                "'the operator and the trainer reserve SFTJOB_* names') + '): remove it from "
                "spec.env'",
                "protectedEnv",
            ),
        },
        {
            "expression": "variables.profileProtected.size() == 0",
            "messageExpression": _violation(
                f"'spec.env[' + {env_index.format(name='variables.profileProtected[0]')} + "
                "'].name'",
                f"'SFTProfile ' + {PROFILE} + ' protects ' + variables.profileProtected[0] + "
                "': remove it from spec.env'",
                "limits.protectedEnv",
            ),
        },
        {
            "expression": "variables.profileEnvSet.size() == 0",
            "messageExpression": _violation(
                f"'spec.env[' + {env_index.format(name=profile_env)} + '].name'",
                f"'SFTProfile ' + {PROFILE} + ' sets ' + {profile_env} + '=' + "
                f"variables.profileEnv.filter(e, e.name == {profile_env})[0].?value.orValue('') "
                "+ ' for every pod and jobs may not override it: remove it from spec.env'",
                "defaults.env",
            ),
        },
        {
            "expression": "variables.badExtraArgs.size() == 0",
            "messageExpression": _violation(
                f"'spec.training.extraArgs[' + {extra} + ']'",
                f"'SFTProfile ' + {PROFILE} + ' does not allow training argument ' + {extra} + "
                f"' (' + ({LIMITS}.allowedExtraArgs.size() > 0 ? 'allowed: ' + "
                f"{LIMITS}.allowedExtraArgs.join(', ') : 'it allows none') + '): remove it "
                "from spec.training.extraArgs'",
                "limits.allowedExtraArgs",
            ),
        },
        {
            "expression": f"!has(object.spec.activeDeadlineSeconds) || !{deadline_cap}.hasValue() "
            f"|| object.spec.activeDeadlineSeconds <= {LIMITS}.maxActiveDeadlineSeconds",
            "messageExpression": _violation(
                "'spec.activeDeadlineSeconds'",
                "string(object.spec.activeDeadlineSeconds) + 's is longer than SFTProfile ' + "
                f"{PROFILE} + ' allows (' + string({LIMITS}.maxActiveDeadlineSeconds) + 's): set "
                f"spec.activeDeadlineSeconds to at most ' + string({LIMITS}.maxActiveDeadlineSeconds)"
                ' + ", or leave it empty for the profile\'s default"',
                "limits.maxActiveDeadlineSeconds",
            ),
        },
    ]


def policy_manifest() -> dict[str, Any]:
    """The ValidatingAdmissionPolicy: SFTJob creates and updates, one SFTProfile as params."""
    return {
        "apiVersion": ADMISSION_API,
        "kind": "ValidatingAdmissionPolicy",
        "metadata": {"name": POLICY_NAME},
        "spec": {
            "failurePolicy": "Fail",
            "paramKind": {"apiVersion": f"{GROUP}/{VERSION}", "kind": PROFILE_KIND},
            "matchConstraints": {
                "resourceRules": [
                    {
                        "apiGroups": [GROUP],
                        "apiVersions": [VERSION],
                        "operations": ["CREATE", "UPDATE"],
                        "resources": [PLURAL],
                    }
                ]
            },
            "matchConditions": [
                {
                    # The binding's profile applies to jobs that name it or name none.
                    "name": "job-uses-this-profile",
                    "expression": "!has(object.spec.profile) || "
                    "object.spec.profile == params.metadata.name",
                },
                {
                    # Only a new spec is judged: labels, annotations and finalizers of a job
                    # admitted earlier (before a profile changed) can still be edited, by
                    # tenants and by the operator, as a profile change never touches a job.
                    "name": "spec-is-new",
                    "expression": "oldObject == null || object.spec != oldObject.spec",
                },
            ],
            "variables": _variables(),
            "validations": _validations(),
        },
    }


def binding_name(profile_name: str) -> str:
    return f"{POLICY_NAME}-{profile_name}"


def binding_manifest(profile: SFTProfile) -> dict[str, Any]:
    """One profile's binding: its namespaces, itself as params, Deny.

    parameterNotFoundAction Allow: a binding left behind by a deleted profile admits jobs
    (the operator still refuses them), instead of refusing every job of those namespaces.
    """
    selector = profile.spec.namespaceSelector.model_dump(mode="json", exclude_defaults=True)
    return {
        "apiVersion": ADMISSION_API,
        "kind": "ValidatingAdmissionPolicyBinding",
        "metadata": {"name": binding_name(profile.metadata.name)},
        "spec": {
            "policyName": POLICY_NAME,
            "paramRef": {"name": profile.metadata.name, "parameterNotFoundAction": "Allow"},
            "matchResources": {"namespaceSelector": selector},
            "validationActions": ["Deny"],
        },
    }


class _Dumper(yaml.SafeDumper):
    pass


def _string(dumper: yaml.SafeDumper, text: str) -> Any:
    # CEL reads best as a block, unquoted (its string literals use quotes of their own).
    style = "|" if "\n" in text or "'" in text or len(text) > 80 else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _string)

HEADER = (
    "# Generated by `python -m sftjob_operator.profile_admission deploy/policy` from\n"
    "# operator/sftjob_operator/policy.py; do not edit (tests/unit keep it in sync).\n"
)


def to_yaml(manifest: dict[str, Any]) -> str:
    return HEADER + yaml.dump(manifest, Dumper=_Dumper, sort_keys=False, width=100)


def write(folder: Path, profiles: list[SFTProfile]) -> list[Path]:
    """The policy and one binding per profile, written into `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    written = [folder / POLICY_FILE]
    written[0].write_text(to_yaml(policy_manifest()))
    for profile in profiles:
        path = folder / f"binding-{profile.metadata.name}.yaml"
        path.write_text(to_yaml(binding_manifest(profile)))
        written.append(path)
    return written


def example_profiles(examples: Path) -> list[SFTProfile]:
    """The SFTProfiles of deploy/examples/profile-*.yaml."""
    found = []
    for path in sorted(examples.glob("profile-*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == PROFILE_KIND:
                found.append(SFTProfile.model_validate(doc))
    return found


if __name__ == "__main__":
    target = Path(sys.argv[1] if len(sys.argv) > 1 else "deploy/policy")
    for written_path in write(target, example_profiles(target.parent / "examples")):
        print(written_path)
