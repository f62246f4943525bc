"""Reading SFTJob and SFTProfile manifests from YAML text, with errors that point at the line.

YAML is read as kubectl and the API server read it (sigs.k8s.io/yaml over go-yaml v2), not as
PyYAML's YAML 1.1 alone: a number with an exponent and no dot (`learningRate: 2e-4`, `1e3`)
or an unsigned exponent (`1.0e3`) is a number there, where PyYAML leaves a string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import yaml

from .api import API_VERSION, KIND, FieldError, SFTJob, SpecError, parse_sftjob
from .profile_api import PROFILE_KIND, SFTProfile, parse_profile


class KubernetesYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus go-yaml v2's floats (its resolve.go yamlStyleFloat)."""


# Only the exponent forms PyYAML misses; its own float resolver keeps the rest. PyYAML copies
# the resolver table for a subclass, so yaml.safe_load elsewhere is unchanged.
KubernetesYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)


def load_yaml_all(text: str) -> list[Any]:
    return list(yaml.load_all(text, Loader=KubernetesYamlLoader))


@dataclass(frozen=True)
class Document:
    index: int
    body: dict[str, Any]

    @property
    def label(self) -> str:
        name = (self.body.get("metadata") or {}).get("name") or f"document {self.index + 1}"
        return f"{self.body.get('kind', '?')}/{name}"


def load_documents(text: str, source: str = "<input>") -> list[Document]:
    """All non-empty YAML documents in `text`; a YAML syntax error names line and column."""
    try:
        raw = [d for d in load_yaml_all(text) if d is not None]
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(
            [FieldError(path="", message=f"{where}: malformed YAML: {problem}. Fix the syntax")]
        ) from None
    documents = []
    for index, body in enumerate(raw):
        if not isinstance(body, dict):
            raise SpecError(
                [
                    FieldError(
                        path="",
                        message=f"{source}: document {index + 1} is a {type(body).__name__}, "
                        "not a mapping with apiVersion, kind, metadata and spec",
                    )
                ]
            )
        documents.append(Document(index=index, body=body))
    return documents


def is_sftjob(document: Document) -> bool:
    return document.body.get("kind") == KIND and document.body.get("apiVersion") == API_VERSION


def sftjobs_in(text: str, source: str = "<input>") -> list[SFTJob]:
    """Parse every SFTJob in a multi-document YAML text; other kinds are left out."""
    jobs = []
    for document in load_documents(text, source):
        if document.body.get("kind") == KIND and not is_sftjob(document):
            raise SpecError(
                [
                    FieldError(
                        path="apiVersion",
                        message=f"{document.label}: apiVersion must be {API_VERSION}, "
                        f"got {document.body.get('apiVersion')!r}",
                    )
                ]
            )
        if is_sftjob(document):
            jobs.append(parse_sftjob(document.body))
    return jobs


def sftprofiles_in(text: str, source: str = "<input>") -> list[SFTProfile]:
    """Parse every SFTProfile in a multi-document YAML text; other kinds are left out."""
    return [
        parse_profile(document.body)
        for document in load_documents(text, source)
        if document.body.get("kind") == PROFILE_KIND
    ]
