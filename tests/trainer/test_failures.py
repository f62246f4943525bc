"""Each failure class ends with its reason, exit code and a termination message."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from sftjob_operator.retry_policy import RETRY_POLICY
from sftjob_trainer.failures import (
    MAX_MESSAGE_BYTES,
    ConfigError,
    DataError,
    Outcome,
    classify,
    network_cause,
)
from sftjob_trainer.worker import run_worker


@pytest.fixture
def termination_log(tmp_path, monkeypatch):
    path = tmp_path / "termination-log"
    monkeypatch.setenv("SFTJOB_TERMINATION_LOG", str(path))
    return path


def written(path) -> Outcome:
    return Outcome.from_json(path.read_text())


def test_malformed_rows_are_a_data_error_naming_the_row(tiny, make_config, termination_log):
    outcome = run_worker(
        make_config({"dataset": {"path": str(tiny.data["malformed"]), "limit": None}})
    )
    assert (outcome.reason, outcome.exit_code) == ("DataError", 11)
    assert "row 3: messages[1].role is 'bot'" in outcome.message
    assert written(termination_log) == outcome


def test_unknown_extra_arg_is_a_config_error_with_suggestion(make_config, termination_log):
    outcome = run_worker(make_config({"training": {"extraArgs": {"packing_stratgy": "bfd"}}}))
    assert (outcome.reason, outcome.exit_code) == ("ConfigError", 12)
    assert "did you mean packing_strategy" in outcome.message
    assert written(termination_log).reason == "ConfigError"


def test_missing_model_path_is_a_model_load_error(tmp_path, make_config, termination_log):
    outcome = run_worker(make_config({"model": {"path": str(tmp_path / "no-model")}}))
    assert (outcome.reason, outcome.exit_code) == ("ModelLoadError", 13)
    assert "does not exist" in outcome.message


def test_broken_model_folder_is_a_model_load_error(tmp_path, make_config):
    broken = tmp_path / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    outcome = run_worker(make_config({"model": {"path": str(broken)}}))
    assert (outcome.reason, outcome.exit_code) == ("ModelLoadError", 13)


def test_oom_test_hook_is_out_of_memory_at_first_step(make_config, monkeypatch, termination_log):
    monkeypatch.setenv("SFTJOB_TEST_OOM_ABOVE_BATCH", "2")
    outcome = run_worker(make_config({"training": {"perDeviceTrainBatchSize": 4}}))
    assert (outcome.reason, outcome.exit_code, outcome.step) == ("OutOfMemory", 10, 0)
    # The micro-batch the operator shrinks to (4 -> 2) fits under the same hook.
    assert (
        run_worker(make_config({"training": {"perDeviceTrainBatchSize": 2}})).reason == "Completed"
    )


def test_classify_messages():
    assert (
        classify(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB")).exit_code
        == 10
    )
    assert classify(RuntimeError("CUDA error: out of memory")).reason == "OutOfMemory"
    internal = classify(KeyError("boom"))
    assert internal.reason == "InternalError" and internal.exit_code == 1
    assert internal.message.startswith("KeyError")
    long = classify(DataError("x" * 10_000))
    assert len(long.to_json().encode()) < 4096
    assert len(long.message.encode()) <= MAX_MESSAGE_BYTES


def test_launcher_propagates_the_worker_reason(make_config, tmp_path):
    # The pod's process is the launcher: its exit code and termination log must carry the
    # worker's reason, not a generic launcher failure.
    log = tmp_path / "pod-termination-log"
    env = {
        **os.environ,
        "SFTJOB_TERMINATION_LOG": str(log),
        "SFTJOB_TEST_OOM_ABOVE_BATCH": "1",
    }
    result = subprocess.run(
        [sys.executable, "-m", "sftjob_trainer", "--config", str(make_config())],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 10, result.stderr[-2000:]
    message = json.loads(log.read_text())
    assert message["reason"] == "OutOfMemory" and message["step"] == 0


def test_unreadable_config_is_a_config_error(tmp_path):
    log = tmp_path / "log"
    result = subprocess.run(
        [sys.executable, "-m", "sftjob_trainer", "--config", str(tmp_path / "missing.json")],
        env={**os.environ, "SFTJOB_TERMINATION_LOG": str(log)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 12
    assert json.loads(log.read_text())["reason"] == "ConfigError"


def test_unwritable_termination_log_is_skipped(make_config, monkeypatch):
    monkeypatch.setenv("SFTJOB_TERMINATION_LOG", "/proc/no/such/termination-log")
    outcome = run_worker(make_config({"training": {"extraArgs": {"nope": 1}}}))
    assert outcome.reason == "ConfigError"


# ---------------------------------------------------------------- config errors: never retried
# Each runs the real path (SFTConfig, the checks before the model loads); the model loader
# is replaced by one that fails the test, to show the error comes before any download.


@pytest.fixture
def model_must_not_load(monkeypatch):
    from sftjob_trainer import preflight, train

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the model was loaded before the config error was found")

    monkeypatch.setattr(train, "load_model", refuse)
    monkeypatch.setattr(preflight, "load_tokenizer", refuse)


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        # The CRD allows any integer; numpy (transformers.set_seed) refuses negatives.
        ({"training": {"seed": -1}}, "spec.training.seed is -1: Seed must be between 0"),
        ({"training": {"extraArgs": {"data_seed": 2**40}}}, "extraArgs.data_seed"),
        # wandb is not installed in this environment (nor in the trainer image).
        ({"training": {"extraArgs": {"report_to": "wandb"}}}, "requires wandb to be installed"),
        ({"training": {"extraArgs": {"report_to": "nonsense"}}}, "nonsense is not supported"),
        (
            {"training": {"extraArgs": {"lr_scheduler_kwargs": "x"}}},
            "extraArgs.lr_scheduler_kwargs='x'",
        ),
        (
            {"training": {"lrSchedulerType": "cosine_with_min_lr"}},
            "cosine_with_min_lr refuses",
        ),
        (
            {"training": {"extraArgs": {"model_init_kwargs": {"torch_dtype": "bogus"}}}},
            "extraArgs.model_init_kwargs: the trainer loads the model itself",
        ),
    ],
)
def test_config_errors_fail_before_the_model_loads(
    spec, says, make_config, termination_log, model_must_not_load
):
    outcome = run_worker(make_config(spec))
    assert (outcome.reason, outcome.exit_code) == ("ConfigError", 12), outcome.message
    assert says in outcome.message
    assert written(termination_log) == outcome


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        # Refused by SFTTrainer.__init__ (after the model loaded): same on every attempt.
        ({"training": {"extraArgs": {"padding_free": True}}}, "padding_free=True"),
        ({"training": {"extraArgs": {"eval_strategy": "steps"}}}, "eval_dataset"),
        # Refused inside Trainer.train() while building the data loader, before step 1.
        (
            {"training": {"extraArgs": {"dataset_kwargs": {"skip_prepare_dataset": True}}}},
            "No columns in the dataset match",
        ),
    ],
)
def test_settings_the_trainer_refuses_before_step_one_are_config_errors(
    spec, says, make_config, termination_log
):
    outcome = run_worker(make_config(spec))
    assert (outcome.reason, outcome.exit_code) == ("ConfigError", 12), outcome.message
    assert says in outcome.message and "before training started" in outcome.message
    assert outcome.step in (None, 0)


def test_assistant_only_loss_on_text_data_is_a_config_error(tiny, make_config):
    outcome = run_worker(
        make_config(
            {
                "dataset": {"path": str(tiny.data["text"])},
                "training": {"extraArgs": {"assistant_only_loss": True}},
            }
        )
    )
    assert (outcome.reason, outcome.exit_code) == ("ConfigError", 12), outcome.message
    assert "not conversational" in outcome.message


def test_a_wrapped_config_error_keeps_its_class():
    # A library that wraps our error (a callback, accelerate) must not turn it into
    # InternalError: the chain is searched for the cause.
    try:
        try:
            raise ConfigError("spec.training.seed is -1")
        except ConfigError as inner:
            raise RuntimeError("callback failed") from inner
    except RuntimeError as outer:
        outcome = classify(outer)
    assert (outcome.reason, outcome.message) == ("ConfigError", "spec.training.seed is -1")


def test_a_wrapped_oom_is_out_of_memory():
    try:
        try:
            raise torch.OutOfMemoryError("CUDA out of memory")
        except torch.OutOfMemoryError:
            raise RuntimeError("step failed")  # noqa: B904 - implicit context, as libraries do
    except RuntimeError as outer:
        assert classify(outer).reason == "OutOfMemory"


# ---------------------------------------------------------------- network: transient


class FlakyHub(http.server.BaseHTTPRequestHandler):
    """A stand-in for the hub that answers every request with `mode`."""

    mode = "503"
    requests = 0

    def log_message(self, *args: Any) -> None:
        pass

    def answer(self) -> None:
        type(self).requests += 1
        if self.mode == "drop":  # connection closed without a response
            self.connection.shutdown(socket.SHUT_RDWR)
            self.connection.close()
            return
        status = 503 if self.mode == "503" else 404
        body = b'{"error": "Repository not found"}' if status == 404 else b""
        self.send_response(status)
        if status == 503:
            # The hub client retries a 503 itself (5 tries); Retry-After keeps its waits at 1 s.
            self.send_header("Retry-After", "0")
        else:
            self.send_header("X-Error-Code", "RepoNotFound")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_HEAD = answer


@pytest.fixture
def flaky_hub() -> Iterator[Any]:
    def start(mode: str) -> str:
        handler = type("Hub", (FlakyHub,), {"mode": mode, "requests": 0})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append((server, handler))
        return f"http://127.0.0.1:{server.server_address[1]}"

    servers: list[Any] = []
    yield start
    for server, _ in servers:
        server.shutdown()
        server.server_close()
    assert all(handler.requests > 0 for _, handler in servers)  # the hub was really asked


def run_pod_against_hub(config, endpoint: str, tmp_path) -> tuple[int, dict[str, Any]]:
    """The pod's process (launcher + worker) with the hub at `endpoint`; its exit and report."""
    log = tmp_path / "pod-termination-log"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    env.update(
        SFTJOB_TERMINATION_LOG=str(log),
        HF_ENDPOINT=endpoint,  # read by huggingface_hub at import: hence a fresh process
        HF_HOME=str(tmp_path / "hf-home"),  # an empty cache: everything must be downloaded
        HF_HUB_ETAG_TIMEOUT="5",
        HF_HUB_DOWNLOAD_TIMEOUT="5",
    )
    result = subprocess.run(
        [sys.executable, "-m", "sftjob_trainer", "--config", str(config)],
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert log.is_file(), result.stderr[-3000:]
    return result.returncode, json.loads(log.read_text())


def test_hub_503_on_model_download_is_a_transient_network_error(make_config, flaky_hub, tmp_path):
    config = make_config({"model": {"path": None, "name": "someone/some-model"}})
    code, report = run_pod_against_hub(config, flaky_hub("503"), tmp_path)
    assert (code, report["reason"]) == (15, "NetworkError"), report
    assert "503" in report["message"] and "someone/some-model" in report["message"]


def test_dropped_connection_on_dataset_download_is_a_transient_network_error(
    make_config, flaky_hub, tmp_path
):
    config = make_config({"dataset": {"path": None, "name": "someone/some-data"}})
    code, report = run_pod_against_hub(config, flaky_hub("drop"), tmp_path)
    assert (code, report["reason"]) == (15, "NetworkError"), report
    assert "RemoteProtocolError" in report["message"]


def test_model_missing_on_the_hub_is_a_model_load_error_not_transient(
    make_config, flaky_hub, tmp_path
):
    config = make_config({"model": {"path": None, "name": "someone/no-such-model"}})
    code, report = run_pod_against_hub(config, flaky_hub("404"), tmp_path)
    assert (code, report["reason"]) == (13, "ModelLoadError"), report


def test_network_cause_reads_the_chain():
    import httpx2
    from huggingface_hub.errors import OfflineModeIsEnabled

    request = httpx2.Request("GET", "https://huggingface.co/x/resolve/main/config.json")

    def chained(inner: BaseException, outer: BaseException) -> BaseException:
        outer.__cause__ = inner
        return outer

    timeout = httpx2.ReadTimeout("The read operation timed out", request=request)
    assert network_cause(chained(timeout, OSError("We couldn't connect"))) is timeout
    reset = ConnectionResetError(104, "Connection reset by peer")
    assert network_cause(chained(reset, OSError("cannot load"))) is reset
    not_found = httpx2.HTTPStatusError(
        "404", request=request, response=httpx2.Response(404, request=request)
    )
    assert network_cause(chained(not_found, OSError("not a valid model identifier"))) is None
    assert network_cause(OfflineModeIsEnabled("HF_HUB_OFFLINE=1")) is None
    assert network_cause(ValueError("bad value")) is None


@pytest.mark.parametrize(("mode", "reason"), [("503", "NetworkError"), ("404", "DataError")])
def test_dataset_uri_outage_is_transient_but_a_missing_file_is_a_data_error(
    mode, reason, make_config, flaky_hub, termination_log
):
    # datasets reports any unreachable data_files URL as "Unable to find", cause dropped.
    uri = flaky_hub(mode) + "/data/chat.jsonl"
    outcome = run_worker(make_config({"dataset": {"path": None, "uri": uri}}))
    assert outcome.reason == reason, outcome.message
    assert written(termination_log).reason == reason


def _full_device_error(write: Any) -> BaseException:
    """The exception a real write to /dev/full raises (every write there fails: ENOSPC)."""
    import stat

    assert stat.S_ISCHR(os.stat("/dev/full").st_mode), "/dev/full is the kernel's full device"
    with pytest.raises(BaseException) as caught:
        write("/dev/full")
    return caught.value


def _usage(free_gib: float) -> Any:
    return lambda path: (100 * 2**30, int((100 - free_gib) * 2**30), int(free_gib * 2**30))


def test_a_checkpoint_that_fills_the_volume_is_storage_full_and_not_retried(tmp_path):
    # torch.save (the optimizer state in every checkpoint) reports a full disk without an
    # errno: a short write, as on the GPU machine whose disk filled (session 15).
    error = _full_device_error(lambda path: torch.save({"state": torch.zeros(100_000)}, path))
    assert getattr(error, "errno", None) is None
    full = classify(error, step=90, output_path=str(tmp_path), usage=_usage(0.01))
    assert (full.reason, full.step, full.exit_code) == ("StorageFull", 90, 16)
    assert "the output volume is full (0.01 GiB free of 100.0 GiB at" in full.message
    assert "spec.output a larger volume" in full.message and "not relaunched" in full.message
    assert RETRY_POLICY["StorageFull"].retry is False
    # The same short write on a volume with room is not taken for a full one: relaunched.
    roomy = classify(error, step=90, output_path=str(tmp_path), usage=_usage(40.0))
    assert roomy.reason == "InternalError"
    # Nor without an output path to look at.
    assert classify(error, step=90).reason == "InternalError"


def test_a_write_refused_with_enospc_is_storage_full_whatever_the_free_space(tmp_path):
    def write(path: str) -> None:
        descriptor = os.open(path, os.O_WRONLY)
        try:
            os.write(descriptor, b"weights")
        finally:
            os.close(descriptor)

    error = _full_device_error(write)
    assert isinstance(error, OSError) and error.errno == 28
    outcome = classify(RuntimeError("saving failed"), step=3)
    assert outcome.reason == "InternalError"
    wrapped = RuntimeError("saving checkpoint-3 failed")
    wrapped.__cause__ = error
    outcome = classify(wrapped, step=3, output_path=str(tmp_path), usage=_usage(50.0))
    assert outcome.reason == "StorageFull"
    assert "No space left on device" in outcome.message
    assert classify(wrapped, step=3).reason == "StorageFull"
