"""Multi-modal projector: merged MoonViT patches -> language-model embeddings (reference §4.5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig


class Projector(nn.Module):
    """[M, kh*kw, vision hidden] -> [M, text hidden].

    Each sub-patch is LayerNorm-ed on its own (not the concatenation), then the sub-patches are
    concatenated in merge order ([TL | TR | BL | BR]), then linear_1, exact erf GELU, linear_2.
    """

    def __init__(self, vision_cfg: VisionConfig, text_hidden_size: int):
        super().__init__()
        kh, kw = vision_cfg.merge_kernel_size
        self.num_sub, self.sub_dim = kh * kw, vision_cfg.hidden_size
        self.pre_norm = nn.LayerNorm(self.sub_dim, eps=1e-5)
        self.linear_1 = nn.Linear(self.num_sub * self.sub_dim, self.num_sub * self.sub_dim)
        self.linear_2 = nn.Linear(self.num_sub * self.sub_dim, text_hidden_size)

    def forward(self, merged: torch.Tensor) -> torch.Tensor:
        if merged.dim() != 3 or tuple(merged.shape[1:]) != (self.num_sub, self.sub_dim):
            raise ValueError(f"merged must have shape [M, {self.num_sub}, {self.sub_dim}], "
                             f"got {tuple(merged.shape)}")
        x = self.pre_norm(merged).reshape(merged.shape[0], -1)
        return self.linear_2(F.gelu(self.linear_1(x)))
