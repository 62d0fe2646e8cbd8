"""Shared by the CPU-kernel tests: run one kernel ISA path, or skip saying why it cannot run."""

import pytest

from kimivl_local.kernels.extension import extension

ISAS = ["portable", "avx2", "avx512_vnni", "amx"]


def force_isa(monkeypatch, isa: str, op: str) -> str:
    """Make `_C.<op>` run its `isa` path (KIMIVL_ISA); skip when this install has no `op` or
    this CPU lacks `isa`."""
    ext = extension()
    if ext is None or not hasattr(ext, op):
        pytest.skip(f"no compiled {op} in this install")
    if isa not in ext.build_info()["cpu_isas_supported"]:
        pytest.skip(f"this CPU does not support {isa}")
    monkeypatch.setenv("KIMIVL_ISA", isa)
    return isa


def bf16_tiles(isa: str, rows: int, moe: bool = False) -> bool:
    """Whether a call takes the CPU kernels' AMX bf16 path (csrc/cpu/qgemm.h): the amx ISA and at
    least 16 activation rows (quant_matmul) or 256 tokens (moe_block). That path rounds the
    activations (and the MoE's h) and the dequantized weights to bf16 instead of quantizing
    activations to int8 per 32."""
    return isa == "amx" and rows >= (256 if moe else 16)
