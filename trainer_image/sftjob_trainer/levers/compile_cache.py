"""A compile cache that outlives the pod: torch's portable cache artifacts, kept by shape.

torch.compile spends minutes on the first step of a 1.5B model (docs/performance.md);
inductor's on-disk cache (compile_model.keep_compiled_kernels) keeps the kernels for a
resume in the same output folder, but a NEW job starts cold. torch can serialize what it
compiled (inductor's graphs and kernels, AOTAutograd's graphs, autotuning results) as one
blob, `torch.compiler.save_cache_artifacts()`, and put it back into its caches in
another process, `torch.compiler.load_cache_artifacts(blob)` (torch >= 2.7; used here
with 2.11 on the GPU and 2.13 on CPU). This module:

- names the blob by what decides the kernels (`cache_key` of `key_facts`, made by the
  planner before the model loads): the model's config, the device, the library versions,
  the micro-batch and length (one static shape), bf16, checkpointing, the method and
  adapter, the attention, the world size and every lever on or off; a job of another
  shape never loads another's kernels; the planner compiles a short run only when the
  blob of its key is there (compile_model.short_cold_run);
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
# "off" turns the cache off (nothing looked up, loaded or saved).
ENV_COMPILE_CACHE = "SFTJOB_COMPILE_CACHE"


def enabled(env: Mapping[str, str] | None = None) -> bool:
    """Whether the cache is in use ($SFTJOB_COMPILE_CACHE=off turns it off)."""
    env = os.environ if env is None else env
    return env.get(ENV_COMPILE_CACHE, "").lower() != "off"


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


# Fields of a model's config.json that name or date it but shape no kernel.
NOT_KERNEL_FACTS = ("_name_or_path", "transformers_version", "architectures_source")


def key_facts(
    model_config: Mapping[str, Any],
    device: str,
    run: Mapping[str, Any],
    levers: Mapping[str, bool],
) -> dict[str, Any]:
    """What decides the compiled kernels of a run, all known before its model loads.

    The planner looks the artifacts up before it decides (a short run compiles only when
    they are at hand), so the key is made of planning facts: the model's config.json
    (without its path), the device's name, the libraries' versions, the run's shape as the
    plan sets it (`run`: micro-batch, lengths, bf16, checkpointing, world size, method and
    adapter, attention, regional or whole) and every lever on or off.
    """
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str | None] = {}
    for package in ("torch", "transformers", "trl", "peft", "triton"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    return {
        "config": {k: v for k, v in model_config.items() if k not in NOT_KERNEL_FACTS},
        "device": device,
        "versions": versions,
        "run": dict(run),
        "levers": dict(levers),
    }


def has_artifacts(key: str, dirs: list[Path]) -> bool:
    """Whether a blob of this key lies in one of the folders (read only when loaded)."""
    return any((folder / f"{key}{SUFFIX}").is_file() for folder in dirs)


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
            "compile_seconds": compile_seconds(),
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


# torch's compile timers that say where a first step's seconds went: dynamo in all, its
# bytecode tracing, AOTAutograd, inductor's compile and its wait for the kernels' builds.
COMPILE_TIMERS = (
    "_compile.compile_inner",
    "bytecode_tracing",
    "create_aot_dispatcher_function",
    "compile_fx_inner",
    "async_compile.wait",
)


def compile_seconds() -> dict[str, float]:
    """Seconds this process spent in each of torch's compile timers (COMPILE_TIMERS)."""
    try:
        from torch._dynamo.utils import compile_times

        names, seconds = compile_times(repr="csv", aggregate=True)
        times = dict(zip(names, seconds, strict=True))
    except Exception:  # a diagnostic only: another torch may name or shape them otherwise
        return {}
    return {name: round(float(times[name]), 1) for name in COMPILE_TIMERS if name in times}


def saving_callback(cache: CompileCache, world_zero: bool) -> Any:
    """Saves the artifacts after the first optimizer step and at the end of training."""
    from transformers import TrainerCallback

    class SaveCompileCache(TrainerCallback):  # type: ignore[misc]
        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if state.global_step == 1 or (state.global_step > 1 and not cache.saved_artifacts):
                log.info(
                    "compile cache after step %d: %s; compile seconds %s",
                    state.global_step,
                    cache_hits(),
                    compile_seconds(),
                )
                if world_zero:
                    cache.save()

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if world_zero:
                cache.save()

    return SaveCompileCache()


def use_compile_cache(trainer: Any, key: str, output_dir: str) -> Any:
    """Load this shape's artifacts now (before the first compile) and save them once built."""
    cache = CompileCache(key, cache_dirs(output_dir))
    cache.load()
    trainer.add_callback(saving_callback(cache, trainer.is_world_process_zero()))
    trainer.sftjob_compile_cache = cache
    return cache
