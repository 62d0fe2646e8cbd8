"""GPTQ for one weight, given the Hessian of its inputs (IST-DASLab/marlin `gptq/gptq.py`, the
compact reference; see reference/kernel-techniques.md §5.2).

Columns are quantized in order; each one's rounding error, scaled by the inverse Hessian's
Cholesky factor, is pushed onto the columns not yet quantized (within a 128-column block at
once, then onto the rest in one matmul). Group scales are fitted when a group is entered, from
the already-updated columns, with the same min-max rule and scale dtype as RTN
(`kimivl_local.quant.packing.quantize_rtn`), so the output is the same pack-quantized format.
"""

from __future__ import annotations

import logging

import torch

from kimivl_local.quant.packing import PackedWeight, QuantScheme, pack_int32, quantize_rtn, unpack

log = logging.getLogger("kimivl_local.quantize")

BLOCK = 128  # columns per lazy-update block; group sizes 32/64/128 divide it
DAMP = 0.01  # H += DAMP * mean(diag H) * I, raised x10 until Cholesky succeeds


class Hessian:
    """Running Σ xᵀx over input rows x [n, K] (fp32), and the number of rows seen."""

    def __init__(self, k: int, device: torch.device):
        self.h = torch.zeros(k, k, dtype=torch.float32, device=device)
        self.rows = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        self.h.addmm_(x.T, x)
        self.rows += x.shape[0]


def relative_error(weight: torch.Tensor, approx: torch.Tensor, h: torch.Tensor) -> tuple[float, float]:
    """(‖X(Ŵ-W)ᵀ‖², ‖XWᵀ‖²) for the inputs X whose Gram matrix is h = XᵀX."""
    delta = (approx - weight).float()
    w = weight.float()
    return float(((delta @ h) * delta).sum()), float(((w @ h) * w).sum())


def gptq(weight: torch.Tensor, h: torch.Tensor, scheme: QuantScheme,
         scale_dtype: torch.dtype) -> PackedWeight | None:
    """Quantize W [N, K] (any float dtype, on h's device) with Hessian h [K, K]; returns the
    packed weight on the CPU, or None when h stays singular after damping."""
    w = weight.float().clone()
    n, k = w.shape
    h = h.clone()
    dead = h.diagonal() == 0  # inputs that were always zero: their columns cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    hinv = _inverse_cholesky(h)
    if hinv is None:
        return None
    group = k if scheme.group_size is None else scheme.group_size
    q = torch.empty(n, k, dtype=torch.int8, device=w.device)
    scales, zeros = [], []
    scale = zero = None
    for b0 in range(0, k, BLOCK):
        b1 = min(b0 + BLOCK, k)
        w1, hinv1 = w[:, b0:b1].clone(), hinv[b0:b1, b0:b1]
        err1 = torch.zeros_like(w1)
        for i in range(b1 - b0):
            col = b0 + i
            if col % group == 0:
                # per-channel: fitted once from the whole (untouched) W; groups: from the
                # group's updated columns, which lie inside this block
                fit = w[:, col:] if scheme.group_size is None else w1[:, i:i + group]
                scale, zero = _fit(fit, scheme, scale_dtype)
                scales.append(scale)
                zeros.append(zero)
            col_q = (w1[:, i] / scale + zero).round().clamp(scheme.qmin, scheme.qmax)
            q[:, col] = col_q.to(torch.int8)
            err = (w1[:, i] - (col_q - zero) * scale) / hinv1[i, i]
            w1[:, i:] -= err[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = err
        w[:, b1:].addmm_(err1, hinv[b0:b1, b1:], alpha=-1)
    scale_t = torch.stack(scales, 1).to(scale_dtype).cpu()
    zp = None
    if not scheme.symmetric:
        zp = pack_int32(torch.stack(zeros, 1).to(torch.int8).cpu(), scheme.bits, dim=-2)
    return PackedWeight(pack_int32(q.cpu(), scheme.bits), scale_t,
                        torch.tensor([n, k], dtype=torch.int64), zp, scheme)


def _fit(columns: torch.Tensor, scheme: QuantScheme, scale_dtype: torch.dtype):
    """RTN's scale and zero for each row of `columns` (as stored: scale rounded to scale_dtype)."""
    fitted = quantize_rtn(columns, QuantScheme(scheme.bits, None, scheme.symmetric), scale_dtype)
    _, scale, zero = unpack(fitted)
    return scale[:, 0].to(columns.device), zero[:, 0].to(columns.device, torch.float32)


def _inverse_cholesky(h: torch.Tensor) -> torch.Tensor | None:
    """Upper Cholesky factor of (h + damping)⁻¹."""
    mean = float(h.diagonal().mean())
    for damp in (DAMP, DAMP * 10, DAMP * 100):
        hd = h.clone()
        hd.diagonal().add_(damp * mean)
        chol, info = torch.linalg.cholesky_ex(hd)
        if info == 0:
            inv = torch.cholesky_inverse(chol)
            chol, info = torch.linalg.cholesky_ex(inv, upper=True)
            if info == 0:
                return chol
        log.debug("Cholesky failed with damping %g; retrying with more", damp)
    return None
