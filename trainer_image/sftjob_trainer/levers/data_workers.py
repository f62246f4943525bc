"""The dataWorkers lever: worker processes tokenize the data and collate the next batches.

DataLoader worker processes collate and prefetch the next micro-batches, so the training
process only queues GPU work (same batches, same order: the sampler stays in the training
process). On with CUDA and CPUs to spare under "auto".

A dataset of 1,000 rows or more is also tokenized by several processes (TRL's
`dataset_num_proc`), before the first step: about 500 conversations a second in one process
(H100 machine, session 15), so 100,000 rows would wait over three minutes, and the
reference job's 1,000 rows took 3.1-3.3 s against 2.0-2.3 s in 8 (session 18). Only the
tokenizing half of TRL's preparation runs in them (prepared_rows.prepare_counting); packing
stays in one process, where TRL would pack each process's shard apart, so the packed rows
are the same as one process's.
"""

from __future__ import annotations

from .contract import Choice, Contract, Hardware, Job, Signature, SpeedOptions, verified

SWITCH = "dataWorkers"

EXACT = True
NUMERICS = (
    "the same batches in the same order, collated in worker processes (bit for bit the "
    "losses without them, tests/trainer/test_data_workers.py)"
)
CONTRACT = Contract(
    versions=verified("transformers", "trl"),
    signatures=(
        Signature(
            "trl:SFTConfig",
            includes=(
                "dataloader_num_workers",
                "dataloader_persistent_workers",
                "dataset_num_proc",
            ),
        ),
        Signature("transformers:Trainer.get_train_dataloader", ("self",)),
    ),
)
# DataLoader worker processes per training process (measured: two were enough to take
# collation off the critical path); they need cores beyond the training process's own.
DATA_WORKERS = 2
# Several tokenizing processes start in about 1.6 s together, and one tokenizes ~300-500
# rows a second (H100 machine, 16 cores: 1,000 rows of the reference job prepared in
# 3.1-3.3 s in one process, 2.0-2.3 s in 8; bench/tokenizing_processes.py, session 18). So
# from 1,000 rows on, one process per 125 rows.
MIN_ROWS_TO_SPLIT = 1_000
ROWS_PER_TOKENIZER = 125
MAX_TOKENIZERS = 8


def decide(opt: SpeedOptions, hw: Hardware, job: Job) -> Choice:
    name = SWITCH
    if opt.dataWorkers == "off":
        return Choice(name, False, "turned off: batches are collated in the training process")
    if "dataloader_num_workers" in job.extra_args:
        return Choice(name, False, "dataloader_num_workers is set in extraArgs: kept as given")
    if opt.dataWorkers == "auto":
        if not hw.cuda:
            return Choice(name, False, "no CUDA device: workers would take the training's cores")
        if hw.cpus is not None and hw.cpus < DATA_WORKERS + 2:
            return Choice(
                name,
                False,
                f"{hw.cpus:g} CPUs per training process: too few to spare {DATA_WORKERS} "
                "for loading",
            )
    tokenizers = tokenizing_processes(hw, job)
    tokenizing = (
        f"; {tokenizers} processes tokenize the {job.rows:,} rows (packed in one: the same rows)"
        if tokenizers
        else ""
    )
    return Choice(
        name,
        True,
        f"{DATA_WORKERS} DataLoader workers collate and prefetch the next micro-batches "
        f"(same batches, same order), so the training process only queues GPU work{tokenizing}",
        sft={
            **({"dataset_num_proc": tokenizers} if tokenizers else {}),
            "dataloader_num_workers": DATA_WORKERS,
            **(
                {}
                if "dataloader_persistent_workers" in job.extra_args
                else {"dataloader_persistent_workers": True}  # no re-fork at each epoch
            ),
        },
    )


def tokenizing_processes(hw: Hardware, job: Job) -> int | None:
    """Processes to tokenize the training rows in, or None for one (the user's extraArgs
    dataset_num_proc is kept; too few rows or CPUs gain nothing)."""
    if "dataset_num_proc" in job.extra_args or job.rows is None or hw.cpus is None:
        return None
    if job.rows < MIN_ROWS_TO_SPLIT:
        return None
    processes = min(MAX_TOKENIZERS, int(hw.cpus), job.rows // ROWS_PER_TOKENIZER)
    return processes if processes >= 2 else None
