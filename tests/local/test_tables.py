"""Server-side Tables of built-in kinds: columns and cells as kubernetes'
pkg/printers/internalversion/printers.go writes them (the server always prints wide; kubectl
hides priority-1 columns unless ``-o wide``), and apiserver pkg/registry/rest/table.go's default
(Name, Created At) for kinds without a printer. Pure: no server."""

from __future__ import annotations

import pytest
from sftjob_local.emulator import tables
from sftjob_local.emulator.resources import builtin_types

pytestmark = pytest.mark.local

TYPES = {(rt.group, rt.kind): rt for rt in builtin_types()}


def table(group: str, kind: str, obj: dict) -> tuple[list[str], list]:
    obj = {"metadata": {"name": "x", "creationTimestamp": "2020-01-01T00:00:00Z"}, **obj}
    result = tables.to_table(TYPES[(group, kind)], [obj], "None", "1")
    return [c["name"] for c in result["columnDefinitions"]], result["rows"][0]["cells"]


def test_service_ports_external_ips_and_selector():
    names, cells = table(
        "",
        "Service",
        {
            "spec": {
                "type": "NodePort",
                "clusterIP": "10.0.0.1",
                "ports": [
                    {"port": 80, "nodePort": 30080, "protocol": "TCP"},
                    {"port": 53, "protocol": "UDP"},
                ],
                "selector": {"b": "2", "a": "1"},
            }
        },
    )
    assert names == ["Name", "Type", "Cluster-IP", "External-IP", "Port(s)", "Age", "Selector"]
    assert cells[1:5] == ["NodePort", "10.0.0.1", "<none>", "80:30080/TCP,53/UDP"]
    assert cells[6] == "a=1,b=2"
    _, cells = table("", "Service", {"spec": {"type": "LoadBalancer", "clusterIP": "10.0.0.2"}})
    assert cells[3] == "<pending>"


def test_bindings_show_role_and_subjects():
    names, cells = table(
        "rbac.authorization.k8s.io",
        "RoleBinding",
        {
            "roleRef": {"kind": "ClusterRole", "name": "view"},
            "subjects": [
                {"kind": "User", "name": "jane"},
                {"kind": "Group", "name": "devs"},
                {"kind": "ServiceAccount", "name": "op", "namespace": "ns1"},
                {"kind": "User", "name": "joe"},
            ],
        },
    )
    assert names == ["Name", "Role", "Age", "Users", "Groups", "ServiceAccounts"]
    assert cells[1] == "ClusterRole/view"
    assert cells[3:] == ["jane, joe", "devs", "ns1/op"]


def test_roles_use_the_default_table():
    names, cells = table("rbac.authorization.k8s.io", "ClusterRole", {"rules": []})
    assert names == ["Name", "Created At"]
    assert cells == ["x", "2020-01-01T00:00:00Z"]


def test_pvc_capacity_and_modes_only_once_bound():
    spec = {"accessModes": ["ReadWriteOnce"], "storageClassName": "fast"}
    names, cells = table(
        "", "PersistentVolumeClaim", {"spec": spec, "status": {"phase": "Pending"}}
    )
    assert names == [
        "Name", "Status", "Volume", "Capacity", "Access Modes", "StorageClass",
        "VolumeAttributesClass", "Age", "VolumeMode",
    ]  # fmt: skip
    assert cells[1:7] == ["Pending", "", "", "", "fast", "<unset>"]
    bound = {
        "phase": "Bound",
        "capacity": {"storage": "1Gi"},
        "accessModes": ["ReadWriteOnce", "ReadOnlyMany"],
    }
    _, cells = table(
        "",
        "PersistentVolumeClaim",
        {"spec": {**spec, "volumeName": "pv1", "volumeMode": "Filesystem"}, "status": bound},
    )
    assert cells[1:7] == ["Bound", "pv1", "1Gi", "RWO,ROX", "fast", "<unset>"]
    assert cells[8] == "Filesystem"


def test_service_account_node_and_deployment_columns():
    names, cells = table("", "ServiceAccount", {"secrets": [{"name": "t"}]})
    assert names == ["Name", "Secrets", "Age"] and cells[1] == 1
    names, cells = table(
        "",
        "Node",
        {
            "metadata": {"name": "n", "labels": {"node-role.kubernetes.io/control-plane": ""}},
            "spec": {"unschedulable": True},
            "status": {
                "conditions": [{"type": "Ready", "status": "True"}],
                "addresses": [{"type": "InternalIP", "address": "10.1.1.1"}],
                "nodeInfo": {"kubeletVersion": "v1.32.0", "osImage": "Linux"},
            },
        },
    )
    assert names[:5] == ["Name", "Status", "Roles", "Age", "Version"]
    assert cells[1:3] == ["Ready,SchedulingDisabled", "control-plane"]
    assert cells[4:] == ["v1.32.0", "10.1.1.1", "<none>", "Linux", "<unknown>", "<unknown>"]
    names, cells = table(
        "apps",
        "Deployment",
        {
            "spec": {
                "replicas": 3,
                "selector": {"matchLabels": {"app": "w"}},
                "template": {"spec": {"containers": [{"name": "a", "image": "i:1"}]}},
            },
            "status": {"readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 2},
        },
    )
    assert names == [
        "Name",
        "Ready",
        "Up-to-date",
        "Available",
        "Age",
        "Containers",
        "Images",
        "Selector",
    ]
    assert cells[1:4] == ["2/3", 3, 2] and cells[5:] == ["a", "i:1", "app=w"]


def test_events_table_has_no_leading_name_column():
    names, cells = table(
        "",
        "Event",
        {"involvedObject": {"kind": "Node"}, "type": "Warning", "reason": "R", "message": "m"},
    )
    assert names[0] == "Last Seen" and names[-1] == "Name"
    assert cells[1:4] == ["Warning", "R", "node"] and cells[-1] == "x"


def pod(status: dict, spec: dict | None = None, **metadata) -> list:
    spec = spec or {"containers": [{"name": "main"}]}
    return table(
        "", "Pod", {"metadata": {"name": "p", **metadata}, "spec": spec, "status": status}
    )[1]


def test_pod_status_follows_print_pod():
    running = {"running": {"startedAt": "2020-01-01T00:00:00Z"}}
    assert pod(
        {
            "phase": "Running",
            "containerStatuses": [
                {"name": "main", "ready": True, "state": running, "restartCount": 0}
            ],
        }
    )[1:4] == ["1/1", "Running", "0"]
    # A crash loop: the waiting reason, and restarts with the time of the last one.
    crashed = {
        "name": "main",
        "ready": False,
        "restartCount": 3,
        "state": {"waiting": {"reason": "CrashLoopBackOff"}},
        "lastState": {"terminated": {"exitCode": 1, "finishedAt": "2020-01-01T00:00:00Z"}},
    }
    cells = pod({"phase": "Running", "containerStatuses": [crashed]})
    assert (
        cells[1:3] == ["0/1", "CrashLoopBackOff"]
        and cells[3].startswith("3 (")
        and cells[3].endswith(" ago)")
    )
    # A finished pod shows its container's reason, even while being deleted.
    done = {"name": "main", "state": {"terminated": {"exitCode": 0, "reason": "Completed"}}}
    cells = pod(
        {"phase": "Succeeded", "containerStatuses": [done]},
        deletionTimestamp="2020-01-01T00:00:00Z",
    )
    assert cells[2] == "Completed"
    killed = {"name": "main", "state": {"terminated": {"exitCode": 137, "signal": 9}}}
    assert pod({"phase": "Failed", "containerStatuses": [killed]})[2] == "Signal:9"
    assert pod({"phase": "Running"}, deletionTimestamp="2020-01-01T00:00:00Z")[2] == "Terminating"


def test_pod_init_containers_and_sidecars():
    spec = {
        "initContainers": [{"name": "setup"}, {"name": "proxy", "restartPolicy": "Always"}],
        "containers": [{"name": "main"}],
    }
    waiting = {
        "phase": "Pending",
        "initContainerStatuses": [
            {"name": "setup", "state": {"waiting": {"reason": "PodInitializing"}}}
        ],
    }
    assert pod(waiting, spec)[1:3] == ["0/2", "Init:0/2"]
    failed = {
        "phase": "Pending",
        "initContainerStatuses": [{"name": "setup", "state": {"terminated": {"exitCode": 2}}}],
    }
    assert pod(failed, spec)[2] == "Init:ExitCode:2"
    status = {
        "phase": "Running",
        "initContainerStatuses": [
            {"name": "setup", "state": {"terminated": {"exitCode": 0}}},
            {"name": "proxy", "started": True, "ready": True, "state": {"running": {}}},
        ],
        "containerStatuses": [{"name": "main", "ready": True, "state": {"running": {}}}],
    }
    assert pod(status, spec)[1:3] == ["2/2", "Running"]


def test_admission_policies_and_bindings():
    """printValidatingAdmissionPolicy (Validations, ParamKind) and
    printValidatingAdmissionPolicyBinding (PolicyName, ParamRef: ``*/name`` without a
    namespace, ``<unset>`` without a paramRef)."""
    group = "admissionregistration.k8s.io"
    spec = {
        "validations": [{"expression": "true"}] * 2,
        "paramKind": {"apiVersion": "v1", "kind": "ConfigMap"},
    }
    names, cells = table(group, "ValidatingAdmissionPolicy", {"spec": spec})
    assert names == ["Name", "Validations", "ParamKind", "Age"]
    assert cells[1:3] == [2, "v1/ConfigMap"]
    assert table(group, "ValidatingAdmissionPolicy", {"spec": {}})[1][2] == "<unset>"
    binding = {"spec": {"policyName": "p", "paramRef": {"name": "limits"}}}
    names, cells = table(group, "ValidatingAdmissionPolicyBinding", binding)
    assert names == ["Name", "PolicyName", "ParamRef", "Age"]
    assert cells[1:3] == ["p", "*/limits"]
    binding["spec"]["paramRef"]["namespace"] = "team-a"
    assert table(group, "ValidatingAdmissionPolicyBinding", binding)[1][2] == "team-a/limits"
    assert table(group, "ValidatingAdmissionPolicyBinding", {"spec": {}})[1][2] == "<unset>"
