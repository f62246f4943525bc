"""Conformance probes: Pod Security Admission, the built-in PodSecurity plugin.

Every expected answer is the real apiserver's, from k8s.io/pod-security-admission v0.32:
``policy/check_*.go`` (each check's reason and detail), ``policy/registry.go`` (baseline checks
then restricted ones, each group sorted by check id; a restricted check replaces the baseline
check it overrides), ``policy/checks.go`` (``reason (detail), ...``), ``admission/admission.go``
(enforce refuses with 403 ``violates PodSecurity "<level>:<version>": ...``, warn adds
``would violate ...``, a tightened namespace warns about its existing pods) and
``api/helpers.go`` (label parsing; warn defaults to a stricter enforce level).
"""

from __future__ import annotations

import copy
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.local, pytest.mark.timeout(60)]

ENFORCE = "pod-security.kubernetes.io/enforce"
Pod = dict[str, Any]


def restricted_pod() -> Pod:
    """A pod the restricted level admits: the smallest such, for the cases to break."""
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {
            "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [
                {
                    "name": "c",
                    "image": "busybox",
                    "securityContext": {
                        "allowPrivilegeEscalation": False,
                        "capabilities": {"drop": ["ALL"]},
                    },
                }
            ],
        },
    }


def plain_pod() -> Pod:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "p"},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]},
    }


@pytest.fixture
def namespace(cluster: Any) -> Iterator[Callable[..., str]]:
    """namespace(labels) -> the name of a new namespace carrying them; deleted afterwards."""
    made: list[str] = []

    def make(labels: dict[str, str] | None = None) -> str:
        name = f"psa-{secrets.token_hex(4)}"
        cluster.ok(
            "POST", "/api/v1/namespaces", {"metadata": {"name": name, "labels": labels or {}}}
        )
        made.append(name)
        # The ServiceAccount admission plugin needs the namespace's default account.
        cluster.wait_for(
            lambda: (
                cluster.request("GET", f"/api/v1/namespaces/{name}/serviceaccounts/default")[0]
                == 200
            )
        )
        return name

    yield make
    for name in made:
        cluster.request("DELETE", f"/api/v1/namespaces/{name}")


def create_pod(cluster: Any, namespace: str, pod: Pod) -> tuple[int, Any, str | None]:
    """POST the pod: (status, body, the Warning header)."""
    response = cluster._send(
        "POST",
        f"/api/v1/namespaces/{namespace}/pods",
        pod,
        {},
        {"Accept": "application/json", "Content-Type": "application/json"},
        timeout=30,
    )
    return response.status, json.loads(response.read()), response.getheader("Warning")


def send(
    cluster: Any, method: str, path: str, body: Any, content_type: str
) -> tuple[int, str | None]:
    response = cluster._send(
        method, path, body, {}, {"Accept": "application/json", "Content-Type": content_type}, 30
    )
    return response.status, response.getheader("Warning")


def with_changes(base: Callable[[], Pod], change: Callable[[Pod], None]) -> Pod:
    pod = copy.deepcopy(base())
    change(pod)
    return pod


def pod_context(pod: Pod) -> dict[str, Any]:
    return pod["spec"].setdefault("securityContext", {})


def container_context(pod: Pod) -> dict[str, Any]:
    return pod["spec"]["containers"][0].setdefault("securityContext", {})


# (id, change to the base pod, the message's detail after `violates PodSecurity "<lv>": `)
BASELINE_CASES: list[tuple[str, Callable[[Pod], None], str]] = [
    (
        "host-namespaces",
        lambda p: p["spec"].update(hostNetwork=True, hostPID=True, hostIPC=True),
        "host namespaces (hostNetwork=true, hostPID=true, hostIPC=true)",
    ),
    (
        "privileged",
        lambda p: container_context(p).update(privileged=True),
        'privileged (container "c" must not set securityContext.privileged=true)',
    ),
    (
        "non-default-capabilities",
        lambda p: container_context(p).update(
            capabilities={"add": ["SYS_TIME", "NET_ADMIN", "CHOWN"]}
        ),
        'non-default capabilities (container "c" must not include "NET_ADMIN", "SYS_TIME" in '
        "securityContext.capabilities.add)",
    ),
    (
        "host-path",
        lambda p: p["spec"].update(volumes=[{"name": "host", "hostPath": {"path": "/etc"}}]),
        'hostPath volumes (volume "host")',
    ),
    (
        "host-ports",
        lambda p: p["spec"]["containers"][0].update(
            ports=[
                {"containerPort": 9090, "hostPort": 9090},
                {"containerPort": 10000, "hostPort": 10000},
            ]
        ),
        # The ports sorted as strings, as sets.String.List() does.
        'hostPort (container "c" uses hostPorts 10000, 9090)',
    ),
    (
        "selinux",
        lambda p: pod_context(p).update(seLinuxOptions={"type": "spc_t", "user": "root"}),
        'seLinuxOptions (pod set forbidden securityContext.seLinuxOptions: type "spc_t"; '
        "user may not be set)",
    ),
    (
        "seccomp-unconfined",
        lambda p: container_context(p).update(seccompProfile={"type": "Unconfined"}),
        'seccompProfile (container "c" must not set securityContext.seccompProfile.type to '
        '"Unconfined")',
    ),
    (
        "sysctls",
        lambda p: pod_context(p).update(
            sysctls=[
                {"name": "kernel.msgmax", "value": "1"},
                {"name": "net.ipv4.tcp_rmem", "value": "4096 87380 6291456"},
            ]
        ),
        # net.ipv4.tcp_rmem is allowed from v1.32 on.
        "forbidden sysctls (kernel.msgmax)",
    ),
    (
        "apparmor",
        lambda p: pod_context(p).update(appArmorProfile={"type": "Unconfined"}),
        'forbidden AppArmor profile (pod must not set AppArmor profile type to "Unconfined")',
    ),
    (
        "two-checks-in-id-order",
        lambda p: (
            container_context(p).update(privileged=True),
            p["spec"].update(hostPID=True),
        ),
        'host namespaces (hostPID=true), privileged (container "c" must not set '
        "securityContext.privileged=true)",
    ),
]


@pytest.mark.parametrize(
    ("change", "detail"), [c[1:] for c in BASELINE_CASES], ids=[c[0] for c in BASELINE_CASES]
)
def test_baseline_refuses_each_violation(
    cluster: Any, namespace: Callable[..., str], change: Callable[[Pod], None], detail: str
) -> None:
    ns = namespace({ENFORCE: "baseline"})
    status, body, _ = create_pod(cluster, ns, with_changes(plain_pod, change))
    assert status == 403, body
    assert body["reason"] == "Forbidden"
    assert (
        body["message"]
        == f'pods "p" is forbidden: violates PodSecurity "baseline:latest": {detail}'
    )
    assert body["details"] == {"name": "p", "kind": "pods"}
    # Refused means not stored.
    assert cluster.request("GET", f"/api/v1/namespaces/{ns}/pods/p")[0] == 404


RESTRICTED_CASES: list[tuple[str, Callable[[Pod], None], str]] = [
    (
        "allow-privilege-escalation",
        lambda p: container_context(p).pop("allowPrivilegeEscalation"),
        'allowPrivilegeEscalation != false (container "c" must set '
        "securityContext.allowPrivilegeEscalation=false)",
    ),
    (
        "drop-all-missing",
        lambda p: container_context(p).update(capabilities={"drop": ["NET_RAW"]}),
        'unrestricted capabilities (container "c" must set securityContext.capabilities.drop=["ALL"])',
    ),
    (
        "capability-added",
        # The baseline check is replaced at restricted: one message, not two.
        lambda p: container_context(p)["capabilities"].update(
            add=["SYS_ADMIN", "NET_BIND_SERVICE"]
        ),
        'unrestricted capabilities (container "c" must not include "SYS_ADMIN" in '
        "securityContext.capabilities.add)",
    ),
    (
        "run-as-non-root-unset",
        lambda p: pod_context(p).pop("runAsNonRoot"),
        'runAsNonRoot != true (pod or container "c" must set securityContext.runAsNonRoot=true)',
    ),
    (
        "run-as-non-root-false",
        lambda p: container_context(p).update(runAsNonRoot=False),
        'runAsNonRoot != true (container "c" must not set securityContext.runAsNonRoot=false)',
    ),
    (
        "run-as-user-0",
        lambda p: pod_context(p).update(runAsUser=0),
        "runAsUser=0 (pod must not set runAsUser=0)",
    ),
    (
        "seccomp-unset",
        lambda p: pod_context(p).pop("seccompProfile"),
        'seccompProfile (pod or container "c" must set securityContext.seccompProfile.type to '
        '"RuntimeDefault" or "Localhost")',
    ),
    (
        "seccomp-unconfined-pod",
        lambda p: pod_context(p).update(seccompProfile={"type": "Unconfined"}),
        'seccompProfile (pod must not set securityContext.seccompProfile.type to "Unconfined")',
    ),
    (
        "restricted-volume",
        # hostPath is named by restrictedVolumes here (it overrides hostPathVolumes).
        lambda p: p["spec"].update(
            volumes=[
                {"name": "host", "hostPath": {"path": "/etc"}},
                {"name": "shared", "nfs": {"server": "nfs.example", "path": "/x"}},
                {"name": "scratch", "emptyDir": {}},
            ]
        ),
        'restricted volume types (volumes "host", "shared" use restricted volume types '
        '"hostPath", "nfs")',
    ),
    (
        "init-container-first",
        lambda p: p["spec"].update(initContainers=[{"name": "init", "image": "busybox"}]),
        'allowPrivilegeEscalation != false (container "init" must set '
        "securityContext.allowPrivilegeEscalation=false), unrestricted capabilities (container "
        '"init" must set securityContext.capabilities.drop=["ALL"])',
    ),
    (
        "everything-at-once",
        lambda p: p["spec"].update(
            securityContext={},
            containers=[{"name": "c", "image": "busybox"}, {"name": "d", "image": "busybox"}],
        ),
        'allowPrivilegeEscalation != false (containers "c", "d" must set '
        "securityContext.allowPrivilegeEscalation=false), unrestricted capabilities (containers "
        '"c", "d" must set securityContext.capabilities.drop=["ALL"]), runAsNonRoot != true (pod '
        'or containers "c", "d" must set securityContext.runAsNonRoot=true), seccompProfile (pod '
        'or containers "c", "d" must set securityContext.seccompProfile.type to "RuntimeDefault" '
        'or "Localhost")',
    ),
]


@pytest.mark.parametrize(
    ("change", "detail"), [c[1:] for c in RESTRICTED_CASES], ids=[c[0] for c in RESTRICTED_CASES]
)
def test_restricted_refuses_each_violation(
    cluster: Any, namespace: Callable[..., str], change: Callable[[Pod], None], detail: str
) -> None:
    ns = namespace({ENFORCE: "restricted"})
    status, body, _ = create_pod(cluster, ns, with_changes(restricted_pod, change))
    assert status == 403, body
    assert body["message"] == (
        f'pods "p" is forbidden: violates PodSecurity "restricted:latest": {detail}'
    )


def test_restricted_admits_a_compliant_pod_with_allowed_volumes(
    cluster: Any, namespace: Callable[..., str]
) -> None:
    ns = namespace({ENFORCE: "restricted", f"{ENFORCE}-version": "latest"})

    def allowed(pod: Pod) -> None:
        container_context(pod)["capabilities"]["add"] = ["NET_BIND_SERVICE"]
        pod["spec"]["volumes"] = [
            {"name": "cm", "configMap": {"name": "x"}},
            {"name": "scratch", "emptyDir": {"sizeLimit": "1Gi"}},
            {"name": "data", "persistentVolumeClaim": {"claimName": "x"}},
            {"name": "token", "projected": {"sources": []}},
            {"name": "info", "downwardAPI": {"items": []}},
            {"name": "key", "secret": {"secretName": "x"}},
        ]

    status, body, warning = create_pod(cluster, ns, with_changes(restricted_pod, allowed))
    assert status == 201, body
    assert warning is None


@pytest.mark.parametrize(
    "labels",
    [
        pytest.param({}, id="unlabelled"),
        pytest.param({ENFORCE: "privileged"}, id="privileged"),
        pytest.param({"app": "x", "pod-security.kubernetes.io/audit": "restricted"}, id="audit"),
    ],
)
def test_unlabelled_and_privileged_namespaces_admit_anything(
    cluster: Any, namespace: Callable[..., str], labels: dict[str, str]
) -> None:
    ns = namespace(labels)

    def everything(pod: Pod) -> None:
        pod["spec"].update(hostNetwork=True, volumes=[{"name": "h", "hostPath": {"path": "/"}}])
        container_context(pod).update(privileged=True, runAsUser=0)

    status, body, warning = create_pod(cluster, ns, with_changes(plain_pod, everything))
    assert status == 201, body
    assert warning is None  # audit has no warning; this server has no audit log either


def test_baseline_admits_what_only_restricted_refuses(
    cluster: Any, namespace: Callable[..., str]
) -> None:
    ns = namespace({ENFORCE: "baseline"})
    status, body, warning = create_pod(cluster, ns, plain_pod())
    assert status == 201, body
    assert warning is None  # warn defaults to the enforce level: baseline


def test_warn_mode_admits_with_a_warning(cluster: Any, namespace: Callable[..., str]) -> None:
    ns = namespace({ENFORCE: "baseline", "pod-security.kubernetes.io/warn": "restricted"})
    status, body, warning = create_pod(
        cluster, ns, with_changes(restricted_pod, lambda p: pod_context(p).pop("runAsNonRoot"))
    )
    assert status == 201, body
    # One warn-text, a quoted-string (its inner quotes escaped), as the apiserver sends it.
    assert warning == (
        '299 - "would violate PodSecurity \\"restricted:latest\\": runAsNonRoot != true (pod or '
        'container \\"c\\" must set securityContext.runAsNonRoot=true)"'
    )


def test_enforce_version_selects_the_checks_of_that_release(
    cluster: Any, namespace: Callable[..., str]
) -> None:
    """runAsUser=0 is a restricted check from v1.23 on; a later version than the server's
    evaluates as the newest it knows, and the message names the label's version."""
    run_as_root = with_changes(restricted_pod, lambda p: pod_context(p).update(runAsUser=0))
    older = namespace({ENFORCE: "restricted", f"{ENFORCE}-version": "v1.22"})
    assert create_pod(cluster, older, run_as_root)[0] == 201
    for version in ("v1.23", "v1.99"):
        ns = namespace({ENFORCE: "restricted", f"{ENFORCE}-version": version})
        status, body, _ = create_pod(cluster, ns, run_as_root)
        assert status == 403
        assert body["message"] == (
            f'pods "p" is forbidden: violates PodSecurity "restricted:{version}": '
            "runAsUser=0 (pod must not set runAsUser=0)"
        )


def test_bad_labels_are_refused_on_the_namespace(cluster: Any) -> None:
    name = f"psa-{secrets.token_hex(4)}"
    labels = {ENFORCE: "strict", f"{ENFORCE}-version": "1.30"}
    status, body = cluster.request(
        "POST", "/api/v1/namespaces", {"metadata": {"name": name, "labels": labels}}
    )
    assert status == 422, body
    assert body["message"] == (
        f'Namespace "{name}" is invalid: [metadata.labels[{ENFORCE}]: Invalid value: "strict": '
        f"must be one of privileged, baseline, restricted, metadata.labels[{ENFORCE}-version]: "
        'Invalid value: "1.30": must be "latest" or "v1.x"]'
    )
    assert cluster.request("GET", f"/api/v1/namespaces/{name}")[0] == 404


def test_tightening_a_namespace_warns_about_its_existing_pods(
    cluster: Any, namespace: Callable[..., str]
) -> None:
    ns = namespace()
    for name in ("b", "a", "c"):
        pod = plain_pod()
        pod["metadata"]["name"] = name
        assert create_pod(cluster, ns, pod)[0] == 201
    status, warning = send(
        cluster,
        "PATCH",
        f"/api/v1/namespaces/{ns}",
        {"metadata": {"labels": {ENFORCE: "restricted"}}},
        "application/merge-patch+json",
    )
    assert status == 200
    assert warning == (
        f'299 - "existing pods in namespace \\"{ns}\\" violate the new PodSecurity enforce level '
        '\\"restricted:latest\\"", 299 - "a (and 2 other pods): allowPrivilegeEscalation != false, '
        'unrestricted capabilities, runAsNonRoot != true, seccompProfile"'
    )
    # Existing pods keep running; new ones are checked.
    assert cluster.request("GET", f"/api/v1/namespaces/{ns}/pods/a")[0] == 200
    assert create_pod(cluster, ns, plain_pod())[0] == 403


def test_status_updates_and_unchanged_images_are_not_checked(
    cluster: Any, namespace: Callable[..., str]
) -> None:
    ns = namespace()
    assert create_pod(cluster, ns, plain_pod())[0] == 201
    cluster.ok(
        "PATCH",
        f"/api/v1/namespaces/{ns}",
        {"metadata": {"labels": {ENFORCE: "restricted"}}},
        content_type="application/merge-patch+json",
    )
    pods = f"/api/v1/namespaces/{ns}/pods/p"
    merge = "application/merge-patch+json"
    assert (
        send(cluster, "PATCH", pods + "/status", {"status": {"phase": "Running"}}, merge)[0] == 200
    )
    assert send(cluster, "PATCH", pods, {"metadata": {"labels": {"x": "y"}}}, merge)[0] == 200
    # A new image is a significant update: the pod is checked, and refused.
    change = {"spec": {"containers": [{"name": "c", "image": "busybox:2"}]}}
    status, _ = send(cluster, "PATCH", pods, change, "application/strategic-merge-patch+json")
    assert status == 403


# Example jobs (the profile-*.yaml examples hold SFTProfiles, checked in tests/unit).
EXAMPLES = sorted(
    p
    for p in (Path(__file__).resolve().parents[2] / "deploy" / "examples").glob("*.yaml")
    if not p.name.startswith("profile-")
)


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_the_operators_trainer_pods_meet_the_restricted_level(
    cluster: Any, namespace: Callable[..., str], example: Path
) -> None:
    """Every rank of every example job, as the operator builds it, in a namespace enforcing
    restricted: admitted, with no warning."""
    from sftjob_operator.children import build_pods, build_service_account
    from sftjob_operator.documents import sftjobs_in

    jobs = sftjobs_in(example.read_text(), source=str(example))
    assert jobs, f"{example.name} holds no SFTJob"
    ns = namespace({ENFORCE: "restricted", "pod-security.kubernetes.io/warn": "restricted"})
    for job in jobs:
        job.metadata.namespace = ns
        account = build_service_account(job)
        # No owner here (no SFTJob is stored): a pod whose owner does not exist would be
        # garbage-collected at once, and the owner is nothing PodSecurity looks at.
        account["metadata"].pop("ownerReferences", None)
        cluster.ok("POST", f"/api/v1/namespaces/{ns}/serviceaccounts", account)
        pods = build_pods(job, attempt=1)
        assert pods
        for pod in pods:
            pod["metadata"].pop("ownerReferences", None)
            status, body, warning = create_pod(cluster, ns, pod)
            assert status == 201, body.get("message", body)
            assert warning is None


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="kubectl is not installed")
def test_kubectl_shows_the_warning_and_the_refusal(
    cluster: Any, namespace: Callable[..., str], tmp_path: Path
) -> None:
    """kubectl parses the Warning header (client-go's ParseWarningHeaders) and prints it."""
    ns = namespace({"pod-security.kubernetes.io/warn": "restricted"})
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "KUBECACHEDIR": str(tmp_path)}

    def kubectl(*args: str) -> subprocess.CompletedProcess[str]:
        command = ["kubectl", *args, "-n", ns]
        return subprocess.run(command, env=env, capture_output=True, text=True, timeout=30)

    checks = (
        'allowPrivilegeEscalation != false (container "w" must set '
        "securityContext.allowPrivilegeEscalation=false), unrestricted capabilities (container "
        '"w" must set securityContext.capabilities.drop=["ALL"]), runAsNonRoot != true (pod or '
        'container "w" must set securityContext.runAsNonRoot=true), seccompProfile (pod or '
        'container "w" must set securityContext.seccompProfile.type to "RuntimeDefault" or '
        '"Localhost")'
    )
    warned = kubectl("run", "w", "--image=busybox", "--restart=Never")
    assert warned.returncode == 0, warned.stderr
    assert warned.stderr == f'Warning: would violate PodSecurity "restricted:latest": {checks}\n'
    kubectl("delete", "pod", "w", "--wait=false")
    assert kubectl("label", "namespace", ns, f"{ENFORCE}=restricted").returncode == 0
    refused = kubectl("run", "w", "--image=busybox", "--restart=Never")
    assert refused.returncode == 1
    assert refused.stderr == (
        'Error from server (Forbidden): pods "w" is forbidden: violates PodSecurity '
        f'"restricted:latest": {checks}\n'
    )
