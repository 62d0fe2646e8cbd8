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
           k = 32c + 4s + t (slot s < 8, t < 4). The stored value v is u = q + 2^(bits-1) (the
           on-disk unsigned code: no sign handling needed) below 8 bits, q in two's complement
           at 8. v is split into parts of 4, 2 or 1 bits (PARTS: 3 = 2 + 1, 5 = 4 + 1,
           6 = 4 + 2, else one part), each stored as `width` planes of 64 bytes, the parts'
           planes one after the other (bits planes in all):
             plane i of a part of width w at bit offset o (of v), byte 4r + t, bits
             w*j .. w*j + w - 1 (j < 8 / w) = (v[n][32c + 4(i + w*j) + t] >> o) & (2^w - 1)
           so one plane shifted and masked gives 16 rows x 4 consecutive k of the part, already
           at its bit offset: the kernel ORs the parts into bytes of v and feeds them to the
           same int8 dot products as int4/int8. For int4 this is byte 64i + 4r + t =
           u[32c + 4i + t] | u[32c + 16 + 4i + t] << 4; for int8 byte 64i + 4r + t = q[32c + 4i + t].
           Bytes read per weight: bits / 8, so decode time scales with the width.
  scales   bf16 or fp16 [NB, G, 16]   scales[b][g][r] = scale[16b + r][g], kept in the
           checkpoint's 16-bit dtype so the kernel sees exactly the on-disk values (fp32 scales are
           rounded to fp16, or bf16 when outside fp16's normal range: the one lossy step)
  zeros    int8 [NB, G, 16], asymmetric only: the zero of the stored value, z + 2^(bits-1) below
           8 bits, z at 8; symmetric uses the constant 2^(bits-1) below 8 bits, 0 at 8.

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
from .packing import BITS, PackedWeight, QuantScheme, unpack_int32

ROWS = 16  # output rows per block; CHUNK (layout.py) = K per chunk and activation block
SLOTS = CHUNK // 4  # 4 consecutive k per 32-bit lane
PARTS = {2: (2,), 3: (2, 1), 4: (4,), 5: (4, 1), 6: (4, 2), 8: (8,)}  # widths of a value's parts


def zero_offset(bits: int) -> int:
    """What the stored value adds to q: 2^(bits-1) (unsigned codes) below 8 bits, 0 at 8."""
    return 0 if bits == 8 else 1 << (bits - 1)


def to_planes(v: torch.Tensor, bits: int) -> torch.Tensor:
    """Stored values v uint8 [B * 16, KC * 32] -> qweight bytes [B, KC, 64 * bits]."""
    b, kc = v.shape[0] // ROWS, v.shape[1] // CHUNK
    v = v.view(b, ROWS, kc, SLOTS, 4).permute(0, 2, 3, 1, 4)  # [b, c, slot, r, t]
    planes, offset = [], 0
    for w in PARTS[bits]:
        part = (v >> offset) & ((1 << w) - 1)
        part = part.reshape(b, kc, SLOTS // w, w, ROWS, 4)  # slot = w * j + i
        byte = torch.zeros(b, kc, w, ROWS, 4, dtype=torch.uint8)
        for j in range(SLOTS // w):
            byte |= part[:, :, j] << (w * j)
        planes.append(byte)
        offset += w
    return torch.cat(planes, dim=2).reshape(b, kc, 64 * bits)


def from_planes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of to_planes for qweight [..., NB, KC, 64 * bits]: stored values
    [..., NB * 16, KC * 32]."""
    lead, (nb, kc) = qweight.shape[:-3], qweight.shape[-3:-1]
    planes = qweight.reshape(-1, nb, kc, bits, ROWS, 4)
    v = torch.zeros(planes.shape[0], nb, kc, SLOTS, ROWS, 4, dtype=torch.uint8)
    plane, offset = 0, 0
    for w in PARTS[bits]:
        byte = planes[:, :, :, plane:plane + w]  # [x, b, c, i, r, t]
        fields = torch.stack([(byte >> (w * j)) & ((1 << w) - 1) for j in range(SLOTS // w)], 3)
        v |= fields.reshape(v.shape) << offset
        plane, offset = plane + w, offset + w
    return v.permute(0, 1, 4, 2, 3, 5).reshape(*lead, nb * ROWS, kc * CHUNK)


class CpuQuantWeight(QuantWeight):
    """A weight [*, N, K] in the CPU kernel layout (module docstring); leading dim = experts."""

    STACKED_DIMS = 4
    BITS = BITS

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
    from ..kernels.bridge import kernel, num_threads
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
        _write_rows(zeros, row0, (zero.to(torch.int16) + zero_offset(s.bits)).to(torch.int8))


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
    n, k = packed.out_features, packed.in_features
    b0, b1 = row0 // ROWS, -(-(row0 + n) // ROWS)
    q = unpack_int32(packed.weight_packed, bits, k)
    v = from_planes(qweight[b0:b1], bits)
    rows = slice(row0 - b0 * ROWS, row0 - b0 * ROWS + n)
    v[rows] = 0
    v[rows, :k] = (q.to(torch.int16) + zero_offset(bits)).to(torch.uint8)  # int8: two's complement
    qweight[b0:b1] = to_planes(v, bits)


def dequantize(w: CpuQuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [*, N, K] from the CPU layout (the torch reference reads the same bytes the kernels do)."""
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    lead = w.qweight.shape[:-3]
    nb = w.qweight.shape[-3]
    v = from_planes(w.qweight, w.bits).reshape(-1, nb * ROWS, w.padded_in_features)
    v = (v.view(torch.int8) if w.bits == 8 else v).to(acc)
    g = w.scales.shape[-2]
    scale = w.scales.reshape(-1, nb, g, ROWS).transpose(2, 3).reshape(-1, nb * ROWS, g).to(acc)
    if w.zeros is not None:
        zero = w.zeros.reshape(-1, nb, g, ROWS).transpose(2, 3).reshape(-1, nb * ROWS, g).to(acc)
    else:
        zero = torch.full_like(scale, float(zero_offset(w.bits)))
    out = (v.unflatten(-1, (g, -1)) - zero[..., None]) * scale[..., None]
    out = out.flatten(-2)[:, :w.out_features, :w.in_features]
    return out.reshape(*lead, w.out_features, w.in_features).to(dtype)
