"""Reading SFTJob manifests from YAML text, with errors that point at the line."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import yaml

from .api import API_VERSION, KIND, FieldError, SFTJob, SpecError, parse_sftjob


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
        raw = [d for d in yaml.safe_load_all(text) if d is not None]
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
