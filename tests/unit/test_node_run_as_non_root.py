"""The kubelet's runAsNonRoot rule as a pure function (node_spec.run_as_non_root_error), and
what it means for the project's own images: both run as a numeric non-root USER, so a
kubelet admits their pods under runAsNonRoot even without a runAsUser (OpenShift assigns
one; issue 21 removes the operator's fixed runAsUser from trainer pods)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from sftjob_local.node_spec import image_user, run_as_non_root_error

ROOT = Path(__file__).resolve().parents[2]
WHERE = '(pod: "p_ns(u1)", container: c)'


def pod(pod_context: dict[str, Any], container_context: dict[str, Any] | None = None) -> Any:
    container = {"name": "c", "image": "i", "securityContext": container_context or {}}
    return {
        "metadata": {"name": "p", "namespace": "ns", "uid": "u1"},
        "spec": {"securityContext": pod_context, "containers": [container]},
    }


@pytest.mark.parametrize(
    ("pod_context", "container_context", "user", "expected"),
    [
        ({}, {}, "", None),  # runAsNonRoot unset: anything runs, root included
        ({"runAsNonRoot": False}, {}, "", None),
        ({"runAsNonRoot": True}, {}, "", "container has runAsNonRoot and image will run as root"),
        ({"runAsNonRoot": True}, {}, "0", "container has runAsNonRoot and image will run as root"),
        ({"runAsNonRoot": True}, {}, "1000:1000", None),
        (
            {"runAsNonRoot": True},
            {},
            "trainer:staff",
            "container has runAsNonRoot and image has non-numeric user (trainer), cannot verify "
            "user is non-root",
        ),
        (
            {"runAsNonRoot": True},
            {},
            "4294967296",
            "container has runAsNonRoot and image has an invalid user id (4294967296). (Must be "
            "1-(2147483647)): must be between 0 and 2147483647, inclusive",
        ),
        # runAsUser decides when set, the image's user is not looked at
        (
            {"runAsNonRoot": True, "runAsUser": 0},
            {},
            "1000",
            "container's runAsUser breaks non-root policy",
        ),
        ({"runAsNonRoot": True, "runAsUser": 1000}, {}, "trainer", None),
        # the container's fields win over the pod's
        (
            {"runAsNonRoot": True, "runAsUser": 1000},
            {"runAsUser": 0},
            None,
            "container's runAsUser breaks non-root policy",
        ),
        ({"runAsNonRoot": True}, {"runAsNonRoot": False}, "", None),
        ({}, {"runAsNonRoot": True}, "", "container has runAsNonRoot and image will run as root"),
        # the image's user unknown (never pulled): only runAsUser can be checked
        ({"runAsNonRoot": True}, {}, None, None),
    ],
)
def test_verify_run_as_non_root(
    pod_context: dict[str, Any],
    container_context: dict[str, Any],
    user: str | None,
    expected: str | None,
) -> None:
    obj = pod(pod_context, container_context)
    got = run_as_non_root_error(obj, obj["spec"]["containers"][0], user)
    assert got == (None if expected is None else f"{expected} {WHERE}")


def dockerfile_user(path: Path) -> str:
    """The USER of the final stage, its ARG defaults substituted."""
    text = path.read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, re.M))
    (user,) = re.findall(r"^USER (\S+)$", text, re.M)
    return re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], user)


@pytest.mark.parametrize("dockerfile", ["trainer_image/Dockerfile", "operator/Dockerfile"])
def test_the_projects_images_pass_the_check_without_a_run_as_user(dockerfile: str) -> None:
    user = dockerfile_user(ROOT / dockerfile)
    uid, name = image_user(user)
    assert uid is not None and uid > 0 and name == "", user
    obj = pod({"runAsNonRoot": True})
    assert run_as_non_root_error(obj, obj["spec"]["containers"][0], user) is None
