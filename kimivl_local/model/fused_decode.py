"""The fused CPU decode step: each decoder layer of a one-token step in one compiled call.

In a CPU decode step of a quantized model the kernels stream near the memory limit, but the ~80
small torch ops per layer between them (norms, RoPE, the latent-cache write, the router's top-k,
SiLU·mul, residuals, dtype casts) cost a third of the step. `_C.decode_layers` runs them in C++
(csrc/cpu/decode_layer.cpp) around the same kernels (quant_matmul, head_gemv, mla_decode,
moe_block), with every rounding point of the torch path, so a bf16 model gives the torch path's
values up to fp32 summation order. One exception, documented and tested: where expert scores
tie exactly at the top-k boundary, the fused router takes the lower expert id (torch.topk on the
CPU leaves the order of ties unspecified).

`FusedDecode.plan(lm)` looks once at every layer: a layer is fused when it runs on the CPU
kernels throughout (quantized q/kv_a/o projections, MLP or shared experts, and routed experts in
the CPU layout; norms in the model dtype, bf16 or fp32). Other layers (unquantized, partly
quantized, CUDA, no extension, --backend reference) keep the torch path, and so does prefill.
``KIMIVL_FUSED_DECODE=0`` turns the fused path off (read at the first decode).
"""

from __future__ import annotations

import logging
import os

import torch

from ..kernels.bridge import DTYPE_CODES, kernel, num_threads
from ..ops.quant_matmul import weight_args
from ..quant.cpu_layout import CpuQuantWeight
from .layers import RopeTables

log = logging.getLogger("kimivl_local")

ENV = "KIMIVL_FUSED_DECODE"
_ACT_DTYPES = (torch.float32, torch.bfloat16)


def enabled_by_env() -> bool:
    value = os.environ.get(ENV, "1").strip().lower()
    if value not in ("0", "1", "off", "on", "false", "true", ""):
        raise ValueError(f"{ENV} must be 0 or 1, got {value!r}")
    return value not in ("0", "off", "false")


def _quantized(module) -> CpuQuantWeight | None:
    """The CPU-layout weight of a bias-free quantized linear on the kernels, else None."""
    w = getattr(module, "qweight", None)
    if isinstance(w, CpuQuantWeight) and getattr(module, "bias", None) is None:
        return w
    return None


def _swiglu(mlp) -> dict | None:
    weights = {name: _quantized(getattr(mlp, name, None))
               for name in ("gate_proj", "up_proj", "down_proj")}
    if any(w is None for w in weights.values()):
        return None
    return {name: weight_args(w) for name, w in weights.items()}


def router_spec(router, hidden: int) -> tuple[dict, tuple[torch.Tensor, ...]]:
    """The _C router spec of a model/moe.py Router and the fp32 tensors it points at."""
    weight, bias = (t.contiguous() for t in router.fp32_params())
    spec = {"weight": weight.data_ptr(), "bias": bias.data_ptr(), "experts": weight.shape[0],
            "hidden": hidden, "top_k": router.top_k, "n_group": router.n_group,
            "topk_group": router.topk_group, "norm_topk_prob": bool(router.norm_topk_prob),
            "scaling": float(router.scaling)}
    return spec, (weight, bias)


def router_topk(router, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused layer's routing of one token, x [hidden] -> (weights fp32 [k], ids int64 [k]);
    the same contract as Router.forward on [1, hidden] (ties: lower expert id)."""
    fn = kernel("router_topk")
    if fn is None:
        raise RuntimeError("router_topk needs the compiled extension kimivl_local._C")
    x32 = x.reshape(-1).float().contiguous()
    spec, _pointed_at = router_spec(router, x32.shape[0])
    ids = torch.empty(router.top_k, dtype=torch.int32)
    weights = torch.empty(router.top_k, dtype=torch.float32)
    fn(spec, x32.data_ptr(), ids.data_ptr(), weights.data_ptr(), num_threads())
    return weights, ids.long()


def layer_spec(layer, cfg, dtype: torch.dtype) -> tuple[dict, list] | str:
    """(_C spec dict, tensors to keep alive) of one DecoderLayer, or why it cannot be fused."""
    attn, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
             attn.kv_a_layernorm.weight)
    if any(n.dtype != dtype or n.device.type != "cpu" or not n.is_contiguous() for n in norms):
        return "a norm weight is not a contiguous CPU tensor in the model dtype"
    projections = {"q_proj": _quantized(attn.q_proj),
                   "kv_a_proj": _quantized(attn.kv_a_proj_with_mqa),
                   "o_proj": _quantized(attn.o_proj)}
    if any(w is None for w in projections.values()):
        return "an attention projection is not quantized on the CPU kernels"
    w_uk, w_uv_t = attn._split_kv_b()
    if w_uk.dtype not in _ACT_DTYPES or w_uk.device.type != "cpu":
        return f"kv_b_proj is {w_uk.dtype} on {w_uk.device}"
    keep = [*norms, w_uk, w_uv_t, *projections.values()]
    spec = {"act_dtype": DTYPE_CODES[dtype], "hidden": cfg.hidden_size, "heads": attn.num_heads,
            "nope": attn.nope_dim, "rope": attn.rope_dim, "v_dim": attn.v_dim,
            "rank": attn.rank, "rms_eps": layer.input_layernorm.eps,
            "kv_eps": attn.kv_a_layernorm.eps, "scale": attn.scale,
            "input_norm": norms[0].data_ptr(), "post_norm": norms[1].data_ptr(),
            "kv_norm": norms[2].data_ptr(), "w_uk": w_uk.data_ptr(), "w_uv_t": w_uv_t.data_ptr(),
            "kv_b_dtype": DTYPE_CODES[w_uk.dtype],
            **{name: weight_args(w) for name, w in projections.items()}}
    if layer.post_attention_layernorm.eps != spec["rms_eps"]:
        return "the two layer norms have different eps"
    experts = getattr(mlp, "experts", None)
    if experts is None:  # dense SwiGLU
        ffn = _swiglu(mlp)
        if ffn is None:
            return "the MLP is not quantized on the CPU kernels"
        spec.update(ffn)
        keep += [getattr(mlp, n).qweight for n in ("gate_proj", "up_proj", "down_proj")]
        return spec, keep
    shared = _swiglu(mlp.shared_experts)
    w13, w2 = getattr(experts, "w13", None), getattr(experts, "w2", None)
    if shared is None or not isinstance(w13, CpuQuantWeight) or not isinstance(w2, CpuQuantWeight):
        return "the shared or routed experts are not quantized on the CPU kernels"
    router, router_keep = router_spec(mlp.gate, cfg.hidden_size)
    spec.update(shared, router=router, w13=weight_args(w13), w2=weight_args(w2))
    keep += [*router_keep, w13, w2,
             *(getattr(mlp.shared_experts, n).qweight for n in ("gate_proj", "up_proj",
                                                                 "down_proj"))]
    return spec, keep


class FusedDecode:
    """The decode plan of one LanguageModel: runs of fused layers (one _C call each) and the
    layers that keep the torch path. `enabled` switches between this and the torch path for
    A/B runs (bench/runtime_cpu.py)."""

    def __init__(self, segments: list, keep: list):
        self.segments = segments  # ("fused", first layer, [_C.DecodeLayer]) or ("torch", i)
        self._keep = keep  # the tensors the _C specs point at
        self.enabled = True

    @property
    def active(self) -> bool:
        """Enabled, and the kernels selected (--backend reference may be chosen after the plan)."""
        return self.enabled and kernel("decode_layers") is not None

    @classmethod
    def plan(cls, lm) -> FusedDecode | None:
        """None (and a debug log line saying why) when no layer can be fused."""
        why = cls._unavailable(lm)
        if why is None:
            ext_layer = kernel("DecodeLayer")
            segments, keep, torch_layers = [], [], []
            for i, layer in enumerate(lm.model.layers):
                got = layer_spec(layer, lm.config, lm.dtype)
                if isinstance(got, str):
                    torch_layers.append(f"{i} ({got})")
                    segments.append(("torch", i))
                    continue
                spec, tensors = got
                keep += tensors
                if segments and segments[-1][0] == "fused":
                    segments[-1][2].append(ext_layer(spec))
                else:
                    segments.append(("fused", i, [ext_layer(spec)]))
            if any(s[0] == "fused" for s in segments):
                fused = [s[1] + j for s in segments if s[0] == "fused" for j in range(len(s[2]))]
                log.debug("CPU decode: fused layers %s; torch path for layers %s", fused,
                          ", ".join(torch_layers) or "none")
                return cls(segments, keep)
            why = "no layer runs on the CPU kernels throughout: " + "; ".join(torch_layers)
        log.debug("CPU decode: torch path for every layer (%s)", why)
        return None

    @staticmethod
    def _unavailable(lm) -> str | None:
        if not enabled_by_env():
            return f"{ENV}=0"
        if lm.device.type != "cpu":
            return f"the model is on {lm.device}"
        if lm.dtype not in _ACT_DTYPES:
            return f"the model dtype is {lm.dtype}"
        if kernel("decode_layers") is None:
            return "no compiled decode_layers (extension missing or --backend reference)"
        return None

    def run(self, lm, x: torch.Tensor, position: torch.Tensor,
            cache: torch.Tensor) -> torch.Tensor:
        """x [1, hidden] at position[0] -> the last layer's output [1, hidden] (before the final
        norm); the latents go to cache [layers, capacity, rank + rope]."""
        if (cache.dtype not in _ACT_DTYPES or cache.stride(2) != 1
                or cache.stride(1) != cache.shape[2]):
            raise ValueError(f"the fused decode needs a row-contiguous fp32/bf16 latent cache, "
                             f"got {cache.dtype} with strides {cache.stride()}")
        pos = int(position[0])
        cos, sin = (t.contiguous() for t in lm.rope.get(position))
        x = x.to(lm.dtype).contiguous().clone()
        rope = None
        for segment in self.segments:
            if segment[0] == "torch":
                if rope is None:
                    rope = RopeTables(cos, sin, x.dtype)
                i = segment[1]
                x = lm.model.layers[i](x, rope, cache[i], position=position)
                continue
            _, first, layers = segment
            kernel("decode_layers")(layers, x.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                    cache[first].data_ptr(), DTYPE_CODES[cache.dtype],
                                    cache.stride(0), cache.shape[1], pos, num_threads())
        return x
