"""policy.py: profile selection, the effective spec, every limit and the built-in rules."""

from __future__ import annotations

import json
from typing import Any

import pytest
from policy_cases import (
    BASE_JOB_SPEC,
    CASES,
    COMPLIANT_VARIANTS,
    TENANT_NAMESPACE_LABELS,
    job_spec,
    merge_patch,
    profile_documents,
)
from sftjob_operator import api, children
from sftjob_operator.api import EffectiveStatus, SFTJob, SpecError, parse_spec
from sftjob_operator.policy import (
    OPERATOR_ENV,
    PodDefaults,
    PolicyViolation,
    image_allowed,
    multiply_quantity,
    prefix_allows,
    protected_env_reason,
    resolve,
    selector_matches,
)
from sftjob_operator.profile_api import (
    OPERATOR_SET_ENV,
    LabelSelector,
    ModelCacheSpec,
    SFTProfile,
    parse_profile,
)

NS = "team-a"


def profile(name: str = "pool", selector: dict[str, Any] | None = None, **spec: Any) -> SFTProfile:
    return parse_profile(
        {
            "apiVersion": "tuning.sftjob.dev/v1alpha1",
            "kind": "SFTProfile",
            "metadata": {"name": name, "generation": 3},
            "spec": {"namespaceSelector": selector or {}, **spec},
        }
    )


def spec(patch: dict[str, Any] | None = None) -> api.SFTJobSpec:
    return parse_spec(merge_patch(BASE_JOB_SPEC, patch or {}))


def verdict(
    patch: dict[str, Any] | None = None, *profiles: SFTProfile, **kwargs: Any
) -> list[tuple[str, str]]:
    resolution = resolve(spec(patch), NS, {}, list(profiles), **kwargs)
    return [(v.rule, v.field) for v in resolution.violations]


def selector(**raw: Any) -> LabelSelector:
    return LabelSelector.model_validate(raw)


# --------------------------------------------------------------------------- selectors


@pytest.mark.parametrize(
    ("raw", "labels", "matches"),
    [
        ({}, {}, True),
        ({}, {"a": "1"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "1", "b": "2"}, True),
        ({"matchLabels": {"a": "1"}}, {"a": "2"}, False),
        ({"matchLabels": {"a": "1"}}, {}, False),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1", "2"]}]}, {"a": "2"}, True),
        ({"matchExpressions": [{"key": "a", "operator": "In", "values": ["1"]}]}, {}, False),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {"a": "1"}, False),
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {"a": "2"}, True),
        # As k8s.io/apimachinery labels: NotIn holds when the key is absent.
        ({"matchExpressions": [{"key": "a", "operator": "NotIn", "values": ["1"]}]}, {}, True),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {"a": ""}, True),
        ({"matchExpressions": [{"key": "a", "operator": "Exists"}]}, {}, False),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {}, True),
        ({"matchExpressions": [{"key": "a", "operator": "DoesNotExist"}]}, {"a": "1"}, False),
        # Every term must hold: labels AND expressions.
        (
            {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]},
            {"a": "1"},
            False,
        ),
        (
            {"matchLabels": {"a": "1"}, "matchExpressions": [{"key": "b", "operator": "Exists"}]},
            {"a": "1", "b": "x"},
            True,
        ),
    ],
)  # fmt: skip
def test_selector_matches_like_kubernetes(
    raw: dict[str, Any], labels: dict[str, str], matches: bool
) -> None:
    assert selector_matches(selector(**raw), labels) is matches


@pytest.mark.parametrize(
    "requirement",
    [
        {"key": "a", "operator": "In", "values": []},
        {"key": "a", "operator": "Exists", "values": ["x"]},
    ],
)
def test_selector_requirements_are_validated_like_the_api_server(
    requirement: dict[str, Any],
) -> None:
    with pytest.raises(SpecError) as caught:
        profile(selector={"matchExpressions": [requirement]})
    assert [e.path for e in caught.value.errors] == [
        "spec.namespaceSelector.matchExpressions[0].values"
    ]


# --------------------------------------------------------------------------- selection


def test_the_one_profile_selecting_the_namespace_is_used() -> None:
    mine = profile("mine", {"matchLabels": {"team": "a"}}, limits={"maxNodes": 1})
    other = profile("other", {"matchLabels": {"team": "b"}})
    resolution = resolve(spec(), NS, {"team": "a"}, [other, mine])
    assert resolution.profile is mine and resolution.violations == []


def test_no_profile_selecting_leaves_the_job_as_it_is() -> None:
    other = profile("other", {"matchLabels": {"team": "b"}}, defaults={"image": "x/y:1"})
    resolution = resolve(spec(), NS, {"team": "a"}, [other])
    assert resolution.profile is None and resolution.violations == []
    assert resolution.spec == spec() and resolution.from_profile == []
    assert resolution.pod == PodDefaults() and resolution.effective_status() is None


def test_no_profile_is_refused_when_one_is_required() -> None:
    resolution = resolve(spec(), NS, {}, [], require_profile=True)
    assert resolution.violations == [
        PolicyViolation(
            "profile",
            "spec.profile",
            f"no SFTProfile selects namespace {NS}; ask your platform team",
        )
    ]


def test_several_profiles_need_spec_profile_and_spec_profile_picks_one() -> None:
    first, second = profile("b-pool"), profile("a-pool", limits={"maxNodes": 1})
    [violation] = resolve(spec(), NS, {}, [first, second]).violations
    assert (violation.rule, violation.field) == ("profile", "spec.profile")
    assert "a-pool, b-pool" in violation.message and "set spec.profile" in violation.message
    picked = resolve(spec({"profile": "a-pool"}), NS, {}, [first, second])
    assert picked.profile is second and picked.violations == []


def test_spec_profile_must_exist_and_select_the_namespace() -> None:
    usable = profile("usable", {"matchLabels": {"team": "a"}})
    elsewhere = profile("elsewhere", {"matchLabels": {"team": "b"}})
    [unknown] = resolve(
        spec({"profile": "nope"}), NS, {"team": "a"}, [usable, elsewhere]
    ).violations
    assert "SFTProfile nope does not exist" in unknown.message
    assert "may use: usable" in unknown.message
    [foreign] = resolve(
        spec({"profile": "elsewhere"}), NS, {"team": "a"}, [usable, elsewhere]
    ).violations
    assert f"SFTProfile elsewhere does not select namespace {NS}" in foreign.message
    [alone] = resolve(spec({"profile": "elsewhere"}), NS, {}, [elsewhere]).violations
    assert alone.message == (
        f"SFTProfile elsewhere does not select namespace {NS}; no SFTProfile selects namespace "
        f"{NS}: remove spec.profile or ask your platform team"
    )
    assert foreign.field == "spec.profile" and foreign.rule == "profile"


def test_a_refused_selection_still_applies_the_built_in_rules() -> None:
    patch = {"profile": "nope", "env": [{"name": "HF_ENDPOINT", "value": "https://evil"}]}
    assert verdict(patch, profile("usable")) == [
        ("profile", "spec.profile"),
        ("protectedEnv", "spec.env[0].name"),
    ]


# --------------------------------------------------------------------------- merge


def test_defaults_fill_what_the_job_left_empty_and_say_so() -> None:
    pool = profile(
        defaults={
            "image": "reg/trainer:1",
            "nodeSelector": {"pool": "gpu"},
            "tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}],
            "cpuPerGpu": "8",
            "memoryPerGpu": "64Gi",
            "output": {"claimName": "results"},
            "env": [{"name": "HF_HUB_OFFLINE", "value": "1"}],
            "activeDeadlineSeconds": 600,
        }
    )
    resolution = resolve(spec({"resources": {"gpusPerNode": 2}}), NS, {}, [pool])
    effective = resolution.spec
    assert effective.image == "reg/trainer:1"
    assert effective.resources.nodeSelector == {"pool": "gpu"}
    assert [t.key for t in effective.resources.tolerations] == ["gpu"]
    assert (effective.resources.cpu, effective.resources.memory) == ("16", "128Gi")
    assert effective.output.claimName == "results"
    assert [(v.name, v.value) for v in effective.env] == [("HF_HUB_OFFLINE", "1")]
    assert effective.activeDeadlineSeconds == 600
    assert resolution.from_profile == [
        ("spec.image", "reg/trainer:1"),
        ("spec.resources.nodeSelector", {"pool": "gpu"}),
        ("spec.resources.tolerations", [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]),
        ("spec.resources.cpu", "16"),
        ("spec.resources.memory", "128Gi"),
        ("spec.output.claimName", "results"),
        ("spec.env", [{"name": "HF_HUB_OFFLINE", "value": "1"}]),
        ("spec.activeDeadlineSeconds", 600),
    ]  # fmt: skip


def test_the_jobs_own_values_win_and_are_not_reported_as_the_profiles() -> None:
    pool = profile(
        defaults={
            "image": "reg/trainer:1",
            "cpuPerGpu": "8",
            "memoryPerGpu": "64Gi",
            "output": {"claimName": "results"},
            "activeDeadlineSeconds": 600,
        }
    )
    own = {
        "image": "reg/trainer:2",
        "resources": {"cpu": "4", "memory": "10Gi"},
        "output": {"claimName": "mine"},
        "activeDeadlineSeconds": 300,
    }
    resolution = resolve(spec(own), NS, {}, [pool])
    assert resolution.spec == spec(own)
    assert resolution.from_profile == [] and resolution.violations == []


def test_a_cpu_job_gets_one_gpus_share() -> None:
    pool = profile(defaults={"cpuPerGpu": "500m", "ephemeralStoragePerGpu": "10Gi"})
    resolution = resolve(spec({"resources": {"gpusPerNode": 0}}), NS, {}, [pool])
    assert resolution.spec.resources.cpu == "500m"
    assert resolution.pod.ephemeralStorage == "10Gi"
    resolution = resolve(spec({"resources": {"gpusPerNode": 3}}), NS, {}, [pool])
    assert (resolution.spec.resources.cpu, resolution.pod.ephemeralStorage) == ("1500m", "30Gi")


def test_deadline_falls_back_to_the_cap() -> None:
    capped = profile(limits={"maxActiveDeadlineSeconds": 3600})
    resolution = resolve(spec(), NS, {}, [capped])
    assert resolution.spec.activeDeadlineSeconds == 3600
    assert ("spec.activeDeadlineSeconds", 3600) in resolution.from_profile


def test_node_selector_union_and_conflicts() -> None:
    pool = profile(defaults={"nodeSelector": {"pool": "gpu"}})
    extra = resolve(spec({"resources": {"nodeSelector": {"zone": "a"}}}), NS, {}, [pool])
    assert extra.violations == [] and extra.spec.resources.nodeSelector == {
        "pool": "gpu",
        "zone": "a",
    }
    [conflict] = resolve(
        spec({"resources": {"nodeSelector": {"pool": "cpu"}}}), NS, {}, [pool]
    ).violations
    assert (conflict.rule, conflict.field) == (
        "limits.allowSchedulingOverrides",
        "spec.resources.nodeSelector[pool]",
    )
    assert "pins pool=gpu" in conflict.message
    free = profile(
        defaults={"nodeSelector": {"pool": "gpu"}}, limits={"allowSchedulingOverrides": True}
    )
    allowed = resolve(spec({"resources": {"nodeSelector": {"pool": "cpu"}}}), NS, {}, [free])
    assert allowed.violations == [] and allowed.spec.resources.nodeSelector == {"pool": "cpu"}
    assert allowed.from_profile == []


def test_tolerations_the_profile_gives_are_added_and_the_jobs_own_refused() -> None:
    pool_toleration = {"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}
    pool = profile(defaults={"tolerations": [pool_toleration]})
    same = resolve(spec({"resources": {"tolerations": [pool_toleration]}}), NS, {}, [pool])
    assert same.violations == [] and len(same.spec.resources.tolerations) == 1
    other = {"key": "spot", "operator": "Exists"}
    refused = resolve(
        spec({"resources": {"tolerations": [pool_toleration, other]}}), NS, {}, [pool]
    )
    assert [(v.rule, v.field) for v in refused.violations] == [
        ("limits.allowSchedulingOverrides", "spec.resources.tolerations[1]")
    ]
    free = profile(
        defaults={"tolerations": [pool_toleration]}, limits={"allowSchedulingOverrides": True}
    )
    allowed = resolve(spec({"resources": {"tolerations": [other]}}), NS, {}, [free])
    assert allowed.violations == []
    assert [t.key for t in allowed.spec.resources.tolerations] == ["spot", "gpu"]


def test_pod_defaults_come_from_the_profile_only() -> None:
    pool = profile(
        defaults={
            "affinity": {"nodeAffinity": {"preferred": []}},
            "priorityClassName": "batch",
            "queueName": "q",
            "modelCache": {"claimName": "cache"},
            "runAsUser": 1000,
            "runAsGroup": 1000,
            "fsGroup": 2000,
        }
    )
    resolution = resolve(spec(), NS, {}, [pool])
    assert resolution.pod == PodDefaults(
        affinity={"nodeAffinity": {"preferred": []}},
        priorityClassName="batch",
        queueName="q",
        modelCache=ModelCacheSpec(claimName="cache"),
        runAsUser=1000,
        runAsGroup=1000,
        fsGroup=2000,
    )
    pod_fields = [path for path, _ in resolution.from_profile if path.startswith("pod.")]
    assert pod_fields == [
        "pod.affinity",
        "pod.priorityClassName",
        "pod.queueName",
        "pod.modelCache",
        "pod.runAsUser",
        "pod.runAsGroup",
        "pod.fsGroup",
    ]


def test_pod_defaults_round_trip_through_json() -> None:
    full = PodDefaults(
        affinity={"podAntiAffinity": {"x": [1]}},
        priorityClassName="p",
        queueName="q",
        ephemeralStorage="20Gi",
        modelCache=ModelCacheSpec(claimName="c", mountPath="/hf"),
        runAsUser=1,
        runAsGroup=0,
        fsGroup=0,
    )
    stored = json.loads(json.dumps(full.to_json()))
    assert PodDefaults.from_json(stored) == full
    assert stored["modelCache"] == {"claimName": "c", "mountPath": "/hf"}
    assert PodDefaults().to_json() == {}
    assert PodDefaults.from_json(None) == PodDefaults() == PodDefaults.from_json({})


def test_effective_status_is_the_api_type() -> None:
    pool = profile("pool", defaults={"image": "reg/t:1", "queueName": "q"})
    status = resolve(spec(), NS, {}, [pool]).effective_status()
    assert status == {
        "profile": "pool",
        "profileGeneration": 3,
        "fromProfile": [
            {"field": "spec.image", "value": '"reg/t:1"'},
            {"field": "pod.queueName", "value": '"q"'},
        ],
    }
    EffectiveStatus.model_validate(status)


# --------------------------------------------------------------------------- quantities


@pytest.mark.parametrize(
    ("quantity", "factor", "product"),
    [
        ("8", 2, "16"),
        ("500m", 3, "1500m"),
        ("64Gi", 2, "128Gi"),
        ("1.5", 2, "3"),
        ("0.5Gi", 3, "1.5Gi"),
        ("100Mi", 1, "100Mi"),
        ("1e3", 2, "2e3"),
        ("2k", 8, "16k"),
        ("250m", 4, "1000m"),
        ("3", 0, "0"),
    ],
)
def test_multiply_quantity(quantity: str, factor: int, product: str) -> None:
    assert multiply_quantity(quantity, factor) == product


@pytest.mark.parametrize("bad", ["", "1.5.2", "-1", "10 Gi", "1Gb"])
def test_multiply_quantity_refuses_what_is_no_quantity(bad: str) -> None:
    with pytest.raises(ValueError):
        multiply_quantity(bad, 2)


# --------------------------------------------------------------------------- matching


@pytest.mark.parametrize(
    ("entry", "value", "allowed"),
    [
        ("registry/ml", "registry/ml", True),
        ("registry/ml", "registry/ml/x:1", True),
        ("registry/ml", "registry/ml:1", True),
        ("registry/ml", "registry/ml@sha256:" + "0" * 64, True),
        ("registry/ml", "registry/ml-evil/x", False),
        ("registry/ml", "registry/mlx", False),
        ("registry/ml/", "registry/ml/x", True),
        ("registry/ml/", "registry/ml", False),
        ("registry/ml:", "registry/ml:1", True),
        ("", "anything", False),
    ],
)
def test_prefix_allows_only_at_a_boundary(entry: str, value: str, allowed: bool) -> None:
    assert prefix_allows(entry, value) is allowed


def test_a_digest_entry_allows_exactly_itself() -> None:
    pinned = "reg/t@sha256:" + "a" * 64
    assert image_allowed(pinned, pinned)
    assert not image_allowed(pinned, "reg/t@sha256:" + "b" * 64)
    assert not image_allowed(pinned, "reg/t:latest")
    assert not image_allowed(pinned, pinned + "x")


# --------------------------------------------------------------------------- limits


def test_the_image_a_job_would_really_run_is_checked() -> None:
    strict = profile(limits={"allowedImages": ["reg/ml/"]})
    [operator_default] = resolve(spec(), NS, {}, [strict]).violations
    assert operator_default.field == "spec.image"
    assert f"the operator's default image {api.DEFAULT_TRAINER_IMAGE}" in operator_default.message
    ok = resolve(spec(), NS, {}, [strict], default_image="reg/ml/trainer:2")
    assert ok.violations == []
    bad_default = profile(defaults={"image": "other/t:1"}, limits={"allowedImages": ["reg/ml/"]})
    [profile_default] = resolve(spec(), NS, {}, [bad_default]).violations
    assert "the profile's default image other/t:1" in profile_default.message


def test_secret_names_none_any_or_a_list() -> None:
    token = {"secrets": {"hfToken": {"name": "hf-token"}}}
    assert verdict(token, profile()) == []
    assert verdict(token, profile(limits={"allowedSecretNames": ["hf-token"]})) == []
    none_allowed = resolve(spec(token), NS, {}, [profile(limits={"allowedSecretNames": []})])
    [violation] = none_allowed.violations
    assert violation.field == "spec.secrets.hfToken.name"
    assert "remove spec.secrets.hfToken" in violation.message


def test_extra_args_none_any_or_a_list() -> None:
    args = {"training": {"extraArgs": {"neftune_noise_alpha": 5, "report_to": "none"}}}
    assert verdict(args, profile()) == []
    assert verdict(args, profile(limits={"allowedExtraArgs": []})) == [
        ("limits.allowedExtraArgs", "spec.training.extraArgs[neftune_noise_alpha]"),
        ("limits.allowedExtraArgs", "spec.training.extraArgs[report_to]"),
    ]


def test_sources_are_every_place_a_job_loads_from() -> None:
    pool = profile(limits={"allowedModelSources": ["/data/"]})
    patch = {
        "model": {"path": None, "name": "org/model", "tokenizer": "org/tok"},
        "dataset": {"path": None, "uri": "s3://bucket/x.jsonl"},
    }
    assert verdict(patch, pool) == [
        ("limits.allowedModelSources", "spec.model.name"),
        ("limits.allowedModelSources", "spec.model.tokenizer"),
        ("limits.allowedModelSources", "spec.dataset.uri"),
    ]
    # A path is compared once normalised; one that only says /data/.. stays inside.
    assert verdict({"model": {"path": "/data/../data/m"}}, pool) == []
    assert verdict({"model": {"path": "/database/m"}}, pool) == [
        ("limits.allowedModelSources", "spec.model.path")
    ]
    # Anything else with a '..' segment never matches: a bucket or hub id is not normalised.
    hub = profile(limits={"allowedModelSources": ["Qwen/", "s3://bucket/"]})
    violation, _dataset_path = resolve(spec(_model("Qwen/../evil/m")), NS, {}, [hub]).violations
    assert violation.field == "spec.model.name" and "without '..'" in violation.message
    assert verdict({"dataset": {"path": None, "uri": "s3://bucket/../other/x"}}, hub) == [
        ("limits.allowedModelSources", "spec.model.path"),
        ("limits.allowedModelSources", "spec.dataset.uri"),
    ]


def _model(name: str) -> dict[str, Any]:
    return {"model": {"path": None, "name": name}}


def test_every_violation_is_reported_in_the_order_of_the_fields() -> None:
    pool = profile(
        defaults={"nodeSelector": {"pool": "gpu"}},
        limits={
            "allowedImages": ["reg/"],
            "allowedMethods": ["lora"],
            "maxNodes": 1,
            "maxGpusPerJob": 1,
            "maxActiveDeadlineSeconds": 60,
            "allowedModelSources": ["/data/"],
            "allowedSecretNames": [],
            "protectedEnv": ["HTTPS_PROXY"],
            "allowedExtraArgs": [],
        },
    )
    patch = {
        "image": "evil/t:1",
        "method": "full",
        "model": {"path": "/etc/m", "trustRemoteCode": True},
        "resources": {"nodes": 2, "gpusPerNode": 1, "nodeSelector": {"pool": "x"}},
        "secrets": {"hfToken": {"name": "t"}},
        "env": [{"name": "HTTPS_PROXY", "value": "p"}, {"name": "LD_PRELOAD", "value": "/x.so"}],
        "training": {"extraArgs": {"report_to": "wandb"}},
        "activeDeadlineSeconds": 61,
    }
    expected = [
        ("limits.allowedImages", "spec.image"),
        ("limits.allowedMethods", "spec.method"),
        ("limits.allowedModelSources", "spec.model.path"),
        ("limits.allowRemoteCode", "spec.model.trustRemoteCode"),
        ("limits.maxNodes", "spec.resources.nodes"),
        ("limits.maxGpusPerJob", "spec.resources.gpusPerNode"),
        ("limits.allowSchedulingOverrides", "spec.resources.nodeSelector[pool]"),
        ("limits.allowedSecretNames", "spec.secrets.hfToken.name"),
        ("limits.protectedEnv", "spec.env[0].name"),
        ("protectedEnv", "spec.env[1].name"),
        ("limits.allowedExtraArgs", "spec.training.extraArgs[report_to]"),
        ("limits.maxActiveDeadlineSeconds", "spec.activeDeadlineSeconds"),
    ]
    assert verdict(patch, pool) == expected
    assert verdict(patch, pool) == expected  # the same order every time
    for violation in resolve(spec(patch), NS, {}, [pool]).violations:
        assert "pool" in violation.message or "protected" in violation.message
        assert str(violation) == f"{violation.field}: {violation.message} (rule {violation.rule})"


# --------------------------------------------------------------------------- built-in env


def test_the_operators_env_is_protected_without_a_profile() -> None:
    for name in ("HF_ENDPOINT", "HF_TOKEN", "HOME", "SFTJOB_CONFIG", "SFTJOB_SPEED", "PYTHONPATH"):
        assert verdict({"env": [{"name": name, "value": "x"}]}) == [
            ("protectedEnv", "spec.env[0].name")
        ], name
    # The trainer's fault-injection hooks only touch the tenant's own run (the e2e tests use them).
    assert verdict({"env": [{"name": "SFTJOB_TEST_SLEEP_PER_STEP", "value": "1"}]}) == []
    assert verdict({"env": [{"name": "NCCL_DEBUG", "value": "INFO"}]}) == []
    assert protected_env_reason("HF_ENDPOINT") == "it decides where the hub token is sent"


def test_every_env_name_the_operator_sets_in_a_pod_is_protected() -> None:
    job = SFTJob.model_validate(
        {
            "metadata": {"name": "j", "namespace": NS},
            "spec": merge_patch(
                BASE_JOB_SPEC,
                {
                    "secrets": {"hfToken": {"name": "hf-token"}, "s3": {"name": "s3-keys"}},
                    "resources": {"nodes": 2},
                },
            ),
        }
    )
    pod = children.build_pod(job, rank=0, attempt=1)
    names = {var["name"] for var in pod["spec"]["containers"][0]["env"]}
    assert names <= OPERATOR_SET_ENV, names - OPERATOR_SET_ENV
    assert OPERATOR_SET_ENV <= OPERATOR_ENV


def test_a_profile_may_not_set_the_operators_env() -> None:
    with pytest.raises(SpecError) as caught:
        profile(defaults={"env": [{"name": "HF_HOME", "value": "/x"}]})
    [error] = caught.value.errors
    assert error.path == "spec.defaults.env" and "HF_HOME" in error.message
    # A mirror is the admin's to set: HF_ENDPOINT is protected from tenants, not from profiles.
    mirror = profile(defaults={"env": [{"name": "HF_ENDPOINT", "value": "https://mirror"}]})
    assert resolve(spec(), NS, {}, [mirror]).spec.env[0].name == "HF_ENDPOINT"


def test_the_default_image_is_the_one_children_runs() -> None:
    assert children.DEFAULT_TRAINER_IMAGE == api.DEFAULT_TRAINER_IMAGE


# --------------------------------------------------------------------------- parse_profile


def test_parse_profile_names_every_bad_field() -> None:
    with pytest.raises(SpecError) as caught:
        parse_profile(
            {
                "apiVersion": "v1",
                "kind": "SFTProfile",
                "metadata": {},
                "spec": {
                    "limits": {"maxNode": 2, "maxGpusPerJob": "4"},
                    "defaults": {"cpuPerGpu": "8 cores"},
                },
            }
        )
    errors = {e.path: e.message for e in caught.value.errors}
    assert errors["apiVersion"] == "must be tuning.sftjob.dev/v1alpha1"
    assert errors["metadata.name"] == "required field is missing"
    assert "did you mean maxNodes" in errors["spec.limits.maxNode"]
    assert "valid integer" in errors["spec.limits.maxGpusPerJob"]
    assert "Kubernetes quantity" in errors["spec.defaults.cpuPerGpu"]


def test_parse_profile_refuses_a_default_deadline_over_the_cap() -> None:
    with pytest.raises(SpecError) as caught:
        profile(defaults={"activeDeadlineSeconds": 100}, limits={"maxActiveDeadlineSeconds": 50})
    assert [e.path for e in caught.value.errors] == ["spec.defaults.activeDeadlineSeconds"]


def test_parse_profile_ignores_status_and_refuses_other_kinds() -> None:
    document = profile_documents()[0]
    assert parse_profile({**document, "status": {"observedGeneration": 1}}).metadata.name
    with pytest.raises(SpecError) as caught:
        parse_profile({**document, "kind": "SFTJob"})
    assert [e.path for e in caught.value.errors] == ["kind"]


# --------------------------------------------------------------------------- the shared table


@pytest.fixture(scope="module")
def cluster_profiles() -> list[SFTProfile]:
    return [parse_profile(document) for document in profile_documents()]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_each_case_gives_exactly_its_rule_and_field(case: Any, cluster_profiles: Any) -> None:
    resolution = resolve(parse_spec(job_spec(case)), NS, TENANT_NAMESPACE_LABELS, cluster_profiles)
    assert [(v.rule, v.field) for v in resolution.violations] == [(case.rule, case.field)]
    assert resolution.violations[0].message


def test_the_base_job_is_allowed_and_gets_the_tenant_defaults(cluster_profiles: Any) -> None:
    resolution = resolve(parse_spec(job_spec()), NS, TENANT_NAMESPACE_LABELS, cluster_profiles)
    assert resolution.violations == []
    assert resolution.profile is not None and resolution.profile.metadata.name == "tenant-lora"
    filled = dict(resolution.from_profile)
    assert filled["spec.resources.nodeSelector"] == {"kubernetes.io/os": "linux"}
    assert filled["spec.activeDeadlineSeconds"] == 1800
    assert filled["pod.queueName"] == "tenant-queue"
    assert resolution.pod.modelCache is not None


@pytest.mark.parametrize("name", list(COMPLIANT_VARIANTS))
def test_each_compliant_variant_is_allowed(name: str, cluster_profiles: Any) -> None:
    variant = parse_spec(merge_patch(BASE_JOB_SPEC, COMPLIANT_VARIANTS[name]))
    assert resolve(variant, NS, TENANT_NAMESPACE_LABELS, cluster_profiles).violations == []
