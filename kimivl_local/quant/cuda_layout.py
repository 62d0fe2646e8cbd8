"""The CUDA kernels' weight layout, and the converter from the on-disk packed form.

A weight W [N, K] (stacked experts add a leading E to every tensor) is three tensors, with
KP = K rounded up to 32, g the group size (KP for per-channel) and G = KP / g:

  qweight  int32 [N, KP * bits / 32]   row n holds W[n, :] along K, `bits` words per 32
           consecutive k (one chunk); rows are never interleaved with each other.
           int4: word w of row n holds k = 8w + e (e < 8) at nibble position p with
                 e = [0, 2, 4, 6, 1, 3, 5, 7][p]  (nibble p = bits 4p..4p+3),
           int8: byte p of word w holds k = 4w + p (plain little-endian bytes),
           2, 3, 5, 6 bits: chunk c (words c * bits ..) splits each code into parts of 4, 2 or
                 1 bits (LOWBIT_PARTS: 2, 3 = 2 + 1, 5 = 4 + 1, 6 = 4 + 2), low part first; a
                 part of width w at bit offset o takes the next w words of the chunk, word j
                 holding k = 32c + (32 / w) j + e at bits w e .. w e + w - 1 as
                 (u[k] >> o) & (2^w - 1)  (plain order: no interleave),
           each value unsigned, u = q + 2^(bits-1) (the on-disk unsigned code); k >= K is 0.
  scales   bf16 or fp16 [N, G]   scale[n, g] for k in [g * group, (g + 1) * group), kept in the
           checkpoint's 16-bit dtype (fp32 scales become fp16, or bf16 outside fp16's normal
           range, as in cpu_layout: the one lossy step)
  zeros    uint8 [N, G], asymmetric only: the zero of the unsigned code, z + 2^(bits-1); the
           symmetric zero is the constant 2^(bits-1).

W[n, k] = scale[n, k // g] * (u[n, k] - zero[n, k // g]).

Why this layout:
  * Row-major along K, 16 bytes = 32 int4 (or 16 int8) weights of one row per 128-bit load: the
    GEMV path (M <= 8) has each lane stream 16-byte vectors of one row, and a row's vectors are
    contiguous so a warp's loads coalesce into full 512-byte runs. Every row is a whole number of
    16-byte vectors (KP is a multiple of 32), so all vector loads are aligned when the tensor is.
    Group sizes are multiples of 32, so a vector never straddles two groups: one scale (and zero)
    per loaded vector.
  * The nibble order inside a word is the interleave the magic-number conversion wants: masking
    the word with 0x000f000f after a right shift by 4i puts nibble positions (i, i + 4), i.e.
    elements (2i, 2i + 1), under the exponent of two fp16 1024.0 halves (OR 0x64006400), so one
    shift, one LOP3 and one half2 subtract of (1024 + zero) give two consecutive weights exactly
    (csrc/cuda/qgemm_common.cuh, int4_pair_f16). int8 needs no interleave: a byte permute places
    bytes (0, 1) and (2, 3) under 0x64.
  * 2, 3, 5 and 6 bits keep the same row-major form, a 32-k chunk being `bits` whole words (so
    no chunk straddles a group and, with the parts below, no code straddles a word), but trade
    the magic-number speed for simplicity: a lane reads one chunk's words and gets each of its
    32 codes with compile-time shifts and masks, OR-ing a code's parts together, then converts
    u - zero exactly through fp32 (csrc/cuda/qgemm_lowbit.cuh). Splitting 3/5/6 bits into
    2/1/4-bit parts keeps every field inside one word (a dense bit stream would straddle
    words), and the bytes read per weight stay bits / 8 (decode is bound by the bytes it reads).
  * The tensor-core path dequantizes whole 32-K slices of 64 rows into shared memory, so it needs
    nothing more than this row-major form; scales stay [N, G] (row-major, read once per group)
    and are applied in fp32 to the accumulators, so the 16-bit operands are the exact integers
    u - zero and no precision is lost before the fp32 accumulation.
"""

from __future__ import annotations

import torch

from .layout import CHUNK, QuantWeight, expect_tensor, padded, scale_dtype_for
from .packing import BITS, PackedWeight, QuantScheme, unpack_int32

INT4_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # element of each nibble position within a word
LOWBIT_PARTS = {2: (2,), 3: (2, 1), 5: (4, 1), 6: (4, 2)}  # widths of a code's parts, low first


class CudaQuantWeight(QuantWeight):
    """A weight [*, N, K] in the CUDA kernel layout (module docstring); leading dim = experts."""

    STACKED_DIMS = 3
    BITS = BITS

    def check_tensors(self) -> None:
        if not isinstance(self.qweight, torch.Tensor) or self.qweight.dim() not in (2, 3):
            raise ValueError("qweight must be a tensor [N, KP * bits / 32] or "
                             "[E, N, KP * bits / 32]")
        lead = list(self.qweight.shape[:-2])
        n, g = self.out_features, self.groups
        expect_tensor("qweight", self.qweight, (torch.int32,),
                      lead + [n, self.padded_in_features * self.bits // 32], None)
        device = self.qweight.device
        expect_tensor("scales", self.scales, (torch.bfloat16, torch.float16), lead + [n, g],
                      device)
        if self.zeros is not None:
            expect_tensor("zeros", self.zeros, (torch.uint8,), lead + [n, g], device)


def kernel_supports(scheme: QuantScheme, in_features: int) -> bool:
    """Whether the CUDA kernels take a weight of this scheme and in_features: any width of
    BITS, the group a multiple of 32 (or per-channel) and in_features a multiple of 8 (16-byte
    activation loads). Other weights with such a group still convert and run, on the torch
    reference; the rest are dequantized at load (model/quantized.py)."""
    return (scheme.bits in CudaQuantWeight.BITS
            and (scheme.group_size is None or scheme.group_size % CHUNK == 0)
            and in_features % 8 == 0)


def to_cuda_layout(packed: PackedWeight, device: torch.device | str = "cuda") -> CudaQuantWeight:
    """Repack [N, K] or stacked [E, N, K] on-disk tensors into the CUDA kernel layout.

    The on-disk words already hold the unsigned codes along K (8 nibbles or 4 bytes per word,
    natural order, zero-padded), so int8 rows are copied as they are and int4 words get their
    nibbles permuted; 2, 3, 5 and 6-bit rows (a dense bit stream on disk) are read code by code
    and repacked into parts. The conversion runs on the CPU
    in torch, one expert at a time, and each converted expert is copied into tensors allocated
    on `device` (so the extra host memory is one expert's).
    """
    s = packed.scheme
    n, k = packed.out_features, packed.in_features
    if s.group_size is not None and s.group_size % CHUNK:
        raise ValueError(f"the CUDA kernels need group_size to be a multiple of {CHUNK}, "
                         f"got {s.group_size}")
    packed.validate()
    device = torch.device(device)
    kp = padded(k)
    group = kp if s.group_size is None else s.group_size
    lead = tuple(packed.weight_packed.shape[:-2])
    g = kp // group
    sdtype = scale_dtype_for(packed.weight_scale)
    words = kp * s.bits // 32
    disk_words = packed.weight_packed.shape[-1]
    qweight = torch.empty(lead + (n, words), dtype=torch.int32, device=device)
    if disk_words < words and s.bits not in LOWBIT_PARTS:
        qweight[..., disk_words:] = 0
    scales = torch.empty(lead + (n, g), dtype=sdtype, device=device)
    zeros = None if s.symmetric else torch.empty(lead + (n, g), dtype=torch.uint8, device=device)
    for e in range(lead[0] if lead else 1):
        at = (e,) if lead else ()
        disk = packed.weight_packed[at].cpu()
        if s.bits in LOWBIT_PARTS:
            qweight[at].copy_(_pack_parts(_stream_codes(disk, s.bits, kp), s.bits))
        else:
            qweight[at][:, :disk_words].copy_(_permute_nibbles(disk) if s.bits == 4 else disk)
        scales[at].copy_(packed.weight_scale[at].cpu().to(sdtype))
        if zeros is not None:
            z = unpack_int32(packed.weight_zero_point[at].cpu(), s.bits, n, dim=-2)
            zeros[at].copy_((z.to(torch.int16) + (1 << (s.bits - 1))).to(torch.uint8))
    return CudaQuantWeight(qweight, scales, zeros, s.bits, group, n, k)


def _permute_nibbles(disk: torch.Tensor) -> torch.Tensor:
    """int32 words with element e at nibble e -> element INT4_ORDER[p] at nibble p, computed
    on the little-endian bytes: byte j holds nibbles (2j, 2j + 1), so the new bytes are
    (e0, e2), (e4, e6), (e1, e3), (e5, e7) from old bytes (e0, e1), (e2, e3), (e4, e5), (e6, e7)."""
    b = disk.contiguous().view(torch.uint8).view(*disk.shape, 4)
    lo, hi = b & 0x0F, b & 0xF0
    out = torch.stack((lo[..., 0] | (lo[..., 1] << 4), lo[..., 2] | (lo[..., 3] << 4),
                       (hi[..., 0] >> 4) | hi[..., 1], (hi[..., 2] >> 4) | hi[..., 3]), dim=-1)
    return out.view(torch.int32).view(disk.shape)


def _pack_rows(q: torch.Tensor, bits: int, kp: int) -> torch.Tensor:
    """int8 q [N, K] -> int32 [N, KP * bits / 32] in the layout of the module docstring
    (the definition, from signed values; to_cuda_layout's fast path must agree with it)."""
    n, k = q.shape
    u = torch.zeros(n, kp, dtype=torch.uint8)
    u[:, :k] = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    if bits == 4:
        s = u.view(n, kp // 8, 8)[:, :, list(INT4_ORDER)]  # s[..., p] = element at nibble p
        u = (s[:, :, 0::2] | (s[:, :, 1::2] << 4)).reshape(n, kp // 2)
    elif bits in LOWBIT_PARTS:
        return _pack_parts(u, bits)
    return u.contiguous().view(torch.int32)


def _pack_parts(u: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned codes uint8 [N, KP] -> int32 [N, KP * bits / 32] in the 2/3/5/6-bit layout,
    built as little-endian bytes: byte B of a w-bit part's 4w bytes holds k = (8 / w) B + i at
    bits w i, which is word B // 4, field (8 / w)(B % 4) + i of the module docstring."""
    n, kp = u.shape
    chunks = u.view(n, kp // 32, 32)
    parts, offset = [], 0
    for w in LOWBIT_PARTS[bits]:
        field = ((chunks >> offset) & ((1 << w) - 1)).view(n, kp // 32, 4 * w, 8 // w)
        byte = field[..., 0].clone()
        for i in range(1, 8 // w):
            byte |= field[..., i] << (w * i)
        parts.append(byte)
        offset += w
    return torch.cat(parts, -1).view(torch.int32).reshape(n, kp * bits // 32)


def _stream_codes(disk: torch.Tensor, bits: int, kp: int) -> torch.Tensor:
    """The unsigned codes uint8 [N, KP] of on-disk rows int32 [N, words] (a dense little-endian
    bit stream, packing.py; zero past its end): every 8 codes are exactly `bits` bytes, read as
    one integer and split with shifts."""
    n = disk.shape[0]
    stream = disk.contiguous().view(torch.uint8)
    stream = torch.nn.functional.pad(stream, (0, kp * bits // 8 - stream.shape[1]))
    octets = stream.view(n, kp // 8, bits).to(torch.int64)
    value = octets[..., 0].clone()
    for b in range(1, bits):
        value |= octets[..., b] << (8 * b)
    codes = torch.empty(n, kp // 8, 8, dtype=torch.uint8)
    for i in range(8):
        codes[..., i] = (value >> (bits * i)) & ((1 << bits) - 1)
    return codes.view(n, kp)


def unpack_codes(w: CudaQuantWeight) -> torch.Tensor:
    """The unsigned codes u [*, N, KP] (int16) as the kernels read them from qweight."""
    words = w.qweight  # int32: the arithmetic shift's sign bits are masked off below
    if w.bits in LOWBIT_PARTS:
        return _unpack_parts(words, w.bits)
    per_word = 32 // w.bits
    shifts = torch.arange(0, 32, w.bits, dtype=torch.int32, device=words.device)
    codes = ((words[..., None] >> shifts) & ((1 << w.bits) - 1)).to(torch.int16)  # [*, N, W, p]
    if w.bits == 4:
        order = torch.tensor(INT4_ORDER, device=words.device)
        u = torch.empty_like(codes)
        u[..., order] = codes  # element INT4_ORDER[p] <- nibble p
        codes = u
    return codes.view(*words.shape[:-1], words.shape[-1] * per_word)


def _unpack_parts(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [*, N, KP * bits / 32] in the 2/3/5/6-bit layout -> codes int16 [*, N, KP]."""
    chunks = words.unflatten(-1, (-1, bits))  # [*, N, KC, bits]
    u = torch.zeros(*chunks.shape[:-1], 32, dtype=torch.int16, device=words.device)
    word, offset = 0, 0
    for w in LOWBIT_PARTS[bits]:
        shifts = torch.arange(0, 32, w, dtype=torch.int32, device=words.device)
        field = (chunks[..., word:word + w, None] >> shifts) & ((1 << w) - 1)  # [*, KC, w, 32/w]
        u |= field.flatten(-2).to(torch.int16) << offset
        word, offset = word + w, offset + w
    return u.flatten(-2)


def dequantize(w: CudaQuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [*, N, K] from the CUDA layout, on w's device (reads the same bytes the kernels do):
    (u - zero) * scale exactly in fp32 (fp64 if asked), cast to dtype. Stacked experts are
    converted one at a time (bounded temporary memory)."""
    if w.num_experts is not None:
        out = torch.empty(w.num_experts, w.out_features, w.in_features, dtype=dtype,
                          device=w.qweight.device)
        for e in range(w.num_experts):
            out[e] = dequantize(w.expert(e), dtype)
        return out
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u = unpack_codes(w).to(acc)
    if w.zeros is not None:
        zero = w.zeros.to(acc)
    else:
        zero = torch.full(w.scales.shape, float(1 << (w.bits - 1)), dtype=acc,
                          device=w.scales.device)
    out = (u.unflatten(-1, (-1, w.group_size)) - zero[..., None]) * w.scales.to(acc)[..., None]
    return out.flatten(-2)[..., :w.in_features].to(dtype)
