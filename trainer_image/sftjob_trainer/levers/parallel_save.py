"""The parallelSave lever: checkpoints' weights written by several threads (weights_writer.py).

A checkpoint's weights are most of the time a job spends after its last step: the reference
job's 1.5B model in fp32 (6.2 GB) took 4.7 s of its 5.1 s save on an H100 machine (session
17), because safetensors copies and writes every tensor in one thread under the GIL. The
same file, byte for byte, written by 4 threads took 2.0 s against transformers' 7.5 s in
one process (bench/startup_probe.py, session 18). The final model is linked from the last
checkpoint (checkpoints.save_final_model), so it is written once, this way. On with CUDA
under "auto", as every lever: a CPU run keeps the libraries' own path unless asked.
"""

from __future__ import annotations

import functools
from typing import Any

from .contract import (
    Choice,
    Contract,
    Hardware,
    Plan,
    Signature,
    SpeedOptions,
    deferred_probe,
    verified,
)
from .weights_writer import WRITER_THREADS

SWITCH = "parallelSave"

EXACT = True
NUMERICS = (
    "changes no number: the weight files are byte for byte safetensors' own "
    "(tests/trainer/test_weights_writer.py)"
)
CONTRACT = Contract(
    versions=verified("torch", "transformers"),
    signatures=(
        Signature("safetensors.torch:save_file", ("tensors", "filename", "metadata")),
        Signature(
            "transformers.modeling_utils:safe_save_file", ("tensors", "filename", "metadata")
        ),
        Signature("transformers:Trainer._save", ("self", "output_dir", "state_dict")),
    ),
    probe=deferred_probe(".weights_writer", "probe_weights_writer"),
)


def decide(opt: SpeedOptions, hw: Hardware) -> Choice:
    if opt.parallelSave == "off":
        return Choice(SWITCH, False, "turned off: safetensors writes each checkpoint in one thread")
    if opt.parallelSave == "auto" and not hw.cuda:
        return Choice(SWITCH, False, "no CUDA device: safetensors writes each checkpoint")
    return Choice(
        SWITCH,
        True,
        f"checkpoints' weights are copied and written by {WRITER_THREADS} threads (the same "
        "safetensors files, byte for byte)",
    )


def apply(trainer: Any, plan: Plan) -> str:
    """Every save of this trainer (its checkpoints, save_model) goes through `_save`; each
    call writes with the threaded writer while it runs."""
    from .weights_writer import threaded_weight_writes

    plain = trainer._save

    @functools.wraps(plain)
    def save(*args: Any, **kwargs: Any) -> Any:
        with threaded_weight_writes():
            return plain(*args, **kwargs)

    trainer._save = save
    return f"checkpoints' weights written by {WRITER_THREADS} threads"
