"""kube.JobReader, the reads of `sftjob get/status/watch`: its permission table against its
calls, and against the RBAC the README gives users (deploy/ grants users nothing)."""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from sftjob_operator import kube
from sftjob_operator.api import GROUP, PLURAL

ROOT = Path(__file__).resolve().parents[2]
OPERATOR_ACCOUNT = {
    "kind": "ServiceAccount",
    "name": "sftjob-operator",
    "namespace": "sftjob-system",
}

# (client attribute in kube.JobReader, method) -> (apiGroup, resource, verb) it needs.
READER_METHODS: dict[tuple[str, str], tuple[str, str, str]] = {
    ("job_api", "get_namespaced_custom_object"): (GROUP, PLURAL, "get"),
    ("job_api", "list_namespaced_custom_object"): (GROUP, PLURAL, "list"),
    ("job_api", "list_cluster_custom_object"): (GROUP, PLURAL, "list"),
    ("event_api", "list_namespaced_event"): ("", "events", "list"),
}


def triples(permissions: dict[tuple[str, str], set[str]]) -> set[tuple[str, str, str]]:
    return {(g, r, v) for (g, r), verbs in permissions.items() for v in verbs}


def reader_calls() -> set[tuple[str, str, str]]:
    """The requests JobReader makes, read from its source (a watch is a list with watch=true)."""
    tree = ast.parse(Path(kube.__file__).read_text())
    (reader,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "JobReader"]
    calls: set[tuple[str, str, str]] = set()
    unmapped = []
    for node in ast.walk(reader):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
            and node.value.attr in {"job_api", "event_api"}
        ):
            key = (node.value.attr, node.attr)
            if key not in READER_METHODS:
                unmapped.append(key)
            else:
                calls.add(READER_METHODS[key])
    assert not unmapped, f"add to READER_METHODS: {unmapped}"
    source = ast.get_source_segment(Path(kube.__file__).read_text(), reader) or ""
    if "watch.stream(" in source:
        calls.add((GROUP, PLURAL, "watch"))
    return calls


def test_reader_permissions_are_exactly_what_job_reader_calls() -> None:
    assert reader_calls() == triples(kube.READER_PERMISSIONS)


def test_reader_is_read_only() -> None:
    verbs = {verb for verbs in kube.READER_PERMISSIONS.values() for verb in verbs}
    assert verbs <= {"get", "list", "watch"}


def readme_reader_rules() -> list[dict[str, Any]]:
    """The RBAC objects in the README's "From the terminal" section."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## From the terminal", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```yaml\n(.*?)```", section, re.DOTALL)
    return [doc for block in blocks for doc in yaml.safe_load_all(block) if doc]


def test_readme_role_grants_what_the_commands_need_and_nothing_more() -> None:
    objects = readme_reader_rules()
    roles = [o for o in objects if o["kind"] in ("ClusterRole", "Role")]
    assert len(roles) == 1, "one role for people who use sftjob get/status/watch"
    granted = {
        (g, r, v)
        for rule in roles[0]["rules"]
        for g in rule["apiGroups"]
        for r in rule["resources"]
        for v in rule["verbs"]
    }
    assert granted == triples(kube.READER_PERMISSIONS)


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl not installed")
@pytest.mark.parametrize("overlay", ["cluster", "namespaced"])
def test_deploy_binds_roles_to_the_operator_only(overlay: str) -> None:
    """deploy/ gives tenants' people no read access to SFTJobs or Events: the README says so
    and gives the role above, rather than deploy/ widening what tenants hold silently."""
    text = subprocess.run(
        ["kubectl", "kustomize", str(ROOT / "deploy" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    bindings = [
        d
        for d in yaml.safe_load_all(text)
        if d and d["kind"] in ("RoleBinding", "ClusterRoleBinding")
    ]
    assert bindings
    for binding in bindings:
        assert binding["subjects"] == [OPERATOR_ACCOUNT], binding["metadata"]["name"]
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## From the terminal", 1)[1].split("\n## ", 1)[0]
    assert "deploy/ grants people no read access" in " ".join(section.split())
