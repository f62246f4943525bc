"""The parallelSave lever: safetensors files written by several threads, byte for byte the
library's own (sftjob_trainer/levers/weights_writer.py, parallel_save.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from sftjob_trainer.levers import parallel_save, weights_writer
from sftjob_trainer.levers.contract import Hardware, SpeedOptions, check
from sftjob_trainer.levers.weights_writer import (
    probe_weights_writer,
    threaded_weight_writes,
    write_safetensors,
)
from transformers import modeling_utils

H100 = Hardware(cuda=True, memory_gib=79.1, name="NVIDIA H100 80GB HBM3", cpus=16.0)
CPU = Hardware(cuda=False, memory_gib=24.0, name="cpu", cpus=2.0)


def mixed_tensors() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.mlp.weight": torch.randn(96, 40, generator=generator),
        "model.layers.0.mlp.weight_t": torch.randn(40, 96, generator=generator).t(),
        "model.norm.weight": torch.randn(40, generator=generator).to(torch.bfloat16),
        "model.embed.half": torch.randn(7, 3, generator=generator).half(),
        "positions": torch.arange(11),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0),
        "scalar": torch.tensor(2.5),
    }


def library_file(tensors: dict[str, torch.Tensor], path: Path, metadata: Any) -> bytes:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata)
    return path.read_bytes()


@pytest.mark.parametrize("threads", [1, 3, 8])
@pytest.mark.parametrize("chunk", [64 << 20, 100, 7])
def test_the_file_is_byte_for_byte_what_safetensors_writes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads: int, chunk: int
) -> None:
    # Small chunks split every tensor over several threads' writes (and odd sizes).
    monkeypatch.setattr(weights_writer, "CHUNK_BYTES", chunk)
    tensors = mixed_tensors()
    metadata = {"format": "pt"}
    write_safetensors(tensors, tmp_path / "ours.safetensors", metadata, threads=threads)
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == library_file(tensors, tmp_path / "theirs.safetensors", metadata)
    with safe_open(str(tmp_path / "ours.safetensors"), "pt") as opened:
        assert opened.metadata() == metadata
        for name, tensor in tensors.items():
            assert torch.equal(opened.get_tensor(name), tensor), name


def test_a_file_without_metadata_or_tensors_is_the_librarys_too(tmp_path: Path) -> None:
    tensors = {"w": torch.ones(3, 5)}
    write_safetensors(tensors, tmp_path / "a", None)
    assert (tmp_path / "a").read_bytes() == library_file(tensors, tmp_path / "b", None)
    write_safetensors({}, tmp_path / "c", {"format": "pt"})
    assert (tmp_path / "c").read_bytes() == library_file({}, tmp_path / "d", {"format": "pt"})


def test_an_existing_longer_file_is_replaced_not_overlaid(tmp_path: Path) -> None:
    target = tmp_path / "model.safetensors"
    target.write_bytes(b"x" * 100_000)
    tensors = {"w": torch.ones(4)}
    write_safetensors(tensors, target, {"format": "pt"})
    assert target.read_bytes() == library_file(tensors, tmp_path / "b", {"format": "pt"})


def test_save_pretrained_inside_writes_the_same_model_and_puts_the_writer_back(
    tmp_path: Path,
) -> None:
    from sftjob_bench.common import TINY
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("qwen2", **TINY))
    plain = modeling_utils.safe_save_file
    model.save_pretrained(tmp_path / "plain")
    with threaded_weight_writes():
        assert getattr(modeling_utils.safe_save_file, "sftjob_threaded", False)
        with threaded_weight_writes():  # a save inside a save keeps the one writer
            assert getattr(modeling_utils.safe_save_file, "sftjob_threaded", False)
        model.save_pretrained(tmp_path / "threaded")
    assert modeling_utils.safe_save_file is plain
    weights = "model.safetensors"
    assert (tmp_path / "threaded" / weights).read_bytes() == (
        tmp_path / "plain" / weights
    ).read_bytes()
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "threaded")
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name

    with pytest.raises(RuntimeError, match="disk full"), threaded_weight_writes():
        raise RuntimeError("disk full")
    assert modeling_utils.safe_save_file is plain


def test_tensors_it_cannot_write_go_to_the_library(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls: list[str] = []

    def library(tensors: Any, filename: Any, metadata: Any = None) -> None:
        calls.append(str(filename))

    save = weights_writer.threaded_save_file(library)
    save({"sparse": torch.eye(3).to_sparse()}, tmp_path / "s", metadata=None)
    assert calls == [str(tmp_path / "s")] and not (tmp_path / "s").exists()
    save({"dense": torch.eye(3)}, tmp_path / "d", metadata=None)
    assert calls == [str(tmp_path / "s")] and (tmp_path / "d").is_file()


class SavingTrainer:
    """What apply reads of a Trainer: its `_save(output_dir, state_dict)`."""

    def __init__(self) -> None:
        self.writers: list[bool] = []

    def _save(self, output_dir: str | None = None, state_dict: Any = None) -> None:
        self.writers.append(getattr(modeling_utils.safe_save_file, "sftjob_threaded", False))


def test_each_save_of_the_trainer_writes_threaded_and_only_while_it_runs() -> None:
    trainer = SavingTrainer()
    done = parallel_save.apply(trainer, plan=None)  # type: ignore[arg-type]
    assert done == "checkpoints' weights written by 4 threads"
    trainer._save("checkpoint-1")
    trainer._save(output_dir="final", state_dict=None)
    assert trainer.writers == [True, True]
    assert not getattr(modeling_utils.safe_save_file, "sftjob_threaded", False)


@pytest.mark.parametrize(
    ("switch", "hardware", "on"),
    [("auto", H100, True), ("auto", CPU, False), ("on", CPU, True), ("off", H100, False)],
)
def test_the_lever_is_on_with_cuda_or_when_asked(switch: str, hardware: Hardware, on: bool) -> None:
    choice = parallel_save.decide(SpeedOptions(parallelSave=switch), hardware)  # type: ignore[arg-type]
    assert choice.on is on and choice.lever == "parallelSave"
    assert choice.sft == {} and choice.model == {}


def test_its_self_check_passes_and_its_probe_catches_a_different_file(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert probe_weights_writer("cpu") is None
    assert check(parallel_save.CONTRACT, "cpu") is None

    # A writer whose file is not the library's is caught (and the lever turned off).
    def unpadded(tensors: Any, filename: Any, metadata: Any = None, threads: int = 1) -> None:
        Path(filename).write_bytes(b"\x02\x00\x00\x00\x00\x00\x00\x00{}")

    monkeypatch.setattr(weights_writer, "write_safetensors", unpadded)
    assert probe_weights_writer("cpu") == (
        "the threaded writer's file differs from safetensors' save_file's"
    )
    assert check(parallel_save.CONTRACT, "cpu") == (
        "its probe differs from the plain path: the threaded writer's file differs from safetensors' save_file's"
    )
