"""Streams a Plan to disk: tensor by tensor from the source shards, resumable and atomic.

While it runs, DST.partial/ holds the finished shards, the shard being written (`*.tmp`, deleted
when writing it fails) and `quantize-manifest.json`: the run's fingerprint, each finished shard
with its errors, and whether the folder is complete. A rerun with the same source and settings
keeps the finished shards (or only publishes a complete folder); anything else starts over. Only
a complete folder is renamed to DST (destination.py), so DST never exists half-written.

Memory: a quantized weight is read, quantized and written in row chunks (RTN is per row; the
scales and zero points, ~1/60 of the weight, are held until its end); copied tensors move in
fixed-size blocks. Reads use pread, not mmap: mapped pages would count in the resident set for
as long as a 5 GB shard stays mapped.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from kimivl_local.checkpoint.shards import INDEX_FILE, SINGLE_FILE, TensorInfo
from kimivl_local.errors import CheckpointError, InputError
from kimivl_local.quant.packing import PackedWeight, dequantize, quantize_rtn

from .destination import REPORT
from .plan import Job, Plan, Shard

log = logging.getLogger("kimivl_local.quantize")

MANIFEST = "quantize-manifest.json"
CHUNK_ELEMS = 1 << 23  # weights per row chunk: 16 MB of bf16; quantize_rtn's fp32 temporaries ~5x
COPY_BLOCK = 16 << 20
ERROR_ROWS_PER_CHUNK = 128  # rows of each chunk that the output error is measured on

# module -> (packed weight, its output error on calibration inputs), e.g. GPTQ's results
Provider = Callable[[str], tuple[PackedWeight, float] | None]


class Workspace:
    """DST.partial and its manifest: the run's fingerprint, the finished shards with their
    errors, and whether the folder is complete (only `publish` is left)."""

    def __init__(self, path: Path, fingerprint: str):
        self.path, self.fingerprint = path, fingerprint
        self.manifest = self.path / MANIFEST
        self.scratch = self.path / "scratch"  # intermediate results (GPTQ), dropped at the end
        self.shards: dict[str, dict] = {}
        self.complete = self.opened = False

    def open(self) -> dict[str, dict]:
        """The shards a previous run of the same job finished ({} when starting afresh); sets
        `complete` when that run finished everything but the publish step."""
        if self.path.exists():
            try:
                state = json.loads(self.manifest.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                raise InputError(f"{self.path} exists but is not an interrupted `kimivl-local "
                                 "quantize` run; remove it") from None
            if state.get("fingerprint") == self.fingerprint:
                self.shards, self.complete = state["shards"], state.get("complete", False)
                self.opened = True
                if self.complete:
                    log.info("publishing %s, which an earlier run completed", self.path)
                elif self.shards:
                    log.info("resuming: %d shard(s) already written in %s", len(self.shards),
                             self.path)
                return self.shards
            log.info("%s is from a run with another source or settings; starting over", self.path)
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True)
        self.opened = True
        self.record({})
        return {}

    def record(self, shards: dict[str, dict], complete: bool = False) -> None:
        tmp = self.manifest.with_name(MANIFEST + ".tmp")
        try:
            tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "shards": shards,
                                       "complete": complete}), encoding="utf-8")
            os.replace(tmp, self.manifest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        self.shards, self.complete = shards, complete

    def seal(self) -> None:
        """Mark the folder complete: the next run only publishes it."""
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.record(self.shards, complete=True)

    def worth_keeping(self) -> bool:
        """Whether a failed run leaves anything to resume: finished shards or GPTQ results."""
        return bool(self.shards) or (self.scratch.is_dir() and any(self.scratch.iterdir()))

    def discard(self) -> None:
        if self.opened:  # only a folder this run created or recognised as its own
            shutil.rmtree(self.path, ignore_errors=True)


def check_space(plan: Plan, ws: Workspace) -> None:
    """Refuse up front when the shards still to write and the copied files do not fit."""
    need = sum(s.size for s in plan.shards if s.file not in ws.shards)
    need += sum(f.stat().st_size for f in plan.src.iterdir()
                if f.is_file() and not f.name.endswith(".safetensors"))
    free = shutil.disk_usage(ws.path).free
    if need > free:
        raise InputError(f"not enough space for {ws.path}: the output needs {need / 1e6:,.1f} MB "
                         f"more, its file system has {free / 1e6:,.1f} MB free; free some space "
                         "or choose another DST")


def write_shards(plan: Plan, ws: Workspace, provider: Provider | None = None) -> dict[str, float]:
    """Write every shard the workspace has not finished (recording each in the manifest);
    returns the output error of every quantized weight, module -> relative error."""
    done = dict(ws.shards)
    total = sum(j.source.nbytes for j in plan.jobs)
    with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="quantize",
              smoothing=0.05, dynamic_ncols=True) as bar:
        for shard in plan.shards:
            path = ws.path / shard.file
            if shard.file in done and path.is_file() and path.stat().st_size == shard.size:
                bar.update(sum(j.source.nbytes for j in shard.jobs))
                continue
            done[shard.file] = {"errors": write_shard(shard, path, provider, bar.update)}
            ws.record(done)
    return {m: e for s in done.values() for m, e in s["errors"].items()}


def write_shard(shard: Shard, path: Path, provider: Provider | None,
                progress: Callable[[int], object]) -> dict[str, float]:
    tmp = path.with_name(path.name + ".tmp")
    errors, handles = {}, {}
    try:
        with open(tmp, "wb") as out:
            out.write(shard.header)
            for i, job in enumerate(shard.jobs):
                src = _handle(handles, job.source.file)
                if i + 1 < len(shard.jobs):  # let the kernel read ahead while this one computes
                    nxt = shard.jobs[i + 1].source
                    os.posix_fadvise(_handle(handles, nxt.file).fileno(), nxt.offset, nxt.nbytes,
                                     os.POSIX_FADV_WILLNEED)
                start = out.tell()
                if job.scheme is None:
                    _copy(src, job.source, out, progress)
                else:
                    given = provider(job.module) if provider else None
                    if given is None:
                        errors[job.module] = _quantize(src, job, out, progress)
                    else:
                        _write_packed(out, given[0])
                        errors[job.module] = given[1]
                        progress(job.source.nbytes)
                if out.tell() - start != job.out_bytes:
                    raise RuntimeError(f"wrote {out.tell() - start} bytes for {job.source.name}, "
                                       f"its header says {job.out_bytes}")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException as exc:  # a full disk, a read error, Ctrl-C: no half shard stays behind
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # write() names no file
            exc.filename = str(tmp)
        raise
    finally:
        for f in handles.values():
            f.close()
    return errors


def _handle(handles: dict, file: Path):
    if file not in handles:
        handles[file] = open(file, "rb")
    return handles[file]


def _read(src, info: TensorInfo, offset: int, buf: memoryview) -> None:
    try:
        got = os.preadv(src.fileno(), [buf], info.offset + offset)
    except OSError as exc:
        exc.filename = str(info.file)
        raise
    if got != len(buf):
        raise CheckpointError(f"{info.file.name}: tensor {info.name} is cut off (read {got} of "
                              f"{len(buf)} bytes at {info.offset + offset}); the source is "
                              "truncated or changed while quantizing")


def _copy(src, info: TensorInfo, out, progress) -> None:
    block = bytearray(min(COPY_BLOCK, info.nbytes))
    done = 0
    while done < info.nbytes:
        view = memoryview(block)[:min(len(block), info.nbytes - done)]
        _read(src, info, done, view)
        out.write(view)
        done += len(view)
        progress(len(view))


def chunk_rows(in_features: int) -> int:
    """Rows per chunk: a multiple of 32, so zero points packed along N split at word ends."""
    return max(32, CHUNK_ELEMS // in_features // 32 * 32)


def _quantize(src, job: Job, out, progress) -> float:
    """RTN in row chunks; writes weight_packed as it goes, then scales, shape and zero points.

    Returns the relative output error for random inputs x ~ N(0, I), whose expectation is
    exactly ‖Ŵ - W‖ / ‖W‖, measured on the first ERROR_ROWS_PER_CHUNK rows of every chunk:
    over 1000 outputs per weight without dequantizing all of it.
    """
    info, scheme = job.source, job.scheme
    n, k = info.shape
    scales, zeros, err, ref = [], [], 0.0, 0.0
    rows = chunk_rows(k)
    for r0 in range(0, n, rows):
        w = torch.empty(min(rows, n - r0), k, dtype=info.dtype)
        _read(src, info, r0 * k * info.dtype.itemsize,
              memoryview(w.view(torch.uint8).numpy()).cast("B"))
        packed = quantize_rtn(w, scheme)
        # NaN or Inf anywhere in a row turns its min-max scale non-finite.
        if not torch.isfinite(packed.weight_scale).all():
            raise CheckpointError(f"{info.file.name}: tensor {info.name} has NaN or Inf values "
                                  f"(rows {r0}..{r0 + len(w) - 1}); the source checkpoint is corrupt")
        _write_tensor(out, packed.weight_packed)
        scales.append(packed.weight_scale)
        zeros.append(packed.weight_zero_point)
        sample = w[:ERROR_ROWS_PER_CHUNK].float()
        err += float((dequantize(_first_rows(packed, len(sample))) - sample).square().sum())
        ref += float(sample.square().sum())
        progress(w.numel() * w.element_size())
    _write_tensor(out, torch.cat(scales))
    _write_tensor(out, torch.tensor([n, k], dtype=torch.int64))
    if not scheme.symmetric:
        _write_tensor(out, torch.cat(zeros))
    return math.sqrt(err / ref) if ref else 0.0


def _first_rows(packed: PackedWeight, r: int) -> PackedWeight:
    """Rows 0..r-1 of a packed weight (r a multiple of 32, or all of its rows)."""
    bits = packed.scheme.bits
    zp = packed.weight_zero_point
    return PackedWeight(packed.weight_packed[:r], packed.weight_scale[:r],
                        torch.tensor([r, packed.in_features]),
                        None if zp is None else zp[:-(-r * bits // 32)], packed.scheme)


def _write_packed(out, packed: PackedWeight) -> None:
    for t in (packed.weight_packed, packed.weight_scale, packed.weight_shape.to(torch.int64),
              packed.weight_zero_point):
        if t is not None:
            _write_tensor(out, t)


def _write_tensor(out, t: torch.Tensor) -> None:
    out.write(memoryview(t.contiguous().view(torch.uint8).numpy()).cast("B"))


def finish(plan: Plan, ws: Workspace, report: dict) -> None:
    """Index, config.json with the quantization_config, the source's other files, the report."""
    weight_map = {t.name: s.file for s in plan.shards for j in s.jobs for t in j.outputs}
    data = sum(j.out_bytes for j in plan.jobs)
    _dump(ws.path / INDEX_FILE, {"metadata": {"total_size": data}, "weight_map": weight_map})
    _dump(ws.path / "config.json", {**plan.config.raw, "quantization_config": plan.qconfig.to_dict()})
    skip = {INDEX_FILE, SINGLE_FILE, "config.json", REPORT}
    for f in sorted(plan.src.iterdir()):
        if f.is_file() and f.name not in skip and not f.name.endswith(".safetensors"):
            shutil.copy2(f, ws.path / f.name)
    _dump(ws.path / REPORT, report)


def _dump(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
