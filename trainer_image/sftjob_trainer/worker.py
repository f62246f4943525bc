"""One training process: `python -m sftjob_trainer.worker --config PATH`.

Started by the launcher (directly, or once per device through accelerate). Every
exit writes an outcome: to the launcher's per-rank report folder when there is
one, else to the pod's termination log.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from .failures import Outcome, classify, write_outcome
from .launcher import ENV_WORKER_REPORT_DIR

log = logging.getLogger("sftjob_trainer.worker")


def report_path() -> Path | None:
    folder = os.environ.get(ENV_WORKER_REPORT_DIR)
    if not folder:
        return None  # standalone: write_outcome falls back to the termination log
    return Path(folder) / f"rank-{int(os.environ.get('RANK', '0')):05d}.json"


def _record_pid() -> None:
    """Let the launcher signal this process directly (see launcher._run_forwarding_signals)."""
    report = report_path()
    if report is not None:
        report.with_name(report.name.replace("rank-", "pid-")).write_text(str(os.getpid()))


def run_worker(config_path: Path | str | None) -> Outcome:
    """Train and classify the result; never raises."""
    from . import train
    from .settings import load_config

    train.STATE = train.RunState()
    previous = {stop: signal.getsignal(stop) for stop in (signal.SIGTERM, signal.SIGINT)}
    output_path = None  # known once the config loads: a full volume there is not retried
    try:
        train.install_sigterm_handler()
        _record_pid()
        config = load_config(config_path)
        output_path = str(config.resolved["outputPath"])
        result = train.main(config)
        outcome = Outcome(
            "Completed",
            f"trained {result.get('step')}/{result.get('totalSteps')} steps on "
            f"{result.get('worldSize')} process(es) ({result.get('distributedType')})"
            + (
                f", resumed from {Path(result['resumedFrom']).name}"
                if result.get("resumedFrom")
                else ""
            )
            + "; "
            f"saved to {result.get('finalPath')}"
            + (f" and uploaded to {result['outputUri']}" if result.get("outputUri") else ""),
            result.get("step"),
        )
    except BaseException as exc:  # noqa: BLE001 - every exit must be classified
        outcome = classify(exc, train.STATE.step, output_path)
        if outcome.reason == "InternalError":
            log.exception("training failed")
    finally:
        for stop, handler in previous.items():
            signal.signal(stop, handler)
    write_outcome(outcome, report_path())
    return outcome


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sftjob_trainer.worker")
    parser.add_argument("--config", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    outcome = run_worker(args.config)
    print(
        f"sftjob-trainer worker: {outcome.reason}: {outcome.message}", file=sys.stderr, flush=True
    )
    return outcome.exit_code


def exit_now(code: int) -> None:
    """Leave without waiting on library threads: the outcome is already written.

    Under FSDP on 2 H100s both ranks finished, wrote their outcome, and then hung in
    interpreter shutdown (NCCL / data-loader threads) until killed minutes later; a pod
    that never exits keeps its job Running. So: end the process group, flush, exit.
    """
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - teardown is best effort; the result is recorded
        log.warning("process group teardown failed", exc_info=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    exit_now(main())
