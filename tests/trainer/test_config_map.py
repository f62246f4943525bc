"""Resolved config -> SFTConfig arguments, without training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sftjob_trainer.config_map import (
    agree_matmul_precision,
    build_sft_config,
    check_extra_args,
    sft_kwargs,
)
from sftjob_trainer.failures import ConfigError
from sftjob_trainer.settings import load_config


def kwargs_for(make_config, spec=None, **kw):
    return sft_kwargs(load_config(make_config(spec)), **kw)


def test_reference_defaults_map_to_sft_config_names(make_config, tmp_path):
    # Blank training block: every value comes from the spec's defaults.
    path = make_config({"method": "lora"})
    raw = json.loads(path.read_text())
    raw["spec"]["training"] = {}
    path.write_text(json.dumps(raw))
    config = load_config(path)
    kwargs = sft_kwargs(config)
    assert kwargs["per_device_train_batch_size"] == 4  # resolved wins over spec defaults
    assert kwargs["max_length"] == 2048
    assert "max_seq_length" not in kwargs
    assert kwargs["warmup_steps"] == pytest.approx(0.03)
    assert isinstance(kwargs["warmup_steps"], float)
    assert "warmup_ratio" not in kwargs
    assert kwargs["lr_scheduler_type"] == "cosine"
    assert kwargs["learning_rate"] == pytest.approx(1e-3)
    assert kwargs["logging_steps"] == 10
    assert kwargs["save_steps"] == 100
    assert kwargs["save_total_limit"] == 2
    assert kwargs["seed"] == 42
    assert kwargs["report_to"] == "none"
    assert kwargs["use_cpu"] is True
    assert kwargs["bf16"] is False  # CPU job: bf16 resolves off
    assert kwargs["activation_checkpointing"] is True
    assert kwargs["activation_checkpointing_kwargs"] == {"use_reentrant": False}
    assert kwargs["output_dir"] == str(tmp_path / "output" / "checkpoints")


def test_warmup_steps_int_and_max_steps(make_config):
    kwargs = kwargs_for(make_config, {"training": {"warmupSteps": 7, "maxSteps": 30}})
    assert kwargs["warmup_steps"] == 7 and isinstance(kwargs["warmup_steps"], int)
    assert kwargs["max_steps"] == 30
    assert kwargs_for(make_config)["max_steps"] == -1


def test_packing_and_drop_last(make_config):
    kwargs = kwargs_for(
        make_config,
        {"training": {"packing": True, "packingStrategy": "wrapped", "dataloaderDropLast": True}},
    )
    assert (kwargs["packing"], kwargs["packing_strategy"]) == (True, "wrapped")
    assert kwargs["dataloader_drop_last"] is True


def test_text_field_only_for_text_format(make_config, tiny):
    spec = {"dataset": {"path": str(tiny.data["text"]), "textField": "body"}}
    assert kwargs_for(make_config, spec, dataset_format="text")["dataset_text_field"] == "body"
    assert "dataset_text_field" not in kwargs_for(make_config, spec, dataset_format="messages")


def test_fsdp_leaves_activation_checkpointing_to_accelerate(make_config):
    kwargs = kwargs_for(
        make_config, {"distributed": "fsdp", "training": {"gradientCheckpointing": True}}
    )
    assert kwargs["activation_checkpointing"] is False


def test_extra_args_pass_through(make_config):
    kwargs = kwargs_for(make_config, {"training": {"extraArgs": {"assistant_only_loss": True}}})
    assert kwargs["assistant_only_loss"] is True


def test_unknown_extra_arg_names_the_closest_fields(make_config):
    with pytest.raises(ConfigError) as err:
        kwargs_for(make_config, {"training": {"extraArgs": {"asistant_only_loss": True}}})
    assert "'asistant_only_loss'" in str(err.value)
    assert "did you mean assistant_only_loss" in str(err.value)


def test_unknown_extra_arg_without_neighbour():
    with pytest.raises(ConfigError, match="no similar SFTConfig field"):
        check_extra_args({"zzzz": 1}, ["learning_rate", "seed"])


def test_real_sft_config_accepts_the_mapping(make_config, tiny):
    # Builds the real SFTConfig: catches renamed or removed transformers arguments.
    args = build_sft_config(load_config(make_config({"training": {"warmupRatio": 0.1}})))
    assert args.warmup_steps == pytest.approx(0.1)
    assert args.get_warmup_steps(50) == 5
    assert args.use_cpu is True
    assert args.max_length == 128
    assert Path(args.output_dir).name == "checkpoints"


def test_sft_config_rejecting_a_value_is_a_config_error(make_config):
    with pytest.raises(ConfigError, match="SFTConfig rejected"):
        build_sft_config(
            load_config(make_config({"training": {"extraArgs": {"optim": "no_such_optimizer"}}}))
        )


# ------------------------------------------------------------- TF32 through both torch APIs

PRECISION_SETTINGS = (
    "",  # torch.backends itself: the default every backend inherits
    "cuda.matmul",
    "cudnn",
    "cudnn.conv",
    "cudnn.rnn",
    "mkldnn",
    "mkldnn.matmul",
    "mkldnn.conv",
    "mkldnn.rnn",
)


def _backend(path):
    import torch

    backend = torch.backends
    for name in filter(None, path.split(".")):
        backend = getattr(backend, name)
    return backend


def precisions():
    """Every backend's fp32 precision as torch resolves it (the new API's view)."""
    return {path: _backend(path).fp32_precision for path in PRECISION_SETTINGS}


@pytest.fixture
def matmul_precision_restored():
    """Torch's precision settings are process-wide: put back what the test changed."""
    import torch

    before = precisions()
    legacy = torch.get_float32_matmul_precision()
    yield
    torch.set_float32_matmul_precision(legacy)
    for path in PRECISION_SETTINGS:  # the default first, then each backend set apart
        _backend(path).fp32_precision = before[path]
    assert precisions() == before


def test_tf32_asked_through_the_new_api_is_readable_through_the_old_one(
    matmul_precision_restored,
):
    import torch

    # What TrainingArguments does with bf16 and torch.compile on an Ampere+ GPU.
    torch.backends.fp32_precision = "tf32"
    asked = precisions()
    with pytest.raises(RuntimeError, match="mix of the legacy and new APIs"):
        torch.get_float32_matmul_precision()  # what inductor's GEMM autotuning reads

    assert agree_matmul_precision() == "high"
    assert torch.get_float32_matmul_precision() == "high"
    assert precisions() == asked  # every backend computes as transformers asked
    assert agree_matmul_precision() == "high"  # already agreeing: nothing written


def test_no_tf32_asked_leaves_the_precision_alone(matmul_precision_restored):
    import torch

    untouched = precisions()
    assert agree_matmul_precision() is None
    assert precisions() == untouched
    assert torch.get_float32_matmul_precision() == "highest"


@pytest.mark.parametrize("backend", ["cuda", "mkldnn"])
def test_a_backend_set_apart_is_not_overwritten(backend, matmul_precision_restored):
    import torch

    torch.backends.fp32_precision = "tf32"
    _backend(f"{backend}.matmul").fp32_precision = "ieee"  # a user's own choice for it
    chosen = precisions()
    assert agree_matmul_precision() is None  # "high" would turn its matmuls to TF32
    assert precisions() == chosen


def test_sft_config_leaves_the_precision_readable(make_config, tiny, matmul_precision_restored):
    import torch

    # On a CPU transformers asks for no TF32; ask as it does on a GPU, then build.
    torch.backends.fp32_precision = "tf32"
    build_sft_config(load_config(make_config()))
    assert torch.get_float32_matmul_precision() == "high"
