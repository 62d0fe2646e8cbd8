"""Safetensors checkpoints: the index, shard headers, strict validation, and tensor reads.

Headers are parsed here (8-byte length + JSON) rather than trusted to the reader, so a truncated
or corrupt shard, or an index that disagrees with its shards, fails up front with one message
that names the file and the tensor. Nothing here unpickles or executes anything.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

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
    """Parse one shard's header and check every entry: a known dtype, a shape of non-negative
    integers, byte ranges inside the data section that match dtype x shape and do not overlap."""
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
            header = json.loads(f.read(n), object_pairs_hook=_no_duplicate_keys)
    except OSError as exc:
        raise CheckpointError(f"cannot read {file}: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{file.name} has a corrupt safetensors header") from None
    except _DuplicateKey as exc:
        raise CheckpointError(f"{file.name}: the header has the key {exc} twice") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file.name} has a corrupt safetensors header")
    header.pop("__metadata__", None)
    data_size = size - 8 - n
    infos, ranges = {}, []
    for name, entry in header.items():
        dtype, shape, (start, end) = _parse_entry(file, name, entry)
        nbytes = math.prod(shape) * dtype.itemsize
        if end - start != nbytes:
            raise CheckpointError(f"{file.name}: tensor {name} has data_offsets [{start}, {end}] "
                                  f"({end - start} bytes) but shape {list(shape)} "
                                  f"{entry['dtype']} needs {nbytes}")
        if end > data_size:
            raise CheckpointError(f"{file.name} is truncated: it has {size} bytes but its header "
                                  f"needs {8 + n + end} (tensor {name} is cut off); re-download it")
        infos[name] = TensorInfo(name, file, dtype, shape, 8 + n + start)
        if end > start:
            ranges.append((start, end, name))
    ranges.sort()
    for (_, end_a, a), (start_b, _, b) in zip(ranges, ranges[1:]):
        if start_b < end_a:
            raise CheckpointError(f"{file.name}: data_offsets of tensors {a} and {b} overlap")
    return infos


class _DuplicateKey(Exception):
    pass


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise _DuplicateKey(key)
        seen[key] = value
    return seen


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(file: Path, name: str,
                 entry: object) -> tuple[torch.dtype, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, data_offsets) of one header entry; the field at fault named otherwise."""
    def bad(field: str, why: str) -> CheckpointError:
        return CheckpointError(f"{file.name}: tensor {name}: {field} {why}")

    if not isinstance(entry, dict):
        raise bad("header entry", f"must be an object, not {entry!r:.80}")
    for key in ("dtype", "shape", "data_offsets"):
        if key not in entry:
            raise bad(key, "is missing")
    dtype = SAFETENSORS_DTYPES.get(entry["dtype"]) if isinstance(entry["dtype"], str) else None
    if dtype is None:
        raise bad("dtype", f"{entry['dtype']!r:.40} is not one of {sorted(SAFETENSORS_DTYPES)}")
    shape, offsets = entry["shape"], entry["data_offsets"]
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise bad("shape", f"{shape!r:.80} is not a list of non-negative integers")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(_is_int(o) for o in offsets)):
        raise bad("data_offsets", f"{offsets!r:.80} is not a pair of integers")
    start, end = offsets
    if start < 0 or end < start:
        raise bad("data_offsets", f"{offsets} must satisfy 0 <= begin <= end (they count from "
                  "the end of the header)")
    return dtype, tuple(shape), (start, end)


class Checkpoint:
    """The tensors of a checkpoint folder, by name, validated against the index and headers."""

    def __init__(self, path: Path, tensors: dict[str, TensorInfo]):
        self.path = path
        self.tensors = tensors
        self._fds: dict[Path, int] = {}

    @classmethod
    def open(cls, path: Path | str) -> "Checkpoint":
        path = Path(path)
        index = path / INDEX_FILE
        if index.is_file():
            return cls(path, _tensors_from_index(path, index))
        if (path / SINGLE_FILE).is_file():
            return cls(path, read_header(inside_checkpoint(path, SINGLE_FILE, SINGLE_FILE)))
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
        """One tensor (CPU, stored dtype) read into memory this process owns.

        Nothing stays mapped from the file, so a shard truncated or replaced on disk after the
        load cannot take the process down (a mapped page past a new end of file is SIGBUS);
        converting or repacking the result frees it, so the peak stays one copy of the weights
        plus one tensor.
        """
        info = self.tensors[name]
        return self.read_into(name, torch.empty(info.shape, dtype=info.dtype))

    def read_into(self, name: str, out: torch.Tensor) -> torch.Tensor:
        """Read tensor `name` straight into `out` (CPU, contiguous, its shape and stored dtype),
        e.g. one expert's slice of a stacked parameter, without a temporary."""
        info = self.tensors[name]
        if (out.device.type != "cpu" or not out.is_contiguous() or out.dtype != info.dtype
                or tuple(out.shape) != info.shape):
            raise ValueError(f"read_into({name}): needs a contiguous CPU {info.dtype} tensor of "
                             f"shape {list(info.shape)}, got {out.dtype} {list(out.shape)} on "
                             f"{out.device}")
        if info.numel == 0:
            return out
        buf = memoryview(out.view(-1).view(torch.uint8).numpy())
        fd, done = self._fd(info.file), 0
        try:
            while done < len(buf):
                got = os.preadv(fd, [buf[done:]], info.offset + done)
                if got == 0:
                    raise CheckpointError(f"{info.file.name}: tensor {name} is cut off (read "
                                          f"{done} of {info.nbytes} bytes); did the file change "
                                          "on disk while loading?")
                done += got
        except OSError as exc:
            raise CheckpointError(f"cannot read {info.file}: {exc.strerror or exc}") from None
        return out

    def _fd(self, file: Path) -> int:
        fd = self._fds.get(file)
        if fd is None:
            try:
                fd = self._fds[file] = os.open(file, os.O_RDONLY)
            except OSError as exc:
                raise CheckpointError(f"cannot open {file}: {exc.strerror or exc}") from None
        return fd

    def close(self) -> None:
        """Close the shards; tensors already loaded do not refer to them."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


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
        if not isinstance(file, str):
            raise CheckpointError(f"{INDEX_FILE}: weight_map[{name!r}] must be a file name, not "
                                  f"{file!r:.80}")
        if file not in by_file:  # every name checked before any shard is opened
            inside_checkpoint(path, file, f"{INDEX_FILE}: weight_map[{name!r}]")
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


def inside_checkpoint(path: Path, file: str, where: str) -> Path:
    """path / file, refusing names that leave the checkpoint folder (absolute, `..`, or a
    symlink whose target lies outside). A Hugging Face cache snapshot's files are symlinks into
    the repo's blobs/ folder, so there the repo folder (models--owner--name) is the boundary."""
    rel = Path(file)
    if not file or rel.is_absolute() or ".." in rel.parts or "\\" in file:
        raise CheckpointError(f"{where} is {file!r:.200}: a shard must be a file inside the "
                              f"checkpoint folder {path}")
    root = path.resolve()
    if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
        root = root.parent.parent
    target = (path / rel).resolve()
    if not target.is_relative_to(root):
        raise CheckpointError(f"{where}: {file} is a link to {target}, outside the checkpoint "
                              f"folder {root}; copy the file into the folder instead")
    return path / rel
