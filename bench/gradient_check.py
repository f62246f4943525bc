"""Weight gradients of the fused layers and of plain autocast, each against float64 (GPU).

fuseGradientAccumulation keeps each linear layer's weight-gradient product in fp32 and
adds it into `.grad` inside the matmul, where autocast rounds the product to bf16 first
and adds it in a separate kernel. Both are judged here against the same gradients in
float64: a small Qwen2 (2 layers of 256) whose weights are first rounded to bf16, so all
three compute with the same weights, runs 4 micro-steps of 2 x 128 random tokens. Prints
JSON: for a few parameters, the largest error relative to the float64 gradient's largest
entry, for autocast, the fused layers, and the fused layers under torch.compile (inductor);
and whether matmul_adds_in_fp32 passed on this device. Session 7's output is in
docs/bench-results/2026-11-28-h200-session7/call2-g1-gradient-check.txt.

    python3 bench/gradient_check.py [--device cuda|cpu] [--no-compile]

On CPU there is no fp32-output matmul: the fused layers multiply in bf16 and add, which is
autocast's arithmetic, so their errors equal autocast's (the CPU test checks that).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer_image"))

import torch  # noqa: E402
from sftjob_bench.bench import TINY  # noqa: E402
from sftjob_trainer.levers.weight_copies import (  # noqa: E402
    LinearAccumulatingInMatmul,
    WeightCopies,
    matmul_adds_in_fp32,
)

PARAMETERS = (
    "model.layers.0.self_attn.q_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "model.layers.0.self_attn.q_proj.bias",
)
MICRO_STEPS = 4


def small_model(device: torch.device) -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    shape = {"vocab_size": 256, "hidden_size": 256, "intermediate_size": 768}
    heads = {"num_attention_heads": 4, "num_key_value_heads": 2}
    return Qwen2ForCausalLM(Qwen2Config(**{**TINY, **shape, **heads})).float().to(device)


def gradients(model: Any, batches: list[torch.Tensor], autocast: bool) -> dict[str, Any]:
    """The summed gradients of MICRO_STEPS micro-steps, as float64, by parameter name."""
    for ids in batches:
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = model(input_ids=ids, labels=ids).loss / len(batches)
        loss.backward()
    return {
        name.removeprefix("_orig_mod."): p.grad.double().clone()
        for name, p in model.named_parameters()
        if p.grad is not None
    }


def fused_gradients(
    base: Any, batches: list[torch.Tensor], fp32_products: bool, compiled: bool
) -> dict[str, Any]:
    model = copy.deepcopy(base)
    copies = WeightCopies(model, accumulate_in_matmul=True)
    for module in copies.modules:
        if isinstance(module, LinearAccumulatingInMatmul):
            module.fp32_products = fp32_products
    copies.hand_over_grad_sums()  # as at train begin
    return gradients(torch.compile(model) if compiled else model, batches, autocast=True)


def check(device: torch.device, compiled: bool) -> dict[str, Any]:
    base = small_model(device)
    generator = torch.Generator(device=device).manual_seed(1)
    batches = [
        torch.randint(0, 256, (2, 128), generator=generator, device=device)
        for _ in range(MICRO_STEPS)
    ]
    exact = copy.deepcopy(base)
    with torch.no_grad():  # the same bf16-rounded weights the others compute with
        for parameter in exact.parameters():
            parameter.copy_(parameter.to(torch.bfloat16).float())
    reference = gradients(exact.double(), batches, autocast=False)
    why_not = matmul_adds_in_fp32(device)
    runs = {
        "autocast": gradients(copy.deepcopy(base), batches, autocast=True),
        "fused": fused_gradients(base, batches, why_not is None, compiled=False),
    }
    if compiled:
        runs["fused_compiled"] = fused_gradients(base, batches, why_not is None, compiled=True)
    errors: dict[str, Any] = {}
    for name in PARAMETERS:
        scale = reference[name].abs().max().item()
        errors[name] = {
            run: (grads[name] - reference[name]).abs().max().item() / scale
            for run, grads in runs.items()
        }
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "matmul_adds_in_fp32": why_not or "passed",
        "same_parameters_have_gradients": all(
            sorted(grads) == sorted(runs["autocast"]) for grads in runs.values()
        ),
        "relative_error_against_float64": errors,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-compile", action="store_true", help="skip the inductor run")
    args = parser.parse_args(argv)
    result = check(torch.device(args.device), compiled=not args.no_compile)
    print(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
