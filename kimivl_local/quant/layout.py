"""What the kernels' weight layouts (cpu_layout.py, cuda_layout.py) share: the weight record and
its scalar checks, the tensor check, K's padding, and the rule for the 16-bit scale dtype."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

CHUNK = 32  # K is padded to a multiple of this; every group size is one of its multiples


def padded(k: int) -> int:
    return -(-k // CHUNK) * CHUNK


def expect_tensor(name, t, dtypes, shape, device) -> None:
    """Raise naming `name` unless t is a contiguous tensor of `dtypes`, `shape`, on `device`."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if list(t.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {list(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} must be one of {dtypes}, got {t.dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device} but qweight is on {device}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def scale_dtype_for(*scales: torch.Tensor) -> torch.dtype:
    """The layout's 16-bit scale dtype for these on-disk scales (all of one weight, e.g. every
    expert): bf16/fp16 stay as they are; fp32 becomes fp16 when every nonzero scale is in fp16's
    normal range, else bf16."""
    if scales[0].dtype in (torch.bfloat16, torch.float16):
        return scales[0].dtype
    fits = True
    for scale in scales:
        nonzero = scale[scale != 0].abs()
        fits &= nonzero.numel() == 0 or bool(nonzero.max() <= 65504 and nonzero.min() >= 2.0 ** -14)
    return torch.float16 if fits else torch.bfloat16


@dataclass(frozen=True)
class QuantWeight:
    """A weight [*, N, K] in one kernel layout; a leading dim of qweight stacks experts.
    Built only by its subclasses, which check their layout's tensors in check_tensors()."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None
    bits: int
    group_size: int  # KP for per-channel
    out_features: int
    in_features: int

    STACKED_DIMS: ClassVar[int]  # qweight's number of dimensions when experts are stacked
    BITS: ClassVar[tuple[int, ...]]  # the widths the layout's kernels take

    def __post_init__(self):
        """Check everything once, here, so the ops need not on each call."""
        self.check_scalars()
        self.check_tensors()

    def check_tensors(self) -> None:
        raise NotImplementedError

    def check_scalars(self) -> None:
        n, k, bits, group = self.out_features, self.in_features, self.bits, self.group_size
        if bits not in self.BITS:
            raise ValueError(f"bits must be one of {', '.join(map(str, self.BITS))} in "
                             f"{type(self).__name__}, got {bits}")
        if n < 1 or k < 1:
            raise ValueError(f"out_features and in_features must be positive, got {n}, {k}")
        kp = padded(k)
        if group < CHUNK or group % CHUNK or kp % group:
            raise ValueError(f"group_size must be a multiple of {CHUNK} dividing {kp}, got {group}")

    @property
    def num_experts(self) -> int | None:
        return self.qweight.shape[0] if self.qweight.dim() == self.STACKED_DIMS else None

    @property
    def padded_in_features(self) -> int:
        return padded(self.in_features)

    @property
    def groups(self) -> int:
        return self.padded_in_features // self.group_size

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def expert(self, e: int):
        if self.num_experts is None:
            raise ValueError("expert() needs a stacked [E, ...] weight")
        return type(self)(self.qweight[e], self.scales[e],
                          None if self.zeros is None else self.zeros[e], self.bits,
                          self.group_size, self.out_features, self.in_features)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros)
                   if t is not None)
