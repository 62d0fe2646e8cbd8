"""Small building blocks shared by the language model: RMSNorm, SwiGLU MLP, interleaved RoPE."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Statistics in fp32, result cast back to the input dtype, then scaled by the weight
    (in the weight's dtype), exactly as the reference does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused op for the statistics and scaling (4 fewer dispatched ops in a decode step,
        # where each costs more than its work).
        normed = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return self.weight * normed.to(x.dtype)


def linear(in_features: int, out_features: int) -> nn.Linear:
    """A bias-free Linear whose weight is filled by the loader (no random init)."""
    layer = nn.Linear(in_features, out_features, bias=False)
    layer.weight.requires_grad_(False)
    return layer


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): the dense layer-0 MLP and the shared experts."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = linear(hidden, intermediate)
        self.up_proj = linear(hidden, intermediate)
        self.down_proj = linear(intermediate, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class RotaryTable:
    """cos/sin of pos * inv_freq (fp32), grown on demand up to max_positions.

    Kept out of the module tree: it is derived, never loaded, and must not be counted as weights.
    """

    def __init__(self, dim: int, theta: float, max_positions: int):
        # Explicit CPU: the model is built under torch.device("meta"), this table is not a weight.
        exponent = torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim
        self.inv_freq = 1.0 / (theta ** exponent)
        self.max_positions = max_positions
        self._cos = self._sin = torch.empty(0, dim // 2, device="cpu")

    def get(self, positions: torch.Tensor, grow: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [T, dim/2] in fp32 for integer positions [T]. grow=False skips the size
        check, which reads the positions on the host (a sync): the caller has called ensure()."""
        if grow:
            self.ensure(int(positions.max()) + 1, positions.device)
        return self._cos.index_select(0, positions), self._sin.index_select(0, positions)

    def ensure(self, need: int, device: torch.device) -> None:
        """Make the table hold positions 0..need-1 on `device`."""
        if need > self._cos.shape[0] or self._cos.device != device:
            size = min(self.max_positions, max(need, 2 * self._cos.shape[0], 4096))
            t = torch.arange(size, dtype=torch.float32, device=device)
            freqs = torch.outer(t, self.inv_freq.to(device))
            self._cos, self._sin = freqs.cos(), freqs.sin()


def apply_rope_interleaved(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate each adjacent pair (x[2j], x[2j+1]) by angle_j (GPT-J style, DeepSeek's layout).

    x: [T, ..., D]; cos/sin: [T, D/2] fp32. Like the reference, the rotation runs in x's dtype and
    the result is returned de-interleaved, [rotated evens | rotated odds]; q and k get the same
    permutation so q·k is unchanged, and the latent cache stores k in this layout.
    """
    return RopeTables(cos, sin, x.dtype).apply(x)


class RopeTables:
    """cos/sin of some positions laid out for `apply`: [cos | cos] and [-sin | sin] in the
    rotation's dtype, so a rotation is two gathers, two products and a sum (5 ops instead of
    9), rounding exactly as x1*cos - x2*sin, x2*cos + x1*sin (the negation is exact). Built once
    per forward (LanguageModel) and shared by every layer."""

    def __init__(self, cos: torch.Tensor, sin: torch.Tensor, dtype: torch.dtype):
        self.cos2 = torch.cat([cos, cos], -1).to(dtype)
        self.sin2 = torch.cat([-sin, sin], -1).to(dtype)
        half = cos.shape[-1]
        evens = torch.arange(0, 2 * half, 2, device=cos.device)
        self.deinterleave = torch.cat([evens, evens + 1])  # [x1 | x2]
        self.swapped = torch.cat([evens + 1, evens])  # [x2 | x1]

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        cos2, sin2 = self.cos2, self.sin2
        if cos2.dtype != x.dtype:  # not the dtype the tables were built for: convert this once
            cos2, sin2 = cos2.to(x.dtype), sin2.to(x.dtype)
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos2.shape[-1],)
        cos2, sin2 = cos2.view(shape), sin2.view(shape)
        return (x.index_select(-1, self.deinterleave) * cos2
                + x.index_select(-1, self.swapped) * sin2)

