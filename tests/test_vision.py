"""MoonViT, the projector and varlen attention against oracles written independently here
(fp64, plain loops and complex numbers, straight from the reference text) and against
transformers' kimi_k25 vision tower, which shares MoonViT's 2-D design for single-frame images."""

import cmath
import math

import pytest
import torch

from kimivl_local.checkpoint.config import VisionConfig
from kimivl_local.model.projector import Projector
from kimivl_local.model.vision import MoonViT, apply_rope, patch_merge, rope_2d_freqs
from kimivl_local.ops import varlen_attention, varlen_attention_reference

# hidden 48 = 4 heads x 12 (head_dim % 4 == 0 as in the real 72), 8x8 position table.
TINY = VisionConfig(init_pos_emb_height=8, init_pos_emb_width=8, num_attention_heads=4,
                    num_hidden_layers=2, hidden_size=48, intermediate_size=80)
TEXT_HIDDEN = 40
# Unequal, non-square grids (one taller, one wider than the table, one equal to it), so a
# width/height swap, cross-image attention or cropping the table would all change the answer.
GRIDS = [(6, 10), (4, 2), (8, 8)]


def seeded(seed):
    return torch.Generator().manual_seed(seed)


def randomize(module, seed=0):
    """Random weights big enough that attention is far from uniform and norms are not identity."""
    g = seeded(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            x = torch.randn(p.shape, generator=g, dtype=torch.float64)
            if "norm" in name:  # LayerNorm gains around 1, biases around 0
                x = x * 0.5 + (1.0 if name.endswith("weight") else 0.0)
            elif not name.endswith("pos_emb.weight"):
                x = x * 0.3
            p.copy_(x)
    return module


def make_tower(dtype=torch.float32):
    return randomize(MoonViT(TINY)).to(dtype)


def make_inputs(grids=GRIDS, seed=1):
    n = sum(h * w for h, w in grids)
    pixels = torch.randn(n, 3, 14, 14, generator=seeded(seed))
    return pixels, torch.tensor(grids, dtype=torch.int64)


# ---- the fp64 oracle ---------------------------------------------------------------------------

def cubic_weights(out_size, in_size):
    """[out, in] matrix of F.interpolate(mode="bicubic", align_corners=False): Keys kernel a=-0.75,
    source x = (o + 0.5) * in/out - 0.5, taps beyond the edge clamped to the border."""
    a = -0.75

    def k(x):
        x = abs(x)
        if x <= 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a if x < 2 else 0.0

    m = torch.zeros(out_size, in_size, dtype=torch.float64)
    for o in range(out_size):
        src = (o + 0.5) * in_size / out_size - 0.5
        base = math.floor(src)
        for tap in range(base - 1, base + 3):
            m[o, min(max(tap, 0), in_size - 1)] += k(src - tap)
    return m


def layer_norm(x, w, b, eps=1e-5):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + eps) * w + b


def oracle_tower(sd, cfg, pixels, grids):
    """MoonViT written out from reference §4.2-4.4 in float64; returns per-image [M, 4, C]."""
    sd = {k: v.double() for k, v in sd.items()}
    c, heads, d = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    n = pixels.shape[0]
    # Conv2d with kernel = stride = patch is a linear map of each patch flattened as (c, ky, kx).
    x = pixels.double().reshape(n, -1) @ sd["patch_embed.proj.weight"].reshape(c, -1).T
    x = x + sd["patch_embed.proj.bias"]
    table = sd["patch_embed.pos_emb.weight"]  # [H0, W0, C]
    pos = [torch.einsum("ri,ijc,sj->rsc", cubic_weights(h, table.shape[0]), table,
                        cubic_weights(w, table.shape[1])).reshape(h * w, c) for h, w in grids]
    x = x + torch.cat(pos)

    rows, cols, image = [], [], []
    for i, (h, w) in enumerate(grids):
        for r in range(h):
            for col in range(w):
                rows.append(r), cols.append(col), image.append(i)
    # Complex pair 2i turns by column * theta_i, pair 2i+1 by row * theta_i.
    rot = torch.empty(n, d // 2, dtype=torch.complex128)
    for t in range(n):
        for i in range(d // 4):
            theta = 10000.0 ** (-4 * i / d)
            rot[t, 2 * i] = cmath.exp(1j * cols[t] * theta)
            rot[t, 2 * i + 1] = cmath.exp(1j * rows[t] * theta)
    image = torch.tensor(image)
    same_image = image[:, None] == image[None, :]  # block-diagonal: no cross-image attention

    def rope(t):  # [n, heads, d], adjacent (real, imag) pairs
        z = torch.complex(t[..., 0::2], t[..., 1::2]) * rot[:, None, :]
        return torch.stack([z.real, z.imag], dim=-1).reshape(t.shape)

    for b in range(cfg.num_hidden_layers):
        p = f"encoder.blocks.{b}."
        h = layer_norm(x, sd[p + "norm0.weight"], sd[p + "norm0.bias"])
        qkv = h @ sd[p + "wqkv.weight"].T + sd[p + "wqkv.bias"]
        q, k, v = (qkv[:, i * c:(i + 1) * c].reshape(n, heads, d) for i in range(3))
        q, k = rope(q), rope(k)
        scores = torch.einsum("nhd,mhd->hnm", q, k) / math.sqrt(d)
        scores = scores.masked_fill(~same_image, float("-inf"))
        attn = torch.einsum("hnm,mhd->nhd", torch.softmax(scores, dim=-1), v).reshape(n, c)
        x = x + attn @ sd[p + "wo.weight"].T + sd[p + "wo.bias"]
        h = layer_norm(x, sd[p + "norm1.weight"], sd[p + "norm1.bias"])
        h = h @ sd[p + "mlp.fc0.weight"].T + sd[p + "mlp.fc0.bias"]
        h = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
        x = x + h @ sd[p + "mlp.fc1.weight"].T + sd[p + "mlp.fc1.bias"]
    x = layer_norm(x, sd["encoder.final_layernorm.weight"], sd["encoder.final_layernorm.bias"])

    out, start = [], 0
    for h, w in grids:
        grid = x[start:start + h * w].reshape(h, w, c)
        out.append(torch.stack([torch.stack([grid[2 * i, 2 * j], grid[2 * i, 2 * j + 1],
                                             grid[2 * i + 1, 2 * j], grid[2 * i + 1, 2 * j + 1]])
                                for i in range(h // 2) for j in range(w // 2)]))
        start += h * w
    return out


def oracle_projector(sd, merged):
    """Each 1152-d (here 48-d) sub-patch normalised alone, then [TL|TR|BL|BR], erf GELU."""
    sd = {k: v.double() for k, v in sd.items()}
    parts = [layer_norm(merged[:, i].double(), sd["pre_norm.weight"], sd["pre_norm.bias"])
             for i in range(merged.shape[1])]
    h = torch.cat(parts, dim=-1) @ sd["linear_1.weight"].T + sd["linear_1.bias"]
    h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
    return h @ sd["linear_2.weight"].T + sd["linear_2.bias"]


# ---- MoonViT ---------------------------------------------------------------------------------

def test_state_dict_names_are_the_checkpoint_names():
    cfg = VisionConfig()  # real widths, on meta: no memory
    with torch.device("meta"):
        tower = MoonViT(cfg)
    c, f = 1152, 4304
    want = {"patch_embed.proj.weight": (c, 3, 14, 14), "patch_embed.proj.bias": (c,),
            "patch_embed.pos_emb.weight": (64, 64, c),
            "encoder.final_layernorm.weight": (c,), "encoder.final_layernorm.bias": (c,)}
    for b in range(27):
        p = f"encoder.blocks.{b}."
        want |= {p + "norm0.weight": (c,), p + "norm0.bias": (c,), p + "norm1.weight": (c,),
                 p + "norm1.bias": (c,), p + "wqkv.weight": (3 * c, c), p + "wqkv.bias": (3 * c,),
                 p + "wo.weight": (c, c), p + "wo.bias": (c,), p + "mlp.fc0.weight": (f, c),
                 p + "mlp.fc0.bias": (f,), p + "mlp.fc1.weight": (c, f), p + "mlp.fc1.bias": (c,)}
    got = {k: tuple(v.shape) for k, v in tower.state_dict().items()}
    assert got == want  # 329 tensors, no buffers
    assert len(list(tower.buffers())) == 0
    with torch.device("meta"):
        proj = Projector(cfg, 2048)
    assert {k: tuple(v.shape) for k, v in proj.state_dict().items()} == {
        "pre_norm.weight": (c,), "pre_norm.bias": (c,), "linear_1.weight": (4 * c, 4 * c),
        "linear_1.bias": (4 * c,), "linear_2.weight": (2048, 4 * c), "linear_2.bias": (2048,)}


def test_meta_construction_then_assign_weights_runs():
    with torch.device("meta"):
        tower = MoonViT(TINY)
    weights = make_tower().state_dict()
    tower.load_state_dict(weights, strict=True, assign=True)
    pixels, grids = make_inputs()
    out = tower(pixels, grids)
    ref = make_tower()(pixels, grids)
    for a, b in zip(out, ref):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_tower_matches_fp64_oracle():
    tower = make_tower()
    pixels, grids = make_inputs()
    with torch.no_grad():
        out = tower(pixels, grids)
    want = oracle_tower(tower.state_dict(), TINY, pixels, GRIDS)
    assert [tuple(o.shape) for o in out] == [(15, 4, 48), (2, 4, 48), (16, 4, 48)]
    for o, w in zip(out, want):
        assert o.dtype == torch.float32
        # fp32 through 2 blocks of LayerNorm-scaled O(1) values: rounding ~1e-6; the RoPE angles
        # are fp32 products (as in the reference), off by ~1e-6 rad at row/col 9.
        assert (o.double() - w).abs().max() < 1e-4


def test_tower_bf16_linears_close_to_oracle():
    """The fast CPU path: fp32 tower and residual stream, bf16 matmuls (fp32 accumulate) and bf16
    activations between them, fp32 math inside the fused ops (ops/vision_ops.py)."""
    tower = make_tower()
    tower.bf16_linears = True
    pixels, grids = make_inputs()
    with torch.no_grad():
        out = tower(pixels, grids)
    want = oracle_tower(tower.state_dict(), TINY, pixels, GRIDS)
    for o, w in zip(out, want):
        assert o.dtype == torch.float32
        # bf16 roundings (2^-8 relative each) of every linear's input, weight and output and of
        # the RoPE'd q/k, the attention output and the GELU, 2 blocks; the residual stream and
        # LayerNorm math stay fp32. LayerNorm output ~1, final values up to ~6. Measured: max
        # 0.16, mean 0.0071 (bf16 linears alone, glue in torch fp32: 0.17 / 0.0068; the all-bf16
        # tower below, which rounds at every op: max 0.12, mean 0.009; its bound is 0.5 / 0.03).
        err = (o.double() - w).abs()
        assert err.max() < 0.25 and err.mean() < 0.0125
    tower.bf16_linears = False
    with torch.no_grad():
        exact = tower(pixels, grids)
    for o, w in zip(exact, want):
        assert (o.double() - w).abs().max() < 1e-4


def test_tower_bf16_close_to_oracle():
    tower = make_tower(torch.bfloat16)
    pixels, grids = make_inputs()
    with torch.no_grad():
        out = tower(pixels, grids)  # fp32 pixels are cast to the tower dtype, as HF does
    want = oracle_tower(tower.state_dict(), TINY, pixels.bfloat16().float(), GRIDS)
    for o, w in zip(out, want):
        assert o.dtype == torch.bfloat16
        # bf16 keeps 8 significant bits (2^-9 relative per rounding), ~20 roundings deep here;
        # outputs reach ~6 after the final LayerNorm. Measured: max 0.12, mean 0.009.
        err = (o.double() - w).abs()
        assert err.max() < 0.5 and err.mean() < 0.03


@pytest.mark.parametrize("bf16_linears, atol", [(False, 1e-6), (True, 1e-5)])
def test_images_do_not_see_each_other(bf16_linears, atol):
    """Exact and fast (bf16) towers: rows are computed per image, so an image's features do not
    depend on the others in the batch."""
    tower = make_tower()
    tower.bf16_linears = bf16_linears
    pixels, grids = make_inputs()
    other = pixels.clone()
    other[60:] = torch.randn(other[60:].shape, generator=seeded(7))  # change images 1 and 2
    with torch.no_grad():
        a, b = tower(pixels, grids), tower(other, grids)
        alone = tower(pixels[:60], grids[:1])
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=atol)
    torch.testing.assert_close(a[0], alone[0], rtol=0, atol=atol)
    assert (a[1] - b[1]).abs().max() > 1e-2


def test_rope_pair_convention_even_is_width_odd_is_height():
    d = 12
    freqs = rope_2d_freqs([(3, 5)], d, torch.device("cpu"))  # row-major: index = r * 5 + c
    assert freqs.shape == (15, d // 2) and freqs.dtype == torch.complex64
    for r in range(3):
        for c in range(5):
            for i in range(d // 4):
                theta = 10000.0 ** (-4 * i / d)
                assert abs(complex(freqs[r * 5 + c, 2 * i]) - cmath.exp(1j * c * theta)) < 1e-6
                assert abs(complex(freqs[r * 5 + c, 2 * i + 1]) - cmath.exp(1j * r * theta)) < 1e-6
    # apply_rope: pair 0 = head dims (0, 1) is turned by the column angle only.
    x = torch.zeros(15, 1, d)
    x[:, 0, 0] = 1.0
    x[:, 0, 2] = 1.0
    y = apply_rope(x, freqs)
    pos = 1 * 5 + 3  # row 1, column 3; theta_0 = 1
    torch.testing.assert_close(y[pos, 0, :4], torch.tensor([math.cos(3), math.sin(3),
                                                            math.cos(1), math.sin(1)]))
    # Positions restart for every image.
    two = rope_2d_freqs([(2, 2), (3, 5)], d, torch.device("cpu"))
    torch.testing.assert_close(two[4:], freqs, rtol=0, atol=0)


def test_patch_merge_order():
    labels = torch.arange(4 * 6 + 2 * 2, dtype=torch.float32)[:, None]  # value = raster index
    first, second = patch_merge(labels, [(4, 6), (2, 2)], (2, 2))
    assert first.shape == (6, 4, 1)
    # token (0,0): TL, TR, BL, BR of rows 0-1, columns 0-1; token 3 is merged row 1, column 0.
    assert first[0, :, 0].tolist() == [0, 1, 6, 7]
    assert first[1, :, 0].tolist() == [2, 3, 8, 9]
    assert first[3, :, 0].tolist() == [12, 13, 18, 19]
    assert second[0, :, 0].tolist() == [24, 25, 26, 27]


def test_forward_argument_errors():
    tower = make_tower()
    pixels, grids = make_inputs()
    with pytest.raises(ValueError, match="covers 132 patches"):
        tower(pixels[:-1], grids)
    with pytest.raises(ValueError, match="merge"):
        tower(pixels[:15], torch.tensor([[3, 5]]))
    with pytest.raises(ValueError, match="pixel_values"):
        tower(pixels[:, :, :7], grids)
    with pytest.raises(ValueError, match="grid_hws"):
        tower(pixels, grids.flatten())


# ---- projector ---------------------------------------------------------------------------------

def test_projector_matches_oracle_and_order_matters():
    proj = randomize(Projector(TINY, TEXT_HIDDEN)).double()
    merged = torch.randn(7, 4, 48, generator=seeded(3), dtype=torch.float64) * 3 + 1
    with torch.no_grad():
        out = proj(merged)
    want = oracle_projector(proj.state_dict(), merged)
    assert out.shape == (7, TEXT_HIDDEN)
    torch.testing.assert_close(out, want, rtol=0, atol=1e-10)
    # The wrong variants really differ, so the check above can fail:
    sd = {k: v for k, v in proj.state_dict().items()}
    whole = merged.reshape(7, -1)
    norm_all = layer_norm(whole, sd["pre_norm.weight"].repeat(4), sd["pre_norm.bias"].repeat(4))
    assert (oracle_projector(sd, norm_all.reshape(7, 4, 48)) - out).abs().max() > 1e-3
    col_major = merged[:, [0, 2, 1, 3]]
    assert (oracle_projector(sd, col_major) - out).abs().max() > 1e-3
    with pytest.raises(ValueError, match=r"\[M, 4, 48\]"):
        proj(merged.reshape(7, 192))


# ---- varlen attention ------------------------------------------------------------------------

LENGTHS = [1, 7, 0, 33, 16]


def packed(dqk, dv, dtype, heads=3, seed=0):
    g = seeded(seed)
    t = sum(LENGTHS)
    q, k = (torch.randn(t, heads, dqk, generator=g) for _ in range(2))
    v = torch.randn(t, heads, dv, generator=g)
    cu = torch.tensor([0] + LENGTHS).cumsum(0).to(torch.int32)
    return q.to(dtype), k.to(dtype), v.to(dtype), cu


@pytest.mark.parametrize("dqk,dv", [(72, 72), (192, 128)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_varlen_attention_matches_fp64_reference(dqk, dv, causal, dtype):
    q, k, v, cu = packed(dqk, dv, dtype)
    scale = dqk ** -0.5
    out = varlen_attention(q, k, v, cu, causal=causal, scale=scale)
    ref = varlen_attention_reference(q.double(), k.double(), v.double(), cu.long(), causal=causal,
                                     scale=scale)
    assert out.shape == (sum(LENGTHS), 3, dv) and out.dtype == dtype
    err = (out.double() - ref).abs().max().item()
    if dtype == torch.float32:  # a softmax-weighted mean of N(0,1) values in fp32: ~1e-6
        assert err < 1e-5, err
    else:  # at most twice the unavoidable error: rounding the exact result to bf16
        assert err <= 2 * (ref.to(dtype).double() - ref).abs().max().item(), err
    if causal:  # the first token of each sequence sees only itself
        firsts = cu[:-1][torch.tensor(LENGTHS) > 0].long()
        torch.testing.assert_close(out[firsts].double(), v[firsts].double(), rtol=0, atol=1e-2)


def test_varlen_attention_reference_fp64_agrees_with_one_sdpa_per_sequence():
    q, k, v, cu = packed(72, 72, torch.float64, seed=5)
    ref = varlen_attention_reference(q, k, v, cu, causal=True, scale=0.2)
    assert ref.dtype == torch.float64
    s, e = 8, 8 + 33  # the 33-token sequence
    want = torch.nn.functional.scaled_dot_product_attention(
        q[s:e].transpose(0, 1), k[s:e].transpose(0, 1), v[s:e].transpose(0, 1), is_causal=True,
        scale=0.2).transpose(0, 1)
    torch.testing.assert_close(ref[s:e], want, rtol=0, atol=1e-12)


def test_varlen_attention_sequences_are_isolated_and_views_accepted():
    qkv = torch.randn(sum(LENGTHS), 3, 3, 72, generator=seeded(2))
    q, k, v = qkv.unbind(1)  # non-contiguous views, as the vision block passes them
    cu = torch.tensor([0] + LENGTHS).cumsum(0)
    base = varlen_attention(q, k, v, cu, causal=False, scale=0.1)
    k2, v2 = k.clone(), v.clone()
    k2[8:41], v2[8:41] = 5.0, -3.0  # rewrite the 33-token sequence only
    other = varlen_attention(q, k2, v2, cu, causal=False, scale=0.1)
    torch.testing.assert_close(base[:8], other[:8], rtol=0, atol=0)
    torch.testing.assert_close(base[41:], other[41:], rtol=0, atol=0)
    assert (base[8:41] - other[8:41]).abs().max() > 0.1


def _bad_args():
    q, k, v, cu = packed(8, 8, torch.float32)
    t = q.shape[0]
    ok = dict(q=q, k=k, v=v, cu_seqlens=cu, causal=False, scale=0.5)
    yield ok | {"q": q[0]}, "q must have shape"
    yield ok | {"k": k[:-1]}, "k must have the shape of q"
    yield ok | {"k": k[..., :4]}, "k must have the shape of q"
    yield ok | {"v": v[:, :2]}, "v must have shape"
    yield ok | {"v": v.double()}, "share one dtype"
    yield ok | {"q": q.long(), "k": k.long(), "v": v.long()}, "q must be float16"
    yield ok | {"q": q.transpose(1, 2).contiguous().transpose(1, 2)}, "q must have a contiguous"
    yield ok | {"k": k.to("meta")}, "k is on meta"
    yield ok | {"cu_seqlens": cu.float()}, "cu_seqlens must be int32 or int64"
    yield ok | {"cu_seqlens": cu[:1]}, r"cu_seqlens must have shape \[n \+ 1\]"
    yield ok | {"cu_seqlens": cu.to("meta")}, "cu_seqlens is on meta"
    yield ok | {"cu_seqlens": cu + 1}, f"start at 0 and end at T = {t}"
    yield ok | {"cu_seqlens": cu[:-1]}, f"end at T = {t}"
    yield ok | {"cu_seqlens": torch.tensor([0, 30, 20, t])}, "non-decreasing"
    yield ok | {"causal": 1}, "causal must be a bool"
    yield ok | {"scale": float("nan")}, "scale must be a finite number"
    yield ok | {"q": q.numpy()}, "q must be a torch.Tensor"


@pytest.mark.parametrize("fn", [varlen_attention, varlen_attention_reference])
def test_varlen_attention_argument_errors(fn):
    for kwargs, message in _bad_args():
        with pytest.raises((ValueError, TypeError), match=message):
            fn(**kwargs)


# ---- transformers' kimi_k25 vision tower as an external oracle -------------------------------

def test_matches_transformers_kimi_k25_single_frame():
    """Kimi-K2.5's MoonViT-3D in transformers reduces to MoonViT for t = 1: the same bicubic
    position table, axial 2-D RoPE (width first in each pair), GELU-tanh pre-norm blocks,
    per-image attention, 2x2 merge and LayerNorm-per-sub-patch projector. Its checkpoint
    conversion splits wqkv and de-interleaves q/k rows for rotate-half RoPE (PermuteForRope)."""
    from types import SimpleNamespace

    kimi_k25 = pytest.importorskip("transformers.models.kimi_k25.modeling_kimi_k25")
    from transformers.core_model_loading import PermuteForRope
    from transformers.models.kimi_k25.configuration_kimi_k25 import Kimi_K25VisionConfig

    hf_cfg = Kimi_K25VisionConfig(
        patch_size=14, pos_emb_height=8, pos_emb_width=8, num_attention_heads=4,
        num_hidden_layers=2, hidden_size=48, intermediate_size=80,
        rope_parameters={"rope_type": "axial", "rope_theta": 10000.0})
    hf_cfg._attn_implementation = "sdpa"
    hf_tower = kimi_k25.Kimi_K25VisionModel(hf_cfg).eval()
    tower = make_tower()
    permute = PermuteForRope()._permute_for_rope

    converted = {}
    for name, t in tower.state_dict().items():
        name = (name.replace("encoder.blocks.", "layers.").replace("encoder.", "")
                .replace("pos_emb.weight", "pos_emb.position_embeddings")
                .replace(".norm1.", ".norm2.").replace(".norm0.", ".norm1.")
                .replace("mlp.fc1.", "mlp.fc2.").replace("mlp.fc0.", "mlp.fc1.")
                .replace(".wo.", ".attn.proj."))
        if ".wqkv." in name:
            q, k, v = t.chunk(3)
            for part, x in (("q", permute(q, hf_cfg)), ("k", permute(k, hf_cfg)), ("v", v)):
                converted[name.replace(".wqkv.", f".attn.{part}_proj.")] = x
        else:
            converted[name] = t
    hf_tower.load_state_dict(converted, strict=True)

    pixels, grids = make_inputs()
    grid_thw = torch.cat([torch.ones(len(GRIDS), 1, dtype=torch.int64), grids], dim=1)
    with torch.no_grad():
        ours = torch.cat(tower(pixels, grids))
        theirs = hf_tower(pixels, grid_thw=grid_thw).pooler_output
    assert theirs.shape == ours.shape
    assert (ours - theirs).abs().max() < 1e-4  # both fp32; RoPE as cos/sin vs complex products

    proj = randomize(Projector(TINY, TEXT_HIDDEN), seed=4)
    hf_proj = kimi_k25.Kimi_K25MultimodalProjection(SimpleNamespace(
        vision_config=SimpleNamespace(hidden_size=48, merge_kernel_size=(2, 2)),
        projection_hidden_size=48, projection_layer_norm_eps=1e-5,
        text_config=SimpleNamespace(hidden_size=TEXT_HIDDEN)))
    hf_proj.load_state_dict({k.replace("linear_1", "in_proj").replace("linear_2", "out_proj"): v
                             for k, v in proj.state_dict().items()}, strict=True)
    with torch.no_grad():
        torch.testing.assert_close(proj(ours), hf_proj(ours).squeeze(1), rtol=0, atol=1e-5)
