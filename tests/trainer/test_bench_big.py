"""The larger-model bench cases (sftjob_bench.big): their CPU smokes through the real code paths.

On CPU accelerate runs an FSDP config as DDP over gloo, and QLoRA cannot run (bitsandbytes'
4-bit kernels need CUDA): the QLoRA case is checked up to where it needs the GPU.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from sftjob_bench.bench_report import report
from sftjob_bench.big import (
    BIG_CASES,
    LLAMA3_8B,
    LLAMA3_8B_PARAMS,
    TINY_LLAMA,
    GpuMemoryPoller,
    case_shape,
    check_pair,
    descendants,
    job_manifest,
    parameter_count,
    reference_fsdp_yaml,
    reference_sft_kwargs,
    side_gpus,
    side_line,
    wait_all,
)
from sftjob_bench.big_cases import wants
from sftjob_operator.api import parse_sftjob
from sftjob_trainer.model import QLORA_QUANTIZATION


def run_bench(case: str, work: Path) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-m", "sftjob_bench.bench", "--case", case, "--workdir", str(work)],
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert all(isinstance(line, dict) for line in lines), result.stdout  # JSON lines only
    return lines


def test_the_8b_shape_is_llama_3_8b_and_the_count_matches_a_built_model():
    import torch
    from sftjob_bench.bench import QWEN25_15B
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    assert parameter_count(LLAMA3_8B) == LLAMA3_8B_PARAMS  # the model card's 8.03 B
    with torch.device("meta"):  # no memory: the shapes alone
        llama = LlamaForCausalLM(LlamaConfig(**LLAMA3_8B))
        qwen = Qwen2ForCausalLM(Qwen2Config(**QWEN25_15B))
    assert sum(p.numel() for p in llama.parameters()) == LLAMA3_8B_PARAMS
    assert llama.lm_head.weight is not llama.model.embed_tokens.weight  # untied
    assert llama.config.num_key_value_heads == 8 and llama.config.vocab_size == 128256
    shape = case_shape(BIG_CASES["lora-2gpu"])
    assert parameter_count(shape) == sum(p.numel() for p in qwen.parameters()) == 1_543_714_304


def test_the_reference_fsdp_config_is_fsdp2_full_shard_with_checkpointing():
    theirs = yaml.safe_load(reference_fsdp_yaml())
    assert theirs["distributed_type"] == "FSDP" and theirs["mixed_precision"] == "no"
    fsdp = theirs["fsdp_config"]
    assert fsdp["fsdp_version"] == 2 and fsdp["fsdp_reshard_after_forward"] is True  # full shard
    assert fsdp["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"
    assert fsdp["fsdp_activation_checkpointing"] is True and not fsdp["fsdp_offload_params"]
    # Checkpointing is FSDP's there; the Trainer's own is off (transformers refuses both).
    kwargs = reference_sft_kwargs(
        BIG_CASES["llama8b-fsdp"], Path("/w"), 12, {"activation_checkpointing"}
    )
    assert kwargs["activation_checkpointing"] is False and kwargs["bf16"] is True
    # Each rank loads its own whole copy on the CPU for FSDP to shard (TRL's "auto" would not).
    assert kwargs["model_init_kwargs"] == {"dtype": "float32", "device_map": None}
    job = parse_sftjob(job_manifest(BIG_CASES["llama8b-fsdp"], Path("/w"), 12))
    assert job.spec.distributed == "fsdp" and job.spec.resources.gpusPerNode == 4
    assert job.spec.training.gradientCheckpointing  # the launcher writes it into FSDP's config


def test_side_line_times_the_steps_after_the_untimed_ones(tmp_path):
    log = tmp_path / "steps.jsonl"
    records = [{"event": "train_begin", "time": 100.0}] + [
        {
            "step": s,
            "time": 100.0 + 10 * s + (30 if s else 0),
            "loss": 5.0 - s,
            "num_tokens": 1000 * s,
        }
        for s in range(1, 6)
    ]
    log.write_text("\n".join(json.dumps(r) for r in records))
    line = side_line(
        "sftjob",
        BIG_CASES["llama8b-qlora"],
        spawned_at=90.0,
        ended_at=200.0,
        step_log=log,
        skip=2,
        params=8_000_000_000,
        device="NVIDIA H100 80GB HBM3",
    )
    # Steps 3-5 after step 2's end: 3000 tokens in 30 s.
    assert line["tokens_per_s"] == 100.0
    assert line["untimed_s"] == 50.0  # step 2 ended at 150, training began at 100
    assert line["wall_s"] == 110.0 and line["tokens_total"] == 5000
    assert line["tokens_per_s_e2e"] == round(5000 / 110, 1)
    assert line["losses"] == [4.0, 3.0, 2.0, 1.0, 0.0]
    assert line["phases"] == {
        "before_training_s": 10.0,
        "first_step_s": 40.0,
        "training_s": 40.0,
        "save_and_exit_s": 20.0,
    }
    assert line["mfu"] == round(6 * 8e9 * 100 / 989e12, 4)


def test_check_pair_fails_on_a_loss_apart_by_more_than_1pct_or_a_short_speedup():
    reference = {"case": "llama8b-qlora", "losses": [10.0, 9.0], "tokens_per_s": 1000.0}
    reference["tokens_total"] = 32768
    good = {"losses": [10.05, 9.08], "tokens_per_s": 2100.0, "wall_s": 50.0}
    good["tokens_total"] = 32768
    reference["wall_s"] = 100.0
    verdict = check_pair(reference, good)
    assert verdict["passed"] and verdict["speedup"] == 2.1 and verdict["speedup_e2e"] == 2.0
    apart = check_pair(reference, {**good, "losses": [10.0, 9.2]})  # 2.2% at step 2
    assert not apart["passed"] and not apart["checks"]["losses_within_1pct"]
    slow = check_pair(reference, {**good, "tokens_per_s": 1900.0})
    assert not slow["passed"] and slow["checks"]["speedup_goal"] is False
    short = check_pair(reference, {**good, "losses": [10.0]})  # a side stopped early
    assert not short["passed"]
    other_data = check_pair(reference, {**good, "tokens_total": 30000})
    assert not other_data["passed"] and other_data["checks"]["same_tokens"] is False


def test_nvidia_smi_readings_keep_the_highest_per_gpu():
    poller = GpuMemoryPoller()
    poller.record("0, NVIDIA H100 80GB HBM3, 1024\n1, NVIDIA H100 80GB HBM3, 40960\n")
    poller.record("0, NVIDIA H100 80GB HBM3, 61440\n1, NVIDIA H100 80GB HBM3, 2048\n")
    assert poller.peak == {"0": 60.0, "1": 40.0}
    assert poller.names == {"NVIDIA H100 80GB HBM3"}
    # Only the side's GPUs: another run on GPU 2 of the same machine is not this side's.
    watching = GpuMemoryPoller(gpus=side_gpus(2, {"CUDA_VISIBLE_DEVICES": "1,2"}))
    watching.record("0, H100, 70000\n1, H100, 1024\n2, H100, 2048\n3, H100, 9000\n")
    assert watching.peak == {"1": 1.0, "2": 2.0}
    assert (
        side_gpus(2, {}) == ["0", "1"] and side_gpus(1, {"CUDA_VISIBLE_DEVICES": "GPU-ab"}) is None
    )


def test_the_bench_hands_these_cases_to_big():
    assert wants(["--case", "llama8b-fsdp", "--steps", "12"])
    assert wants(["--case=lora-2gpu"])
    assert not wants(["--case", "full"]) and not wants([])


def test_fsdp_smoke_both_sides_train_the_same_and_save(tmp_path):
    lines = run_bench("llama-fsdp-cpu-smoke", tmp_path)
    inputs, reference, sftjob, verdict = lines
    assert inputs["inputs"]["params"] == 336_192
    for side in (reference, sftjob):
        assert all(code == 0 for code in side["exit_codes"])
        assert len(side["losses"]) == 4 and side["tokens_total"] > 0
        assert side["tokens_per_s"] > 0 and side["settings"]["timed_steps"] == 3
        assert side["wall_s"] >= sum(side["phases"].values()) - 0.05
        # On CPU accelerate turns an FSDP config into DDP over gloo (it says so).
        assert side["settings"]["distributed_type"] == "MULTI_CPU"
    assert (tmp_path / "reference" / "final" / "model.safetensors").is_file()
    assert (tmp_path / "sftjob" / "final" / "model.safetensors").is_file()
    assert sftjob["settings"]["outcome"]["reason"] == "Completed"
    assert reference["tokens_total"] == sftjob["tokens_total"]
    assert reference["losses"] == sftjob["losses"]  # CPU: no lever changes a number
    assert verdict["check"] == "big_pair" and verdict["passed"]
    assert verdict["max_rel_loss_diff"] == 0.0
    # bench_report reads these lines like the other cases' (its tables and loss check).
    text = report(lines, title="fsdp")
    assert "| sftjob | per_device 2, accum 2" in text and "| 4 | 7." in text


def test_lora_two_process_smoke_both_sides_train_adapters(tmp_path):
    lines = run_bench("lora-2proc-cpu-smoke", tmp_path)
    _, reference, sftjob, verdict = lines
    assert reference["settings"]["processes"] == 2  # the reference's accelerate ran two
    assert len(sftjob["exit_codes"]) == 2  # two pods of the real entrypoint
    for side in ("reference", "sftjob"):
        assert (tmp_path / side / "final" / "adapter_model.safetensors").is_file()
    assert len(reference["losses"]) == len(sftjob["losses"]) == 4
    assert verdict["passed"] and verdict["max_rel_loss_diff"] <= 1e-6


def test_qlora_smoke_goes_as_far_as_a_cpu_can(tmp_path):
    """Both sides' commands and settings; the real entrypoint stops where CUDA is needed."""
    (line,) = run_bench("llama-qlora-cpu-smoke", tmp_path)
    reference = line["reference"]
    assert reference["quantization"] == QLORA_QUANTIZATION  # the product's 4-bit settings
    assert reference["sft_config"]["bf16"] and not reference["sft_config"]["use_cpu"]
    spec = line["sftjob"]["manifest"]["spec"]
    assert spec["method"] == "qlora" and spec["lora"]["r"] == 16
    assert line["inputs"]["params"] == parameter_count(TINY_LLAMA) == 336_192
    assert (tmp_path / "model" / "config.json").is_file()  # the inputs were built
    command, *_ = line["sftjob"]["commands"]
    env = {**os.environ, "SFTJOB_TERMINATION_LOG": str(tmp_path / "t.json")}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    outcome = json.loads((tmp_path / "t.json").read_text())
    assert done.returncode != 0
    assert outcome["reason"] == "ConfigError", outcome
    assert "needs a CUDA GPU" in outcome["message"]


@pytest.mark.parametrize("name", ["llama8b-fsdp", "llama8b-qlora", "lora-2gpu"])
def test_the_gpu_cases_dry_run_prints_both_sides_commands(tmp_path, name):
    result = subprocess.run(
        [sys.executable, "-m", "sftjob_bench.bench", "--case", name, "--dry-run"]
        + ["--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    line = json.loads(result.stdout)
    case = BIG_CASES[name]
    command = line["reference"]["command"]
    if case.processes > 1:
        assert command[command.index("--num_processes") + 1] == str(case.processes)
        assert ("--config_file" in command) == (case.distributed == "fsdp")
    spec = parse_sftjob(line["sftjob"]["manifest"]).spec
    assert spec.resources.gpusPerNode == case.processes and spec.method == case.method
    assert line["params"] == parameter_count(case_shape(case))
    assert not (tmp_path / "model").exists()  # a dry run builds nothing


def running(pid: int) -> bool:
    """Alive and not a zombie (here nobody may reap an orphan, so a dead one can linger)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_a_side_past_its_timeout_is_killed_with_its_children(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    # A launcher-like parent whose child runs in a session of its own (as torchrun starts
    # its workers): killing the parent's process group would leave it running.
    script = f"setsid sleep 60 & echo $! > {pid_file}; wait"
    processes = [subprocess.Popen(["bash", "-c", script], start_new_session=True)]
    started = time.time()
    assert wait_all(processes, deadline=started + 1.0)
    assert time.time() - started < 10
    assert processes[0].returncode == -signal.SIGKILL
    grandchild = int(pid_file.read_text())
    time.sleep(0.2)
    assert not running(grandchild)
    quick = [subprocess.Popen(["true"], start_new_session=True)]
    assert not wait_all(quick, deadline=time.time() + 30) and quick[0].returncode == 0


def test_descendants_walks_the_whole_tree():
    parents = {10: 1, 11: 10, 12: 11, 13: 11, 20: 1, 21: 20}
    assert sorted(descendants(10, parents)) == [11, 12, 13]
    assert descendants(13, parents) == []
