"""The CPU kernels' weight layout, and the converter from the on-disk packed form.

Why this layout: the kernels compute 16 output rows at once with one 32-bit lane per row (an
AVX-512 register is 16 lanes; AVX2 takes the first 8 rows from the first 32 bytes of every
64 and the other 8 from the rest), multiplying 4 unsigned weight bytes of each row by the same 4
broadcast int8 activation bytes (`vpdpbusd` / `vpmaddubsw`). So every 32-K chunk of a 16-row block
is one contiguous run of bytes in exactly the order the registers consume it, with no shuffles and
no horizontal sums; blocks are streamed front to back.

With NB = ceil(N / 16) row blocks, KP = K rounded up to 32, KC = KP / 32 chunks, g the group size
(KP for per-channel) and G = KP / g, a weight is three tensors (stacked experts add a leading E):

  qweight  uint8 [NB, KC, 64 * bits]  chunk c of block b: rows n = 16b + r (r < 16),
           k = 32c + ...
           int4: byte 64i + 4r + t (i < 4, t < 4) = u[n][32c + 4i + t]
                                                    | u[n][32c + 16 + 4i + t] << 4
                 with u = q + 8 in [0, 15] (the on-disk unsigned nibble: no sign handling needed)
           int8: byte 64j + 4r + t (j < 8)        = q[n][32c + 4j + t], two's complement
  scales   bf16 or fp16 [NB, G, 16]   scales[b][g][r] = scale[16b + r][g], kept in the
           checkpoint's 16-bit dtype so the kernel sees exactly the on-disk values (fp32 scales are
           rounded to fp16, or bf16 when outside fp16's normal range: the one lossy step)
  zeros    int8 [NB, G, 16], asymmetric only: the zero of the stored value, z + 8 (int4, in
           [0, 15]) or z (int8); symmetric int4 uses the constant 8, symmetric int8 none.

W[n][k] = scale * (stored - zero). Rows N..16*NB-1 are padding with scale 0; columns K..KP-1
(per-channel only) hold 0 and meet zero activations. The activations' per-32 sums turn the zero
into one correction per group (see csrc/cpu/qgemm.h). Tensors of 2 MB and more are allocated on
transparent huge pages where the OS allows it (see _empty).
"""

from __future__ import annotations

import math
import mmap

import torch

from .layout import CHUNK, QuantWeight, expect_tensor, padded, scale_dtype_for
from .packing import PackedWeight, QuantScheme, unpack_int32

ROWS = 16  # output rows per block; CHUNK (layout.py) = K per chunk and activation block


class CpuQuantWeight(QuantWeight):
    """A weight [*, N, K] in the CPU kernel layout (module docstring); leading dim = experts."""

    STACKED_DIMS = 4

    def check_tensors(self) -> None:
        if not isinstance(self.qweight, torch.Tensor) or self.qweight.dim() not in (3, 4):
            raise ValueError("qweight must be a tensor [NB, KC, 64 * bits] or "
                             "[E, NB, KC, 64 * bits]")
        lead = list(self.qweight.shape[:-3])
        nb, kc, g = -(-self.out_features // ROWS), self.padded_in_features // CHUNK, self.groups
        expect_tensor("qweight", self.qweight, (torch.uint8,), lead + [nb, kc, 64 * self.bits],
                      None)
        device = self.qweight.device
        scale_dtypes = (torch.bfloat16, torch.float16)
        expect_tensor("scales", self.scales, scale_dtypes, lead + [nb, g, ROWS], device)
        if self.zeros is not None:
            expect_tensor("zeros", self.zeros, (torch.int8,), lead + [nb, g, ROWS], device)


def allocate(out_features: int, in_features: int, scheme: QuantScheme, scale_dtype: torch.dtype,
             num_experts: int | None = None) -> CpuQuantWeight:
    """An unfilled weight in the layout (huge pages where offered), padding rows already zero;
    `fill_rows` writes the real rows."""
    if scheme.group_size is not None and scheme.group_size % CHUNK:
        raise ValueError(f"the CPU kernels need group_size to be a multiple of {CHUNK}, "
                         f"got {scheme.group_size}")
    n, k = out_features, in_features
    group = padded(k) if scheme.group_size is None else scheme.group_size
    lead = () if num_experts is None else (num_experts,)
    nb, kc, g = -(-n // ROWS), padded(k) // CHUNK, padded(k) // group
    qweight = _empty(lead + (nb, kc, 64 * scheme.bits), torch.uint8)
    scales = _empty(lead + (nb, g, ROWS), scale_dtype)
    zeros = None if scheme.symmetric else _empty(lead + (nb, g, ROWS), torch.int8)
    if n % ROWS:  # the last block's padding rows: weight 0, scale 0
        qweight[..., nb - 1, :, :].zero_()
        for t in (scales, zeros):
            if t is not None:
                t[..., nb - 1, :, n % ROWS:].zero_()
    return CpuQuantWeight(qweight, scales, zeros, scheme.bits, group, n, k)


def fill_rows(dst: CpuQuantWeight, packed: PackedWeight, row0: int = 0,
              expert: int | None = None) -> None:
    """Write one on-disk [n, K] weight into rows row0..row0+n-1 of `dst` (of expert `expert` of a
    stacked dst). The quantized values go through `_C.repack_rows` straight from the source
    in one pass; without the extension, through the torch converter."""
    s = packed.scheme
    n, k = packed.out_features, packed.in_features
    if (s.bits, packed.weight_packed.dim()) != (dst.bits, 2) or k != dst.in_features:
        raise ValueError(f"fill_rows: a {s.bits}-bit [{n}, {k}] weight does not fit a "
                         f"{dst.bits}-bit layout of in_features {dst.in_features}")
    if not 0 <= row0 <= dst.out_features - n:
        raise ValueError(f"fill_rows: rows {row0}..{row0 + n - 1} outside 0..{dst.out_features - 1}")
    if (dst.zeros is None) != s.symmetric:
        raise ValueError("fill_rows: symmetric and asymmetric schemes do not mix in one weight")
    at = () if expert is None else (expert,)
    qweight, scales, zeros = (None if t is None else t[at] for t in (dst.qweight, dst.scales,
                                                                      dst.zeros))
    packed.validate()
    from ..ops._bridge import kernel, num_threads  # here: ops imports this module
    repack = kernel("repack_rows")
    if repack is not None:
        src = packed.weight_packed.contiguous()
        repack(src.data_ptr(), src.shape[1] * 4, n, k, s.bits, qweight.data_ptr(),
               qweight.shape[1], row0, num_threads())
    else:
        _fill_rows_torch(qweight, packed, row0)
    _write_rows(scales, row0, packed.weight_scale.to(scales.dtype))
    if zeros is not None:
        zero = unpack_int32(packed.weight_zero_point, s.bits, n, dim=-2)
        _write_rows(zeros, row0, (zero.to(torch.int16) + (8 if s.bits == 4 else 0)).to(torch.int8))


def to_cpu_layout(packed: PackedWeight) -> CpuQuantWeight:
    """Repack [N, K] or stacked [E, N, K] on-disk tensors into the CPU kernel layout."""
    lead = packed.weight_packed.shape[:-2]
    w = allocate(packed.out_features, packed.in_features, packed.scheme,
                 scale_dtype_for(packed.weight_scale), lead[0] if lead else None)
    for e in range(lead[0] if lead else 1):
        at = (e,) if lead else ()
        zp = None if packed.weight_zero_point is None else packed.weight_zero_point[at]
        fill_rows(w, PackedWeight(packed.weight_packed[at], packed.weight_scale[at],
                                  packed.weight_shape, zp, packed.scheme), 0, e if lead else None)
    return w


def _write_rows(t: torch.Tensor, row0: int, values: torch.Tensor) -> None:
    """scales/zeros t [NB, G, 16] hold row n's group g at [n // 16, g, n % 16]: write
    values [n, G] as rows row0..row0+n-1, rebuilding only the blocks they touch."""
    b0, b1 = row0 // ROWS, -(-(row0 + values.shape[0]) // ROWS)
    blocks = t[b0:b1].transpose(-1, -2).contiguous()  # [b, 16, G]
    flat = blocks.view(-1, t.shape[-2])
    flat[row0 - b0 * ROWS:row0 - b0 * ROWS + values.shape[0]] = values
    t[b0:b1] = blocks.transpose(-1, -2)


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """Uninitialized; 2 MB and larger on transparent huge pages where the OS offers them
    (Linux: madvise). Streaming weights on 4 KB pages costs a page walk every 4 KB once the page
    tables are out of cache, as they are in decode: about 2x slower (measured on Zen 4)."""
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes < (2 << 20) or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.empty(shape, dtype=dtype)
    buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(buf, dtype=dtype).view(shape)  # the tensor keeps buf alive


def _fill_rows_torch(qweight: torch.Tensor, packed: PackedWeight, row0: int) -> None:
    """What `_C.repack_rows` does, in torch (no extension; also its test oracle): the whole
    blocks that rows row0..row0+n-1 touch are rebuilt from their current bytes plus the new rows."""
    bits = packed.scheme.bits
    nb, kc = qweight.shape[:2]
    n, k = packed.out_features, packed.in_features
    b0, b1 = row0 // ROWS, -(-(row0 + n) // ROWS)
    q = unpack_int32(packed.weight_packed, bits, k)
    if bits == 4:
        # stored byte 64i + 4r + t of chunk c = u[32c + 4i + t] | u[32c + 16 + 4i + t] << 4
        cur = qweight[b0:b1].view(b1 - b0, kc, 4, ROWS, 4)
        u = torch.stack((cur & 0xF, cur >> 4), dim=2)  # [b, c, half, i, r, t]
        u = u.permute(0, 4, 1, 2, 3, 5).reshape((b1 - b0) * ROWS, kc * CHUNK)
        u[row0 - b0 * ROWS:row0 - b0 * ROWS + n] = 0
        u[row0 - b0 * ROWS:row0 - b0 * ROWS + n, :k] = (q.to(torch.int16) + 8).to(torch.uint8)
        u = u.view(b1 - b0, ROWS, kc, 2, 4, 4).permute(0, 2, 3, 4, 1, 5)
        qweight[b0:b1] = (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(b1 - b0, kc, 256)
    else:
        # stored byte 64j + 4r + t of chunk c = q[32c + 4j + t]
        cur = qweight[b0:b1].view(torch.int8).view(b1 - b0, kc, 8, ROWS, 4)
        v = cur.permute(0, 3, 1, 2, 4).reshape((b1 - b0) * ROWS, kc * CHUNK)
        v[row0 - b0 * ROWS:row0 - b0 * ROWS + n] = 0
        v[row0 - b0 * ROWS:row0 - b0 * ROWS + n, :k] = q
        v = v.view(b1 - b0, ROWS, kc, 8, 4).permute(0, 2, 3, 1, 4)
        qweight[b0:b1] = v.reshape(b1 - b0, kc, 512).view(torch.uint8)


def dequantize(w: CpuQuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [*, N, K] from the CPU layout (the torch reference reads the same bytes the kernels do)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lead = w.qweight.shape[:-3]
    nb, kc = w.qweight.shape[-3:-1]
    qw = w.qweight.reshape(-1, nb, kc, w.qweight.shape[-1])
    if w.bits == 4:
        b = qw.view(-1, nb, kc, 4, ROWS, 4)
        u = torch.stack((b & 0xF, b >> 4), dim=3)  # [x, b, c, half, i, r, t]
        v = u.permute(0, 1, 5, 2, 3, 4, 6).to(acc)
    else:
        v = qw.view(torch.int8).view(-1, nb, kc, 8, ROWS, 4).permute(0, 1, 4, 2, 3, 5).to(acc)
    v = v.reshape(-1, nb * ROWS, kc * CHUNK)
    g = w.scales.shape[-2]
    scale = w.scales.reshape(-1, nb, g, ROWS).transpose(2, 3).reshape(-1, nb * ROWS, g).to(acc)
    if w.zeros is not None:
        zero = w.zeros.reshape(-1, nb, g, ROWS).transpose(2, 3).reshape(-1, nb * ROWS, g).to(acc)
    else:
        zero = torch.full_like(scale, 8.0 if w.bits == 4 else 0.0)
    out = (v.unflatten(-1, (g, -1)) - zero[..., None]) * scale[..., None]
    out = out.flatten(-2)[:, :w.out_features, :w.in_features]
    return out.reshape(*lead, w.out_features, w.in_features).to(dtype)
