"""What the reference job spends outside its training steps, part by part (GPU machine).

Prints one JSON line per probe:
- `imports`: seconds of a fresh interpreter importing each library the trainer starts with
  (torch; transformers; TRL's SFTTrainer; the trainer's train module; liger's kernels), and
  `-X importtime`'s largest cumulative imports for the trainer's whole set;
- `cuda_init`: seconds to the first tensor on the GPU in a fresh process;
- `save`: seconds to save the Qwen2.5-1.5B shape in fp32 (6.2 GB, on the GPU) with
  transformers' save_pretrained as it is, and with its safetensors writes spread over
  threads (sftjob_trainer/levers/weights_writer.py), and whether the files are the same.

    python3 bench/startup_probe.py [--save-dir /tmp/probe-save] [--threads 4 8 16]
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "trainer_image"), str(ROOT / "operator")]

IMPORTS = {
    "torch": "import torch",
    "transformers": "import torch, transformers",
    "trl_sft_trainer": "import torch, trl.trainer.sft_trainer",
    "sftjob_train": "import torch, trl.trainer.sft_trainer; from sftjob_trainer import train",
    "liger": "import liger_kernel.transformers",
}


def fresh_seconds(code: str) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=False, capture_output=True)
    return round(time.perf_counter() - start, 2)


def import_profile(code: str, top: int = 25) -> list[tuple[str, float]]:
    """The `top` imports by cumulative seconds, at any depth (a nested one counts inside
    the import that pulled it in too)."""
    done = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True
    )
    rows = []
    for line in done.stderr.splitlines():
        if not line.startswith("import time:") or "cumulative" in line:
            continue
        _, _, rest = line.partition(":")
        _self_us, cumulative_us, name = (part.strip() for part in rest.split("|"))
        rows.append((name, round(int(cumulative_us) / 1e6, 2)))
    return sorted(rows, key=lambda row: -row[1])[:top]


def probe_imports() -> None:
    seconds = {name: fresh_seconds(code) for name, code in IMPORTS.items()}
    seconds["python"] = fresh_seconds("pass")
    profile = import_profile(IMPORTS["sftjob_train"])
    print(json.dumps({"probe": "imports", "seconds": seconds, "largest": profile}), flush=True)
    code = (
        "import time; t = time.perf_counter(); import torch; a = time.perf_counter();"
        " torch.empty(1, device='cuda'); torch.cuda.synchronize();"
        " print(round(a - t, 2), round(time.perf_counter() - a, 2))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout
    print(json.dumps({"probe": "cuda_init", "import_torch_and_first_tensor_s": out.split()}))


def probe_save(folder: Path, threads: list[int], device: str) -> None:
    import torch
    import transformers.modeling_utils as modeling_utils
    from sftjob_bench.common import QWEN25_15B, TINY
    from sftjob_trainer.levers.weights_writer import write_safetensors
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", **(QWEN25_15B if device == "cuda" else TINY))
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    size = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    results: dict[str, float] = {}
    plain = modeling_utils.safe_save_file
    shutil.rmtree(folder, ignore_errors=True)
    for run in ["plain", *[f"threads_{n}" for n in threads], "plain_again"]:
        if run.startswith("threads_"):

            def threaded(tensors, filename, metadata=None, _n=int(run[8:])):  # type: ignore[no-untyped-def]
                write_safetensors(tensors, filename, metadata, threads=_n)

            modeling_utils.safe_save_file = threaded
        start = time.perf_counter()
        model.save_pretrained(folder / run)
        results[run] = round(time.perf_counter() - start, 2)
        modeling_utils.safe_save_file = plain
    same = {
        run.name: filecmp.cmp(
            folder / "plain" / "model.safetensors", run / "model.safetensors", shallow=False
        )
        for run in folder.iterdir()
        if run.name != "plain"
    }
    shutil.rmtree(folder, ignore_errors=True)
    print(json.dumps({"probe": "save", "bytes": size, "seconds": results, "same_file": same}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--save-dir", type=Path, default=Path("/tmp/probe-save"))
    parser.add_argument("--threads", type=int, nargs="*", default=[4, 8, 16])
    parser.add_argument("--device", default="cuda", help="cpu: the tiny shape, to try the probe")
    parser.add_argument("--skip", nargs="*", default=[], choices=["imports", "save"])
    options = parser.parse_args()
    if "imports" not in options.skip:
        probe_imports()
    if "save" not in options.skip:
        probe_save(options.save_dir, options.threads, options.device)


if __name__ == "__main__":
    main()
