"""The dataWorkers lever: DataLoader worker processes collate the next micro-batches.

DataLoader worker processes collate and prefetch the next micro-batches, so the training
process only queues GPU work (same batches, same order: the sampler stays in the training
process). On with CUDA and CPUs to spare under "auto".
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
            includes=("dataloader_num_workers", "dataloader_persistent_workers"),
        ),
        Signature("transformers:Trainer.get_train_dataloader", ("self",)),
    ),
)
# DataLoader worker processes per training process (measured: two were enough to take
# collation off the critical path); they need cores beyond the training process's own.
DATA_WORKERS = 2


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
    return Choice(
        name,
        True,
        f"{DATA_WORKERS} DataLoader workers collate and prefetch the next micro-batches "
        "(same batches, same order), so the training process only queues GPU work",
        sft={
            "dataloader_num_workers": DATA_WORKERS,
            **(
                {}
                if "dataloader_persistent_workers" in job.extra_args
                else {"dataloader_persistent_workers": True}  # no re-fork at each epoch
            ),
        },
    )
