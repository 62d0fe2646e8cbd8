"""The language model: embeddings, N pre-norm decoder layers (MLA + dense/MoE FFN), final norm,
untied lm_head. Attribute names follow the checkpoint (`language_model.model.layers.{i}...`)."""

from __future__ import annotations

import torch
from torch import nn

from ..checkpoint.config import TextConfig
from .fused_decode import FusedDecode
from .layers import RMSNorm, RopeTables, RotaryTable, SwiGLU, linear
from .mla import MLAttention
from .moe import MoE


class DecoderLayer(nn.Module):
    def __init__(self, cfg: TextConfig, index: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = MLAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(index) else SwiGLU(cfg.hidden_size,
                                                                   cfg.intermediate_size)

    def forward(self, x, rope, cache=None, start=0, position=None):
        x = x + self.self_attn(self.input_layernorm(x), rope, cache, start, position)
        return x + self.mlp(self.post_attention_layernorm(x))


class TextModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LanguageModel(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.model = TextModel(cfg)
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size)
        self.rope = RotaryTable(cfg.qk_rope_head_dim, cfg.rope_theta, cfg.max_position_embeddings)

    @property
    def device(self) -> torch.device:
        """Where the layers compute (the embeddings may stay in host memory: memory_plan.py)."""
        return self.model.norm.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.norm.weight.dtype

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings, on the table's device (host memory on a GPU run: the forward
        moves them)."""
        return self.model.embed_tokens(input_ids.to(self.model.embed_tokens.weight.device))

    def hidden_states(self, embeds: torch.Tensor, cache: torch.Tensor | None = None,
                      start: int = 0) -> torch.Tensor:
        """embeds [T, hidden] at positions start..start+T-1 -> final-normed hidden [T, hidden].

        cache: [num_layers, capacity, latent_dim] latent buffer (written at [start, start+T)),
        or None for a cache-free forward from position 0.
        """
        positions = torch.arange(start, start + embeds.shape[0], device=self.device)
        x = embeds.to(self.device)
        rope = RopeTables(*self.rope.get(positions), x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, None if cache is None else cache[i], start)
        return self.model.norm(x)

    def decode_hidden(self, embeds: torch.Tensor, position: torch.Tensor,
                      cache: torch.Tensor) -> torch.Tensor:
        """One token: embeds [1, hidden] at position[0] (a device tensor [1], int64) ->
        final-normed hidden [1, hidden]. Nothing here reads a device value on the host, so a
        CUDA graph can capture it (the rope table must already reach the position: ensure())."""
        x = embeds.to(self.device)
        fused = self.fused_decode()
        if fused is not None and fused.active:
            return self.model.norm(fused.run(self, x, position, cache))
        rope = RopeTables(*self.rope.get(position, grow=False), x.dtype)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, rope, cache[i], position=position)
        return self.model.norm(x)

    def fused_decode(self) -> FusedDecode | None:
        """The CPU decode step's fused layers (fused_decode.py), planned at the first
        decode; None where no layer can be fused (CUDA, unquantized, KIMIVL_FUSED_DECODE=0)."""
        if "_fused_decode" not in self.__dict__:
            self.__dict__["_fused_decode"] = FusedDecode.plan(self)
        return self.__dict__["_fused_decode"]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[T, hidden] -> fp32 logits [T, vocab]."""
        return self.lm_head(hidden).float()
