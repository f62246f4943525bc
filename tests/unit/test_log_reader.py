"""kube.LogReader, the reads of `sftjob logs` and `sftjob plot`: its permission table is
what it calls (read from its source), and the README names those permissions."""

from __future__ import annotations

import ast
from pathlib import Path

from sftjob_operator import kube
from sftjob_operator.api import GROUP, PLURAL

ROOT = Path(__file__).resolve().parents[2]

# LogReader's client method -> the API request it makes.
CLIENT_METHODS = {
    ("job_api", "get_namespaced_custom_object"): (GROUP, PLURAL, "get"),
    ("pod_api", "list_namespaced_pod"): ("", "pods", "list"),
    ("pod_api", "read_namespaced_pod_log"): ("", "pods/log", "get"),
}


def log_reader_calls() -> set[tuple[str, str, str]]:
    tree = ast.parse(Path(kube.__file__).read_text())
    (reader,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "LogReader"]
    calls, unmapped = set(), []
    for node in ast.walk(reader):
        if (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Attribute)
            and isinstance(node.value.value, ast.Name)
            and node.value.value.id == "self"
            and node.value.attr.endswith("_api")
        ):
            key = (node.value.attr, node.attr)
            if key in CLIENT_METHODS:
                calls.add(CLIENT_METHODS[key])
            else:
                unmapped.append(key)
    assert not unmapped, f"add these LogReader calls to CLIENT_METHODS: {unmapped}"
    return calls


def test_the_permission_table_is_what_log_reader_calls() -> None:
    granted = {(g, r, v) for (g, r), verbs in kube.LOG_READER_PERMISSIONS.items() for v in verbs}
    assert log_reader_calls() == granted == set(CLIENT_METHODS.values())


def test_the_readme_names_the_permissions() -> None:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("### sftjob logs and sftjob plot", 1)[1].split("\n#", 1)[0]
    section = " ".join(section.split())  # as read, across line breaks
    for (group, resource), verbs in kube.LOG_READER_PERMISSIONS.items():
        for verb in verbs:
            assert f"`{verb}` on `{resource}" in section, (group, resource, verb)
