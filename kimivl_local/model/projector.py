"""Multi-modal projector: merged MoonViT patches -> language-model embeddings (reference §4.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.config import VisionConfig
from ..ops.vision_ops import add_layer_norm
from .vision import TowerLinear, fast_path_default


class Projector(nn.Module):
    """[M, kh*kw, vision hidden] -> [M, text hidden].

    Each sub-patch is LayerNorm-ed on its own (not the concatenation), then the sub-patches are
    concatenated in merge order ([TL | TR | BL | BR]), then linear_1, exact erf GELU, linear_2.
    bf16_linears: as MoonViT's (None: the tower's fast-path rule): the two linears as bf16
    matmuls on a bf16 LayerNorm output, GELU and biases in fp32, the result in fp32.
    """

    bf16_linears: bool | None = None

    def __init__(self, vision_cfg: VisionConfig, text_hidden_size: int):
        super().__init__()
        kh, kw = vision_cfg.merge_kernel_size
        self.num_sub, self.sub_dim = kh * kw, vision_cfg.hidden_size
        self.pre_norm = nn.LayerNorm(self.sub_dim, eps=1e-5)
        self.linear_1 = TowerLinear(self.num_sub * self.sub_dim, self.num_sub * self.sub_dim)
        self.linear_2 = TowerLinear(self.num_sub * self.sub_dim, text_hidden_size)

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        if merged.dim() != 3 or tuple(merged.shape[1:]) != (self.num_sub, self.sub_dim):
            raise ValueError(f"merged must have shape [M, {self.num_sub}, {self.sub_dim}], "
                             f"got {tuple(merged.shape)}")
        if self._fast(merged):
            return self._forward_fast(merged)
        x = self.pre_norm(merged).reshape(merged.shape[0], -1)
        return self.linear_2(F.gelu(self.linear_1(x)))

    def _fast(self, merged: torch.Tensor) -> bool:
        """bf16_linears' choice, for float32 linears that are not quantized (QuantLinear)."""
        linears = (self.linear_1, self.linear_2)
        if not all(isinstance(m, TowerLinear) for m in linears):
            return False
        weight = self.linear_1.weight
        fast = self.bf16_linears
        if fast is None:
            fast = fast_path_default(weight.device, weight.dtype)
        return (fast and merged.dtype == weight.dtype == torch.float32
                and weight.device.type == "cpu")

    def _forward_fast(self, merged: torch.Tensor) -> torch.Tensor:
        m = merged.shape[0]
        norm = self.pre_norm
        x = add_layer_norm(merged.reshape(-1, self.sub_dim), norm.weight, norm.bias, norm.eps)
        h = torch.mm(x.view(m, -1), self.linear_1.bf16_weight().t()).float()
        h = F.gelu(h.add_(self.linear_1.bias)).bfloat16()
        return torch.mm(h, self.linear_2.bf16_weight().t()).float().add_(self.linear_2.bias)
