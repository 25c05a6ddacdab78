"""The sink for merged tensors on disk: a streaming sharded safetensors writer.

The disk sink knows every output tensor's name, shape and dtype before the first one is
computed (the plan has them), so it lays out the shards and their headers up front and then
appends each tensor's bytes as it arrives: nothing is buffered beyond the tensor in hand.
Everything is written into `OUT.partial/`, which is renamed to `OUT` only when complete.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

import torch

from mergelab.checkpoint import DTYPE_NAMES, INDEX_FILE, SINGLE_FILE, tensor_nbytes
from mergelab.errors import OutputError, RecipeError

log = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int, argument: str = "shard_size") -> int:
    """'5GB' -> 5_000_000_000 (decimal units as in transformers; KiB/MiB/GiB binary); `argument` names it in errors."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([\d.]+)\s*([a-zA-Z]*)\s*", text)
    if not m or m[2].upper() not in _UNITS:
        raise RecipeError(f"{argument}={text!r}: not a size; use e.g. 5GB, 500MB, 2GiB", arguments=(argument,))
    size = int(float(m[1]) * _UNITS[m[2].upper()])
    if size <= 0:
        raise RecipeError(f"{argument}={text!r}: must be positive", arguments=(argument,))
    return size


class Sink(Protocol):
    """Where the executor puts each merged tensor, in plan order."""

    def write(self, name: str, tensor: torch.Tensor) -> None: ...


@dataclass(frozen=True)
class _Entry:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int


class ShardedWriter:
    """Streams tensors into safetensors shards whose headers are known in advance."""

    def __init__(self, folder: Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]], shard_size: int) -> None:
        self.folder = folder
        self.shards: list[list[_Entry]] = [[]]
        size = 0
        for name, shape, dtype in layout:
            n = tensor_nbytes(tuple(shape), dtype)
            if self.shards[-1] and size + n > shard_size:
                self.shards.append([])
                size = 0
            self.shards[-1].append(_Entry(name, tuple(shape), dtype, n))
            size += n
        total = len(self.shards)
        self.files = [SINGLE_FILE] if total == 1 else [f"model-{i + 1:05d}-of-{total:05d}.safetensors" for i in range(total)]
        self._order = [(si, e) for si, shard in enumerate(self.shards) for e in shard]
        self._next = 0
        self._done = 0  # bytes of the current tensor written so far
        self._fh: BinaryIO | None = None
        self._shard = -1

    def write(self, name: str, tensor: torch.Tensor) -> None:
        entry = self._order[self._next][1]
        if tuple(tensor.shape) != entry.shape:
            raise AssertionError(f"tensor '{name}': got {tuple(tensor.shape)} {tensor.dtype}, planned {entry.shape} {entry.dtype}")
        self.write_part(name, tensor)

    def write_part(self, name: str, part: torch.Tensor) -> None:
        """Append the next elements of tensor `name` (in row-major order); a tensor may come in several parts."""
        si, entry = self._order[self._next]
        if name != entry.name:
            raise AssertionError(f"writer expected tensor '{entry.name}', got '{name}'")
        data = part.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8) if part.dtype == entry.dtype else None
        if data is None or self._done + data.numel() > entry.nbytes:
            raise AssertionError(f"tensor '{name}': a {part.dtype} part of {part.numel()} elements does not fit, planned {entry.shape} {entry.dtype}")
        if si != self._shard:
            self._open(si)
        assert self._fh is not None
        if data.numel():
            self._fh.write(memoryview(data.numpy()))
        self._done += data.numel()
        if self._done == entry.nbytes:
            self._next, self._done = self._next + 1, 0

    def _open(self, si: int) -> None:
        if self._fh is not None:
            self._fh.close()
        self._shard = si
        self._fh = open(self.folder / self.files[si], "wb")
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for e in self.shards[si]:
            header[e.name] = {"dtype": DTYPE_NAMES[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned
        self._fh.write(struct.pack("<Q", len(raw)) + raw)

    def close(self) -> None:
        """Finish the last shard and write the index (when sharded); all tensors must have come."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._next != len(self._order):
            raise AssertionError(f"writer closed after {self._next} of {len(self._order)} tensors")
        if len(self.files) > 1:
            index = {
                "metadata": {"total_size": sum(e.nbytes for _, e in self._order)},
                "weight_map": {e.name: self.files[si] for si, e in self._order},
            }
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class OutputFolder:
    """`OUT.partial/` while writing; renamed to `OUT` by `commit`, removed by `discard`."""

    def __init__(self, out: str | os.PathLike[str], overwrite: bool) -> None:
        self.final = Path(out).resolve()
        self.partial = self.final.with_name(self.final.name + ".partial")
        if self.final.exists() and not overwrite:
            raise OutputError(f"{self.final}: already exists; pass overwrite=True to replace it", arguments=("overwrite",))
        if self.final.exists() and not self.final.is_dir():
            raise OutputError(f"{self.final}: exists and is not a folder")
        self.overwrite = overwrite

    def create(self) -> Path:
        if self.partial.exists():  # left over from a crashed run
            shutil.rmtree(self.partial)
        try:
            self.partial.mkdir(parents=True)
        except OSError as exc:
            raise OutputError(f"{self.partial}: cannot create output folder ({exc.strerror})") from None
        return self.partial

    def commit(self) -> Path:
        old = self.final.with_name(self.final.name + ".old")
        if self.final.exists():
            self.final.rename(old)
        self.partial.rename(self.final)
        if old.exists():
            shutil.rmtree(old)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.partial, ignore_errors=True)
