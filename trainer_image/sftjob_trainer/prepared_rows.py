"""Rows over maxLength: what TRL's data preparation truncates and drops, counted.

TRL 1.16 (`SFTTrainer._prepare_dataset`) tokenizes every row, then
- without packing, cuts each row to `max_length` (`truncation_mode` keep_start or
  keep_end) and drops the rows left with no trainable token (labels all -100: a prompt
  filling max_length under completion-only loss, every assistant token beyond it under
  `assistant_only_loss`);
- with packing, never truncates in preparation: `bfd` cuts a row over max_length when it
  packs it (the overflow is lost), `bfd_split` and `wrapped` split it (nothing lost); bfd
  drops empty rows.
It says nothing about either. Here TRL's own preparation runs in two halves: tokenizing
(max_length off, no packing, no shuffle), the token lengths read, then the same call on
the tokenized rows, which TRL recognises by their `input_ids` and only truncates, drops,
packs and shuffles. The rows that come out are those of the single call, at the cost of
reading one length column; the counts are exact. With `dataset_num_proc` the first half
runs in that many processes and the packing in one, so the packed rows do not depend on it.

`tokenized_rows` runs the same preparation without a model, for a planner that can reach
the model's tokenizer and the data (`sftjob plan` with local files): the prepared row
count is then known before any pod starts, packed or not.
"""

from __future__ import annotations

import copy
import inspect
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sftjob_operator.plan import PreparedRows

log = logging.getLogger("sftjob_trainer.prepared_rows")

# TRL 1.16's signature; another one means the two-half preparation may not be TRL's.
PREPARE_PARAMETERS = (
    "self",
    "dataset",
    "processing_class",
    "args",
    "packing",
    "formatting_func",
    "dataset_name",
)


@dataclass(frozen=True)
class RowCounts:
    """One dataset's preparation: rows in, rows out, rows over max_length cut or removed."""

    rows: int
    prepared: int
    truncated: int
    dropped: int
    max_length: int | None

    def as_prepared_rows(self) -> PreparedRows:
        return PreparedRows(rows=self.prepared, truncated=self.truncated, dropped=self.dropped)

    def sentence(self, name: str = "training") -> str | None:
        """What a user should read about it, or None when no row lost a token."""
        if not (self.truncated or self.dropped):
            return None
        parts = []
        if self.truncated:
            parts.append(f"{self.truncated} truncated to maxLength {self.max_length} tokens")
        if self.dropped:
            parts.append(
                f"{self.dropped} dropped (no trainable token left after truncation to "
                f"maxLength {self.max_length})"
            )
        return (
            f"{self.truncated + self.dropped} of {self.rows} {name} rows were longer than "
            f"maxLength: {' and '.join(parts)}; raise training.maxLength to keep them whole"
        )


def count_rows(
    lengths: Sequence[int],
    prepared: int,
    *,
    max_length: int | None,
    packing: bool,
    strategy: str,
) -> RowCounts:
    """Counts from the tokenized lengths and the prepared row count (TRL 1.16's rules)."""
    rows = len(lengths)
    over = 0 if max_length is None else sum(1 for n in lengths if n > max_length)
    if packing:
        # bfd drops empty rows before packing; wrapped keeps every token.
        dropped = 0 if strategy == "wrapped" else sum(1 for n in lengths if n == 0)
        truncated = over if strategy == "bfd" else 0
    else:
        # Only a row cut to max_length can lose all its trainable tokens.
        dropped = rows - prepared
        truncated = max(over - dropped, 0)
    return RowCounts(rows, prepared, truncated, dropped, max_length)


def _token_lengths(dataset: Any) -> list[int]:
    import pyarrow.compute as pc

    # The arrow view honours a select()'s indices mapping; one column, no Python rows.
    column = dataset.with_format("arrow")["input_ids"]
    return [int(n) for n in pc.list_value_length(column).to_pylist()]


def prepare_counting(
    prepare: Callable[..., Any],
    dataset: Any,
    processing_class: Any,
    args: Any,
    packing: bool,
    formatting_func: Any,
    dataset_name: str,
) -> tuple[Any, RowCounts]:
    """TRL's `_prepare_dataset` (`prepare`, bound) in two halves; (prepared rows, counts)."""
    tokenize_only = copy.copy(args)
    tokenize_only.max_length = None
    tokenize_only.shuffle_dataset = False
    tokenized = prepare(
        dataset, processing_class, tokenize_only, False, formatting_func, dataset_name
    )
    lengths = _token_lengths(tokenized)
    pack_args = args
    if packing and args.dataset_num_proc:
        # TRL would pack each process's shard apart; packed in one, the rows are the same
        # however many processes tokenized them.
        pack_args = copy.copy(args)
        pack_args.dataset_num_proc = None
    prepared = prepare(tokenized, processing_class, pack_args, packing, None, dataset_name)
    counts = count_rows(
        lengths,
        len(prepared),
        max_length=args.max_length,
        packing=packing,
        strategy=args.packing_strategy,
    )
    return prepared, counts


def trl_prepare_matches() -> bool:
    """True when SFTTrainer._prepare_dataset has the signature the two halves rely on."""
    from trl import SFTTrainer

    prepare = getattr(SFTTrainer, "_prepare_dataset", None)
    if prepare is None:
        return False
    return tuple(inspect.signature(prepare).parameters) == PREPARE_PARAMETERS


def sft_trainer_class() -> type:
    """SFTTrainer counting what its preparation truncates and drops (`row_counts` by name).

    With another TRL whose preparation has another shape, plain SFTTrainer: training is
    unchanged, only the counts are unknown (logged).
    """
    from trl import SFTTrainer

    if not trl_prepare_matches():
        log.warning(
            "TRL's SFTTrainer._prepare_dataset is not the one this trainer was verified with: "
            "rows truncated or dropped over maxLength are not counted"
        )
        return SFTTrainer

    class CountingSFTTrainer(SFTTrainer):  # type: ignore[misc]
        def _prepare_dataset(
            self,
            dataset: Any,
            processing_class: Any,
            args: Any,
            packing: bool,
            formatting_func: Any,
            dataset_name: str,
        ) -> Any:
            prepared, counts = prepare_counting(
                super()._prepare_dataset,
                dataset,
                processing_class,
                args,
                packing,
                formatting_func,
                dataset_name,
            )
            self.__dict__.setdefault("row_counts", {})[dataset_name] = counts
            return prepared

    return CountingSFTTrainer


class _PreparationOnly:
    """What TRL's `_prepare_dataset` reads of its trainer, decided as SFTTrainer decides it."""

    def __init__(self, tokenizer: Any, args: Any, sample: dict[str, Any]):
        from trl.chat_template_utils import get_training_chat_template, has_generation_markers

        self._tokenizer = tokenizer
        if args.assistant_only_loss and not has_generation_markers(tokenizer.chat_template):
            self.chat_template = get_training_chat_template(tokenizer)
        else:
            self.chat_template = None
        if args.completion_only_loss is None:
            self.completion_only_loss = "prompt" in sample and "completion" in sample
        else:
            self.completion_only_loss = args.completion_only_loss


def tokenized_rows(config: Any) -> RowCounts:
    """The training rows after TRL's preparation, found with the model's tokenizer, no model.

    `config` is a TrainerConfig. Reads the data and the tokenizer as the trainer does (so
    both must be reachable from here) and applies dataset.eval's held-out split.
    """
    from trl import SFTConfig, SFTTrainer

    from .config_map import sft_kwargs
    from .data import prepare_dataset
    from .eval_data import split_eval
    from .model import load_tokenizer

    spec = config.spec
    dataset, fmt = prepare_dataset(spec.dataset)
    dataset, _ = split_eval(dataset, spec.dataset, fmt)
    kwargs = sft_kwargs(config, dataset_format=fmt if spec.dataset.format == "auto" else None)
    # Device settings change nothing in data preparation; a planner may have no GPU.
    args = SFTConfig(**{**kwargs, "use_cpu": True, "bf16": False})
    if fmt == "text" and spec.dataset.textField != args.dataset_text_field:
        args.dataset_text_field = spec.dataset.textField
    tokenizer = load_tokenizer(spec.model)
    preparer = _PreparationOnly(tokenizer, args, dataset[0])

    def prepare(*call: Any) -> Any:
        return SFTTrainer._prepare_dataset(preparer, *call)

    _, counts = prepare_counting(prepare, dataset, tokenizer, args, args.packing, None, "train")
    return counts
