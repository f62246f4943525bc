"""A compile cache that outlives the pod: torch's portable cache artifacts, kept by shape.

torch.compile spends minutes on the first step of a 1.5B model (docs/performance.md);
inductor's on-disk cache (compile_model.keep_compiled_kernels) keeps the kernels for a
resume in the same output folder, but a NEW job starts cold. torch can serialize what it
compiled (inductor's graphs and kernels, AOTAutograd's graphs, autotuning results) as one
blob, `torch.compiler.save_cache_artifacts()`, and put it back into its caches in
another process, `torch.compiler.load_cache_artifacts(blob)` (torch >= 2.7; used here
with 2.11 on the GPU and 2.13 on CPU). This module:

- names the blob by what decides the kernels (`cache_key`): the model's config, the
  device, the library versions, the micro-batch and length (one static shape), bf16,
  checkpointing, the attention, the world size and every lever on or off; a job of
  another shape never loads another's kernels;
- looks for it, before the first compile, in the output folder's `.sftjob-cache/` and on
  the profile's shared model-cache volume ($HF_HOME, when a profile mounts one there;
  the scratch default /tmp/hf-home is skipped, it dies with the pod);
- saves it after the first optimizer step (every graph of a static-shape run is compiled
  by then) and again at the end of training if more was compiled, atomically;
- never fails a run: an unreadable or corrupt blob is a warning and a cold start.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("sftjob_trainer.speed")

# Everything the trainer caches for a later job of the same shape, in the output folder.
OUTPUT_CACHE_ROOT = ".sftjob-cache"
OUTPUT_CACHE = f"{OUTPUT_CACHE_ROOT}/compile-artifacts"
SHARED_CACHE = "sftjob-compile-cache"
# children.py's HF_HOME when no profile mounts a model cache: scratch, gone with the pod.
SCRATCH_HF_HOME = "/tmp/hf-home"
SUFFIX = ".torch-artifacts"


def cache_dirs(output_dir: str | Path, env: Mapping[str, str] | None = None) -> list[Path]:
    """Where the artifacts are looked for and kept: the output folder, then a shared cache."""
    env = os.environ if env is None else env
    dirs = [Path(output_dir) / OUTPUT_CACHE]
    hf_home = env.get("HF_HOME", "")
    if hf_home and os.path.normpath(hf_home) != SCRATCH_HF_HOME:
        dirs.append(Path(hf_home) / SHARED_CACHE)
    return dirs


def cache_key(facts: Mapping[str, Any]) -> str:
    """A short digest of everything that decides the compiled kernels (JSON-able facts)."""
    text = json.dumps(facts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def key_facts(trainer: Any, plan_summary: Mapping[str, Any]) -> dict[str, Any]:
    """What decides the kernels of this trainer's compiled model."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    config = trainer.model.config.to_dict()
    for name in ("_name_or_path", "transformers_version", "architectures_source"):
        config.pop(name, None)
    args = trainer.args
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    versions = {}
    for package in ("torch", "transformers", "trl", "peft", "triton"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    checkpointing = getattr(args, "activation_checkpointing", None)
    if checkpointing is None:
        checkpointing = getattr(args, "gradient_checkpointing", False)
    return {
        "config": config,
        "device": device,
        "versions": versions,
        "per_device": args.per_device_train_batch_size,
        "max_length": getattr(args, "max_length", None),
        "pad_to_multiple_of": getattr(args, "pad_to_multiple_of", None),
        "bf16": bool(args.bf16),
        "checkpointing": bool(checkpointing),
        "world_size": args.world_size,
        "peft": type(trainer.model).__name__,
        # Each decoder layer compiled on its own (compile_model.compile_regions): other graphs.
        "regional": bool(
            getattr(
                getattr(getattr(trainer, "accelerator", None), "state", None),
                "dynamo_plugin",
                None,
            )
            and trainer.accelerator.state.dynamo_plugin.use_regional_compilation
        ),
        "levers": {name: bool(choice["on"]) for name, choice in plan_summary.items()},
    }


@dataclass
class CompileCache:
    """The artifacts of one key: loaded at start, saved once compiled."""

    key: str
    dirs: list[Path]
    loaded_from: str | None = None
    loaded_artifacts: int = 0
    saved_artifacts: int = 0
    notes: list[str] = field(default_factory=list)

    def path(self, folder: Path) -> Path:
        return folder / f"{self.key}{SUFFIX}"

    def load(self) -> bool:
        """Put the first readable blob of this key into torch's caches; False when cold."""
        import torch

        for folder in self.dirs:
            path = self.path(folder)
            if not path.is_file():
                continue
            try:
                info = torch.compiler.load_cache_artifacts(path.read_bytes())
                # torch logs a blob it cannot un-pickle (a torn write) and returns None.
                problem = "torch could not read it" if info is None else None
            except Exception as exc:  # a foreign file: compile as if cold
                problem = f"{type(exc).__name__}: {exc}"
            if problem is not None:
                note = f"compile cache {path} unreadable, ignored ({problem})"
                log.warning("%s", note[:500])
                self.notes.append(note[:200])
                continue
            self.loaded_from = str(path)
            self.loaded_artifacts = artifact_count(info)
            log.info(
                "compile cache: %d artifacts loaded from %s (key %s)",
                self.loaded_artifacts,
                path,
                self.key,
            )
            return True
        log.info("compile cache: none for key %s in %s", self.key, [str(d) for d in self.dirs])
        return False

    def save(self) -> int:
        """Write what torch compiled so far to every folder (atomically); artifacts written."""
        import torch

        try:
            saved = torch.compiler.save_cache_artifacts()
        except Exception as exc:  # never fail training over the cache
            log.warning("compile cache: nothing saved (%s: %s)", type(exc).__name__, exc)
            return 0
        if saved is None:
            return 0
        blob, info = saved
        count = artifact_count(info)
        if count <= self.saved_artifacts:
            return 0  # nothing new since the last save
        for folder in self.dirs:
            try:
                folder.mkdir(parents=True, exist_ok=True)
                partial = folder / f".{self.key}.{os.getpid()}.partial"
                partial.write_bytes(blob)
                partial.replace(self.path(folder))
            except OSError as exc:
                log.warning("compile cache: cannot write %s (%s)", folder, exc)
        self.saved_artifacts = count
        log.info(
            "compile cache: %d artifacts (%.1f MB) saved as key %s in %s",
            count,
            len(blob) / 1e6,
            self.key,
            [str(d) for d in self.dirs],
        )
        return count

    def describe(self) -> str:
        """One short line for the log and status.speedPlan."""
        if self.loaded_from is not None:
            return f"compile cache warm ({self.loaded_artifacts} artifacts, key {self.key[:8]})"
        return f"compile cache cold (key {self.key[:8]}; saved after the first step)"

    def summary(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "warm": self.loaded_from is not None,
            "loaded_from": self.loaded_from,
            "loaded_artifacts": self.loaded_artifacts,
            "saved_artifacts": self.saved_artifacts,
            "hits": cache_hits(),
            "notes": self.notes,
        }


def artifact_count(info: Any) -> int:
    """Artifacts of every kind in a torch CacheInfo."""
    kinds = (
        "inductor_artifacts",
        "autotune_artifacts",
        "aot_autograd_artifacts",
        "pgo_artifacts",
        "precompile_artifacts",
    )
    return sum(len(getattr(info, kind, None) or []) for kind in kinds)


def cache_hits() -> dict[str, int]:
    """torch's own counts of compile-cache hits and misses in this process."""
    from torch._dynamo.utils import counters

    return {
        "fxgraph_hit": int(counters["inductor"]["fxgraph_cache_hit"]),
        "fxgraph_miss": int(counters["inductor"]["fxgraph_cache_miss"]),
        "autograd_hit": int(counters["aot_autograd"]["autograd_cache_hit"]),
        "autograd_miss": int(counters["aot_autograd"]["autograd_cache_miss"]),
    }


def saving_callback(cache: CompileCache, world_zero: bool) -> Any:
    """Saves the artifacts after the first optimizer step and at the end of training."""
    from transformers import TrainerCallback

    class SaveCompileCache(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 1 or (state.global_step > 1 and not cache.saved_artifacts):
                log.info("compile cache after step %d: %s", state.global_step, cache_hits())
                if world_zero:
                    cache.save()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if world_zero:
                cache.save()

    return SaveCompileCache()


def use_compile_cache(trainer: Any, plan_summary: Mapping[str, Any], output_dir: str) -> Any:
    """Load this shape's artifacts now (before the first compile) and save them once built."""
    cache = CompileCache(cache_key(key_facts(trainer, plan_summary)), cache_dirs(output_dir))
    cache.load()
    trainer.add_callback(saving_callback(cache, trainer.is_world_process_zero()))
    trainer.sftjob_compile_cache = cache
    return cache
