"""The MoE feed-forward of layers 1..N: sigmoid router with noaux_tc group-limited top-k,
routed experts stored stacked [E, ...], and always-on shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.config import TextConfig
from .layers import SwiGLU


class Router(nn.Module):
    """Checkpoint names: mlp.gate.weight [E, hidden], mlp.gate.e_score_correction_bias [E]."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.top_k, self.n_group, self.topk_group = cfg.num_experts_per_tok, cfg.n_group, cfg.topk_group
        self.norm_topk_prob, self.scaling = cfg.norm_topk_prob, cfg.routed_scaling_factor
        e = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(e, cfg.hidden_size), requires_grad=False)
        self.e_score_correction_bias = nn.Parameter(torch.empty(e, dtype=torch.float32),
                                                    requires_grad=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, hidden] -> (weights fp32 [T, k], expert ids int64 [T, k]); all in fp32."""
        weight, bias = self.fp32_params()
        scores = F.linear(x.float(), weight).sigmoid()
        # The correction bias only chooses experts; the weights are the unbiased scores.
        choice = scores + bias
        if self.n_group > 1:
            grouped = choice.view(x.shape[0], self.n_group, -1)
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
            keep = group_scores.topk(self.topk_group, dim=-1).indices
            group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
            choice = grouped.masked_fill(~group_mask[..., None], 0.0).view_as(choice)
        ids = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, ids)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return weights * self.scaling, ids

    def fp32_params(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight and correction bias in fp32, converted once and kept while the parameters
        are the same tensors (a bf16 router weight is 0.5 MB of fp32 per layer per step)."""
        cached = self.__dict__.get("_fp32")
        params = (self.weight, self.e_score_correction_bias)
        if cached is None or cached[0] is not params[0] or cached[1] is not params[1]:
            cached = (self.weight, self.e_score_correction_bias, self.weight.float(),
                      self.e_score_correction_bias.float())
            self.__dict__["_fp32"] = cached
        return cached[2], cached[3]


class StackedExperts(nn.Module):
    """All routed experts as [E, out, in] tensors (checkpoint: experts.{e}.{proj}.weight)."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        e, h, i = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.gate_proj = nn.Parameter(torch.empty(e, i, h), requires_grad=False)
        self.up_proj = nn.Parameter(torch.empty(e, i, h), requires_grad=False)
        self.down_proj = nn.Parameter(torch.empty(e, h, i), requires_grad=False)

    @property
    def device(self) -> torch.device:
        return self.gate_proj.device

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return experts_forward(x, weights, ids, self.gate_proj, self.up_proj, self.down_proj)


def experts_forward(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, gate: torch.Tensor,
                    up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """sum_k weights[:, k] * expert_{ids[:, k]}(x) over dense [E, out, in] weights, combined in
    fp32 and cast back.

    Token-expert pairs are sorted by expert so each expert runs once on its rows; experts that
    receive no token cost nothing.
    """
    t, k = ids.shape
    flat = ids.reshape(-1)
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=gate.shape[0]).tolist()
    rows = order // k  # token index of each sorted pair
    out = torch.empty(t * k, x.shape[1], dtype=x.dtype, device=x.device)
    begin = 0
    for expert, n in enumerate(counts):
        if n == 0:
            continue
        sel = order[begin:begin + n]
        xe = x[rows[begin:begin + n]]
        h = F.silu(F.linear(xe, gate[expert])) * F.linear(xe, up[expert])
        out[sel] = F.linear(h, down[expert])
        begin += n
    combined = (out.view(t, k, -1).float() * weights[..., None]).sum(1)
    return combined.to(x.dtype)


class MoE(nn.Module):
    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate = Router(cfg)
        self.experts = StackedExperts(cfg)
        self.shared_experts = SwiGLU(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.gate(x)
        where = self.experts.device
        if where == x.device:
            routed = self.experts(x, weights, ids)
        else:  # experts kept in host memory (--cpu-experts): run them there, on the CPU kernels
            routed = self.experts(x.to(where), weights.to(where), ids.to(where)).to(x.device)
        # Shared experts are added unweighted and unscaled.
        return routed + self.shared_experts(x)
