"""Quantized matmul: y = x · Wᵀ for int4/int8 group-quantized W in the CPU kernel layout.

The CPU kernel (`_C.quant_matmul`) quantizes each row of x to int8 per 32-element block on the
fly (`quantize_activations_reference` gives the exact values it uses), multiplies with integer
dot products and accumulates in fp32; threads split the output columns (and rows for large M).
On a CPU with AMX, calls of 16 rows or more (prefill) instead round x and the dequantized weight
to bf16 and multiply on AMX tiles with fp32 accumulation (csrc/cpu/qgemm_amx.h).
`quant_matmul_reference` (dequantize, then matmul in fp32, or fp64 for fp64 inputs) is both the
fallback, used without the extension or for non-CPU tensors and other dtypes, and the oracle.
The op is registered as ``kimivl::quant_matmul`` (with a fake implementation) for torch.compile
and tracing; eager calls go straight to the implementation, skipping ~20 µs of dispatch.

On the GPU (a CudaQuantWeight from kimivl_local.quant.cuda_layout, x a bf16/fp16 CUDA tensor) the
op calls `_C.cuda_quant_matmul` on the current stream: a GEMV kernel for up to 8 rows of x and a
tensor-core kernel above (csrc/cuda/qgemm_*.cu), both accumulating exact integer weights times x
in fp32. It is registered as ``kimivl::cuda_quant_matmul``. Nothing synchronizes with the host, so
calls can be captured in a CUDA graph. Other dtypes, in_features not a multiple of 8, or an
extension without CUDA take the torch reference on the weight's device.
"""

from __future__ import annotations

import torch

from ..kernels.bridge import DTYPE_CODES, check_tensor, kernel, num_threads
from ..quant import cuda_layout
from ..quant.cpu_layout import CHUNK, CpuQuantWeight, dequantize
from ..quant.cuda_layout import CudaQuantWeight

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
CUDA_KERNEL_DTYPES = (torch.bfloat16, torch.float16)
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PATHS = {"auto": 0, "gemv": 1, "mma": 2}  # csrc/cuda/qgemm.cuh QPath


def check_weight(name: str, w, experts: bool = False) -> None:
    """w must be a CpuQuantWeight or CudaQuantWeight (its tensors are checked when it is built),
    stacked or not."""
    if not isinstance(w, (CpuQuantWeight, CudaQuantWeight)):
        raise TypeError(f"{name} must be a CpuQuantWeight or CudaQuantWeight, got "
                        f"{type(w).__name__}")
    if (w.num_experts is not None) != experts:
        raise ValueError(f"{name} must be {'a stacked [E, N, K]' if experts else 'one [N, K]'} "
                         f"weight, got qweight of shape {list(w.qweight.shape)}")


def traced(x: torch.Tensor) -> bool:
    """Whether this call is being compiled or traced (then the registered custom op must run)."""
    return torch.compiler.is_compiling() or type(x) is not torch.Tensor


def dequantize_weight(w: CpuQuantWeight | CudaQuantWeight,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """W [*, N, K] from either kernel layout, on the weight's device."""
    if isinstance(w, CudaQuantWeight):
        return cuda_layout.dequantize(w, dtype)
    return dequantize(w, dtype)


def weight_args(w: CpuQuantWeight | CudaQuantWeight) -> tuple[int, ...]:
    """The weight as the WeightArgs tuple of csrc/ops_quant.cpp (CPU layout) and
    csrc/cuda/ops_cuda_quant.cpp (CUDA layout): the same 9 fields for both."""
    return (w.qweight.data_ptr(), w.scales.data_ptr(),
            0 if w.zeros is None else w.zeros.data_ptr(), DTYPE_CODES[w.scales.dtype], w.bits,
            w.out_features, w.in_features, w.padded_in_features, w.group_size)


def quantize_activations_reference(x: torch.Tensor) -> torch.Tensor:
    """The kernel's int8 activations x_hat [*, K] as fp64: per 32-element block of a row (the
    last one zero-padded), d = amax / 127 and q = round_half_even(x * (127 / amax)), all in
    fp32; x_hat = d * q exactly. A block of zeros stays zero."""
    x32 = x.float()
    k = x32.shape[-1]
    blocks = torch.nn.functional.pad(x32, (0, (-k) % CHUNK)).unflatten(-1, (-1, CHUNK))
    amax = blocks.abs().amax(-1, keepdim=True)
    c127 = torch.full_like(amax, 127.0)  # tensor / tensor: torch turns `127 / t` into 127 * (1 / t)
    inv = torch.where(amax > 0, c127 / amax, torch.zeros_like(amax))
    q = (blocks * inv).round()
    return (q.double() * (amax / c127).double()).flatten(-2)[..., :k]


def cuda_stream(device: torch.device) -> int:
    """The current stream of `device` as the integer handle the CUDA entry points take."""
    return torch.cuda.current_stream(device).cuda_stream


def cuda_kernel_ok(x: torch.Tensor, *weights: CudaQuantWeight) -> bool:
    """Whether the CUDA kernels take this call: x bf16/fp16 on a CUDA device, every in_features
    a multiple of 8 (16-byte activation vectors) and every qweight 16-byte aligned (to_cuda_layout
    allocates them so; a view at an odd offset would not be)."""
    return (x.device.type == "cuda" and x.dtype in CUDA_KERNEL_DTYPES
            and all(w.in_features % 8 == 0 and w.qweight.data_ptr() % 16 == 0 for w in weights))


def cuda_kernels_available() -> bool:
    """Whether this install's _C has the CUDA quant kernels and torch sees a CUDA device."""
    return (kernel("cuda_quant_matmul") is not None and kernel("cuda_moe_block") is not None
            and torch.cuda.is_available())


def aligned16(x: torch.Tensor) -> torch.Tensor:
    """x, or a copy of it when its data is not 16-byte aligned (a view at an odd offset)."""
    return x if x.data_ptr() % 16 == 0 else x.clone()


def quant_matmul_reference(x: torch.Tensor, w: CpuQuantWeight | CudaQuantWeight) -> torch.Tensor:
    """Dequantize W, then x · Wᵀ in fp32 (fp64 for fp64 x); returns x's dtype."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(acc) @ dequantize_weight(w, acc).to(x.device).T).to(x.dtype)


def quant_matmul(x: torch.Tensor, w: CpuQuantWeight | CudaQuantWeight) -> torch.Tensor:
    """y = x · Wᵀ.

    x:       [*, K] float16/bfloat16/float32/float64, contiguous; the kernel runs for float32 and
             bfloat16 on the CPU (CpuQuantWeight), for bfloat16 and float16 on CUDA
             (CudaQuantWeight, K a multiple of 8); everything else takes the reference
    w:       CpuQuantWeight (kimivl_local.quant.cpu_layout) or CudaQuantWeight
             (kimivl_local.quant.cuda_layout) of one [N, K] weight, on x's device
    returns: [*, N] in x's dtype
    """
    check_weight("w", w)
    if not isinstance(x, torch.Tensor) or x.dim() < 1:
        raise TypeError(f"x must be a torch.Tensor of shape [*, {w.in_features}], got "
                        f"{type(x).__name__}")
    check_tensor("x", x, FLOAT_DTYPES, [None] * (x.dim() - 1) + [w.in_features])
    if w.qweight.device != x.device:
        raise ValueError(f"w is on {w.qweight.device} but x is on {x.device}")
    x2 = x if x.dim() == 2 else x.view(-1, w.in_features)
    if isinstance(w, CudaQuantWeight):
        if traced(x):
            y = _cuda_quant_matmul_op(x2, w.qweight, w.scales, w.zeros, w.bits, w.group_size,
                                      w.out_features, w.in_features)
        else:
            y = _run_cuda(x2, w)
    elif traced(x):
        y = _quant_matmul_op(x2, w.qweight, w.scales, w.zeros, w.bits, w.group_size,
                             w.out_features, w.in_features)
    else:
        y = _run(x2, w)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], w.out_features)


def _run(x: torch.Tensor, w: CpuQuantWeight) -> torch.Tensor:
    fn = kernel("quant_matmul")
    if fn is None or x.device.type != "cpu" or x.dtype not in KERNEL_DTYPES:
        return quant_matmul_reference(x, w)
    y = x.new_empty(x.shape[0], w.out_features)
    fn(x.data_ptr(), DTYPE_CODES[x.dtype], x.shape[0], weight_args(w), y.data_ptr(),
       DTYPE_CODES[y.dtype], num_threads())
    return y


def _run_cuda(x: torch.Tensor, w: CudaQuantWeight, path: str = "auto") -> torch.Tensor:
    """The CUDA kernel where it applies (cuda_kernel_ok), else the reference; `path` forces the
    GEMV ("gemv") or tensor-core ("mma") kernel (tests run both on every shape)."""
    fn = kernel("cuda_quant_matmul")
    if fn is None or not cuda_kernel_ok(x, w):
        return quant_matmul_reference(x, w)
    y = x.new_empty(x.shape[0], w.out_features)
    if x.shape[0] == 0:
        return y
    x = aligned16(x)
    with torch.cuda.device(x.device):
        fn(x.data_ptr(), DTYPE_CODES[x.dtype], x.shape[0], weight_args(w), y.data_ptr(),
           PATHS[path], cuda_stream(x.device))
    return y


@torch.library.custom_op("kimivl::cuda_quant_matmul", mutates_args=())
def _cuda_quant_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                          zeros: torch.Tensor | None, bits: int, group_size: int,
                          out_features: int, in_features: int) -> torch.Tensor:
    return _run_cuda(x, CudaQuantWeight(qweight, scales, zeros, bits, group_size, out_features,
                                        in_features))


@_cuda_quant_matmul_op.register_fake
def _(x, qweight, scales, zeros, bits, group_size, out_features, in_features):
    return x.new_empty(x.shape[0], out_features)


@torch.library.custom_op("kimivl::quant_matmul", mutates_args=())
def _quant_matmul_op(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                     zeros: torch.Tensor | None, bits: int, group_size: int, out_features: int,
                     in_features: int) -> torch.Tensor:
    return _run(x, CpuQuantWeight(qweight, scales, zeros, bits, group_size, out_features,
                                  in_features))


@_quant_matmul_op.register_fake
def _(x, qweight, scales, zeros, bits, group_size, out_features, in_features):
    return x.new_empty(x.shape[0], out_features)
