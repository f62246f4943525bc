"""MFU: the peak of a card by its name, none on CPU or an unknown card, the bench's formula."""

from __future__ import annotations

from typing import Any

import pytest
from sftjob_trainer.flops import (
    mfu_meter,
    model_flops_utilization,
    parameter_count,
    peak_flops,
)
from sftjob_trainer.progress import progress_report


@pytest.mark.parametrize(
    ("device", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),  # SXM, as torch.cuda.get_device_name names it
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H200 NVL", 835e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA GeForce RTX 4090", None),  # not in the table: no guess
        ("Tesla T4", None),
        ("cpu", None),
        (None, None),
        ("", None),
    ],
)
def test_peak_by_device_name(device: str | None, peak: float | None) -> None:
    assert peak_flops(device) == peak


def test_mfu_is_six_flops_per_parameter_and_token_over_every_gpus_peak() -> None:
    # 1.5B parameters at 50k tokens/s on one H100: 4.5e14 / 9.89e14.
    one = model_flops_utilization(1_500_000_000, 50_000.0, 989e12)
    assert one == pytest.approx(0.455, abs=1e-3)
    # Twice the tokens over two GPUs: the tokens/s counts every rank's tokens.
    assert model_flops_utilization(1_500_000_000, 100_000.0, 989e12, gpus=2) == one


@pytest.mark.parametrize(
    ("parameters", "tokens_per_second", "peak", "gpus"),
    [(10, 5.0, None, 1), (10, None, 989e12, 1), (10, 0.0, 989e12, 1), (0, 5.0, 989e12, 1)],
)
def test_no_mfu_without_every_figure(
    parameters: int, tokens_per_second: float | None, peak: float | None, gpus: int
) -> None:
    assert model_flops_utilization(parameters, tokens_per_second, peak, gpus) is None


def tiny_model() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=128,
    )
    return Qwen2ForCausalLM(config)


def test_parameter_count_of_a_plain_and_an_adapter_model() -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    model = tiny_model()
    plain = sum(p.numel() for p in model.parameters())
    assert parameter_count(model) == plain
    lora = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    adapters = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    # Frozen base weights count too (flops.py says why): all of them plus the adapters.
    assert adapters > 0 and parameter_count(lora) == plain + adapters
    assert parameter_count(torch.nn.Linear(3, 2)) == 8  # no transformers/peft counter


def test_the_report_carries_mfu_only_where_known() -> None:
    figures = {"step": 3, "total_steps": 10, "epoch": 0.3, "metrics": {"loss": 1.0}}
    gpu = progress_report(**figures, steps_per_second=1.0, tokens_per_second=5e4, mfu=0.41)
    cpu = progress_report(**figures, steps_per_second=1.0, tokens_per_second=900.0)
    assert gpu["mfu"] == 0.41 and cpu["mfu"] is None


def test_the_meter_of_a_model_on_known_cards_and_none_on_a_cpu() -> None:
    model = tiny_model()
    parameters = parameter_count(model)
    meter = mfu_meter(model, "NVIDIA H100 80GB HBM3", gpus=2)
    assert meter is not None
    # 2 H100s: the figure the bench would quote for the same parameters and tokens/s.
    tokens_per_second = 1e12 / parameters
    assert meter(tokens_per_second) == round(6e12 / (2 * 989e12), 4)
    assert meter(None) is None  # no throughput measured yet
    assert mfu_meter(model, None, gpus=1) is None  # CPU
    assert mfu_meter(model, "NVIDIA GeForce RTX 4090", gpus=1) is None  # peak not known
