"""The final model from the last step's checkpoint (checkpoints.save_final_model).

The end-to-end runs (test_resume, test_bench_e2e) show a real run's final/ sharing the last
checkpoint's weights; here, the cases where it must not, on folders laid out as transformers
writes them.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

from sftjob_trainer.checkpoints import RUN_RECORD, final_step_checkpoint, save_final_model

CHECKPOINT_FILES = {
    "model.safetensors": b"weights",
    "config.json": b"{}",
    "tokenizer.json": b"{}",
    "training_args.bin": b"args",
    "trainer_state.json": b"{}",
    "optimizer.pt": b"adam",
    "scheduler.pt": b"lr",
    "rng_state.pth": b"rng",
    RUN_RECORD: b"{}",
}


def trainer_at(output: Path, step: int, **args: Any) -> Any:
    saved: list[str] = []
    trainer = SimpleNamespace(
        args=SimpleNamespace(
            **{"output_dir": str(output), "load_best_model_at_end": False, **args}
        ),
        state=SimpleNamespace(global_step=step),
        is_fsdp_enabled=False,
        is_deepspeed_enabled=False,
        is_world_process_zero=lambda: True,
        save_model=saved.append,
    )
    trainer.saved = saved
    return trainer


def checkpoint(output: Path, step: int, files: dict[str, bytes] = CHECKPOINT_FILES) -> Path:
    folder = output / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def test_the_final_model_shares_the_last_checkpoints_weights(tmp_path: Path) -> None:
    last = checkpoint(tmp_path / "checkpoints", 30)
    trainer = trainer_at(tmp_path / "checkpoints", 30)
    final = tmp_path / "final"
    final.mkdir()
    (final / "model.safetensors").write_bytes(b"partial")  # an earlier attempt's
    assert save_final_model(trainer, final) == (
        "final model linked from checkpoint-30 (its weights not written twice)"
    )
    assert trainer.saved == []
    assert (final / "model.safetensors").samefile(last / "model.safetensors")
    # The small files are copies: train.py writes the tokenizer into final/ again.
    assert not (final / "tokenizer.json").samefile(last / "tokenizer.json")
    assert (final / "tokenizer.json").read_bytes() == b"{}"
    # What only a resume reads stays with the checkpoint.
    assert sorted(p.name for p in final.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "training_args.bin",
    ]


def test_save_model_writes_it_where_the_checkpoint_is_not_the_final_model(
    tmp_path: Path,
) -> None:
    output = tmp_path / "checkpoints"
    final = tmp_path / "final"
    checkpoint(output, 20)  # an earlier step's: training went on after it
    assert final_step_checkpoint(trainer_at(output, 30)) is None
    checkpoint(output, 30, {"model.safetensors": b"w"})  # killed before trainer_state.json
    assert final_step_checkpoint(trainer_at(output, 30)) is None
    (output / "checkpoint-30" / "trainer_state.json").write_bytes(b"{}")
    assert final_step_checkpoint(trainer_at(output, 30)) == output / "checkpoint-30"
    # The best checkpoint is loaded back at the end: the final model is another one.
    best = trainer_at(output, 30, load_best_model_at_end=True)
    assert save_final_model(best, final) == "final model written"
    assert best.saved == [str(final)] and not final.exists()
    # FSDP gathers the weights inside save_model, on every rank.
    sharded = trainer_at(output, 30)
    sharded.is_fsdp_enabled = True
    assert save_final_model(sharded, final) == "final model written"
    # A checkpoint holding no weight file, or a folder inside: save_model, as usual.
    checkpoint(output, 40, {"trainer_state.json": b"{}", "config.json": b"{}"})
    assert final_step_checkpoint(trainer_at(output, 40)) is None
    checkpoint(output, 50)
    (output / "checkpoint-50" / "global_step50").mkdir()
    assert final_step_checkpoint(trainer_at(output, 50)) is None
    # Another rank: rank 0 links; this one writes nothing.
    other = trainer_at(output, 30)
    other.is_world_process_zero = lambda: False
    assert save_final_model(other, final) == "final model linked by rank 0"
    assert other.saved == [] and not final.exists()
