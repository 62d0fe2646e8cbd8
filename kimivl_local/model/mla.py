"""Multi-head latent attention (MLA) with a latent-only KV cache.

Per token the cache holds the normalised c_kv (kv_lora_rank) and the roped, shared k_pe
(qk_rope_head_dim): 576 values instead of 16 heads x (192 + 128). Prefill expands the latents
with kv_b_proj and attends normally; decode uses the absorbed form, folding kv_b_proj's key half
into the query and its value half into the output, so the cache is never expanded.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import ops
from ..checkpoint.config import TextConfig
from ..ops.head_gemv import head_gemv
from .layers import RMSNorm, RopeTables, linear


class MLAttention(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.nope_dim, self.rope_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
        self.v_dim, self.rank = cfg.v_head_dim, cfg.kv_lora_rank
        self.scale = cfg.qk_head_dim ** -0.5  # 1/sqrt(192): no YaRN mscale (rope_scaling is null)
        self.q_proj = linear(cfg.hidden_size, self.num_heads * cfg.qk_head_dim)
        self.kv_a_proj_with_mqa = linear(cfg.hidden_size, cfg.latent_dim)
        # Built without an eps argument in the reference, so the class default 1e-6 applies.
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = linear(cfg.kv_lora_rank, self.num_heads * (self.nope_dim + self.v_dim))
        self.o_proj = linear(self.num_heads * self.v_dim, cfg.hidden_size)

    def forward(self, x: torch.Tensor, rope: RopeTables, cache: torch.Tensor | None = None,
                start: int = 0, position: torch.Tensor | None = None) -> torch.Tensor:
        """x [T, hidden] at positions start..start+T-1; rope: their RoPE angles (in x's dtype).

        cache: this layer's [capacity, rank + rope_dim] latent buffer, or None for a cache-free
        forward over x alone (then start must be 0). New latents are written at [start, start+T).
        position: instead of start, for one token (T = 1) with a cache: its position as a device
        tensor [1], so the step never reads a device value on the host (CUDA-graph capturable).
        """
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.nope_dim + self.rope_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        q_pe = rope.apply(q_pe)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope_dim], dim=-1)
        latent = torch.cat([self.kv_a_layernorm(c_kv), rope.apply(k_pe)], -1)
        if position is not None:
            cache.index_copy_(0, position, latent.to(cache.dtype))
            out = self.attend_cache(q_nope, q_pe, cache, position + 1)
            return self.o_proj(out.reshape(t, self.num_heads * self.v_dim))
        if cache is not None:
            cache[start:start + t] = latent
            latent = cache[:start + t]
        elif start != 0:
            raise ValueError("start > 0 needs a cache holding the earlier tokens")
        attend = self.attend_absorbed if t == 1 else self.attend_expanded
        out = attend(q_nope, q_pe, latent, start)
        return self.o_proj(out.reshape(t, self.num_heads * self.v_dim))

    def _split_kv_b(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_uk [H, nope, rank], W_uvᵀ [H, rank, v]) in kv_b_proj's dtype. On the CPU they are
        made contiguous once and kept (4 MB a layer in bf16) for `head_gemv`; on a GPU they are
        views (torch.bmm reads them strided at full speed)."""
        cached = self.__dict__.get("_kv_b_split")
        if cached is not None and cached[0] is self.kv_b_proj.weight:
            return cached[1]
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope_dim + self.v_dim, self.rank)
        split = w[:, :self.nope_dim], w[:, self.nope_dim:].transpose(1, 2)
        if w.device.type == "cpu":
            split = tuple(t.contiguous() for t in split)
            self.__dict__["_kv_b_split"] = (self.kv_b_proj.weight, split)
        return split

    def attend_expanded(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                        start: int) -> torch.Tensor:
        """Expand-then-attend: q [T,H,*], latent [S, rank+rope] with S = start+T -> [T,H,v_dim].

        On the CPU the expansion and attention run in fp32 (torch's CPU bf16 matmul and
        attention are several times slower than fp32 without AVX512-BF16); a prompt starting at
        position 0 goes through `ops.varlen_attention` (causal, O(T) memory), a later chunk
        through SDPA with an explicit mask over the cached positions."""
        t, s = q_nope.shape[0], latent.shape[0]
        compute = torch.float32 if latent.device.type == "cpu" else latent.dtype
        c_kv, k_pe = latent.to(compute).split([self.rank, self.rope_dim], dim=-1)
        kv = F.linear(c_kv, self.kv_b_proj.weight.to(compute))
        k_nope, v = kv.view(s, self.num_heads, self.nope_dim + self.v_dim).split(
            [self.nope_dim, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, None, :].expand(s, self.num_heads, self.rope_dim)], -1)
        q = torch.cat([q_nope, q_pe], -1).to(compute)
        if start == 0:
            bounds = torch.tensor([0, t], dtype=torch.int32, device=q.device)
            out = ops.varlen_attention(q, k, v, bounds, causal=True, scale=self.scale,
                                       max_seqlen=t)
        else:
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)
            mask = causal_mask(t, s, start, q.device)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
            out = out.transpose(0, 1)
        return out.to(q_nope.dtype)

    def attend_absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor,
                        start: int) -> torch.Tensor:
        """Absorbed form over the raw latents, in fp32: q [T,H,*], latent [S, rank+rope].

        One token goes through attend_cache; several (only tests ask) write the math out with a
        causal mask."""
        t, s = q_nope.shape[0], latent.shape[0]
        if t == 1:
            return self.attend_cache(q_nope, q_pe, latent,
                                     torch.tensor([s], dtype=torch.int64, device=latent.device))
        w_uk, w_uv_t = (w.float() for w in self._split_kv_b())
        lat = latent.float()
        c_kv, k_pe = lat[:, :self.rank], lat[:, self.rank:]
        q_lat = torch.einsum("thd,hdr->thr", q_nope.float(), w_uk)
        scores = (torch.einsum("thr,sr->ths", q_lat, c_kv)
                  + torch.einsum("thd,sd->ths", q_pe.float(), k_pe)) * self.scale
        if t > 1:
            scores = scores.masked_fill(~causal_mask(t, s, start, scores.device)[:, None], -torch.inf)
        o_lat = torch.einsum("ths,sr->thr", scores.softmax(-1), c_kv)
        return torch.einsum("thr,hrd->thd", o_lat, w_uv_t).to(q_nope.dtype)


    def attend_cache(self, q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                     seq_len: torch.Tensor) -> torch.Tensor:
        """One query token over the first seq_len[0] rows of `cache` [capacity, rank + rope],
        absorbed, via `ops.mla_decode` (the cache as stored, bf16 or fp32, never copied)."""
        w_uk, w_uv_t = self._split_kv_b()
        q_lat = head_gemv(q_nope[0].float(), w_uk)  # [H, rank]
        o_lat = ops.mla_decode(q_lat[None], q_pe.float(), cache[None], seq_len, scale=self.scale,
                               max_seq_len=cache.shape[0])  # [1, H, rank] fp32
        return head_gemv(o_lat[0], w_uv_t)[None].to(q_nope.dtype)  # [1, H, v]


def causal_mask(t: int, s: int, start: int, device) -> torch.Tensor:
    """[t, s] bool, True where query i (at position start+i) may see key j."""
    rows = torch.arange(t, device=device)[:, None] + start
    return torch.arange(s, device=device)[None, :] <= rows
