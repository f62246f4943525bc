"""Time packed-document causal attention, forward and backward, by several kernels (GPU).

Micro-batches of the full case's shape (4 rows of 2048 packed tokens, the 1.5B shape's 12
query and 2 key/value heads of 128) through the kernels below. The documents are the
bench's (log-normal around 500 tokens), packed best-fit-decreasing, and the first rows
are timed without shuffling: they hold the longest documents (7 to 12 real documents per
micro-batch, one of 2048 tokens), a heavier attention load than training's average.
Kernels:
- flex_attention with the document block mask, as the model runs it (compiled), with the
  default kernel options and a few block shapes;
- torch's varlen_attn (FlashAttention 2 kernels built into PyTorch), over cu_seqlens.
Prints one line per variant: milliseconds for forward + backward (mean of back-to-back
runs, best of three rounds, averaged over the batches), TFLOP/s on the causal in-document
work, and the largest relative difference of output and gradients from the first variant.
Session 5's figures are in docs/performance.md.

    python3 bench/attention_variants.py [--iters 30]
"""

from __future__ import annotations

import argparse
import inspect
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer_image"))

import torch  # noqa: E402
from sftjob_bench.bench import CASES, synthetic_rows  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 12, 2, 128
ROWS, WIDTH = 4, 2048


def packed_batches(count: int) -> list[list[int]]:
    """Document lengths of `count` micro-batches, packed best-fit-decreasing into rows."""
    case = CASES["full"]
    lengths = [len(row) for row in synthetic_rows(case, count * ROWS * 8)]
    rows: list[list[int]] = []
    for length in sorted(lengths, reverse=True):
        best = None
        for row in rows:
            room = WIDTH - sum(row)
            if room >= length and (best is None or room < WIDTH - sum(best)):
                best = row
        if best is None:
            rows.append([length])
        else:
            best.append(length)
    batches = []
    for start in range(0, ROWS * count, ROWS):
        docs = [doc for row in rows[start : start + ROWS] for doc in row]
        pad = ROWS * WIDTH - sum(docs)
        batches.append(docs + [1] * pad)  # padding tokens: one-token documents, as in training
    return batches


def causal_flops(docs: list[int]) -> float:
    """Forward FLOPs of causal attention inside each document (two matmuls, half the square)."""
    return sum(4 * HEADS * HEAD_DIM * n * (n + 1) / 2 for n in docs)


def time_ms(fn, iters: int) -> float:
    """Mean over `iters` back-to-back runs (the host queues ahead, as in training), best of 3."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) / iters)
    return best


def measure_batch(docs: list[int], flex, iters: int) -> dict[str, dict]:
    """Each variant's time, rate and largest relative difference from the first, on one batch."""
    from torch.nn.attention.flex_attention import create_block_mask

    device = torch.device("cuda")
    tokens = ROWS * WIDTH
    doc_ids = torch.repeat_interleave(
        torch.arange(len(docs), device=device), torch.tensor(docs, device=device)
    )
    cu = torch.tensor([0, *torch.tensor(docs).cumsum(0).tolist()], dtype=torch.int32, device=device)

    def same_doc_causal(b, h, q, kv):
        return (doc_ids[q] == doc_ids[kv]) & (q >= kv)

    def rand(heads: int, grad: bool = True) -> torch.Tensor:
        shape = (1, heads, tokens, HEAD_DIM)
        return torch.randn(shape, device=device, dtype=torch.bfloat16, requires_grad=grad)

    q, k, v = rand(HEADS), rand(KV_HEADS), rand(KV_HEADS)
    grad_out = rand(HEADS, grad=False)
    masks: dict[int, object] = {}

    def run_flex(block: int = 128, options: dict | None = None):
        if block not in masks:
            masks[block] = create_block_mask(
                same_doc_causal, 1, None, tokens, tokens, device=device, BLOCK_SIZE=block
            )

        def step():
            out = flex(q, k, v, block_mask=masks[block], enable_gqa=True, kernel_options=options)
            out.backward(grad_out)
            return out

        return step

    def run_varlen():
        from torch.nn.attention.varlen import varlen_attn

        params = inspect.signature(varlen_attn).parameters
        takes_gqa = "enable_gqa" in params
        if "is_causal" in params:
            causal: dict = {"is_causal": True}
        elif "window_size" in params:
            causal = {"window_size": (-1, 0)}
        else:
            raise TypeError(f"no causal switch in varlen_attn{inspect.signature(varlen_attn)}")

        def step():
            qt = q[0].transpose(0, 1)  # [tokens, heads, dim]
            kt, vt = k[0].transpose(0, 1), v[0].transpose(0, 1)
            if not takes_gqa:  # torch 2.11: no GQA, so the key/value heads are repeated
                kt = kt.repeat_interleave(HEADS // KV_HEADS, dim=1)
                vt = vt.repeat_interleave(HEADS // KV_HEADS, dim=1)
            extra = {"enable_gqa": True} if takes_gqa else {}
            out = varlen_attn(qt, kt, vt, cu, cu, max(docs), max(docs), **causal, **extra)
            out = out.transpose(0, 1).unsqueeze(0)
            out.backward(grad_out)
            return out

        return step

    candidates = {
        "flex default": run_flex,
        "flex M64 N64": lambda: run_flex(options={"BLOCK_M": 64, "BLOCK_N": 64}),
        "flex M128 N64": lambda: run_flex(options={"BLOCK_M": 128, "BLOCK_N": 64}),
        "flex M128 N128 w8 s3": lambda: run_flex(
            options={"BLOCK_M": 128, "BLOCK_N": 128, "num_warps": 8, "num_stages": 3}
        ),
        "varlen (FA2)": run_varlen,
    }
    found: dict[str, dict] = {}
    reference = None
    for name, make in candidates.items():
        try:
            step = make()
            for tensor in (q, k, v):
                tensor.grad = None
            out = step()
            outs = [t.float() for t in (out.detach(), q.grad, k.grad, v.grad)]
            if reference is None:
                reference, diff = outs, 0.0
            else:
                diff = max(
                    ((a - b).abs().max() / b.abs().max()).item()
                    for a, b in zip(outs, reference, strict=True)
                )
            ms = time_ms(step, iters)
            flops = causal_flops(docs) * 3.5  # forward 1, backward 2.5 (recomputes scores)
            found[name] = {"ms": ms, "tflops": flops / ms / 1e9, "diff": diff}
        except Exception as exc:  # noqa: BLE001 - report and go on to the next variant
            found[name] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
    return found


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--iters", type=int, default=30)
    parser.add_argument("--batches", type=int, default=4)
    args = parser.parse_args()
    from torch.nn.attention.flex_attention import flex_attention

    torch.manual_seed(0)
    flex = torch.compile(flex_attention, dynamic=False)
    batches = packed_batches(args.batches)
    variants: dict[str, list[dict]] = {}
    for docs in batches:
        for name, entry in measure_batch(docs, flex, args.iters).items():
            variants.setdefault(name, []).append(entry)
    shapes = [{"docs": len(docs), "max_doc": max(docs)} for docs in batches]
    print(
        json.dumps(
            {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "batches": shapes}
        )
    )
    for name, entries in variants.items():
        errors = [e["error"] for e in entries if "error" in e]
        if errors:
            print(f"{name:24s} ERROR {errors[0]}")
            continue
        ms = sum(e["ms"] for e in entries) / len(entries)
        tflops = sum(e["tflops"] for e in entries) / len(entries)
        diff = max(e["diff"] for e in entries)
        print(f"{name:24s} {ms:8.3f} ms fwd+bwd  {tflops:6.1f} TFLOP/s  max rel diff {diff:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
