"""How much faster fp8 matmuls run a decoder layer's linear layers than bf16 (issue 24).

The steady state's matmuls are 72% of our kernel time (session 19's profile) at about two
thirds of the card's bf16 peak; fp8 (`torch._scaled_mm`, e4m3 with one scale per tensor)
doubles the tensor cores' peak on Hopper. This times, for each linear shape of the bench's
Qwen2.5-1.5B layer at the micro-batch our plan runs (4 x 2048 tokens), one forward and
backward (input gradient and weight gradient) both ways, each compiled, the casts to fp8
and their scales included, and prints one JSON line per shape and a weighted total.

    python3 bench/fp8_matmul_probe.py [--tokens 8192] [--frozen]

`--frozen` leaves out the weight gradient (LoRA's frozen base layers). The roundings are
the fp8Matmuls lever's (`fp8_linear.rounded_to_fp8`; trainer_image/ on PYTHONPATH), but
the weight is rounded at every call here, where the lever rounds it once per step.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from sftjob_trainer.levers.fp8_linear import E4M3, E5M2, rounded_to_fp8

# (in, out, count per layer) of Qwen2.5-1.5B's decoder layer.
SHAPES = {
    "q_proj": (1536, 1536, 1),
    "kv_proj": (1536, 256, 2),
    "o_proj": (1536, 1536, 1),
    "gate_up_proj": (1536, 8960, 2),
    "down_proj": (8960, 1536, 1),
}


class Fp8Matmul(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, frozen):  # type: ignore[override]
        x2 = x.reshape(-1, x.shape[-1])
        xq, xs = rounded_to_fp8(x2, E4M3)
        wq, ws = rounded_to_fp8(w, E4M3)
        out = torch._scaled_mm(xq, wq.t(), xs, ws, out_dtype=torch.bfloat16, use_fast_accum=True)
        # The weight gradient reads x column-major: keep its fp8 transpose, not x.
        ctx.save_for_backward(xq.t().contiguous() if not frozen else xq, xs, wq, ws)
        ctx.frozen = frozen
        ctx.shape = x.shape
        return out.reshape(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        xq_t, xs, wq, ws = ctx.saved_tensors
        g2 = grad_out.reshape(-1, grad_out.shape[-1])
        gq, gs = rounded_to_fp8(g2, E5M2)
        # grad_input = g @ w: w must be column-major (N, K), i.e. its transpose contiguous.
        w_col = wq.t().contiguous().t()
        grad_in = torch._scaled_mm(gq, w_col, gs, ws, out_dtype=torch.bfloat16)
        grad_w = None
        if not ctx.frozen:
            grad_w = torch._scaled_mm(
                gq.t().contiguous(), xq_t.t(), gs, xs, out_dtype=torch.float32
            )
        return grad_in.reshape(ctx.shape), grad_w, None


def bf16_linear(x, w, frozen):
    return x @ w.t()


def fp8_linear(x, w, frozen):
    return Fp8Matmul.apply(x, w, frozen)


def time_it(fn, x, w, reps: int = 20) -> float:
    grad = torch.randn(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    for _ in range(3):
        fn(x, w).backward(grad)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn(x, w).backward(grad)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--frozen", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    totals = {"bf16": 0.0, "fp8": 0.0}
    for name, (k, n, count) in SHAPES.items():
        x = torch.randn(args.tokens, k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        w.requires_grad_(not args.frozen)
        row = {"shape": name, "in": k, "out": n, "tokens": args.tokens, "frozen": args.frozen}
        for label, fn in (("bf16", bf16_linear), ("fp8", fp8_linear)):
            compiled = torch.compile(lambda a, b, fn=fn: fn(a, b, args.frozen))
            seconds = time_it(compiled, x, w)
            row[f"{label}_ms"] = round(seconds * 1e3, 3)
            totals[label] += seconds * count
        # How far the fp8 product strays from bf16's, relative.
        with torch.no_grad():
            ref = bf16_linear(x, w, True).float()
            got = Fp8Matmul.apply(x, w, True).float()
            row["rel_err"] = round(((got - ref).norm() / ref.norm()).item(), 5)
        row["speedup"] = round(row["bf16_ms"] / row["fp8_ms"], 3)
        print(json.dumps(row), flush=True)
    print(
        json.dumps(
            {
                "layer_bf16_ms": round(totals["bf16"] * 1e3, 3),
                "layer_fp8_ms": round(totals["fp8"] * 1e3, 3),
                "layer_speedup": round(totals["bf16"] / totals["fp8"], 3),
                "device": torch.cuda.get_device_name(0),
                "torch": torch.__version__,
            }
        ),
        flush=True,
    )


if __name__ == "__main__":
    main()
