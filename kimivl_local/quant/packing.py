"""The on-disk compressed-tensors "pack-quantized" format, in one place.

A quantized Linear weight W [N, K] (N = out_features, K = in_features; or [E, N, K] for stacked
experts, packed slice by slice) is stored as these tensors, exactly as compressed-tensors
(`PackedQuantizationCompressor`) writes them and vLLM / transformers read them:

  weight_packed      int32 [N, ceil(K * bits / 32)]
      Signed integers q in [-2^(bits-1), 2^(bits-1) - 1] are offset to unsigned u = q + 2^(bits-1)
      and packed densely, little-end first, along K: element k occupies bits k * bits ..
      k * bits + bits - 1 of the row's bit stream (bit b of the stream = bit b % 32 of word
      b // 32), so a 3-, 5- or 6-bit value may straddle two words (compressed-tensors >= 0.12;
      older releases wasted the leftover bits of each word and are not read). On a little-endian
      host that is, for 4 bits, byte j = u[2j] | u[2j+1] << 4, and for 8 bits, byte k = u[k].
      The stream is zero-padded (u = 0) to a whole word.
  weight_scale       [N, G] in the checkpoint's dtype (bf16 for Kimi-VL); G = K / group_size for
                     the "group" strategy, G = 1 for "channel" (one scale per output row).
  weight_zero_point  int32 [ceil(N * bits / 32), G], asymmetric schemes only: the signed zero
                     points z [N, G] packed the same way but along N (dim 0).
  weight_shape       int64 [2] = [N, K].

Dequantization: W[n, k] = (q[n, k] - z[n, k // group_size]) * scale[n, k // group_size]
(z = 0 when symmetric). RTN parameters follow compressed-tensors' min-max observer:
symmetric scale = absmax / ((qmax - qmin) / 2), e.g. absmax / 7.5 for int4 and / 127.5 for int8
(so -absmax maps to qmin and +absmax rounds to qmax); asymmetric scale = (max - min) / (qmax - qmin)
over a range widened to include 0, z = round(qmin - min / scale);
zero scales become the scale dtype's eps; q = clamp(round_half_even(w / scale + z), qmin, qmax)
computed in fp32 (compressed-tensors divides in the weight's dtype; for bf16 weights that rounds
w / scale to bf16 first, so a few ties may land one step apart; fp32 is the more accurate).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch

_SCALE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
BITS = (2, 3, 4, 5, 6, 8)  # the widths a rule, the format and the CPU kernels take


@dataclass(frozen=True)
class QuantScheme:
    """bits one of BITS; group_size 32, 64, 128, ... along K, or None (per-channel); symmetric or not."""

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True

    def __post_init__(self):
        if self.bits not in BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, BITS))}, got {self.bits}")
        if self.group_size is not None and (self.group_size <= 0 or self.group_size % 8):
            raise ValueError(f"group_size must be a positive multiple of 8 or None (per-channel), "
                             f"got {self.group_size}")

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1))

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def num_groups(self, in_features: int) -> int:
        if self.group_size is None:
            return 1
        if in_features % self.group_size:
            raise ValueError(f"in_features {in_features} is not a multiple of group_size "
                             f"{self.group_size}")
        return in_features // self.group_size

    def to_config(self) -> dict:
        """The `weights` entry of a compressed-tensors `config_groups` item."""
        return {"num_bits": self.bits, "type": "int", "symmetric": self.symmetric,
                "strategy": "channel" if self.group_size is None else "group",
                "group_size": self.group_size, "dynamic": False, "actorder": None,
                "observer": "minmax"}

    @classmethod
    def from_config(cls, weights: dict) -> "QuantScheme":
        if weights.get("type", "int") != "int" or weights.get("dynamic", False):
            raise ValueError(f"only static integer weight quantization is supported, got {weights}")
        strategy = weights.get("strategy")
        if strategy not in ("group", "channel"):
            raise ValueError(f"weight strategy must be 'group' or 'channel', got {strategy!r}")
        if weights.get("actorder") not in (None, "static"):
            raise ValueError(f"activation-ordered groups are not supported, got "
                             f"actorder={weights.get('actorder')!r}")
        group = weights.get("group_size") if strategy == "group" else None
        return cls(bits=int(weights["num_bits"]), group_size=group,
                   symmetric=bool(weights.get("symmetric", True)))


@dataclass(frozen=True)
class PackedWeight:
    """One quantized weight in the on-disk tensors (see the module docstring for each layout).

    Leading dimensions (stacked experts) are allowed on every tensor except weight_shape.
    """

    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_shape: torch.Tensor
    weight_zero_point: torch.Tensor | None
    scheme: QuantScheme

    @property
    def out_features(self) -> int:
        return int(self.weight_shape[0])

    @property
    def in_features(self) -> int:
        return int(self.weight_shape[1])

    def state_dict(self, prefix: str = "") -> dict[str, torch.Tensor]:
        """Tensors under their checkpoint names (prefix e.g. 'model.layers.0.mlp.up_proj.')."""
        out = {prefix + "weight_packed": self.weight_packed,
               prefix + "weight_scale": self.weight_scale,
               prefix + "weight_shape": self.weight_shape}
        if self.weight_zero_point is not None:
            out[prefix + "weight_zero_point"] = self.weight_zero_point
        return out

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], scheme: QuantScheme,
                        prefix: str = "") -> "PackedWeight":
        def get(name):
            if prefix + name not in tensors:
                raise KeyError(f"missing tensor {prefix + name}")
            return tensors[prefix + name]

        zp = None if scheme.symmetric else get("weight_zero_point")
        packed = cls(get("weight_packed"), get("weight_scale"), get("weight_shape"), zp, scheme)
        packed.validate()
        return packed

    def validate(self) -> None:
        """Raise ValueError naming the tensor whose dtype or shape disagrees with weight_shape."""
        s = self.scheme
        shape_t = self.weight_shape
        if shape_t.dtype not in (torch.int64, torch.int32) or shape_t.shape != (2,):
            raise ValueError(f"weight_shape must be an int tensor [2], got {shape_t.dtype} "
                             f"{tuple(shape_t.shape)}")
        n, k = self.out_features, self.in_features
        lead = tuple(self.weight_packed.shape[:-2])
        expect = {
            "weight_packed": (torch.int32, lead + (n, _words(k, s.bits))),
            "weight_scale": (None, lead + (n, s.num_groups(k))),
        }
        if not s.symmetric:
            expect["weight_zero_point"] = (torch.int32, lead + (_words(n, s.bits), s.num_groups(k)))
        elif self.weight_zero_point is not None:
            raise ValueError("weight_zero_point given for a symmetric scheme")
        for name, (dtype, shape) in expect.items():
            t = getattr(self, name)
            if t is None:
                raise ValueError(f"{name} is required for an asymmetric scheme")
            if tuple(t.shape) != shape:
                raise ValueError(f"{name} must have shape {list(shape)} for weight_shape "
                                 f"[{n}, {k}], got {list(t.shape)}")
            if dtype is not None and t.dtype != dtype:
                raise ValueError(f"{name} must be {dtype}, got {t.dtype}")
        if self.weight_scale.dtype not in _SCALE_DTYPES:
            raise ValueError(f"weight_scale must be one of {_SCALE_DTYPES}, got "
                             f"{self.weight_scale.dtype}")


def _words(n: int, bits: int) -> int:
    return -(-n * bits // 32)


def pack_int32(q: torch.Tensor, bits: int, dim: int = -1) -> torch.Tensor:
    """Pack signed int8 values q (in the bits' range) into int32 words along `dim` (-1 or -2)."""
    if q.dtype != torch.int8:
        raise ValueError(f"q must be int8, got {q.dtype}")
    if sys.byteorder != "little":
        raise RuntimeError("pack-quantized byte views assume a little-endian host")
    if dim in (-2, q.dim() - 2):
        return pack_int32(q.transpose(-1, -2), bits).transpose(-1, -2).contiguous()
    u = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    size = u.shape[-1]
    if bits == 8:
        stream = u
    elif bits == 4:
        u = torch.nn.functional.pad(u, (0, size % 2))
        stream = u[..., 0::2] | (u[..., 1::2] << 4)
    else:  # the general bit stream: every value's bits, low first, regrouped 8 to a byte
        shifts = torch.arange(bits, dtype=torch.uint8)
        bit = ((u[..., None] >> shifts) & 1).flatten(-2)
        bit = torch.nn.functional.pad(bit, (0, (-bit.shape[-1]) % 8))
        stream = (bit.unflatten(-1, (-1, 8)) << torch.arange(8, dtype=torch.uint8)).sum(
            -1, dtype=torch.uint8)
    stream = torch.nn.functional.pad(stream, (0, 4 * _words(size, bits) - stream.shape[-1]))
    return stream.flatten().view(torch.int32).view(*stream.shape[:-1], -1)


def unpack_int32(packed: torch.Tensor, bits: int, size: int, dim: int = -1) -> torch.Tensor:
    """Inverse of pack_int32: `size` signed int8 values along `dim` (-1 or -2)."""
    if packed.dtype != torch.int32:
        raise ValueError(f"packed must be int32, got {packed.dtype}")
    if dim in (-2, packed.dim() - 2):
        return unpack_int32(packed.transpose(-1, -2).contiguous(), bits, size).transpose(-1, -2)
    u = packed.contiguous().view(torch.uint8)
    if bits == 4:
        u = torch.stack((u & 0xF, u >> 4), dim=-1).flatten(-2)
    elif bits != 8:
        bit = ((u[..., None] >> torch.arange(8, dtype=torch.uint8)) & 1).flatten(-2)
        bit = bit[..., :size * bits].unflatten(-1, (size, bits))
        u = (bit << torch.arange(bits, dtype=torch.uint8)).sum(-1, dtype=torch.uint8)
    return (u[..., :size].to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def unpack(packed: PackedWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q int8 [*, N, K], scale fp32 [*, N, G], zero int8 [*, N, G]) with zero = 0 if symmetric."""
    packed.validate()
    s = packed.scheme
    n, k = packed.out_features, packed.in_features
    q = unpack_int32(packed.weight_packed, s.bits, k)
    scale = packed.weight_scale.float()
    if packed.weight_zero_point is None:
        zero = torch.zeros(scale.shape, dtype=torch.int8)
    else:
        zero = unpack_int32(packed.weight_zero_point, s.bits, n, dim=-2)
    return q, scale, zero


def dequantize(packed: PackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [*, N, K] = (q - z) * scale, computed exactly in fp32 (fp64 if asked), cast to dtype."""
    q, scale, zero = unpack(packed)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    group = packed.in_features if packed.scheme.group_size is None else packed.scheme.group_size
    w = (q.to(acc).unflatten(-1, (-1, group)) - zero.to(acc)[..., None]) * scale.to(acc)[..., None]
    return w.flatten(-2).to(dtype)


def quantize_rtn(weight: torch.Tensor, scheme: QuantScheme,
                 scale_dtype: torch.dtype | None = None) -> PackedWeight:
    """Round-to-nearest quantization of W [*, N, K] to the packed form.

    scale_dtype defaults to the weight's dtype when it is bf16/fp16/fp32 (compressed-tensors keeps
    scales in the model's dtype); q is computed against the scale as stored, so dequantize()
    reproduces exactly what the kernels see.
    """
    if weight.dim() < 2 or not weight.is_floating_point():
        raise ValueError(f"weight must be a float tensor [*, N, K], got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    scale_dtype = scale_dtype or (weight.dtype if weight.dtype in _SCALE_DTYPES else torch.float32)
    if scale_dtype not in _SCALE_DTYPES:
        raise ValueError(f"scale_dtype must be one of {_SCALE_DTYPES}, got {scale_dtype}")
    n, k = weight.shape[-2:]
    group = k if scheme.group_size is None else scheme.group_size
    scheme.num_groups(k)
    w = weight.float().unflatten(-1, (-1, group))  # [*, N, G, group]
    lo = w.amin(-1).clamp(max=0.0)
    hi = w.amax(-1).clamp(min=0.0)
    steps = scheme.qmax - scheme.qmin
    scale = torch.maximum(-lo, hi) / (steps / 2) if scheme.symmetric else (hi - lo) / steps
    scale = scale.to(scale_dtype)
    scale = torch.where(scale == 0, torch.finfo(scale_dtype).eps, scale).to(scale_dtype)
    s32 = scale.float()
    if scheme.symmetric:
        zero = torch.zeros_like(s32)
    else:
        zero = (scheme.qmin - lo / s32).clamp(scheme.qmin, scheme.qmax).round()
    q = (w / s32[..., None] + zero[..., None]).clamp(scheme.qmin, scheme.qmax).round()
    q = q.flatten(-2).to(torch.int8)
    zp = None if scheme.symmetric else pack_int32(zero.to(torch.int8), scheme.bits, dim=-2)
    packed = PackedWeight(pack_int32(q, scheme.bits), scale.contiguous(),
                          torch.tensor([n, k], dtype=torch.int64), zp, scheme)
    return packed


def concat_out_features(parts: list[PackedWeight]) -> PackedWeight:
    """Rows of several weights with one scheme and K, as one weight (e.g. gate ‖ up)."""
    scheme, k = parts[0].scheme, parts[0].in_features
    for p in parts:
        if p.scheme != scheme or p.in_features != k:
            raise ValueError("concat_out_features needs one scheme and one in_features")
    zp = None
    if not scheme.symmetric:
        zero = torch.cat([unpack(p)[2] for p in parts], dim=-2)
        zp = pack_int32(zero, scheme.bits, dim=-2)
    n = sum(p.out_features for p in parts)
    return PackedWeight(torch.cat([p.weight_packed for p in parts], dim=-2),
                        torch.cat([p.weight_scale for p in parts], dim=-2),
                        torch.tensor([n, k], dtype=torch.int64), zp, scheme)


def stack_experts(experts: list[PackedWeight]) -> PackedWeight:
    """Per-expert weights (each under its own name on disk) as one [E, ...] weight."""
    first = experts[0]
    for p in experts:
        if p.scheme != first.scheme or not torch.equal(p.weight_shape, first.weight_shape):
            raise ValueError("stack_experts needs one scheme and one weight_shape")
    zp = None
    if first.weight_zero_point is not None:
        zp = torch.stack([p.weight_zero_point for p in experts])
    return PackedWeight(torch.stack([p.weight_packed for p in experts]),
                        torch.stack([p.weight_scale for p in experts]), first.weight_shape.clone(),
                        zp, first.scheme)
