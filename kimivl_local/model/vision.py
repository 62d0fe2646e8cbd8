"""MoonViT, the Kimi-VL vision tower (reference §4.2-4.4).

Attribute names mirror the checkpoint's `vision_tower.*` tensors, so `state_dict()` keys are those
names without the prefix. No buffers: the RoPE angles are computed per call on the input's device
(the CPU fast path keeps its tables in a small cache keyed by the grids), which keeps the module
constructible on the meta device and fillable from mmapped safetensors.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoint.config import VisionConfig
from ..kernels.extension import build_info
from ..ops import varlen_attention
from ..ops.vision_ops import add_layer_norm, bias_gelu_, bias_rope_, rope_tables

ROPE_THETA = 10000.0
EXACT_ENV = "KIMIVL_VISION_EXACT"  # "1": fp32 linears on the CPU even where bf16 is fast

# A block's MLP output (bf16, bias not yet added) and its bias, which the next LayerNorm adds.
Pending = tuple[torch.Tensor | None, torch.Tensor | None]


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX512-BF16; AMX-BF16 CPUs have it too),
    where torch's bf16 matmul (oneDNN) runs ~8x faster than fp32 (measured 291 vs 35 GFLOP/s on
    [1296, 1152] x [1152, 4304], 2 Xeon cores). Without it bf16 matmul is ~4x slower than fp32."""
    features = build_info().get("cpu_features") or {}
    return bool(features.get("avx512_bf16"))


def fast_path_default(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether a tower held in `dtype` on `device` takes the bf16 fast path when bf16_linears is
    None: an fp32 tower on a CPU with bf16 hardware, unless KIMIVL_VISION_EXACT=1."""
    return (device.type == "cpu" and dtype == torch.float32 and os.environ.get(EXACT_ENV) != "1"
            and cpu_has_fast_bf16())


class TowerLinear(nn.Linear):
    """nn.Linear (the exact path) that also hands out a bf16 copy of its weight for the fast
    path's matmuls (EncoderBlock.forward_fast, Projector). The copy is made at the first
    fast call and kept while the weight is the same tensor: half the fp32 weight's memory, which
    memory_plan.vision_fast_bytes counts."""

    def bf16_weight(self) -> torch.Tensor:
        cached = self.__dict__.get("_bf16")
        if cached is None or cached[0] is not self.weight:
            cached = (self.weight, self.weight.detach().bfloat16())
            self.__dict__["_bf16"] = cached
        return cached[1]


class LearnedPosEmb2D(nn.Module):
    """A [H0, W0, dim] table, bicubically resized to each image's grid and added to its patches."""

    def __init__(self, height: int, width: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(height, width, dim))

    def forward(self, x: torch.Tensor, grids: list[tuple[int, int]],
                separable: bool = False) -> torch.Tensor:
        """separable: resize with two small matmuls (the fast CPU path; fp32 tables): torch's
        CPU bicubic kernel took 199 ms for the 64x64x1152 table to 38x38 on 2 cores."""
        if separable:
            return x + torch.cat([self._resize_separable(h, w) for h, w in grids])
        table = self.weight.permute(2, 0, 1).unsqueeze(0)  # [1, dim, H0, W0]
        # Always interpolate (even to smaller grids: no cropping); align_corners=False, no antialias,
        # in the table's dtype, like the reference.
        pos = [F.interpolate(table, size=(h, w), mode="bicubic").squeeze(0).permute(1, 2, 0)
               .reshape(h * w, -1) for h, w in grids]
        return x + torch.cat(pos)

    def _resize_separable(self, h: int, w: int) -> torch.Tensor:
        """The same bicubic resize as rows then columns: bicubic is separable and linear, so
        F.interpolate of an identity gives its [out, in] matrix along one axis."""
        h0, w0, dim = self.weight.shape
        rows, cols = (F.interpolate(torch.eye(n, dtype=self.weight.dtype).view(1, n, n, 1),
                                    size=(m, 1), mode="bicubic")[0, :, :, 0].t()
                      for n, m in ((h0, h), (w0, w)))
        tmp = (rows @ self.weight.reshape(h0, w0 * dim)).view(h, w0, dim)  # [h, W0, dim]
        return torch.matmul(cols, tmp).reshape(h * w, dim)  # [h, w, dim] as rows


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(3, cfg.hidden_size, kernel_size=p, stride=p)
        self.pos_emb = LearnedPosEmb2D(cfg.init_pos_emb_height, cfg.init_pos_emb_width, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor, grids: list[tuple[int, int]],
                fast: bool = False) -> torch.Tensor:
        """fast: the CPU fast path's forms of the same fp32 math (a stride-p p x p convolution
        is one matmul over flattened patches: 380 ms for 1444 patches through oneDNN's
        convolution on 2 cores, ~15 ms as a matmul; and the separable position resize)."""
        n = pixel_values.shape[0]
        if fast:
            w = self.proj.weight
            x = torch.addmm(self.proj.bias, pixel_values.reshape(n, -1), w.view(w.shape[0], -1).t())
        else:
            x = self.proj(pixel_values).view(n, -1)
        return self.pos_emb(x, grids, separable=fast)


def rope_2d_freqs(grids: list[tuple[int, int]], head_dim: int, device: torch.device) -> torch.Tensor:
    """complex64 [sum h*w, head_dim/2] rotations; positions restart at (0, 0) for every image.

    Complex pair 2i turns by col * theta_i (width), pair 2i+1 by row * theta_i (height), with
    theta_i = 10000^(-4i/head_dim): the reference code's layout (its docstring says the opposite).
    Angles are fp32 products, as in the reference's precomputed table, so values match it exactly.
    """
    dim_range = torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float()
    theta = 1.0 / (ROPE_THETA ** (dim_range / head_dim))  # [head_dim/4]
    out = []
    for h, w in grids:
        idx = torch.arange(h * w, device=device)
        col, row = (idx % w).float(), torch.div(idx, w, rounding_mode="floor").float()
        angles = torch.stack([torch.outer(col, theta), torch.outer(row, theta)], dim=-1)
        out.append(torch.polar(torch.ones_like(angles), angles).reshape(h * w, -1))
    return torch.cat(out)


@functools.lru_cache(maxsize=8)
def cpu_rope_tables(grids: tuple[tuple[int, int], ...],
                    head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast path's interleaved RoPE tables (ops.vision_ops.rope_tables) for these grids,
    kept for the next images of the same sizes: building them is a dozen small torch ops, each
    ~10 ms when other processes hold the cores. Read-only."""
    return rope_tables(rope_2d_freqs(list(grids), head_dim, torch.device("cpu")))


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate adjacent pairs (2j, 2j+1) of x [N, heads, D] by freqs [N, D/2], in fp32 complex."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs.unsqueeze(1)).flatten(-2).to(x.dtype)


def sdpa_per_image(qkv: torch.Tensor, seq_lens: list[int]) -> torch.Tensor:
    """Bidirectional attention within each image: qkv [N, 3, heads, D] bf16 -> [N, heads * D].

    The fast path's attention: torch's CPU flash attention on bf16 (AMX tiles through oneDNN's
    brgemm where present) took 81 ms for 1296 patches x 16 heads x 72 on 2 Xeon cores, where
    ops.varlen_attention took 154 (fp32) / 168 ms (bf16 storage, fp32 math) in the same run.
    Its probabilities are rounded to bf16 before the product with V; tests/test_vision.py bounds
    the whole tower's error."""
    n, _, heads, dim = qkv.shape
    outs, start = [], 0
    for length in seq_lens:
        q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in qkv[start:start + length].unbind(1))
        # [1, heads, L, D] with token-major strides: transposed back it is contiguous [L, heads,
        # D], so one image needs no copy (reshape is a view then).
        outs.append(F.scaled_dot_product_attention(q, k, v)[0].transpose(0, 1))
        start += length
    out = outs[0] if len(outs) == 1 else torch.cat(outs)
    return out.reshape(n, heads * dim)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc0 = TowerLinear(dim, hidden)
        self.fc1 = TowerLinear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(F.gelu(self.fc0(x), approximate="tanh"))


class EncoderBlock(nn.Module):
    """Pre-norm: x + wo(attn(rope(wqkv(norm0 x)))), then x + mlp(norm1 x)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.norm0 = nn.LayerNorm(cfg.hidden_size, eps=1e-5)
        self.wqkv = TowerLinear(cfg.hidden_size, 3 * cfg.hidden_size)
        self.wo = TowerLinear(cfg.hidden_size, cfg.hidden_size)
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-5)
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor,
                max_seqlen: int | None = None) -> torch.Tensor:
        n = x.shape[0]
        # wqkv rows are [q heads | k heads | v heads].
        q, k, v = self.wqkv(self.norm0(x)).view(n, 3, self.num_heads, self.head_dim).unbind(1)
        q, k = apply_rope(q, freqs), apply_rope(k, freqs)
        attn = varlen_attention(q, k, v, cu_seqlens, causal=False, scale=self.head_dim ** -0.5,
                                max_seqlen=max_seqlen)
        x = x + self.wo(attn.reshape(n, -1))
        return x + self.mlp(self.norm1(x))

    def forward_fast(self, x: torch.Tensor, pending: Pending, seq_lens: list[int],
                     rope: tuple[torch.Tensor, torch.Tensor]) -> Pending:
        """The bf16 CPU path. x is the fp32 residual stream, updated in place; `pending` is the
        previous block's MLP output (bf16, without its bias) not yet added to x, which this
        block's first LayerNorm adds. Returns this block's own pending MLP output. Between the
        bf16 matmuls (oneDNN, bias-free: its fused bias cost +50%) activations stay in bf16; each
        fused op (ops/vision_ops.py) adds the bias and does its fp32 math in one pass; seq_lens
        are the images' patch counts."""
        n, heads, dim = x.shape[0], self.num_heads, self.head_dim
        h = add_layer_norm(x, self.norm0.weight, self.norm0.bias, self.norm0.eps,
                           delta=pending[0], delta_bias=pending[1])
        qkv = torch.mm(h, self.wqkv.bf16_weight().t())
        bias_rope_(qkv, self.wqkv.bias, *rope, heads, dim)
        attn = sdpa_per_image(qkv.view(n, 3, heads, dim), seq_lens)
        o = torch.mm(attn, self.wo.bf16_weight().t())
        h = add_layer_norm(x, self.norm1.weight, self.norm1.bias, self.norm1.eps, delta=o,
                           delta_bias=self.wo.bias)
        f = bias_gelu_(torch.mm(h, self.mlp.fc0.bf16_weight().t()), self.mlp.fc0.bias)
        return torch.mm(f, self.mlp.fc1.bf16_weight().t()), self.mlp.fc1.bias


class Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.blocks = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = nn.LayerNorm(cfg.hidden_size, eps=1e-5)

    def forward(self, x: torch.Tensor, cu_seqlens: torch.Tensor, freqs: torch.Tensor,
                max_seqlen: int | None = None) -> torch.Tensor:
        for block in self.blocks:
            x = block(x, cu_seqlens, freqs, max_seqlen)
        return self.final_layernorm(x)

    def forward_fast(self, x: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        """The bf16 CPU path (EncoderBlock.forward_fast); x (fp32) is updated in place."""
        rope = cpu_rope_tables(tuple(grids), self.blocks[0].head_dim) if self.blocks else None
        pending: Pending = (None, None)
        for block in self.blocks:
            pending = block.forward_fast(x, pending, [h * w for h, w in grids], rope)
        norm = self.final_layernorm
        return add_layer_norm(x, norm.weight, norm.bias, norm.eps, delta=pending[0],
                              delta_bias=pending[1], out_dtype=torch.float32)


def patch_merge(x: torch.Tensor, grids: list[tuple[int, int]],
                kernel: tuple[int, int]) -> list[torch.Tensor]:
    """Per image, [(h/kh)(w/kw), kh*kw, C]: merged tokens in raster order, each holding its
    sub-patches row by row (2x2: top-left, top-right, bottom-left, bottom-right)."""
    kh, kw = kernel
    out, start = [], 0
    for h, w in grids:
        img = x[start:start + h * w].view(h // kh, kh, w // kw, kw, -1)
        out.append(img.permute(0, 2, 1, 3, 4).reshape((h // kh) * (w // kw), kh * kw, -1))
        start += h * w
    return out


class MoonViT(nn.Module):
    """bf16_linears: None (default) runs the blocks of an fp32 tower on the bf16 fast path
    (Encoder.forward fast=True) on a CPU with bf16 hardware, unless KIMIVL_VISION_EXACT=1 (the
    exact fp32 path); True/False force it. The fast path keeps the residual stream fp32 and
    stores the activations between its bf16 matmuls in bf16, with fp32 math in every op; features
    stay within a few bf16 roundings of fp32 (tests/test_vision.py states the bound)."""

    bf16_linears: bool | None = None

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.encoder = Encoder(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> list[torch.Tensor]:
        """pixel_values [N, 3, p, p] (any float dtype; cast to the tower's), grid_hws [n, 2] (h, w)
        with sum h*w = N -> per image [(h/2)(w/2), 4, hidden] in the tower's dtype."""
        grids = self._check(pixel_values, grid_hws)
        weight = self.patch_embed.proj.weight
        fast = self.bf16_linears
        if fast is None:
            fast = fast_path_default(weight.device, weight.dtype)
        fast = (fast and weight.dtype == torch.float32 and weight.device.type == "cpu"
                and all(isinstance(m, TowerLinear) for m in self.encoder.modules()
                        if isinstance(m, nn.Linear)))  # not where a checkpoint quantized them
        x = self.patch_embed(pixel_values.to(device=weight.device, dtype=weight.dtype), grids,
                             fast=fast)
        if fast:
            return patch_merge(self.encoder.forward_fast(x, grids), grids,
                               self.cfg.merge_kernel_size)
        lengths = torch.tensor([0] + [h * w for h, w in grids], dtype=torch.int64)
        cu_seqlens = lengths.cumsum(0).to(device=x.device, dtype=torch.int32)
        freqs = rope_2d_freqs(grids, self.cfg.head_dim, x.device)
        x = self.encoder(x, cu_seqlens, freqs, max(h * w for h, w in grids))  # no sync on CUDA
        return patch_merge(x, grids, self.cfg.merge_kernel_size)

    def _check(self, pixel_values: torch.Tensor, grid_hws: torch.Tensor) -> list[tuple[int, int]]:
        p = self.cfg.patch_size
        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != (3, p, p):
            raise ValueError(f"pixel_values must have shape [N, 3, {p}, {p}], "
                             f"got {tuple(pixel_values.shape)}")
        if grid_hws.dim() != 2 or grid_hws.shape[1] != 2:
            raise ValueError(f"grid_hws must have shape [n_images, 2], got {tuple(grid_hws.shape)}")
        grids = [(int(h), int(w)) for h, w in grid_hws.tolist()]
        kh, kw = self.cfg.merge_kernel_size
        for h, w in grids:
            if h <= 0 or w <= 0 or h % kh or w % kw:
                raise ValueError(f"grid_hws entry ({h}, {w}) must be positive multiples of the "
                                 f"{kh}x{kw} merge kernel")
        total = sum(h * w for h, w in grids)
        if total != pixel_values.shape[0]:
            raise ValueError(f"grid_hws covers {total} patches but pixel_values has "
                             f"{pixel_values.shape[0]}")
        return grids
