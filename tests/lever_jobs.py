"""The seed's reference job as the speed levers see it, shared by the trainer tests.

Qwen2.5-1.5B full fine-tune, per-device 2 x accumulation 8, packed (padding-free) to
2048 tokens, TRL's default gradient checkpointing, bf16: the job the levers' "auto"
decisions and the bench were measured on (seed-notes.md, docs/performance.md).
"""

from sftjob_trainer.levers.contract import Hardware, Job, ModelShape

SEED_REFERENCE_JOB = Job(
    method="full",
    per_device=2,
    accumulation=8,
    max_length=2048,
    padding_free=True,
    checkpointing=True,
    bf16=True,
)

# The Qwen2.5-1.5B shape and the H100 (80 GB, as torch reports it) the levers were measured on.
QWEN_15B = ModelShape(
    params=1_543_655_424, hidden=1536, layers=28, intermediate=8960, vocab=151_936
)
H100 = Hardware(cuda=True, memory_gib=79.1, name="NVIDIA H100 80GB HBM3")
