"""The whole model, composed: language model (+ vision tower and projector when present).

Module names follow the checkpoint's tensor names; the one structural exception is the routed
experts, stored stacked [E, ...] here and one tensor per expert on disk (see `checkpoint_name`).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..config import KimiVLConfig
from .language import LanguageModel

_STACKED_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")


class KimiVLForConditionalGeneration(nn.Module):
    def __init__(self, config: KimiVLConfig):
        super().__init__()
        self.config = config
        self.language_model = LanguageModel(config.text)

    def expected_checkpoint(self) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
        """Every tensor the checkpoint must hold: name -> (shape, allowed dtypes)."""
        dtype = self.config.dtype
        expected = {}
        for name, param in self.named_parameters():
            m = _STACKED_EXPERT.match(name)
            if m:
                for e in range(param.shape[0]):
                    expected[f"{m[1]}.{e}.{m[2]}.weight"] = (tuple(param.shape[1:]), (dtype,))
            elif name.endswith("e_score_correction_bias"):
                # Stored in fp32 like DeepSeek-V3's; accept the weight dtype too.
                expected[name] = (tuple(param.shape), (torch.float32, dtype))
            else:
                expected[name] = (tuple(param.shape), (dtype,))
        return expected


def checkpoint_names(param_name: str, param_shape: torch.Size) -> list[str]:
    """The on-disk tensor name(s) of one parameter: E names for a stacked expert tensor."""
    m = _STACKED_EXPERT.match(param_name)
    if m:
        return [f"{m[1]}.{e}.{m[2]}.weight" for e in range(param_shape[0])]
    return [param_name]
