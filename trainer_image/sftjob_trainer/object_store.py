"""Datasets from and models to S3-compatible object storage (dataset.uri, output.uri).

The client is Arrow's S3 filesystem (pyarrow, already in the image through datasets; the
AWS C++ SDK underneath). s3fs cannot be installed next to the trainer: its aiobotocore and
botocore pin python-dateutil<3, while the kubernetes client the trainer reports progress
with needs >=3. The endpoint and region come from spec.objectStorage, the key pair from the
pod env (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, which the operator maps from the Secret
of spec.secrets.s3); without a key pair the SDK's own chain applies (e.g. a pod role).

Reading: `fetch_dataset` copies the object (or every object under a prefix ending in "/")
to a local folder before datasets reads it, so every data error names a file and a row as
for dataset.path.

Writing: `upload_output` is marker-last. It first removes the prefix's completion marker
(`_SUCCESS`), uploads every file of the final model, then writes `_SUCCESS`: a manifest of
each file's size and sha256. A prefix without the marker is not a model, whatever files it
holds; `download_output` trusts only the manifest and checks every file against it. Each
request is retried on a network failure (bounded, with doubling backoff); when the tries
run out the run ends with NetworkError, which the operator relaunches, and the marker is
never written over a half-uploaded model.

Failure classes: refused credentials are a ConfigError naming spec.secrets.s3; a missing
bucket or key is a DataError naming dataset.uri (a ConfigError naming output.uri for the
output); an endpoint that cannot be reached, or answers 5xx, is a NetworkError.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import socket
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from sftjob_operator.api import DatasetSource, SFTJobSpec
from sftjob_operator.object_storage import ENV_ACCESS_KEY_ID, ENV_SECRET_ACCESS_KEY

from .failures import ConfigError, DataError, NetworkError, TrainerFailure

log = logging.getLogger("sftjob_trainer.object_store")

MARKER = "_SUCCESS"
MANIFEST_FORMAT = "sftjob.dev/output-manifest/v1"
# Tries per request and the first pause between them (1, 2, 4, 8 s: 15 s in all), enough
# for a load balancer to move a connection or a server to restart; longer outages end the
# attempt as NetworkError and the operator relaunches after its own backoff.
ATTEMPTS = 5
FIRST_BACKOFF_SECONDS = 1.0
DEFAULT_REGION = "us-east-1"
CHUNK_BYTES = 8 << 20

# Arrow reports an S3 failure as OSError text "AWS Error <CODE> during <Op> operation: ...",
# the CODE being the SDK's S3Errors name, or "UNKNOWN (HTTP status N)"; it has no typed
# errors, so the code is read from the text.
_AWS_ERROR = re.compile(r"AWS Error (\w+)(?: \(HTTP status (\d+)\))?")
_CREDENTIAL_CODES = {
    "ACCESS_DENIED",
    "INVALID_ACCESS_KEY_ID",
    "SIGNATURE_DOES_NOT_MATCH",
    "UNRECOGNIZED_CLIENT",
    "MISSING_AUTHENTICATION_TOKEN",
    "INVALID_CLIENT_TOKEN_ID",
    "EXPIRED_TOKEN",
    "INVALID_SIGNATURE",
}
_MISSING_CODES = {"NO_SUCH_BUCKET", "NO_SUCH_KEY", "RESOURCE_NOT_FOUND", "NO_SUCH_UPLOAD"}
_NETWORK_CODES = {
    "NETWORK_CONNECTION",
    "SERVICE_UNAVAILABLE",
    "SLOW_DOWN",
    "THROTTLING",
    "INTERNAL_FAILURE",
    "REQUEST_TIMEOUT",
}
_RETRYABLE_STATUS = {408, 429, 500, 502, 503, 504}

T = TypeVar("T")


def is_s3(uri: str | None) -> bool:
    return uri is not None and uri.startswith("s3://")


@dataclass(frozen=True)
class S3Uri:
    bucket: str
    key: str  # "" for the bucket itself; a key ending in "/" is a prefix

    @classmethod
    def parse(cls, uri: str) -> S3Uri:
        bucket, _, key = uri.removeprefix("s3://").partition("/")
        return cls(bucket, key)

    @property
    def path(self) -> str:
        """Arrow's name for it: bucket/key."""
        return f"{self.bucket}/{self.key}".rstrip("/")

    def child(self, relative: str) -> str:
        return f"{self.path}/{relative}"

    def __str__(self) -> str:
        return f"s3://{self.bucket}/{self.key}"


def failure_kind(exc: BaseException) -> str | None:
    """'credentials', 'missing' or 'network' for an S3 failure, else None."""
    if isinstance(exc, FileNotFoundError):
        return "missing"
    if not isinstance(exc, OSError):
        return None
    match = _AWS_ERROR.search(str(exc))
    if match is None:
        return None
    code, status = match.group(1), int(match.group(2) or 0)
    if code in _CREDENTIAL_CODES or status in (401, 403):
        return "credentials"
    if code in _MISSING_CODES or status == 404:
        return "missing"
    if code in _NETWORK_CODES or status in _RETRYABLE_STATUS or "curlCode" in str(exc):
        return "network"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def s3_failure(exc: BaseException, spec: SFTJobSpec, field: str, uri: str) -> TrainerFailure | None:
    """The trainer's failure class for an S3 error while using `field` (spec path) = `uri`."""
    kind = failure_kind(exc)
    detail = _first_line(exc)
    if kind == "credentials":
        ref = spec.secrets.s3
        where = (
            f"spec.secrets.s3 (Secret {ref.name}, keys {ref.accessKeyIdKey} and "
            f"{ref.secretAccessKeyKey})"
            if ref
            else "spec.secrets.s3 (not set: the pod's own AWS credentials were used)"
        )
        return ConfigError(
            f"{field} {uri}: the object store refused the credentials of {where}: {detail}. "
            "Check the key pair, its permissions on the bucket, and spec.objectStorage.endpointUrl"
        )
    if kind == "missing":
        message = f"{field} {uri} does not exist: {detail}"
        return DataError(message) if field.startswith("spec.dataset") else ConfigError(message)
    if kind == "network":
        return NetworkError(
            f"{field} {uri}: the object store could not be reached ({detail}); transient, "
            "relaunched after a backoff"
        )
    return None


@dataclass(frozen=True)
class Retries:
    """How often a request is tried after network failures, and the first pause."""

    attempts: int = ATTEMPTS
    first_backoff: float = FIRST_BACKOFF_SECONDS


def with_retries(action: Callable[[], T], what: str, retries: Retries = Retries()) -> T:
    """`action()`, tried again after a network failure, at most `retries.attempts` times."""
    for attempt in range(1, retries.attempts + 1):
        try:
            return action()
        except OSError as exc:
            if failure_kind(exc) != "network" or attempt == retries.attempts:
                raise
            pause = retries.first_backoff * 2 ** (attempt - 1)
            log.warning(
                "%s failed on the network (%s); try %d of %d in %.1fs",
                what,
                _first_line(exc),
                attempt + 1,
                retries.attempts,
                pause,
            )
            time.sleep(pause)
    raise AssertionError("unreachable: the last try returns or raises")


def open_store(spec: SFTJobSpec, env: dict[str, str] | None = None) -> Any:
    """An Arrow S3 filesystem for the spec's endpoint and the pod's key pair."""
    from pyarrow import fs

    env = dict(os.environ if env is None else env)
    storage = spec.objectStorage
    options: dict[str, Any] = {
        "region": (storage.region if storage else None) or DEFAULT_REGION,
        "connect_timeout": 10,
        "request_timeout": 60,
        # One SDK try per call: with_retries owns the retrying (and says so in the log).
        "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=1),
    }
    if storage and storage.endpointUrl:
        endpoint = urlsplit(storage.endpointUrl)
        options["endpoint_override"] = endpoint.netloc
        options["scheme"] = endpoint.scheme
    access, secret = env.get(ENV_ACCESS_KEY_ID), env.get(ENV_SECRET_ACCESS_KEY)
    if access and secret:
        options["access_key"] = access
        options["secret_key"] = secret
    return fs.S3FileSystem(**options)


def _classified(exc: OSError, spec: SFTJobSpec, field: str, uri: str) -> BaseException:
    failure = s3_failure(exc, spec, field, uri)
    return exc if failure is None else failure


def _download(store: Any, source: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    with store.open_input_stream(source) as stream, partial.open("wb") as out:
        while chunk := stream.read(CHUNK_BYTES):
            out.write(chunk)
    partial.replace(target)


def _objects_under(store: Any, uri: S3Uri) -> list[Any]:
    """FileInfos of the object `uri` names, or of every object under it (a prefix)."""
    from pyarrow import fs

    if uri.key and not uri.key.endswith("/"):
        info = store.get_file_info(uri.path)
        if info.type == fs.FileType.File:
            return [info]
        if info.type == fs.FileType.NotFound:
            raise FileNotFoundError(f"no object {uri}")
    selector = fs.FileSelector(uri.path, recursive=True, allow_not_found=True)
    return [info for info in store.get_file_info(selector) if info.type == fs.FileType.File]


def fetch_dataset(
    spec: SFTJobSpec, into: Path | None = None, store: Any = None, retries: Retries = Retries()
) -> DatasetSource:
    """dataset.uri s3://... copied to a local folder, as the DatasetSource of that copy."""
    source = spec.dataset
    assert source.uri is not None
    uri = S3Uri.parse(source.uri)
    root = into or Path(tempfile.mkdtemp(prefix="sftjob-dataset-"))
    try:
        store = store or open_store(spec)
        objects = with_retries(lambda: _objects_under(store, uri), f"listing {uri}", retries)
        for info in objects:
            target = root / info.path
            with_retries(
                lambda info=info, target=target: _download(store, info.path, target),
                f"downloading s3://{info.path}",
                retries,
            )
    except OSError as exc:
        raise _classified(exc, spec, "spec.dataset.uri", source.uri) from None
    if not objects:
        raise DataError(f"spec.dataset.uri {uri} holds no objects (is the prefix right?)")
    local = root / uri.path
    log.info("copied %d object(s) of %s to %s", len(objects), uri, local)
    return source.model_copy(update={"uri": None, "path": str(local)})


def _put_file(store: Any, local: Path, target: str) -> None:
    with local.open("rb") as source, store.open_output_stream(target) as out:
        while chunk := source.read(CHUNK_BYTES):
            out.write(chunk)


def _put_bytes(store: Any, data: bytes, target: str) -> None:
    with store.open_output_stream(target) as out:
        out.write(data)


def _delete_if_present(store: Any, target: str) -> None:
    from pyarrow import fs

    if store.get_file_info(target).type != fs.FileType.NotFound:
        store.delete_file(target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as source:
        while chunk := source.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def manifest_of(folder: Path, about: dict[str, Any] | None = None) -> dict[str, Any]:
    """The completion marker's content: every file's size and sha256, relative to `folder`."""
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return {
        "format": MANIFEST_FORMAT,
        **(about or {}),
        "files": {
            p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)}
            for p in files
        },
    }


def check_output(spec: SFTJobSpec, store: Any = None, retries: Retries = Retries()) -> None:
    """Before the model loads: output.uri's bucket exists and takes a write from these
    credentials (a probe object, removed), so hours of training do not end unsaved."""
    uri_text = spec.output.uri
    assert uri_text is not None
    # One probe per process: every rank checks, and one rank's delete must not race another's.
    probe = S3Uri.parse(uri_text).child(f".sftjob-write-check-{socket.gethostname()}-{os.getpid()}")
    try:
        store = store or open_store(spec)
        with_retries(lambda: _put_bytes(store, b"", probe), f"writing {probe}", retries)
        with_retries(lambda: store.delete_file(probe), f"deleting {probe}", retries)
    except OSError as exc:
        raise _classified(exc, spec, "spec.output.uri", uri_text) from None


def upload_output(
    spec: SFTJobSpec,
    folder: Path,
    store: Any = None,
    about: dict[str, Any] | None = None,
    retries: Retries = Retries(),
) -> dict[str, Any]:
    """Upload `folder` (the final model) to output.uri, marker last; returns the manifest.

    `about` (job name, uid, step) is recorded in the manifest.
    """
    uri_text = spec.output.uri
    assert uri_text is not None
    uri = S3Uri.parse(uri_text)
    manifest = manifest_of(folder, about)
    marker = uri.child(MARKER)
    try:
        store = store or open_store(spec)
        # An earlier run's marker must not vouch for files this run is about to replace.
        with_retries(lambda: _delete_if_present(store, marker), f"removing {marker}", retries)
        for relative in manifest["files"]:
            target = uri.child(relative)
            with_retries(
                lambda relative=relative, target=target: _put_file(
                    store, folder / relative, target
                ),
                f"uploading s3://{target}",
                retries,
            )
        body = json.dumps(manifest, indent=2, sort_keys=True).encode()
        with_retries(lambda: _put_bytes(store, body, marker), f"writing {marker}", retries)
    except OSError as exc:
        raise _classified(exc, spec, "spec.output.uri", uri_text) from None
    log.info("uploaded %d file(s) to %s, then %s", len(manifest["files"]), uri, MARKER)
    return manifest


def download_output(uri_text: str, into: Path, store: Any) -> dict[str, Any]:
    """A complete output (its marker present, every file as the manifest says) into `into`.

    Raises DataError when the marker is missing or a file differs: that prefix holds no
    complete model.
    """
    uri = S3Uri.parse(uri_text)
    try:
        with store.open_input_stream(uri.child(MARKER)) as stream:
            manifest: dict[str, Any] = json.loads(stream.read())
    except FileNotFoundError:
        raise DataError(f"{uri} has no {MARKER}: its upload never completed") from None
    for relative, expected in manifest["files"].items():
        target = into / relative
        _download(store, uri.child(relative), target)
        if target.stat().st_size != expected["size"] or _sha256(target) != expected["sha256"]:
            raise DataError(f"{uri.child(relative)} differs from its {MARKER} manifest")
    return manifest
