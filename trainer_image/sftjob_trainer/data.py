"""Loading the training data and checking every row before any training step.

A malformed row deep in a dataset otherwise fails hours into a run with a stack
trace from a collator; here it fails in seconds with the file, the row within that
file, the field and the fix. A folder's files are read in name order and concatenated:
`RowLocator` maps a row of the whole dataset back to its file and row.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
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


@dataclass(frozen=True)
class DataFiles:
    """The local files a dataset.path names, in the order they are read."""

    builder: str
    files: tuple[str, ...]
    folder: Path | None = None  # set when dataset.path is a folder: names are shown relative

    def name(self, file: str) -> str:
        return str(Path(file).relative_to(self.folder)) if self.folder else file


def data_files(source: DatasetSource) -> DataFiles | None:
    """The local files of `source`, or None for a hub dataset or a URI."""
    if source.path is None:
        return None
    path = Path(source.path)
    if not path.exists():
        raise DataError(f"dataset.path {path} does not exist (is the volume mounted?)")
    builder, files = _local_files(path)
    return DataFiles(builder, tuple(files), None if path.is_file() else path)


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

    local = None
    try:
        local = data_files(source)
        if local is not None:
            dataset = datasets.load_dataset(
                local.builder, data_files=list(local.files), split="train"
            )
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
        if _decode_error(exc) is not None:
            raise not_utf8_error(exc, local, where) from None
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
        if local is not None and local.builder == "json":
            # Arrow refuses rows whose types disagree (content 3 vs "3") without saying
            # which row: re-read the file as plain JSON to name it.
            _diagnose_json_files(local, source)
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


def row_number(index: int) -> str:
    return f"row {index + 1}"


def validate_rows(
    dataset: Any,
    fmt: str,
    text_field: str = "text",
    where: Callable[[int], str] = row_number,
) -> None:
    """Check every row; the error names the first few bad rows and what is wrong.

    `where` turns a 0-based index into the row's place ("chat.jsonl row 3").
    """
    bad: list[str] = []
    count = 0
    for index, row in enumerate(dataset):
        problems = row_problems(row, fmt, text_field)
        if problems:
            count += 1
            if len(bad) < MAX_PROBLEMS_SHOWN:
                bad.append(f"{where(index)}: {'; '.join(problems[:3])}")
    if count:
        more = f" (and {count - len(bad)} more bad rows)" if count > len(bad) else ""
        raise DataError(
            f"{count} of {len(dataset)} rows are malformed ({fmt} format): "
            + " | ".join(bad)
            + more
        )


def _json_rows(file: str, name: str) -> Iterator[tuple[Any, int | None]]:
    """The rows of a JSON array or JSON Lines file, each with its line (None in an array)."""
    import json

    try:
        text = Path(file).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise not_utf8_error(exc, DataFiles("json", (file,)), name) from None
    if file.endswith(".json") and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DataError(f"{name} is not valid JSON: {exc}") from None
        yield from ((row, None) for row in rows)
        return
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            yield json.loads(line), number
        except json.JSONDecodeError as exc:
            raise DataError(f"{name} line {number} is not valid JSON: {exc.msg}") from None


def _diagnose_json_files(local: DataFiles, source: DatasetSource) -> None:
    """Raise a DataError naming the first bad rows of JSON/JSON Lines files, if any are found."""
    rows: list[Any] = []
    places: list[tuple[str, int, int | None]] = []  # (file name, row in it, line)
    for file in local.files:
        name = local.name(file)
        for number, (row, line) in enumerate(_json_rows(file, name), start=1):
            if not isinstance(row, dict):
                raise DataError(f"{_place(name, number, line)} is not a JSON object")
            rows.append(row)
            places.append((name, number, line))
    if not rows:
        raise DataError("the dataset has no rows")
    fmt = detect_format(list(rows[0]), source.format, source.textField)
    validate_rows(rows, fmt, source.textField, where=lambda index: _place(*places[index]))


def _place(name: str, row: int, line: int | None) -> str:
    return f"{name} row {row}" + (f" (line {line})" if line is not None and line != row else "")


def _open_binary(file: str) -> Any:
    import fsspec

    return fsspec.open(file, "rb", compression="infer").open()


def _json_lines(builder: str, file: str) -> bool:
    """True for a JSON Lines file (one row per line), whatever its suffix."""
    if builder != "json":
        return False
    with _open_binary(file) as handle:
        return not handle.read(4096).lstrip().startswith(b"[")


def _rows_in_file(builder: str, file: str) -> int:
    """Rows `datasets` reads from one file (its JSON Lines reader skips blank lines)."""
    if builder == "parquet":
        import pyarrow.parquet as pq

        return int(pq.read_metadata(file).num_rows)
    if _json_lines(builder, file):
        with _open_binary(file) as handle:
            return sum(1 for line in handle if line.strip())
    import datasets

    return int(datasets.load_dataset(builder, data_files=[file], split="train").num_rows)


def _line_of_row(builder: str, file: str, row: int) -> int | None:
    """The line of the `row`-th (1-based) row of a JSON Lines file; None for other files."""
    if not _json_lines(builder, file):
        return None
    seen = 0
    with _open_binary(file) as handle:
        for number, line in enumerate(handle, start=1):
            seen += 1 if line.strip() else 0
            if seen == row:
                return number
    return None


@dataclass
class RowLocator:
    """Where row `index` (0-based, whole dataset) came from: its file and row in that file.

    Files are counted only when an error needs a place, so a clean dataset costs nothing.
    """

    local: DataFiles | None
    _ends: list[int] = field(default_factory=list)

    def __call__(self, index: int) -> str:
        if self.local is None:
            return row_number(index)
        files = self.local.files
        if len(files) > 1 and not self._ends:
            total = 0
            for file in files:
                total += _rows_in_file(self.local.builder, file)
                self._ends.append(total)
        position = next((i for i, end in enumerate(self._ends) if index < end), 0)
        row = index + 1 - (self._ends[position - 1] if position else 0)
        file = files[position]
        line = _line_of_row(self.local.builder, file, row)
        return _place(self.local.name(file), row, line)


def _decode_error(exc: BaseException) -> UnicodeDecodeError | None:
    from .failures import exception_chain

    return next((e for e in exception_chain(exc) if isinstance(e, UnicodeDecodeError)), None)


def _first_non_utf8_line(file: str) -> tuple[int, int, int] | None:
    """(line, column, byte) of the first byte that is not UTF-8, all 1-based; None if clean."""
    with _open_binary(file) as handle:
        for number, line in enumerate(handle, start=1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as exc:
                return number, exc.start + 1, line[exc.start]
    return None


def not_utf8_error(exc: BaseException, local: DataFiles | None, where: Any) -> DataError:
    """A DataError naming the file and line that is not UTF-8 text."""
    fix = (
        "the data must be UTF-8 text: re-save the file as UTF-8 (for Latin-1 text: "
        "iconv -f latin1 -t utf-8 FILE) or remove that row"
    )
    text_files = local.files if local is not None and local.builder != "parquet" else ()
    for file in text_files:
        found = _first_non_utf8_line(file)
        if found is not None:
            assert local is not None
            line, column, byte = found
            return DataError(
                f"{local.name(file)} line {line} is not UTF-8 text "
                f"(byte 0x{byte:02x} at column {column}): {fix}"
            )
    decode = _decode_error(exc)
    return DataError(f"dataset {where} is not UTF-8 text ({decode}): {fix}")


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
    local = data_files(source)
    try:
        validate_rows(dataset, fmt, source.textField, where=RowLocator(local))
    except UnicodeDecodeError as exc:
        # Arrow's JSON reader stores bytes unchecked; they are decoded when a row is read.
        raise not_utf8_error(exc, local, source.name or source.path or source.uri) from None
    return dataset, fmt
