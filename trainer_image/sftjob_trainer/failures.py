"""Failure classification: one reason and exit code per kind of failure.

The operator decides what to do from the pod's exit code and termination message
(its policy per class: sftjob_operator.retry_policy.RETRY_POLICY): an out-of-memory
run is relaunched with a smaller micro-batch, a preempted one resumes from its
checkpoint, a model or dataset download that failed on the network (hub 5xx, a
connection reset, a timeout) is relaunched after a backoff, and data/config/model
errors fail the job at once (retrying cannot fix them). So every exit goes through
`classify`, which looks through the whole exception chain for the cause, and the
message is short enough for the kubelet, which keeps at most 4096 bytes of it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ENV_TERMINATION_LOG = "SFTJOB_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
MAX_MESSAGE_BYTES = 3000

EXIT_OK = 0
EXIT_INTERNAL = 1
EXIT_OOM = 10
EXIT_DATA = 11
EXIT_CONFIG = 12
EXIT_MODEL_LOAD = 13
EXIT_INTERRUPTED = 14
EXIT_NETWORK = 15
EXIT_STORAGE_FULL = 16

EXIT_CODES = {
    "Completed": EXIT_OK,
    "InternalError": EXIT_INTERNAL,
    "OutOfMemory": EXIT_OOM,
    "DataError": EXIT_DATA,
    "ConfigError": EXIT_CONFIG,
    "ModelLoadError": EXIT_MODEL_LOAD,
    "Interrupted": EXIT_INTERRUPTED,
    "NetworkError": EXIT_NETWORK,
    "StorageFull": EXIT_STORAGE_FULL,
}
REASONS_BY_CODE = {code: reason for reason, code in EXIT_CODES.items()}


class TrainerFailure(Exception):
    """A failure whose class we know; `reason` is the CamelCase word the operator reads."""

    reason = "InternalError"


class DataError(TrainerFailure):
    reason = "DataError"


class ConfigError(TrainerFailure):
    reason = "ConfigError"


class ModelLoadError(TrainerFailure):
    reason = "ModelLoadError"


class Interrupted(TrainerFailure):
    reason = "Interrupted"


class NetworkError(TrainerFailure):
    """Loading the model, tokenizer or dataset failed on the network: retried after a backoff."""

    reason = "NetworkError"


# HTTP answers worth another try: huggingface_hub's own retry set
# (huggingface_hub/utils/_http.py _DEFAULT_RETRY_ON_STATUS_CODES). Any other 4xx (404 no
# such repo or file, 401/403 gated or no token) is an answer, not an outage.
RETRYABLE_HTTP_STATUS = (408, 429, 500, 502, 503, 504)


def exception_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and every exception behind it (__cause__, else __context__), outermost first."""
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and all(current is not seen for seen in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain


def _http_status(exc: BaseException) -> int | None:
    # httpx2.HTTPStatusError / HfHubHTTPError / requests.HTTPError carry .response.status_code;
    # aiohttp.ClientResponseError (fsspec's http filesystem) carries .status, urllib's
    # HTTPError .code.
    import urllib.error

    status = getattr(getattr(exc, "response", None), "status_code", None)
    if status is None and type(exc).__name__ == "ClientResponseError":
        status = getattr(exc, "status", None)
    if status is None and isinstance(exc, urllib.error.HTTPError):
        status = exc.code
    return status if isinstance(status, int) else None


def _transport_error_types() -> tuple[type[BaseException], ...]:
    """Errors of the connection itself, from each HTTP stack the loaders use.

    httpx2 (huggingface_hub, so transformers and datasets): the classes huggingface_hub
    itself retries (_DEFAULT_RETRY_ON_EXCEPTIONS: TimeoutException, NetworkError,
    RemoteProtocolError). requests: ConnectionError and Timeout. aiohttp (fsspec http for
    dataset.uri): ClientConnectionError (resets, refused, server disconnected),
    ClientPayloadError (a body cut short) and its timeouts. Built-in ConnectionError and
    TimeoutError (socket level) last.
    """
    import importlib

    types: list[type[BaseException]] = [ConnectionError, TimeoutError]
    # huggingface_hub 2.x uses httpx2, 1.x httpx: the same classes under either name.
    for name in ("httpx2", "httpx"):
        try:
            httpx = importlib.import_module(name)
        except ImportError:
            continue
        types += [httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError]
    try:
        import requests

        types += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    try:
        import aiohttp

        types += [aiohttp.ClientConnectionError, aiohttp.ClientPayloadError]
    except ImportError:
        pass
    return tuple(types)


def _offline_mode_error(exc: BaseException) -> bool:
    # huggingface_hub's OfflineModeIsEnabled is a ConnectionError, but HF_HUB_OFFLINE=1 is a
    # setting: retrying changes nothing.
    return type(exc).__name__ == "OfflineModeIsEnabled"


def network_cause(exc: BaseException) -> BaseException | None:
    """The transient network failure behind `exc`, or None.

    None as soon as the chain holds a definite HTTP answer (a 404, a 401): the hub said
    no, however the connection behaved before.
    """
    chain = exception_chain(exc)
    if any(_offline_mode_error(link) for link in chain):
        return None
    statuses = [status for link in chain if (status := _http_status(link)) is not None]
    if any(400 <= status < 500 and status not in RETRYABLE_HTTP_STATUS for status in statuses):
        return None
    for link in chain:
        if (_http_status(link) or 0) in RETRYABLE_HTTP_STATUS:
            return link
    transport = _transport_error_types()
    return next((link for link in chain if isinstance(link, transport)), None)


def load_failure(kind: type[TrainerFailure], message: str, exc: BaseException) -> TrainerFailure:
    """`kind` (ModelLoadError, DataError) for `exc`, or NetworkError when the network failed."""
    cause = network_cause(exc)
    if cause is not None:
        return NetworkError(
            f"{message} (network: {type(cause).__name__}: {first_line(cause)}; transient, "
            "relaunched after a backoff)"
        )
    return kind(message)


def refused_settings(exc: BaseException, where: str) -> ConfigError | None:
    """A ConfigError for a ValueError/TypeError raised while setting the run up, else None.

    Before the first step, SFTTrainer and Trainer validate the settings against the model
    and data (`assistant_only_loss` on text data, `padding_free` without packing, an
    `eval_strategy` without eval data): a ValueError or TypeError there is the same on
    every attempt, so relaunching only reloads the model to fail again. OOM and network
    causes keep their own (retried) classes.
    """
    template = _template_error(exc)
    if template is not None:
        # The pre-flight renders one row of each shape; a row of a known shape can still
        # fail (a template that tests the content): the same on every attempt.
        return ConfigError(
            f"{where}: the chat template failed on a row while the data was tokenized: "
            f"{type(template).__name__}: {first_line(template)} (use a tokenizer whose "
            "template renders every row, spec.model.tokenizer, or fix the rows)"
        )
    if not isinstance(exc, (ValueError, TypeError)) or isinstance(exc, TrainerFailure):
        return None
    if network_cause(exc) is not None or any(_is_oom(link) for link in exception_chain(exc)):
        return None
    return ConfigError(
        f"{where} refused the settings before training started: {type(exc).__name__}: {exc} "
        "(check spec.training and its extraArgs against the model and the data)"
    )


def _template_error(exc: BaseException) -> BaseException | None:
    try:
        from jinja2 import TemplateError
    except ImportError:
        return None
    return next((link for link in exception_chain(exc) if isinstance(link, TemplateError)), None)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


@dataclass(frozen=True)
class Outcome:
    reason: str
    message: str
    step: int | None = None

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.reason, EXIT_INTERNAL)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Outcome:
        data = json.loads(text)
        return cls(
            reason=str(data["reason"]), message=str(data.get("message", "")), step=data.get("step")
        )


def _is_oom(exc: BaseException) -> bool:
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except ImportError:  # the launcher parent may run before torch is importable
        pass
    text = str(exc)
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text.lower() or isinstance(exc, MemoryError)
    )


def _shorten(text: str, limit: int = MAX_MESSAGE_BYTES) -> str:
    data = text.encode()
    if len(data) <= limit:
        return text
    # Keep the head (what failed) and the tail (the innermost cause) of long messages.
    half = limit // 2 - 10
    return data[:half].decode(errors="ignore") + "\n...\n" + data[-half:].decode(errors="ignore")


def classify(
    exc: BaseException,
    step: int | None = None,
    output_path: str | None = None,
    usage: DiskUsage = shutil.disk_usage,
) -> Outcome:
    """The outcome for an exception raised anywhere in the worker.

    The cause may sit deeper than the exception that arrives here (a library wraps our
    ConfigError, an OOM, or a connection reset in its own error): the whole chain is
    searched, a classified TrainerFailure first, then OOM, then a full output volume
    (`output_path`, whose free space `usage` reads), then a network failure.
    """
    chain = exception_chain(exc)
    known = next((link for link in chain if isinstance(link, TrainerFailure)), None)
    if known is not None:
        return Outcome(known.reason, _shorten(str(known)), step)
    oom = next((link for link in chain if _is_oom(link)), None)
    if oom is not None:
        return Outcome(
            "OutOfMemory",
            _shorten(f"out of memory: {first_line(oom) or type(oom).__name__}"),
            step,
        )
    if isinstance(exc, KeyboardInterrupt):
        return Outcome("Interrupted", "interrupted", step)
    full = storage_full(exc, output_path, usage)
    if full is not None:
        return Outcome("StorageFull", _shorten(full), step)
    cause = network_cause(exc)
    if cause is not None:
        return Outcome(
            "NetworkError",
            _shorten(f"{type(exc).__name__}: {exc} (network: {type(cause).__name__})"),
            step,
        )
    frames = traceback.extract_tb(exc.__traceback__)
    where = f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    return Outcome("InternalError", _shorten(f"{type(exc).__name__}: {exc}{where}"), step)


# A write refused for want of space: the errno (ENOSPC, EDQUOT a quota), or its text where
# a library re-raised it without one (safetensors' Rust I/O error says "StorageFull").
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
NO_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded", "StorageFull")
# torch.save's writer says neither: a short write reaches Python as these (measured with
# /dev/full, and on the GPU machine when its disk filled with a checkpoint half written).
SHORT_WRITE_TEXTS = ("unexpected pos", "basic_ios::clear", "PytorchStreamWriter failed writing")
# Free space under which a short write is taken for a full volume.
NEARLY_FULL_BYTES = 1 << 30

DiskUsage = Callable[[str], Any]


def _says_no_space(link: BaseException) -> bool:
    if isinstance(link, OSError) and link.errno in NO_SPACE_ERRNOS:
        return True
    return any(text in str(link) for text in NO_SPACE_TEXTS)


def storage_full(
    exc: BaseException, output_path: str | None, usage: DiskUsage = shutil.disk_usage
) -> str | None:
    """Why `exc` is a full output volume, or None.

    Relaunching cannot help: the checkpoint that filled it is what the next attempt writes
    again. A short write without an errno (torch.save) counts only where the output volume
    is nearly full now; elsewhere it may be a flaky network volume, worth a relaunch.
    """
    chain = exception_chain(exc)
    said = next((link for link in chain if _says_no_space(link)), None)
    short = next(
        (link for link in chain if any(text in str(link) for text in SHORT_WRITE_TEXTS)), None
    )
    if said is None and short is None:
        return None
    free = None
    if output_path:
        try:
            total, _, free = usage(output_path)
        except OSError:
            free = None
    if said is None and (free is None or free >= NEARLY_FULL_BYTES):
        return None
    where = (
        f" ({free / 2**30:.2f} GiB free of {total / 2**30:.1f} GiB at {output_path})"
        if free is not None
        else ""
    )
    cause = said or short
    return (
        f"the output volume is full{where}: {type(cause).__name__}: {first_line(cause)}. "
        "Free space on it or give spec.output a larger volume (checkpoints hold the weights "
        "and the optimizer state: about 12 bytes per parameter for a full fine-tune); the "
        "job is not relaunched, it would fail the same way"
    )


def termination_log_path() -> Path:
    return Path(os.environ.get(ENV_TERMINATION_LOG) or DEFAULT_TERMINATION_LOG)


def write_outcome(outcome: Outcome, path: Path | None = None) -> bool:
    """Write the termination message; False when the file is not writable (e.g. off-cluster)."""
    target = path or termination_log_path()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(outcome.to_json())
        return True
    except OSError:
        return False


# When several ranks report, the most specific cause wins: a rank that ran out of
# memory makes the launcher stop the others (they then report Interrupted or a
# broken collective as InternalError), and the operator must see OutOfMemory.
# Deterministic errors come before OOM (a smaller batch would meet them again); the
# same order as the operator's across pods (sftjob_operator.retry_policy.RETRY_POLICY).
_PRIORITY = {
    "DataError": 0,
    "ConfigError": 0,
    "ModelLoadError": 0,
    "OutOfMemory": 1,
    "NetworkError": 2,
    "InternalError": 3,
    "Interrupted": 4,
    "Completed": 5,
}


def most_specific(outcomes: list[Outcome]) -> Outcome | None:
    if not outcomes:
        return None
    return min(outcomes, key=lambda o: _PRIORITY.get(o.reason, _PRIORITY["InternalError"]))
