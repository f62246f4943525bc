"""A safetensors file written by several threads at once.

safetensors' `save_file` copies every tensor to host memory, then to one bytes buffer,
then writes it, all under the GIL (transformers' own comment at its shard loop says the
same): a 1.5B model's fp32 weights took 4.7 s to save on an H100 machine (session 17). This
writes the same format (8-byte header length, a JSON header padded with spaces to 8 bytes,
then every tensor's bytes at its offsets) with the copies and `os.pwrite`s spread over
threads: torch's device-to-host copy and `pwrite` both release the GIL.

The layout follows safetensors': tensors ordered by dtype as its writer orders them (larger
elements first, so each starts aligned to its element size), then by name. The file is
byte for byte the one safetensors writes (tests/trainer/test_weights_writer.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

# A piece of one tensor, copied and written by one thread at a time: large enough that a
# write is one long pwrite, small enough that a 1.5B model's 6 GB spread over the threads.
CHUNK_BYTES = 64 << 20
# Measured on an H100 machine (16 cores; bench/startup_probe.py, session 18): the 1.5B
# model's fp32 weights saved by transformers in 7.5 s, with 4 threads in 2.0 s, with 8 or
# 16 in 3.1-3.2 s (more threads contend for the page cache).
WRITER_THREADS = 4


def safetensors_dtype_names() -> dict[Any, str]:
    import torch

    names = {
        torch.float64: "F64",
        torch.float32: "F32",
        torch.float16: "F16",
        torch.bfloat16: "BF16",
        torch.int64: "I64",
        torch.int32: "I32",
        torch.int16: "I16",
        torch.int8: "I8",
        torch.uint8: "U8",
        torch.bool: "BOOL",
    }
    for attr, name in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2")):
        if hasattr(torch, attr):
            names[getattr(torch, attr)] = name
    return names


# safetensors' order of dtypes in a file (its Dtype enum, reversed), read from its output.
LAYOUT_ORDER = (
    "I64",
    "F64",
    "F32",
    "I32",
    "BF16",
    "F16",
    "I16",
    "F8_E4M3",
    "F8_E5M2",
    "I8",
    "U8",
    "BOOL",
)


def header_and_layout(
    tensors: Mapping[str, Any], metadata: Mapping[str, str] | None
) -> tuple[bytes, list[tuple[str, int, int]]]:
    """The file's first bytes (length and padded JSON header) and each tensor's
    (name, offset from the start of the file, bytes)."""
    names = safetensors_dtype_names()
    rank = {dtype: LAYOUT_ORDER.index(name) for dtype, name in names.items()}
    order = sorted(tensors, key=lambda name: (rank[tensors[name].dtype], name))
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    spans = []
    offset = 0
    for name in order:
        tensor = tensors[name]
        size = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": names[tensor.dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + size],
        }
        spans.append((name, offset, size))
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    start = 8 + len(blob)
    prefix = struct.pack("<Q", len(blob)) + blob
    return prefix, [(name, start + at, size) for name, at, size in spans]


def writable(tensors: Mapping[str, Any]) -> bool:
    """Whether this writer handles every tensor (a dtype safetensors names, dense storage);
    otherwise the caller keeps safetensors' own save_file."""
    import torch

    names = safetensors_dtype_names()
    return all(
        isinstance(t, torch.Tensor)
        and t.layout == torch.strided
        and t.dtype in names
        and t.device.type != "meta"
        for t in tensors.values()
    )


def chunks(layout: list[tuple[str, int, int]]) -> Iterator[tuple[str, int, int, int]]:
    """(name, byte offset inside the tensor, length, file offset) pieces of CHUNK_BYTES."""
    for name, at, size in layout:
        for start in range(0, size, CHUNK_BYTES):
            yield name, start, min(CHUNK_BYTES, size - start), at + start


def write_safetensors(
    tensors: Mapping[str, Any],
    filename: str | os.PathLike[str],
    metadata: Mapping[str, str] | None = None,
    threads: int = WRITER_THREADS,
) -> None:
    """safetensors.torch.save_file's file, its copies and writes spread over `threads`."""
    import torch

    prefix, layout = header_and_layout(tensors, metadata)
    total = layout[-1][1] + layout[-1][2] if layout else len(prefix)
    # Flat byte views; a tensor that is not contiguous is copied once here (as
    # safetensors does), on its own device.
    flat = {
        name: t.detach().contiguous().reshape(-1).view(torch.uint8) for name, t in tensors.items()
    }
    path = Path(filename)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.pwrite(fd, prefix, 0)
        os.ftruncate(fd, total)
        local = threading.local()

        def write(piece: tuple[str, int, int, int]) -> None:
            name, start, length, file_at = piece
            source = flat[name][start : start + length]
            if source.device.type != "cpu":
                buffer = getattr(local, "buffer", None)
                if buffer is None:
                    buffer = torch.empty(CHUNK_BYTES, dtype=torch.uint8, pin_memory=True)
                    local.buffer = buffer
                buffer[:length].copy_(source)
                source = buffer[:length]
            view = memoryview(source.numpy())
            written = 0
            while written < length:
                written += os.pwrite(fd, view[written:], file_at + written)

        with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
            for _ in pool.map(write, chunks(layout)):
                pass
    finally:
        os.close(fd)


def threaded_save_file(plain: Callable[..., Any]) -> Callable[..., Any]:
    """A stand-in for safetensors' `save_file(tensors, filename, metadata=None)`: this
    writer where it handles every tensor, `plain` otherwise."""

    def save_file(
        tensors: Mapping[str, Any],
        filename: str | os.PathLike[str],
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        if writable(tensors):
            write_safetensors(tensors, filename, metadata)
        else:
            plain(tensors, filename, metadata=metadata)

    save_file.sftjob_threaded = True  # type: ignore[attr-defined]
    return save_file


@contextlib.contextmanager
def threaded_weight_writes() -> Iterator[None]:
    """transformers' save_pretrained writes its shards with this writer while inside.

    transformers calls safetensors' save_file through its module's own name
    (`modeling_utils.safe_save_file`); that name is swapped for the call and put back,
    whatever the save raised.
    """
    from transformers import modeling_utils

    plain = modeling_utils.safe_save_file
    if getattr(plain, "sftjob_threaded", False):  # a save inside a save: already threaded
        yield
        return
    modeling_utils.safe_save_file = threaded_save_file(plain)
    try:
        yield
    finally:
        modeling_utils.safe_save_file = plain


def probe_weights_writer(device: str) -> str | None:
    """A few tensors of several dtypes (one not contiguous) written by this writer and by
    safetensors: None when the two files are the same bytes."""
    import torch
    from safetensors.torch import save_file

    tensors = {
        "layer.weight": torch.arange(24, dtype=torch.float32, device=device).reshape(4, 6).t(),
        "layer.bias": torch.linspace(-1, 1, 6, device=device).to(torch.bfloat16),
        "layer.scale": torch.linspace(-1, 1, 3, device=device).to(torch.float16),
        "positions": torch.arange(5, device=device),
        "empty": torch.zeros(0, device=device),
    }
    metadata = {"format": "pt"}
    with tempfile.TemporaryDirectory() as folder:
        ours, theirs = Path(folder) / "ours", Path(folder) / "theirs"
        write_safetensors(tensors, ours, metadata, threads=2)
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, theirs, metadata)
        if ours.read_bytes() != theirs.read_bytes():
            return "the threaded writer's file differs from safetensors' save_file's"
    return None
