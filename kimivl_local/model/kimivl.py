"""The whole model, composed: MoonViT -> projector -> features spliced into the language model.

Module names follow the checkpoint's tensor names; the one structural exception is the routed
experts, stored stacked [E, ...] here and one tensor per expert on disk (see `checkpoint_name`).
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..checkpoint.config import KimiVLConfig
from ..errors import InputError
from .language import LanguageModel
from .projector import Projector
from .quantized import QuantExperts, QuantLinear
from .vision import MoonViT

_STACKED_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$")


class KimiVLForConditionalGeneration(nn.Module):
    def __init__(self, config: KimiVLConfig):
        super().__init__()
        self.config = config
        self.vision_tower = MoonViT(config.vision)
        self.multi_modal_projector = Projector(config.vision, config.text.hidden_size)
        self.language_model = LanguageModel(config.text)

    def image_features(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> list[torch.Tensor]:
        """Preprocessed patches [N, 3, 14, 14] + grids [n, 2] -> per image [tokens_i, text hidden]."""
        merged = self.vision_tower(pixel_values, grid_hws)
        projected = self.multi_modal_projector(torch.cat(merged))
        return list(projected.split([m.shape[0] for m in merged]))

    def embed(self, input_ids: torch.Tensor, features: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Token embeddings [T, hidden] with the image features written over the placeholder
        tokens, in order (features from all images concatenated, as the reference does)."""
        embeds = self.language_model.embed(input_ids)
        slots = input_ids == self.config.media_placeholder_token_id
        n_slots = int(slots.sum())
        n_features = sum(f.shape[0] for f in features) if features else 0
        if n_slots != n_features:
            raise InputError(f"the prompt has {n_slots} image placeholder tokens but the images "
                             f"give {n_features} features")
        if n_slots:
            embeds[slots] = torch.cat(features).to(embeds.device, embeds.dtype)
        return embeds

    def expected_checkpoint(self) -> dict[str, tuple[tuple[int, ...], tuple[torch.dtype, ...]]]:
        """Every tensor the checkpoint must hold: name -> (shape, allowed dtypes).

        Quantized layers (swapped in by the loader) list their own packed tensors.
        """
        dtype = self.config.dtype
        expected = {}
        for name, module in self.named_modules():
            if isinstance(module, QuantLinear):
                expected.update(module.expected_checkpoint(name))
            elif isinstance(module, QuantExperts):
                expected.update(module.expected_checkpoint(name, dtype))
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
