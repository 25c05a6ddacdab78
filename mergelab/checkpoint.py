"""A model folder on disk: tensor index from the safetensors headers, lazy per-tensor reads.

Opening a `Checkpoint` reads `config.json` and every shard's header (a few KB each); no tensor
data is touched until `read(name)`, which copies exactly that tensor's bytes from the file with
`os.preadv` into a fresh tensor. We deliberately do not memory-map: mapped pages of every input
model would stay in the process's resident set, and a merge would grow to the size of its inputs.

File format: https://github.com/huggingface/safetensors#format
(8-byte little-endian header length, JSON header, raw little-endian tensor bytes).

`TensorSource` is what the plan and the executor ask of an input: a `Checkpoint` is one, and so
is a checkpoint with a LoRA adapter applied on the fly (`lora/apply.py`), built on a `Checkpoint`.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch

from mergelab.errors import CheckpointError

log = logging.getLogger(__name__)

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES: dict[torch.dtype, str] = {v: k for k, v in SAFETENSORS_DTYPES.items()}

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"
MAX_HEADER_BYTES = 100 * 1024 * 1024


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def tensor_nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    """Bytes of a dense tensor of this shape and dtype."""
    n = torch.empty((), dtype=dtype).element_size()
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what it is; everything needed to read it later."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: Path
    offset: int  # absolute byte offset of the data in `file`
    nbytes: int


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Parse one .safetensors file's header and check it against the file's size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{path}: truncated safetensors file (no header)")
            (header_len,) = struct.unpack("<Q", raw)
            if header_len > min(MAX_HEADER_BYTES, size - 8):
                raise CheckpointError(f"{path}: corrupt safetensors header (length {header_len} for a {size}-byte file)")
            header = json.loads(f.read(header_len))
    except FileNotFoundError:
        raise CheckpointError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        tensors[name] = _tensor_info(path, name, entry, data_start, size)
    return tensors


def _tensor_info(path: Path, name: str, entry: object, data_start: int, file_size: int) -> TensorInfo:
    try:
        dtype = SAFETENSORS_DTYPES[entry["dtype"]]  # type: ignore[index]
        shape = tuple(int(d) for d in entry["shape"])  # type: ignore[index]
        begin, end = (int(o) for o in entry["data_offsets"])  # type: ignore[index]
    except (KeyError, TypeError, ValueError):
        raise CheckpointError(f"{path}: corrupt header entry for tensor '{name}'") from None
    expected = tensor_nbytes(shape, dtype)
    if end - begin != expected or begin < 0:
        raise CheckpointError(f"{path}: tensor '{name}' has {end - begin} bytes, expected {expected} for shape {list(shape)}")
    if data_start + end > file_size:
        raise CheckpointError(f"{path}: truncated file: tensor '{name}' ends at byte {data_start + end}, file has {file_size}")
    return TensorInfo(name, shape, dtype, path, data_start + begin, end - begin)


class TensorSource(Protocol):
    """A model's tensors by name, read lazily: what a plan checks and an executor reads."""

    @property
    def path(self) -> Path: ...  # the folder config, tokenizer and generation config come from

    @property
    def config(self) -> dict: ...  # config.json ({} if none)

    @property
    def tensors(self) -> dict[str, TensorInfo]: ...  # name -> shape, dtype (read from headers)

    def __contains__(self, name: object) -> bool: ...

    def info(self, name: str) -> TensorInfo: ...

    def read(self, name: str) -> torch.Tensor: ...

    def ranged(self, name: str) -> bool: ...

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor: ...

    def close(self) -> None: ...


class Checkpoint:
    """A Hugging Face model folder: `config.json` plus safetensors weights (single or sharded)."""

    def __init__(self, path: str | os.PathLike[str], *, allow_pickle: bool = False) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: model folder not found")
        self.config: dict = self._read_config()
        self._pickled: dict[Path, dict[str, torch.Tensor]] = {}
        self.tensors: dict[str, TensorInfo] = self._index(allow_pickle)
        self._fds: dict[Path, int] = {}

    # ------------------------------------------------------------------ index
    def _read_config(self) -> dict:
        cfg = self.path / "config.json"
        if not cfg.is_file():
            return {}
        try:
            return json.loads(cfg.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{cfg}: invalid JSON ({exc})") from None

    def _index(self, allow_pickle: bool) -> dict[str, TensorInfo]:
        if (self.path / INDEX_FILE).is_file():
            return self._index_sharded(self.path / INDEX_FILE)
        if (self.path / SINGLE_FILE).is_file():
            return read_safetensors_header(self.path / SINGLE_FILE)
        files = sorted(self.path.glob("*.safetensors"))
        if len(files) == 1:
            return read_safetensors_header(files[0])
        if (self.path / PICKLE_INDEX_FILE).is_file() or (self.path / PICKLE_FILE).is_file():
            if not allow_pickle:
                raise CheckpointError(
                    f"{self.path}: only pickled .bin weights found; pickles can run code when loaded, "
                    "pass allow_pickle=True to load them anyway (with torch.load(weights_only=True))", arguments=("allow_pickle",)
                )
            return self._index_pickle()
        raise CheckpointError(f"{self.path}: no model.safetensors or {INDEX_FILE} in this folder")

    def _index_sharded(self, index_path: Path) -> dict[str, TensorInfo]:
        try:
            weight_map = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index_path}: invalid shard index ({exc!r})") from None
        headers = {f: read_safetensors_header(self.path / f) for f in sorted(set(weight_map.values()))}
        tensors: dict[str, TensorInfo] = {}
        for name, shard in weight_map.items():
            if name not in headers[shard]:
                raise CheckpointError(f"{self.path / shard}: tensor '{name}' is in {INDEX_FILE} but not in the shard")
            tensors[name] = headers[shard][name]
        return tensors

    def _index_pickle(self) -> dict[str, TensorInfo]:
        index_path = self.path / PICKLE_INDEX_FILE
        files = (
            sorted(set(json.loads(index_path.read_text())["weight_map"].values()))
            if index_path.is_file()
            else [PICKLE_FILE]
        )
        tensors: dict[str, TensorInfo] = {}
        for fname in files:
            for name, t in self._load_pickle(self.path / fname).items():
                nbytes = t.numel() * t.element_size()
                tensors[name] = TensorInfo(name, tuple(t.shape), t.dtype, self.path / fname, -1, nbytes)
        return tensors

    def _load_pickle(self, file: Path) -> dict[str, torch.Tensor]:
        if file not in self._pickled:
            try:
                # mmap keeps the pickle's storage on disk until a tensor is touched.
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:  # torch raises many types for a bad pickle
                raise CheckpointError(f"{file}: cannot load pickled weights ({type(exc).__name__}: {exc})") from None
            self._pickled[file] = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        return self._pickled[file]

    # ------------------------------------------------------------------ reads
    def __contains__(self, name: object) -> bool:
        return name in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor named '{name}'") from None

    def read(self, name: str) -> torch.Tensor:
        """Read one tensor's bytes from disk into a new CPU tensor (no mmap, no other tensor)."""
        info = self.info(name)
        if info.offset < 0:
            return self._load_pickle(info.file)[name].clone()
        return self.read_range(name, 0, _numel(info.shape)).reshape(info.shape)

    def ranged(self, name: str) -> bool:
        """Whether `read_range(name, ...)` reads only the bytes of the range (safetensors: yes; pickles: no)."""
        return self.info(name).offset >= 0

    def read_range(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Elements [start, stop) of the flattened tensor, as a new 1-D CPU tensor (only those bytes read)."""
        info = self.info(name)
        if info.offset < 0:
            return self._load_pickle(info.file)[name].reshape(-1)[start:stop].clone()
        size = info.nbytes // max(1, _numel(info.shape))
        out = torch.empty((stop - start) * size, dtype=torch.uint8)
        if out.numel():
            self._pread_into(info, out, info.offset + start * size)
        return out.view(info.dtype)

    def _pread_into(self, info: TensorInfo, out: torch.Tensor, offset: int) -> None:
        fd = self._fds.get(info.file)
        if fd is None:
            fd = self._fds[info.file] = os.open(info.file, os.O_RDONLY)
        view = memoryview(out.numpy())
        done, nbytes = 0, out.numel()
        while done < nbytes:  # preadv may return short reads (2 GiB cap per call on Linux)
            n = os.preadv(fd, [view[done:]], offset + done)
            if n <= 0:
                raise CheckpointError(f"{info.file}: unexpected end of file while reading '{info.name}'")
            done += n

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        self._pickled.clear()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.tensors)} tensors)"
