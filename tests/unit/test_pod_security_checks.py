"""The Pod Security checks that the API probes (tests/local/test_pod_security.py) cannot
reach with a pod the API server would store: older policy versions, the alpha annotations,
Windows-only and user-namespace-only fields. Expected texts are pod-security-admission
v0.32's (policy/check_*.go)."""

from __future__ import annotations

from typing import Any

import pytest
from sftjob_local.emulator.pod_security import LevelVersion, evaluate, forbidden_detail, policy_of


def pod(spec: dict[str, Any] | None = None, annotations: dict[str, str] | None = None) -> Any:
    base: dict[str, Any] = {"containers": [{"name": "c", "image": "i"}]}
    return {
        "metadata": {"name": "p", "annotations": annotations or {}},
        "spec": {**base, **(spec or {})},
    }


def detail(level: str, version: tuple[int, int] | None, obj: Any) -> str:
    return forbidden_detail(evaluate(LevelVersion(level, version), obj))


def restricted_ok(**container_context: Any) -> dict[str, Any]:
    context = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    return {
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [
            {"name": "c", "image": "i", "securityContext": {**context, **container_context}}
        ],
    }


@pytest.mark.parametrize(
    ("version", "obj", "expected"),
    [
        pytest.param(
            None,
            pod(
                {
                    "containers": [
                        {"name": "c", "image": "i", "securityContext": {"procMount": "Unmasked"}}
                    ]
                }
            ),
            'procMount (container "c" must not set securityContext.procMount to "Unmasked")',
            id="proc-mount",
        ),
        pytest.param(
            None,
            pod({"securityContext": {"windowsOptions": {"hostProcess": True}}}),
            "hostProcess (pod must not set securityContext.windowsOptions.hostProcess=true)",
            id="windows-host-process",
        ),
        pytest.param(
            None,
            pod(annotations={"container.apparmor.security.beta.kubernetes.io/c": "unconfined"}),
            "forbidden AppArmor profile (annotation must not set AppArmor profile type to "
            # joinQuote wraps the `key="value"` text in quotes, escaping nothing
            '"container.apparmor.security.beta.kubernetes.io/c="unconfined"")',
            id="apparmor-annotation",
        ),
        pytest.param(
            (1, 18),
            pod(annotations={"seccomp.security.alpha.kubernetes.io/pod": "unconfined"}),
            'seccompProfile (forbidden annotation seccomp.security.alpha.kubernetes.io/pod="unconfined")',
            id="seccomp-annotation-before-1.19",
        ),
        pytest.param(
            None,
            pod(annotations={"seccomp.security.alpha.kubernetes.io/pod": "unconfined"}),
            "",
            id="seccomp-annotation-ignored-from-1.19",
        ),
        pytest.param(
            (1, 30),
            pod({"securityContext": {"seLinuxOptions": {"type": "container_engine_t"}}}),
            'seLinuxOptions (pod set forbidden securityContext.seLinuxOptions: type "container_engine_t")',
            id="selinux-engine-type-before-1.31",
        ),
        pytest.param(
            (1, 31),
            pod({"securityContext": {"seLinuxOptions": {"type": "container_engine_t"}}}),
            "",
            id="selinux-engine-type-from-1.31",
        ),
        pytest.param(
            (1, 31),
            pod({"securityContext": {"sysctls": [{"name": "net.ipv4.tcp_rmem", "value": "1"}]}}),
            "forbidden sysctls (net.ipv4.tcp_rmem)",
            id="sysctl-before-1.32",
        ),
    ],
)
def test_baseline_checks(version: tuple[int, int] | None, obj: Any, expected: str) -> None:
    assert detail("baseline", version, obj) == expected


def test_restricted_checks_replace_their_baseline_checks_from_their_version() -> None:
    adds = pod(restricted_ok(capabilities={"drop": ["ALL"], "add": ["SYS_ADMIN"]}))
    assert detail("restricted", (1, 22), adds) == (
        'unrestricted capabilities (container "c" must not include "SYS_ADMIN" in '
        "securityContext.capabilities.add)"
    )
    # Before v1.22 there is no restricted capabilities check: the baseline one speaks.
    assert detail("restricted", (1, 21), adds) == (
        'non-default capabilities (container "c" must not include "SYS_ADMIN" in '
        "securityContext.capabilities.add)"
    )
    # runAsUser=0 is refused from v1.23 on; allowPrivilegeEscalation from v1.8 on.
    root = pod(
        {
            **restricted_ok(),
            "securityContext": {**restricted_ok()["securityContext"], "runAsUser": 0},
        }
    )
    assert detail("restricted", (1, 22), root) == ""
    assert detail("restricted", (1, 23), root) == "runAsUser=0 (pod must not set runAsUser=0)"
    escalates = pod(restricted_ok(allowPrivilegeEscalation=True))
    assert detail("restricted", (1, 7), escalates) == ""
    assert "allowPrivilegeEscalation != false" in detail("restricted", (1, 8), escalates)


def test_windows_pods_are_exempt_from_the_linux_only_checks_from_1_25() -> None:
    windows = pod({"os": {"name": "windows"}, "securityContext": {"runAsNonRoot": True}})
    assert detail("restricted", (1, 25), windows) == ""
    assert detail("restricted", (1, 24), windows).startswith("allowPrivilegeEscalation != false")


def test_privileged_evaluates_nothing_and_the_newest_version_is_the_latest() -> None:
    bad = pod({"hostNetwork": True})
    assert evaluate(LevelVersion("privileged"), bad) == []
    assert detail("baseline", (1, 99), bad) == detail("baseline", None, bad) != ""


@pytest.mark.parametrize(
    ("labels", "enforce", "warn"),
    [
        ({}, "privileged:latest", "privileged:latest"),
        ({"pod-security.kubernetes.io/enforce": "baseline"}, "baseline:latest", "baseline:latest"),
        (
            {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "v1.25",
            },
            "restricted:v1.25",
            "restricted:v1.25",
        ),
        (
            {
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/warn": "baseline",
            },
            "restricted:latest",
            "baseline:latest",
        ),
        # A bad enforce level is evaluated as restricted; a bad warn level as privileged.
        ({"pod-security.kubernetes.io/enforce": "nope"}, "restricted:latest", "privileged:latest"),
        ({"pod-security.kubernetes.io/warn": "nope"}, "privileged:latest", "privileged:latest"),
    ],
)
def test_policy_from_labels(labels: dict[str, str], enforce: str, warn: str) -> None:
    policy, _ = policy_of(labels)
    assert (str(policy["enforce"]), str(policy["warn"])) == (enforce, warn)
