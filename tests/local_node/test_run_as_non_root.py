"""The kubelet's runAsNonRoot check (pkg/kubelet/kuberuntime/security_context_others.go
verifyRunAsNonRoot), as the local node applies it: a container that must run as non-root
but would run as root, or as a user the kubelet cannot tell is not root, waits in
CreateContainerConfigError (kuberuntime_container.go startContainer) with a Warning event
`Failed` "Error: <message>", and never starts. The node knows an image's USER only from
its `image_users` (conftest.IMAGE_USERS): it never pulls images.
"""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client import CoreV1Api
from local_node_kit import py_pod, wait_for, wait_phase
from test_kubelet import events, waiting_reason

pytestmark = pytest.mark.local


def non_root_pod(name: str, image: str, **pod_context: Any) -> dict[str, Any]:
    pod = py_pod(name, "print('ran')", image=image)
    pod["spec"]["securityContext"] = {"runAsNonRoot": True, **pod_context}
    return pod


@pytest.mark.parametrize(
    ("image", "pod_context", "message"),
    [
        pytest.param(
            "example.invalid/never-pulled:1",
            {"runAsUser": 0},
            "container's runAsUser breaks non-root policy",
            id="run-as-user-0",
        ),
        pytest.param(
            "example.test/user-root:1",
            {},
            "container has runAsNonRoot and image will run as root",
            id="image-without-user",
        ),
        pytest.param(
            "example.test/user-zero:1",
            {},
            "container has runAsNonRoot and image will run as root",
            id="image-user-0",
        ),
        pytest.param(
            "example.test/user-named:1",
            {},
            "container has runAsNonRoot and image has non-numeric user (trainer), cannot verify "
            "user is non-root",
            id="image-named-user",
        ),
    ],
)
def test_a_root_container_under_run_as_non_root_never_starts(
    core: CoreV1Api, ns: str, image: str, pod_context: dict[str, Any], message: str
) -> None:
    created = core.create_namespaced_pod(ns, non_root_pod("root", image, **pod_context))
    expected = f'{message} (pod: "root_{ns}({created.metadata.uid})", container: main)'
    reason = wait_for(lambda: waiting_reason(core, ns, "root"), what="a waiting reason")
    assert reason == ("CreateContainerConfigError", expected)
    assert ("Failed", f"Error: {expected}", "Warning", "kubelet") in events(core, ns, "root")
    assert core.read_namespaced_pod("root", ns).status.phase == "Pending"


@pytest.mark.parametrize(
    ("image", "pod_context"),
    [
        pytest.param("example.test/user-1000:1", {}, id="numeric-image-user"),
        # An explicit non-zero runAsUser wins over the image's user, even a named one.
        pytest.param("example.test/user-named:1", {"runAsUser": 1000}, id="run-as-user-wins"),
        # The node cannot read an image it has no entry for: only runAsUser is checked.
        pytest.param("example.invalid/never-pulled:1", {}, id="unknown-image"),
    ],
)
def test_a_non_root_container_runs(
    core: CoreV1Api, ns: str, image: str, pod_context: dict[str, Any]
) -> None:
    core.create_namespaced_pod(ns, non_root_pod("ok", image, **pod_context))
    wait_phase(core, ns, "ok", "Succeeded")
