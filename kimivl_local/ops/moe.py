"""The routed-experts block: y[t] = Σ_j w[t, j] · down_e(silu(gate_e(x[t])) · up_e(x[t])),
e = topk_ids[t, j], for stacked quantized experts in the CPU kernel layout.

The CPU kernel (`_C.moe_block`) sorts the token-expert pairs by expert (experts with no tokens
are never touched), quantizes x once, then runs two threaded stages: (expert × 32 intermediate
channels) items doing gate and up together, SiLU·mul and int8 quantization of h; and output
column blocks that loop over the active experts, so the router-weighted sum over top-k is
accumulated in fp32 without races. `moe_block_reference` (per-expert loop on dequantized
weights) is the fallback and the oracle.

With CudaQuantWeight experts and bf16/fp16 CUDA inputs, `_C.cuda_moe_block` runs on the current
stream (csrc/cuda/qgemm_moe.cu): up to 8 tokens in two launches (gate/up + SiLU·mul per
token-expert pair with the expert id read on the device; down + the weighted top-k sum per
token), more tokens by routing on the device (count, scan, scatter) into tensor-core grouped
GEMMs and a deterministic combine. The workspace is a torch.empty on the device per call (the
caching allocator makes that free and graph-safe); nothing synchronizes with the host, so the
block can be captured in a CUDA graph. On that path expert ids outside [0, E) are not diagnosed
(that needs a host sync): their pairs contribute nothing. Registered as ``kimivl::cuda_moe_block``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.bridge import DTYPE_CODES, check_tensor, kernel, num_threads
from ..quant.cpu_layout import CpuQuantWeight
from ..quant.cuda_layout import CudaQuantWeight
from .quant_matmul import (FLOAT_DTYPES, KERNEL_DTYPES, PATHS, aligned16, check_weight,
                           cuda_kernel_ok, cuda_stream, dequantize_weight, traced, weight_args)


def _check_args(x, topk_weights, topk_ids, w13, w2) -> None:
    check_weight("w13", w13, experts=True)
    check_weight("w2", w2, experts=True)
    if type(w13) is not type(w2):
        raise TypeError(f"w13 and w2 must be of one layout, got {type(w13).__name__} and "
                        f"{type(w2).__name__}")
    e, hidden, inter = w13.num_experts, w13.in_features, w13.out_features // 2
    if isinstance(w13, CudaQuantWeight):
        if w13.out_features % 2:
            raise ValueError(f"w13 must be [E, 2I, H], got out_features {w13.out_features}")
    elif w13.out_features % 64:
        raise ValueError(f"w13 must be [E, 2I, H] with I a multiple of 32, got out_features "
                         f"{w13.out_features}")
    if (w2.num_experts, w2.out_features, w2.in_features) != (e, hidden, inter):
        raise ValueError(f"w2 must be [E, H, I] = [{e}, {hidden}, {inter}], got "
                         f"[{w2.num_experts}, {w2.out_features}, {w2.in_features}]")
    check_tensor("x", x, FLOAT_DTYPES, [None, hidden])
    t = x.shape[0]
    check_tensor("topk_ids", topk_ids, (torch.int32, torch.int64), [t, None], x.device)
    if topk_ids.shape[1] < 1:
        raise ValueError(f"topk_ids must have shape [T, k] with k >= 1, got {list(topk_ids.shape)}")
    check_tensor("topk_weights", topk_weights, (torch.float32,), [t, topk_ids.shape[1]], x.device)
    for name, w in (("w13", w13), ("w2", w2)):
        if w.qweight.device != x.device:
            raise ValueError(f"{name} is on {w.qweight.device} but x is on {x.device}")


def moe_block_reference(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                        w13: CpuQuantWeight | CudaQuantWeight,
                        w2: CpuQuantWeight | CudaQuantWeight) -> torch.Tensor:
    """One expert at a time on dequantized weights, in fp32 (fp64 for fp64 x); x's dtype out."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    out = torch.zeros(x.shape, dtype=acc, device=x.device)
    inter = w13.out_features // 2
    for e in topk_ids.unique().tolist():
        if not 0 <= e < w13.num_experts:
            raise ValueError(f"topk_ids: expert id {e} outside [0, {w13.num_experts})")
        tok, slot = (topk_ids == e).nonzero(as_tuple=True)
        gate_up = x[tok].to(acc) @ dequantize_weight(w13.expert(e), acc).to(x.device).T
        h = F.silu(gate_up[:, :inter]) * gate_up[:, inter:]
        y = h @ dequantize_weight(w2.expert(e), acc).to(x.device).T
        out.index_add_(0, tok, y * topk_weights[tok, slot, None].to(acc))
    return out.to(x.dtype)


def moe_block(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              w13: CpuQuantWeight | CudaQuantWeight,
              w2: CpuQuantWeight | CudaQuantWeight) -> torch.Tensor:
    """Routed experts, combined over the top-k.

    x:            [T, H] float16/bfloat16/float32/float64, contiguous (kernel: float32, bfloat16
                  on the CPU; bfloat16, float16 on CUDA with H and I multiples of 8; otherwise
                  the reference runs)
    topk_weights: [T, k] float32, router weights (any scaling already applied)
    topk_ids:     [T, k] int32/int64, expert ids in [0, E)
    w13:          CpuQuantWeight [E, 2I, H] (I multiple of 32) or CudaQuantWeight [E, 2I, H]:
                  gate rows 0..I-1, up rows I..2I-1
    w2:           the same layout, [E, H, I]
    returns:      [T, H] in x's dtype
    """
    _check_args(x, topk_weights, topk_ids, w13, w2)
    if isinstance(w13, CudaQuantWeight):
        if traced(x):
            return _cuda_moe_block_op(x, topk_weights, topk_ids, w13.qweight, w13.scales,
                                      w13.zeros, w13.bits, w13.group_size, w2.qweight,
                                      w2.scales, w2.zeros, w2.bits, w2.group_size)
        return _run_cuda(x, topk_weights, topk_ids, w13, w2)
    if traced(x):
        return _moe_block_op(x, topk_weights, topk_ids, w13.qweight, w13.scales, w13.zeros,
                             w13.bits, w13.group_size, w2.qweight, w2.scales, w2.zeros, w2.bits,
                             w2.group_size)
    return _run(x, topk_weights, topk_ids, w13, w2)


def _run(x, topk_weights, topk_ids, w13: CpuQuantWeight, w2: CpuQuantWeight) -> torch.Tensor:
    fn = kernel("moe_block")
    if fn is None or x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES:
        return moe_block_reference(x, topk_weights, topk_ids, w13, w2)
    y = torch.empty_like(x)
    ids = topk_ids.to(torch.int32)
    fn(x.data_ptr(), DTYPE_CODES[x.dtype], x.shape[0], ids.data_ptr(), topk_weights.data_ptr(),
       ids.shape[1], w13.num_experts, weight_args(w13), weight_args(w2), y.data_ptr(),
       DTYPE_CODES[y.dtype], num_threads())
    return y


def _run_cuda(x, topk_weights, topk_ids, w13: CudaQuantWeight, w2: CudaQuantWeight,
              path: str = "auto") -> torch.Tensor:
    """The CUDA kernels where they apply, else the reference; `path` forces the GEMV ("gemv")
    or the routed tensor-core ("mma") kernels."""
    fn = kernel("cuda_moe_block")
    if fn is None or not cuda_kernel_ok(x, w13, w2):
        return moe_block_reference(x, topk_weights, topk_ids, w13, w2)
    y = torch.empty_like(x)
    t, k = topk_ids.shape
    if t == 0:
        return y
    x = aligned16(x)
    ids = topk_ids if topk_ids.dtype == torch.int32 else topk_ids.to(torch.int32)
    e, hidden, inter = w13.num_experts, w13.in_features, w2.in_features
    nbytes = kernel("cuda_moe_workspace_bytes")(t, k, e, hidden, inter, PATHS[path])
    workspace = torch.empty(nbytes, dtype=torch.uint8, device=x.device)
    with torch.cuda.device(x.device):
        fn(x.data_ptr(), DTYPE_CODES[x.dtype], t, ids.data_ptr(), topk_weights.data_ptr(), k, e,
           weight_args(w13), weight_args(w2), y.data_ptr(), workspace.data_ptr(),
           nbytes, PATHS[path], cuda_stream(x.device))
    return y


@torch.library.custom_op("kimivl::cuda_moe_block", mutates_args=())
def _cuda_moe_block_op(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                       w13_qweight: torch.Tensor, w13_scales: torch.Tensor,
                       w13_zeros: torch.Tensor | None, w13_bits: int, w13_group: int,
                       w2_qweight: torch.Tensor, w2_scales: torch.Tensor,
                       w2_zeros: torch.Tensor | None, w2_bits: int, w2_group: int) -> torch.Tensor:
    hidden, inter = x.shape[1], w13_qweight.shape[1] // 2  # w13 has 2I rows
    w13 = CudaQuantWeight(w13_qweight, w13_scales, w13_zeros, w13_bits, w13_group, 2 * inter,
                          hidden)
    w2 = CudaQuantWeight(w2_qweight, w2_scales, w2_zeros, w2_bits, w2_group, hidden, inter)
    return _run_cuda(x, topk_weights, topk_ids, w13, w2)


@_cuda_moe_block_op.register_fake
def _(x, topk_weights, topk_ids, w13_qweight, w13_scales, w13_zeros, w13_bits, w13_group,
      w2_qweight, w2_scales, w2_zeros, w2_bits, w2_group):
    return torch.empty_like(x)


@torch.library.custom_op("kimivl::moe_block", mutates_args=())
def _moe_block_op(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                  w13_qweight: torch.Tensor, w13_scales: torch.Tensor,
                  w13_zeros: torch.Tensor | None,
                  w13_bits: int, w13_group: int, w2_qweight: torch.Tensor, w2_scales: torch.Tensor,
                  w2_zeros: torch.Tensor | None, w2_bits: int, w2_group: int) -> torch.Tensor:
    hidden, inter = x.shape[1], w2_qweight.shape[2] * 32
    w13 = CpuQuantWeight(w13_qweight, w13_scales, w13_zeros, w13_bits, w13_group, 2 * inter, hidden)
    w2 = CpuQuantWeight(w2_qweight, w2_scales, w2_zeros, w2_bits, w2_group, hidden, inter)
    return _run(x, topk_weights, topk_ids, w13, w2)


@_moe_block_op.register_fake
def _(x, topk_weights, topk_ids, w13_qweight, w13_scales, w13_zeros, w13_bits, w13_group,
      w2_qweight, w2_scales, w2_zeros, w2_bits, w2_group):
    return torch.empty_like(x)
