"""Loading the training data and checking every row before any training step.

A malformed row deep in a dataset otherwise fails hours into a run with a stack
trace from a collator; here it fails in seconds with the row number and the fix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sftjob_operator.api import DatasetSource

from .failures import ConfigError, DataError, load_failure, network_cause

FILE_BUILDERS = {
    ".json": "json",
    ".jsonl": "json",
    ".parquet": "parquet",
    ".csv": "csv",
}
ROLES = ("system", "user", "assistant", "tool")
MAX_PROBLEMS_SHOWN = 5


def _builder_for(name: str) -> str:
    lowered = name.lower()
    for suffix in (".gz", ".zst", ".bz2", ".xz"):
        lowered = lowered.removesuffix(suffix)
    builder = FILE_BUILDERS.get(Path(lowered).suffix)
    if builder is None:
        raise ConfigError(
            f"dataset file {name} has an unknown type: use .json, .jsonl, .parquet or .csv"
        )
    return builder


def _local_files(path: Path) -> tuple[str, list[str]]:
    if path.is_file():
        return _builder_for(path.name), [str(path)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    by_builder: dict[str, list[str]] = {}
    for file in files:
        try:
            by_builder.setdefault(_builder_for(file.name), []).append(str(file))
        except ConfigError:
            continue  # READMEs, licences and such live next to data files
    if not by_builder:
        raise DataError(f"dataset folder {path} holds no .json, .jsonl, .parquet or .csv files")
    if len(by_builder) > 1:
        raise DataError(
            f"dataset folder {path} mixes file types ({', '.join(sorted(by_builder))}): "
            "keep one type per folder"
        )
    builder, found = next(iter(by_builder.items()))
    return builder, found


def _probe_http(uri: str) -> BaseException | None:
    """Why an http(s) data file could not be read, or None when the server answers.

    datasets resolves `data_files` through fsspec and reports any failure to reach a URL
    (a 503, a dropped connection) as "Unable to find", the cause dropped: one HEAD request
    tells an outage (NetworkError, retried) from a file that is not there (DataError).
    """
    import urllib.request

    if not uri.startswith(("http://", "https://")):
        return None
    try:
        with urllib.request.urlopen(urllib.request.Request(uri, method="HEAD"), timeout=10):
            return None
    except Exception as exc:  # noqa: BLE001 - the caller classifies whatever came back
        return exc


def load_rows(source: DatasetSource) -> Any:
    """The split as a datasets.Dataset, limited to `source.limit` rows."""
    import datasets

    builder, files = "", []
    try:
        if source.path is not None:
            path = Path(source.path)
            if not path.exists():
                raise DataError(f"dataset.path {path} does not exist (is the volume mounted?)")
            builder, files = _local_files(path)
            dataset = datasets.load_dataset(builder, data_files=files, split="train")
        elif source.uri is not None:
            dataset = datasets.load_dataset(
                _builder_for(source.uri), data_files=source.uri, split="train"
            )
        else:
            dataset = datasets.load_dataset(source.name, source.config, split=source.split)
    except (DataError, ConfigError):
        raise
    except Exception as exc:  # datasets raises many types; all mean "cannot read the data"
        where = source.name or source.path or source.uri
        if network_cause(exc) is not None:
            # datasets wraps a hub 5xx or a dropped connection in FileNotFoundError ("not
            # cached"): a transient NetworkError, relaunched after a backoff.
            raise load_failure(
                DataError, f"cannot load dataset {where}: {type(exc).__name__}: {exc}", exc
            ) from None
        if isinstance(exc, FileNotFoundError):
            unreachable = _probe_http(source.uri) if source.uri else None
            if unreachable is not None and network_cause(unreachable) is not None:
                raise load_failure(
                    DataError, f"cannot load dataset {where}: {exc}", unreachable
                ) from None
            raise DataError(f"dataset not found: {exc}") from None
        if source.path is not None and builder == "json":
            # Arrow refuses rows whose types disagree (content 3 vs "3") without saying
            # which row: re-read the file as plain JSON to name it.
            _diagnose_json_files(files, source)
        raise DataError(f"cannot load dataset {where}: {type(exc).__name__}: {exc}") from None
    if isinstance(dataset, datasets.DatasetDict):
        raise DataError(f"dataset {source.name} returned several splits: set dataset.split")
    if source.limit is not None:
        if len(dataset) < source.limit:
            raise DataError(
                f"dataset.limit is {source.limit} but the dataset has only {len(dataset)} rows: "
                f"lower the limit to at most {len(dataset)} or remove it"
            )
        dataset = dataset.select(range(source.limit))
    return dataset


def detect_format(columns: list[str], declared: str, text_field: str = "text") -> str:
    """messages, prompt-completion or text, from the declared format or the columns."""
    needed = {
        "messages": ["messages"],
        "prompt-completion": ["prompt", "completion"],
        "text": [text_field],
    }
    if declared != "auto":
        missing = [c for c in needed[declared] if c not in columns]
        if missing:
            raise DataError(
                f"dataset.format is {declared} but the data has no column "
                f"{', '.join(missing)} (columns: {', '.join(columns)})"
            )
        return declared
    for name in ("messages", "prompt-completion", "text"):
        if all(c in columns for c in needed[name]):
            return name
    raise DataError(
        f"cannot tell the dataset format from its columns ({', '.join(columns)}): expected "
        f"messages, prompt + completion, or {text_field}; set dataset.format and the columns"
    )


def _message_problems(value: Any, column: str) -> list[str]:
    if not isinstance(value, list):
        return [f"{column} must be a list of messages, got {type(value).__name__}"]
    if not value:
        return [f"{column} is an empty list"]
    problems = []
    for i, message in enumerate(value):
        where = f"{column}[{i}]"
        if not isinstance(message, dict):
            problems.append(f"{where} must be an object with role and content")
            continue
        role = message.get("role")
        if role not in ROLES:
            problems.append(f"{where}.role is {role!r}; must be one of {', '.join(ROLES)}")
        content = message.get("content")
        if content is None and role == "assistant" and message.get("tool_calls"):
            continue
        if not isinstance(content, str):
            problems.append(f"{where}.content must be a string, got {type(content).__name__}")
        elif not content.strip():
            problems.append(f"{where}.content is empty")
    return problems


def _text_problems(value: Any, column: str) -> list[str]:
    if not isinstance(value, str):
        return [f"{column} must be a string, got {type(value).__name__}"]
    if not value.strip():
        return [f"{column} is empty"]
    return []


def row_problems(row: dict[str, Any], fmt: str, text_field: str = "text") -> list[str]:
    if fmt == "messages":
        if row.get("messages") is None:
            return ["messages is missing"]
        problems = _message_problems(row["messages"], "messages")
        roles = (
            [m.get("role") for m in row["messages"] if isinstance(m, dict)] if not problems else []
        )
        if roles and "assistant" not in roles:
            problems.append("messages has no assistant message to learn from")
        return problems
    if fmt == "prompt-completion":
        problems = []
        for column in ("prompt", "completion"):
            value = row.get(column)
            if value is None:
                problems.append(f"{column} is missing")
            elif isinstance(value, list):
                problems += _message_problems(value, column)
            else:
                problems += _text_problems(value, column)
        kinds = {type(row.get("prompt")), type(row.get("completion"))}
        if not problems and len(kinds) > 1:
            problems.append("prompt and completion must both be text or both be message lists")
        return problems
    value = row.get(text_field)
    return [f"{text_field} is missing"] if value is None else _text_problems(value, text_field)


def validate_rows(dataset: Any, fmt: str, text_field: str = "text") -> None:
    """Check every row; the error names the first few bad rows (1-based) and what is wrong."""
    bad: list[str] = []
    count = 0
    for index, row in enumerate(dataset):
        problems = row_problems(row, fmt, text_field)
        if problems:
            count += 1
            if len(bad) < MAX_PROBLEMS_SHOWN:
                bad.append(f"row {index + 1}: {'; '.join(problems[:3])}")
    if count:
        more = f" (and {count - len(bad)} more bad rows)" if count > len(bad) else ""
        raise DataError(
            f"{count} of {len(dataset)} rows are malformed ({fmt} format): "
            + " | ".join(bad)
            + more
        )


def _diagnose_json_files(files: list[str], source: DatasetSource) -> None:
    """Raise a DataError naming the first bad row of JSON/JSON Lines files, if one is found."""
    import json

    rows: list[Any] = []
    for file in files:
        text = Path(file).read_text()
        if file.endswith(".json") and text.lstrip().startswith("["):
            try:
                rows += json.loads(text)
            except json.JSONDecodeError as exc:
                raise DataError(f"{file} is not valid JSON: {exc}") from None
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise DataError(f"{file} line {number} is not valid JSON: {exc.msg}") from None
    if not rows or not all(isinstance(r, dict) for r in rows):
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), 0)
        raise DataError(f"row {bad + 1} is not a JSON object")
    fmt = detect_format(list(rows[0]), source.format, source.textField)
    validate_rows(rows, fmt, source.textField)


def is_conversational(dataset: Any, fmt: str) -> bool:
    if fmt == "messages":
        return True
    return (
        fmt == "prompt-completion" and len(dataset) > 0 and isinstance(dataset[0]["prompt"], list)
    )


def prepare_dataset(source: DatasetSource) -> tuple[Any, str]:
    """Load, detect the format and validate every row: (dataset, format)."""
    dataset = load_rows(source)
    if len(dataset) == 0:
        raise DataError("the dataset has no rows")
    fmt = detect_format(list(dataset.column_names), source.format, source.textField)
    validate_rows(dataset, fmt, source.textField)
    return dataset, fmt
