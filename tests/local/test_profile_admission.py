"""Admission-time refusal (issue 21): the shared case table through the real kubectl.

deploy/policy's ValidatingAdmissionPolicy, the case table's two SFTProfiles and their
bindings are applied to the API server; every case is then applied as YAML with
``kubectl apply --dry-run=server``. A case the policy can judge from the job and its bound
profile is refused at apply with the violation `policy.resolve` reports (the same rule and
field, in PolicyViolation's own words); the cases it cannot judge are listed in
`OPERATOR_ONLY`, with the reason, and are admitted (the operator refuses them); the compliant
base job and its compliant variants are admitted.
"""

from __future__ import annotations

import os
import re
import secrets
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import policy_cases
import pytest
import yaml
from sftjob_operator import policy, profile_admission
from sftjob_operator.api import SFTJobSpec
from sftjob_operator.profile_api import SFTProfile

pytestmark = [
    pytest.mark.local,
    pytest.mark.timeout(180),
    pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed"),
]

ROOT = Path(__file__).resolve().parents[2]

# Cases the policy admits, and why only the operator can refuse them.
OPERATOR_ONLY = {
    "profile-not-selecting-namespace": "the named profile's binding does not select the "
    "namespace, and the profile the namespace uses skips jobs that name another profile",
    "profile-unknown": "no binding has a profile of that name as its param",
}

# kubectl prints a refusal of one object of several as `Error from server (Invalid): error when
# creating "STDIN": sftjobs.tuning.sftjob.dev "x" is forbidden: <policy's sentence>`, and the
# refusal of a single object from its details (reason Invalid, one cause without a field) as
# `The sftjobs "x" is invalid: : <policy's sentence>`.
DENIED = re.compile(
    r'"(?P<job>[^"]+)" is (?:forbidden|invalid: ?): ValidatingAdmissionPolicy '
    r"'(?P<policy>[^']+)' with binding '(?P<binding>[^']+)' denied request: (?P<message>.*)$",
    re.MULTILINE,
)
VIOLATION = re.compile(r"^(?P<field>\S+): .* \(rule (?P<rule>[^)]+)\)$")


class Kubectl:
    def __init__(self, kubeconfig: Path, cache: Path) -> None:
        self.env = {**os.environ, "KUBECONFIG": str(kubeconfig), "KUBECACHEDIR": str(cache)}

    def __call__(
        self, *args: str, stdin: str | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        result = subprocess.run(
            ["kubectl", *args],
            env=self.env,
            cwd=ROOT,  # the README's commands name deploy/ paths relative to the checkout
            input=stdin,
            capture_output=True,
            text=True,
            timeout=120,
        )
        if check:
            assert result.returncode == 0, (args, result.stdout, result.stderr)
        return result

    def apply(
        self, documents: list[dict[str, Any]], *flags: str
    ) -> subprocess.CompletedProcess[str]:
        return self("apply", *flags, "-f", "-", stdin=yaml.safe_dump_all(documents), check=False)


@pytest.fixture(scope="module")
def admission(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """CRDs, profiles, the policy and one binding per profile; a tenant namespace."""
    kubectl = Kubectl(cluster.kubeconfig, tmp_path_factory.mktemp("kubectl-cache"))
    kubectl(
        "apply",
        "-f",
        str(ROOT / "crds" / "sftjob.yaml"),
        "-f",
        str(ROOT / "crds" / "sftprofile.yaml"),
    )
    kubectl(
        "wait",
        "--for=condition=Established",
        "crd/sftprofiles.tuning.sftjob.dev",
        "crd/sftjobs.tuning.sftjob.dev",
    )
    profiles = policy_cases.profile_documents()
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(profiles))
    kubectl("apply", "-k", str(ROOT / "deploy" / "policy"))
    models = [SFTProfile.model_validate(p) for p in profiles]
    bindings = [profile_admission.binding_manifest(p) for p in models]
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(bindings))
    namespace = f"sftjob-tenant-{secrets.token_hex(3)}"
    labels = policy_cases.TENANT_NAMESPACE_LABELS
    kubectl("create", "namespace", namespace)
    kubectl("label", "namespace", namespace, *(f"{k}={v}" for k, v in labels.items()))
    state = type("Admission", (), {"kubectl": kubectl, "namespace": namespace, "profiles": models})
    try:
        yield state
    finally:
        kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        kubectl(
            "delete",
            "-f",
            "-",
            "--ignore-not-found",
            stdin=yaml.safe_dump_all(bindings),
            check=False,
        )
        kubectl("delete", "-k", str(ROOT / "deploy" / "policy"), "--ignore-not-found", check=False)
        kubectl(
            "delete",
            "-f",
            "-",
            "--ignore-not-found",
            stdin=yaml.safe_dump_all(profiles),
            check=False,
        )


def _expected(admission: Any, case: policy_cases.PolicyCase) -> policy.PolicyViolation:
    spec = SFTJobSpec.model_validate(policy_cases.job_spec(case))
    resolution = policy.resolve(
        spec, admission.namespace, policy_cases.TENANT_NAMESPACE_LABELS, admission.profiles
    )
    assert [(v.rule, v.field) for v in resolution.violations] == [(case.rule, case.field)]
    return resolution.violations[0]


def _job_name(prefix: str, case_name: str) -> str:
    return f"{prefix}-{case_name}"[:63].rstrip("-")


def _dry_run_all(
    admission: Any, jobs: dict[str, dict[str, Any]]
) -> tuple[dict[str, str], set[str]]:
    """Apply every job in one `kubectl apply --dry-run=server`: (refusals by job, admitted)."""
    result = admission.kubectl.apply(list(jobs.values()), "--dry-run=server")
    refused = {m.group("job"): m.group("message") for m in DENIED.finditer(result.stderr)}
    admitted = set(
        re.findall(
            r"^sftjob\.tuning\.sftjob\.dev/(\S+) created \(server dry run\)$",
            result.stdout,
            re.MULTILINE,
        )
    )
    assert refused.keys() | admitted == set(jobs), (result.stdout, result.stderr)
    return refused, admitted


@pytest.fixture(scope="module")
def verdicts(cluster: Any, admission: Any) -> tuple[dict[str, str], set[str]]:
    """Every case of the table, applied in one kubectl call once the policy is in force."""
    first = next(c for c in policy_cases.CASES if c.name not in OPERATOR_ONLY)
    probe = {"probe": policy_cases.job_manifest("probe", admission.namespace, first)}
    # A real apiserver loads a new policy a moment after it is stored.
    cluster.wait_for(lambda: bool(_dry_run_all(admission, probe)[0]), timeout=60, interval=0.5)
    jobs = {
        _job_name("case", case.name): policy_cases.job_manifest(
            _job_name("case", case.name), admission.namespace, case
        )
        for case in policy_cases.CASES
    }
    return _dry_run_all(admission, jobs)


@pytest.mark.parametrize(
    "case",
    [c for c in policy_cases.CASES if c.name not in OPERATOR_ONLY],
    ids=lambda c: c.name,
)
def test_a_case_the_policy_can_judge_is_refused_at_apply_with_the_operators_rule_and_field(
    admission, verdicts, case
):
    refused, _ = verdicts
    expected = _expected(admission, case)
    name = _job_name("case", case.name)
    assert name in refused, f"{case.name} was admitted; the operator refuses it: {expected}"
    printed = VIOLATION.match(refused[name])
    assert printed is not None, refused[name]
    assert (printed.group("rule"), printed.group("field")) == (expected.rule, expected.field)
    # The words too: the policy's messages are PolicyViolation's.
    assert refused[name] == str(expected)


@pytest.mark.parametrize("name", sorted(OPERATOR_ONLY))
def test_a_case_only_the_operator_can_judge_is_admitted(admission, verdicts, name):
    _, admitted = verdicts
    case = policy_cases.cases_by_name()[name]
    _expected(admission, case)  # the operator does refuse it
    assert _job_name("case", name) in admitted, OPERATOR_ONLY[name]


def test_the_compliant_job_and_its_variants_are_admitted(admission):
    jobs = {"base": policy_cases.job_manifest("base", admission.namespace)}
    for variant, patch in policy_cases.COMPLIANT_VARIANTS.items():
        name = _job_name("ok", variant)
        jobs[name] = policy_cases.job_manifest(
            name, admission.namespace, policy_cases.PolicyCase(variant, patch, "", "")
        )
    refused, admitted = _dry_run_all(admission, jobs)
    assert refused == {}
    assert admitted == set(jobs)


def test_an_update_that_breaks_the_profile_is_refused_and_the_stored_job_kept(admission):
    """kubectl apply of a changed manifest is a PATCH: the UPDATE is evaluated as well."""
    name = f"update-{secrets.token_hex(3)}"
    job = policy_cases.job_manifest(name, admission.namespace)
    created = admission.kubectl.apply([job])
    assert created.returncode == 0, created.stderr
    case = policy_cases.cases_by_name()["nodes-over-cap"]
    changed = policy_cases.job_manifest(name, admission.namespace, case)
    result = admission.kubectl.apply([changed])
    assert result.returncode != 0
    assert result.stderr.startswith(
        f"The sftjobs \"{name}\" is invalid: : ValidatingAdmissionPolicy 'sftjob-profile-limits' "
        "with binding 'sftjob-profile-limits-tenant-lora' denied request: "
    ), result.stderr
    refusal = DENIED.search(result.stderr)
    assert refusal is not None, result.stderr
    assert refusal.group("message") == str(_expected(admission, case))
    stored = admission.kubectl(
        "get", "sftjobs.tuning.sftjob.dev", name, "-n", admission.namespace, "-o", "yaml"
    )
    assert yaml.safe_load(stored.stdout)["spec"]["resources"]["nodes"] == 1


README_ADMISSION_COMMANDS = [
    "kubectl apply -f deploy/examples/profile-shared-gpu-lora.yaml",
    "kubectl apply -k deploy/policy",
    "kubectl apply -f deploy/policy/binding-shared-gpu-lora.yaml",
]


def test_the_example_profiles_and_their_bindings_refuse_at_apply(admission):
    """deploy/examples/profile-*.yaml with deploy/policy/binding-*.yaml, as the README tells an
    admin to apply them: the shared GPU pool's cap of one node is refused at apply in a
    namespace the pool selects, in the operator's words; a job within it is admitted."""
    for command in README_ADMISSION_COMMANDS:  # as written in the README
        admission.kubectl(*shlex.split(command)[1:])
    namespace = f"sftjob-pool-{secrets.token_hex(3)}"
    profile = next(
        p
        for p in profile_admission.example_profiles(ROOT / "deploy" / "examples")
        if p.metadata.name == "shared-gpu-lora"
    )
    labels = profile.spec.namespaceSelector.matchLabels
    admission.kubectl("create", "namespace", namespace)
    admission.kubectl("label", "namespace", namespace, *(f"{k}={v}" for k, v in labels.items()))
    try:
        spec = {
            "model": {"name": "Qwen/Qwen2.5-0.5B"},
            "dataset": {"name": "trl-lib/Capybara"},
            "method": "lora",
        }
        job = {
            "apiVersion": policy_cases.API_VERSION,
            "kind": "SFTJob",
            "metadata": {"name": "within", "namespace": namespace},
            "spec": spec,
        }
        two_nodes = {**job, "metadata": {"name": "two-nodes", "namespace": namespace}}
        two_nodes["spec"] = {**spec, "resources": {"nodes": 2, "gpusPerNode": 1}}
        refused, admitted = _dry_run_all(admission, {"within": job, "two-nodes": two_nodes})
        assert admitted == {"within"}
        expected = policy.resolve(
            SFTJobSpec.model_validate(two_nodes["spec"]), namespace, labels, [profile]
        ).violations
        assert [str(v) for v in expected][:1] == [refused["two-nodes"]]
        assert expected[0].rule == "limits.maxNodes"
    finally:
        admission.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
        # The example profile and its binding; the policy stays for the other tests.
        files = ["-f", "deploy/examples/profile-shared-gpu-lora.yaml"]
        files += ["-f", "deploy/policy/binding-shared-gpu-lora.yaml"]
        admission.kubectl("delete", *files, "--ignore-not-found", check=False)


def test_a_job_admitted_before_its_namespace_joined_the_profile_keeps_metadata_edits(admission):
    """The policy judges a new spec only (matchCondition spec-is-new): a job that broke no
    bound profile when it was created can still be labelled (and its finalizers removed by the
    operator) after its namespace joins a profile; a change of its spec is judged."""
    namespace = f"sftjob-late-{secrets.token_hex(3)}"
    admission.kubectl("create", "namespace", namespace)
    try:
        case = policy_cases.cases_by_name()["nodes-over-cap"]
        job = policy_cases.job_manifest("early", namespace, case)
        assert admission.kubectl.apply([job]).returncode == 0
        labels = policy_cases.TENANT_NAMESPACE_LABELS
        admission.kubectl("label", "namespace", namespace, *(f"{k}={v}" for k, v in labels.items()))
        resource = "sftjobs.tuning.sftjob.dev"
        admission.kubectl("label", resource, "early", "-n", namespace, "team=a")
        changed = policy_cases.job_manifest("early", namespace, case)
        changed["spec"]["resources"]["nodes"] = 4
        result = admission.kubectl.apply([changed])
        assert result.returncode != 0 and "(rule limits.maxNodes)" in result.stderr, result.stderr
    finally:
        admission.kubectl("delete", "namespace", namespace, "--wait=false", check=False)
