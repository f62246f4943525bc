"""Progress reporting from rank 0: the job's progress ConfigMap, or the console off-cluster.

Inside a cluster the trainer merge-patches its report (`progress`, `measuredPlan` and
`speedPlan`, tagged with the job's uid and the launch attempt) into its job's progress
ConfigMap, `<job>-progress`: the only object its ServiceAccount may write. It cannot write
the SFTJob's status; the operator validates the report and copies it into
`status.progress`, `status.measuredPlan` and `status.speedPlan`
(sftjob_operator.progress_report). Reports are
throttled to one per `progressIntervalSeconds`; a failed patch is logged and retried
with the next report, it never stops training. Off-cluster (`sftjob run`, or
SFTJOB_REPORT=console) the same reports become a progress line on the console;
every report is also appended to OUTPUT/progress.jsonl.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sftjob_operator.children import progress_config_map_name
from sftjob_operator.progress_report import encode_report

log = logging.getLogger("sftjob_trainer.progress")

ENV_REPORT = "SFTJOB_REPORT"
PROGRESS_FILE = "progress.jsonl"


def format_duration(seconds: float | None) -> str | None:
    """3m20s, 1h05m, 45s: short enough for a kubectl printer column."""
    if seconds is None or not math.isfinite(seconds):
        return None
    total = max(int(round(seconds)), 0)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def progress_report(
    *,
    step: int,
    total_steps: int,
    epoch: float | None,
    metrics: dict[str, Any],
    steps_per_second: float | None,
    tokens_per_second: float | None,
    best_eval_loss: float | None = None,
    mfu: float | None = None,
) -> dict[str, Any]:
    """A `Progress` object (field names as in sftjob_operator.api.Progress); `mfu` only
    where the card's peak is known (flops.mfu_meter), else null, which the operator keeps
    out of the status like every unknown figure."""
    remaining = max(total_steps - step, 0)
    # Rounded up: while any step remains the ETA is never "0s".
    eta_seconds = (
        math.ceil(remaining / steps_per_second) if steps_per_second else (None if remaining else 0)
    )
    return {
        "step": step,
        "totalSteps": total_steps,
        "epoch": round(epoch, 4) if epoch is not None else None,
        "percent": round(100.0 * step / total_steps, 1) if total_steps else None,
        "loss": _finite(metrics.get("loss")),
        "learningRate": _finite(metrics.get("learning_rate")),
        "gradNorm": _finite(metrics.get("grad_norm")),
        "tokensPerSecond": round(tokens_per_second, 1) if tokens_per_second else None,
        "etaSeconds": eta_seconds,
        "eta": format_duration(eta_seconds),
        "summary": f"{step}/{total_steps}",
        "updateTime": now_rfc3339(),
        "evalLoss": _finite(metrics.get("eval_loss")),
        "bestEvalLoss": _finite(best_eval_loss),
        "mfu": mfu,
    }


# --------------------------------------------------------------------------- sinks


class KubeProgressSink:
    """Merge-patches the report into the job's progress ConfigMap."""

    def __init__(self, namespace: str, name: str, job_uid: str | None, attempt: int):
        from kubernetes import client, config

        # An explicit client rather than the module-global default: in-cluster first (the
        # pod's ServiceAccount), else $KUBECONFIG read now (the client reads it at import).
        try:
            configuration = client.Configuration()
            config.load_incluster_config(client_configuration=configuration)
            api_client = client.ApiClient(configuration)
        except config.ConfigException:
            api_client = config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))
        self.api = client.CoreV1Api(api_client)
        self.namespace = namespace
        self.config_map = progress_config_map_name(name)
        self.job_uid = job_uid
        self.attempt = attempt

    def send(self, status: dict[str, Any]) -> None:
        data = encode_report(
            job_uid=self.job_uid,
            attempt=self.attempt,
            progress=status.get("progress"),
            measured_plan=status.get("measuredPlan"),
            speed_plan=status.get("speedPlan"),
        )
        self.api.patch_namespaced_config_map(
            self.config_map,
            self.namespace,
            {"data": data},
            _content_type="application/merge-patch+json",
            # A slow API server must not stall training for long; the next report retries.
            _request_timeout=(3, 10),
        )

    def __str__(self) -> str:
        return f"ConfigMap {self.namespace}/{self.config_map}"


class ConsoleSink:
    """A progress line on stderr for people running the trainer by hand."""

    def __init__(self, stream: Any = None):
        self.stream = stream or sys.stderr

    def send(self, status: dict[str, Any]) -> None:
        progress = status.get("progress")
        if progress:
            self.stream.write(console_line(progress) + "\n")
            self.stream.flush()
        plan = status.get("measuredPlan")
        if plan:
            self.stream.write(
                f"measured plan: {plan['datasetSize']} rows, world size {plan['worldSize']}, "
                f"effective batch {plan['effectiveBatchSize']}, {plan['stepsPerEpoch']} steps/epoch, "
                f"{plan['totalSteps']} steps, warmup {plan['warmupSteps']}\n"
            )
            if plan.get("rowsTruncated") or plan.get("rowsDropped"):
                self.stream.write(
                    f"rows over maxLength: {plan.get('rowsTruncated', 0)} truncated, "
                    f"{plan.get('rowsDropped', 0)} dropped\n"
                )
            self.stream.flush()
        speed = status.get("speedPlan")
        if speed:
            self.stream.write(speed_line(speed) + "\n")
            self.stream.flush()

    def __str__(self) -> str:
        return "console"


def speed_line(speed: dict[str, Any]) -> str:
    """The speed plan in one line: batch shape, attention, compile, the levers on."""
    on = [lever["name"] for lever in speed.get("levers", []) if lever.get("on")]
    return (
        f"speed plan ({speed.get('preset')}): per_device {speed.get('perDeviceTrainBatchSize')} "
        f"x accumulation {speed.get('gradientAccumulationSteps')}, checkpointing "
        f"{'on' if speed.get('gradientCheckpointing') else 'off'}, attention "
        f"{speed.get('attention')}, compile {'on' if speed.get('compile') else 'off'}; "
        f"levers on: {', '.join(on) or 'none'}"
    )


def console_line(progress: dict[str, Any], width: int = 24) -> str:
    total = progress.get("totalSteps") or 0
    done = int(width * progress["step"] / total) if total else 0
    bar = "#" * done + "." * (width - done)
    parts = [f"[{bar}] {progress.get('summary')}", f"{progress.get('percent') or 0:.0f}%"]
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.4f}")
    if progress.get("learningRate") is not None:
        parts.append(f"lr {progress['learningRate']:.2e}")
    if progress.get("evalLoss") is not None:
        parts.append(f"eval {progress['evalLoss']:.4f}")
    if progress.get("tokensPerSecond"):
        parts.append(f"{progress['tokensPerSecond']:.0f} tok/s")
    if progress.get("eta"):
        parts.append(f"eta {progress['eta']}")
    return "  ".join(parts)


def make_sink(
    namespace: str | None, name: str | None, job_uid: str | None = None, attempt: int = 1
) -> Any:
    """The API sink when the job is known and a cluster is configured, else the console."""
    if os.environ.get(ENV_REPORT, "").lower() == "console" or not (namespace and name):
        return ConsoleSink()
    try:
        return KubeProgressSink(namespace, name, job_uid, attempt)
    except Exception as exc:  # no in-cluster config and no kubeconfig
        log.warning("no Kubernetes API configured (%s): reporting progress to the console", exc)
        return ConsoleSink()


# --------------------------------------------------------------------------- callback


def lowest_eval_loss(args: Any, state: Any, metrics: dict[str, Any]) -> float | None:
    """The lowest eval loss so far with output.keepBest, else None.

    transformers updates state.best_metric (kept across resumes) only after on_evaluate,
    so the loss just computed counts too.
    """
    if args is None or not (
        args.load_best_model_at_end and args.metric_for_best_model == "eval_loss"
    ):
        return None
    seen = [_finite(v) for v in (state.best_metric, metrics.get("eval_loss"))]
    known = [v for v in seen if v is not None]
    return min(known) if known else None


def _callback_base() -> type:
    from transformers import TrainerCallback

    return TrainerCallback


class Reporter:
    """Sends status updates through a sink, keeping unsent ones for the next try."""

    def __init__(self, sink: Any, output_path: Path | None):
        self.sink = sink
        self.output_path = output_path
        self.pending: dict[str, Any] = {}

    def send(self, status: dict[str, Any]) -> bool:
        self.pending.update(status)
        if self.output_path is not None:
            try:
                self.output_path.mkdir(parents=True, exist_ok=True)
                with (self.output_path / PROGRESS_FILE).open("a") as handle:
                    handle.write(json.dumps(status) + "\n")
            except OSError as exc:
                log.warning("cannot append to %s: %s", self.output_path / PROGRESS_FILE, exc)
        try:
            self.sink.send(self.pending)
        except Exception as exc:
            log.warning("progress report to %s failed, retrying next time: %s", self.sink, exc)
            return False
        self.pending = {}
        return True


def make_progress_callback(
    reporter: Reporter,
    *,
    interval_seconds: float,
    plan_info: dict[str, Any],
    steps_per_epoch: Any,
    notes: list[str] | None = None,
    speed_plan: dict[str, Any] | None = None,
    mfu: Callable[[float | None], float | None] | None = None,
) -> Any:
    """A TrainerCallback reporting from rank 0 only.

    `plan_info` holds the static measured-plan fields; `steps_per_epoch(rows)` computes
    the per-epoch figure for the prepared row count, the trainer's own arithmetic; `notes`
    go into the measured plan after its own (rows truncated or dropped over maxLength);
    `speed_plan` is what the speed planner made of the run (speed.SpeedPlan.status), sent
    with the measured plan; `mfu(tokens_per_second)` the run's model FLOPs utilisation, None
    where it is not known (a CPU, a card without a known peak).
    """

    class ProgressCallback(_callback_base()):  # type: ignore[misc]
        def __init__(self) -> None:
            self.trainer: Any = None
            self.metrics: dict[str, Any] = {}
            self.last_report = 0.0
            self.start_time = 0.0
            self.start_step = 0
            self.tokens_mark: tuple[float, float] | None = None
            self.tokens_per_second: float | None = None
            self.args: Any = None

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.args = args
            if not state.is_world_process_zero:
                return
            self.start_time = time.monotonic()
            self.start_step = state.global_step
            rows = len(self.trainer.train_dataset) if self.trainer is not None else None
            per_epoch = steps_per_epoch(rows) if rows is not None else None
            epochs = (
                round(state.max_steps / per_epoch, 4)
                if args.max_steps > 0 and per_epoch
                else float(args.num_train_epochs)
            )
            measured = {
                **plan_info,
                "datasetSize": rows,
                "datasetSizeSource": "measured",
                "stepsPerEpoch": per_epoch,
                "totalSteps": state.max_steps,
                "epochs": epochs,
                "warmupSteps": args.get_warmup_steps(state.max_steps),
                "estimate": False,
                "measured": True,
                "notes": ["measured by the trainer after preparing the data", *(notes or [])],
            }
            self.last_report = time.monotonic()
            first: dict[str, Any] = {"measuredPlan": measured, "progress": self._progress(state)}
            if speed_plan is not None:
                first["speedPlan"] = speed_plan
            reporter.send(first)

        def on_log(
            self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any
        ) -> None:
            if not state.is_world_process_zero or not logs:
                return
            self.metrics.update(logs)
            tokens = _finite(logs.get("num_tokens"))
            if tokens is not None:
                now = time.monotonic()
                if (
                    self.tokens_mark is not None
                    and now > self.tokens_mark[0]
                    and tokens > self.tokens_mark[1]
                ):
                    self.tokens_per_second = (tokens - self.tokens_mark[1]) / (
                        now - self.tokens_mark[0]
                    )
                self.tokens_mark = (now, tokens)

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not state.is_world_process_zero:
                return
            if time.monotonic() - self.last_report >= interval_seconds:
                self.last_report = time.monotonic()
                reporter.send({"progress": self._progress(state)})

        def on_evaluate(
            self, args: Any, state: Any, control: Any, metrics: Any = None, **kwargs: Any
        ) -> None:
            # Every eval loss reaches the history (progress.jsonl), unthrottled: there are few.
            if not state.is_world_process_zero or not metrics:
                return
            self.metrics.update(metrics)
            self.last_report = time.monotonic()
            reporter.send({"progress": self._progress(state)})

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.is_world_process_zero:
                reporter.send({"progress": self._progress(state)})

        def _progress(self, state: Any) -> dict[str, Any]:
            done = state.global_step - self.start_step
            elapsed = time.monotonic() - self.start_time
            rate = done / elapsed if done > 0 and elapsed > 0 else None
            return progress_report(
                step=state.global_step,
                total_steps=state.max_steps,
                epoch=state.epoch,
                metrics=self.metrics,
                steps_per_second=rate,
                tokens_per_second=self.tokens_per_second,
                best_eval_loss=lowest_eval_loss(self.args, state, self.metrics),
                mfu=mfu(self.tokens_per_second) if mfu is not None else None,
            )

    return ProgressCallback()
