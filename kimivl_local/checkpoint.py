"""Safetensors checkpoints: the index, shard headers, strict validation, and tensor reads.

Headers are parsed here (8-byte length + JSON) rather than trusted to the reader, so a truncated
or corrupt shard, or an index that disagrees with its shards, fails up front with one message
that names the file and the tensor. Nothing here unpickles or executes anything.
"""

from __future__ import annotations

import json
import math
import mmap
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

SAFETENSORS_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I8": torch.int8, "U8": torch.uint8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
    "BOOL": torch.bool,
}
DTYPE_NAMES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
_MAX_HEADER = 256 << 20  # a header larger than this is corrupt, not a real checkpoint


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int = 0  # file position of the tensor's first byte (byte-range copies)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse one shard's header and check that the file holds every byte it promises."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise CheckpointError(f"{file.name} is truncated or empty ({size} bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > min(size - 8, _MAX_HEADER):
                raise CheckpointError(f"{file.name} is not a safetensors file or is truncated "
                                      f"(header length {n}, file size {size})")
            header = json.loads(f.read(n))
    except OSError as exc:
        raise CheckpointError(f"cannot read {file}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{file.name} has a corrupt safetensors header") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file.name} has a corrupt safetensors header")
    header.pop("__metadata__", None)
    infos, data_end = {}, 0
    for name, entry in header.items():
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            shape = tuple(int(d) for d in entry["shape"])
            start, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file.name}: corrupt or unsupported header entry for "
                                  f"tensor {name}: {entry!r}") from None
        numel = 1
        for d in shape:
            numel *= d
        if end - start != numel * dtype.itemsize:
            raise CheckpointError(f"{file.name}: tensor {name} has {end - start} bytes of data "
                                  f"but shape {list(shape)} {entry['dtype']} needs "
                                  f"{numel * dtype.itemsize}")
        data_end = max(data_end, end)
        infos[name] = TensorInfo(name, file, dtype, shape, 8 + n + start)
    if 8 + n + data_end > size:
        last = max(infos.values(), key=lambda i: header[i.name]["data_offsets"][1]).name
        raise CheckpointError(f"{file.name} is truncated: it has {size} bytes but its header needs "
                              f"{8 + n + data_end} (tensor {last} is cut off); re-download it")
    return infos


class Checkpoint:
    """The tensors of a checkpoint folder, by name, validated against the index and headers."""

    def __init__(self, path: Path, tensors: dict[str, TensorInfo]):
        self.path = path
        self.tensors = tensors
        self._maps: dict[Path, mmap.mmap] = {}

    @classmethod
    def open(cls, path: Path | str) -> "Checkpoint":
        path = Path(path)
        index = path / INDEX_FILE
        if index.is_file():
            return cls(path, _tensors_from_index(path, index))
        if (path / SINGLE_FILE).is_file():
            return cls(path, read_header(path / SINGLE_FILE))
        raise CheckpointError(f"no weights in {path}: expected {INDEX_FILE} (sharded) or "
                              f"{SINGLE_FILE}")

    def validate(self, expected: dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]) -> None:
        """Raise one CheckpointError listing missing, unexpected, mis-shaped or mis-typed tensors.

        `expected` maps each tensor name to (shape, allowed dtypes).
        """
        problems = []
        for name, (shape, dtypes) in expected.items():
            info = self.tensors.get(name)
            if info is None:
                problems.append(f"missing tensor {name}")
            elif info.shape != tuple(shape):
                problems.append(f"{info.file.name}: tensor {name} has shape {list(info.shape)}, "
                                f"expected {list(shape)}")
            elif info.dtype not in dtypes:
                want = " or ".join(DTYPE_NAMES[d] for d in dtypes)
                problems.append(f"{info.file.name}: tensor {name} is {DTYPE_NAMES[info.dtype]}, "
                                f"expected {want}")
        for name, info in self.tensors.items():
            if name not in expected:
                problems.append(f"{info.file.name}: unexpected tensor {name}")
        if problems:
            shown = "\n  ".join(problems[:8])
            more = f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else ""
            raise CheckpointError(f"checkpoint {self.path} does not match its config.json "
                                  f"({len(problems)} problem(s)):\n  {shown}{more}")

    def load(self, name: str) -> torch.Tensor:
        """One tensor (CPU, stored dtype) backed by its shard's mmap: no bytes are read or copied
        until used. The mapping is private copy-on-write, so the file is never modified."""
        info = self.tensors[name]
        if info.numel == 0:
            return torch.empty(info.shape, dtype=info.dtype)
        with warnings.catch_warnings():  # frombuffer warns that the buffer is not resizable
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(self._map(info.file), dtype=info.dtype, count=info.numel,
                                    offset=info.offset)
        return flat.view(info.shape)

    def release(self, name: str) -> None:
        """Drop the pages of a tensor that was copied elsewhere (e.g. repacked) from this process'
        memory; they stay in the OS file cache. Only whole pages inside the tensor are dropped,
        and reading the tensor again just maps them back."""
        info = self.tensors[name]
        mm = self._maps.get(info.file)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = -(-info.offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (info.offset + info.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def _map(self, file: Path) -> mmap.mmap:
        mm = self._maps.get(file)
        if mm is None:
            try:
                with open(file, "rb") as f:
                    mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE)
            except OSError as exc:
                raise CheckpointError(f"cannot map {file}: {exc.strerror or exc}") from None
            self._maps[file] = mm
        return mm

    def close(self) -> None:
        """Forget the mappings; tensors already loaded keep theirs alive."""
        self._maps.clear()


def _tensors_from_index(path: Path, index: Path) -> dict[str, TensorInfo]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{index} is not a valid safetensors index (needs a 'weight_map' "
                              "object)") from None
    by_file: dict[str, list[str]] = {}
    for name, file in weight_map.items():
        by_file.setdefault(file, []).append(name)
    tensors: dict[str, TensorInfo] = {}
    for file, names in sorted(by_file.items()):
        shard = path / file
        if not shard.is_file():
            raise CheckpointError(f"shard {file} listed in {INDEX_FILE} is missing from {path} "
                                  f"(it should hold {names[0]} and {len(names) - 1} more); "
                                  "the download is incomplete")
        header = read_header(shard)
        for name in names:
            if name not in header:
                raise CheckpointError(f"{INDEX_FILE} says tensor {name} is in {file}, "
                                      "but that shard does not contain it")
        for name, info in header.items():
            if weight_map.get(name) != file:
                raise CheckpointError(f"{file} holds tensor {name}, which has no matching "
                                      f"entry in {INDEX_FILE}")
        tensors.update(header)
    return tensors
