"""Trained tokens counted on the host: a leaf shared by the levers that change TRL's count.

lightMetrics counts each micro-batch's tokens here instead of reading them back from the
device, and the compile lever's static batches subtract their padding here.
"""

from __future__ import annotations

from typing import Any


class TokenTally:
    """Trained tokens counted on the host and folded into TRL's count once per log.

    TRL adds each micro-batch's tokens to `trainer._total_train_tokens` through a gather and
    `.item()`. Counts added here (a padding-free row's width, minus static padding) are
    Python ints, or device sums when batches carry an attention mask; they are summed over
    ranks only when the trainer logs (every rank logs, so the collective always matches).
    """

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.host = 0
        self.device: Any = None

    def add(self, tokens: Any) -> None:
        if isinstance(tokens, int):
            self.host += tokens
        else:
            self.device = tokens if self.device is None else self.device + tokens

    def pending(self) -> int:
        """This rank's tokens not yet folded into TRL's count (syncs only for device sums)."""
        return self.host + (int(self.device.item()) if self.device is not None else 0)

    def flush(self) -> None:
        import torch

        trainer = self.trainer
        local = self.pending()
        self.host, self.device = 0, None
        total = local
        if trainer.accelerator.num_processes > 1:
            count = torch.tensor(local, device=trainer.accelerator.device, dtype=torch.int64)
            total = int(trainer.accelerator.reduce(count, reduction="sum").item())
        trainer._total_train_tokens += total // int(getattr(trainer, "_tp_size", 1) or 1)
        trainer._metrics["train"]["num_tokens"] = [trainer._total_train_tokens]


def token_tally(trainer: Any) -> TokenTally:
    """The trainer's tally, made on first use; flushed before every training log."""
    tally = getattr(trainer, "sftjob_token_tally", None)
    if tally is not None:
        return tally
    tally = TokenTally(trainer)
    trainer.sftjob_token_tally = tally
    original_log = trainer.log

    def log_with_tokens(logs: dict[str, float], start_time: float | None = None) -> None:
        if trainer.model.training:
            tally.flush()
        original_log(logs, start_time)

    trainer.log = log_with_tokens
    return tally


def trained_tokens(trainer: Any) -> int:
    """TRL's token count plus what this rank has not yet folded into it (one process: exact)."""
    tally = getattr(trainer, "sftjob_token_tally", None)
    return int(getattr(trainer, "_total_train_tokens", 0)) + (tally.pending() if tally else 0)
