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


def activation_block(isa: str, rows: int, in_features: int) -> int:
    """The span of K the CPU kernels quantize activations over (csrc/cpu/qgemm.cpp): 128 on the
    AMX path for 16 or more rows where K rounded up to 32 is a multiple of 128, else 32."""
    kp = -(-in_features // 32) * 32
    return 128 if isa == "amx" and rows >= 16 and kp % 128 == 0 else 32
