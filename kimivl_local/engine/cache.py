"""The MLA latent KV cache: per layer and token, the normalised c_kv and the roped k_pe.

Preallocated once at the context size ([layers, capacity, kv_lora_rank + rope_dim]), so decoding
never allocates; 27 x 576 x 2 bytes = 31 KB per token in bf16 for Kimi-VL-A3B.
"""

from __future__ import annotations

import torch


class LatentCache:
    def __init__(self, num_layers: int, capacity: int, latent_dim: int, dtype: torch.dtype,
                 device: torch.device | str):
        self.kv = torch.zeros(num_layers, capacity, latent_dim, dtype=dtype, device=device)
        # One key per cached position (token id, or an image placeholder's (digest, index)).
        self.tokens: list = []

    @property
    def capacity(self) -> int:
        return self.kv.shape[1]

    @property
    def device(self) -> torch.device:
        return self.kv.device

    def common_prefix(self, keys: list) -> int:
        """How many leading positions of `keys` are already cached."""
        n = min(len(keys), len(self.tokens))
        i = 0
        while i < n and keys[i] == self.tokens[i]:
            i += 1
        return i

    def set_tokens(self, keys: list) -> None:
        self.tokens = list(keys)

    def append(self, token: int) -> None:
        self.tokens.append(token)

    def reset(self) -> None:
        self.tokens = []
