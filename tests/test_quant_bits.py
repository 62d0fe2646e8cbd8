"""Bits 2, 3, 5 and 6 end to end: `quantize` writes them in the pack-quantized format that
compressed-tensors decompresses exactly, the runtime loads a checkpoint the library's own
compressor wrote at those widths, and the CPU and CUDA kernels take them at load."""

import json

import pytest
import torch
from safetensors.torch import load_file

import kimivl_local
from kimivl_local.model import quantized as quant_modules
from kimivl_local.model.quantized import QuantLinear
from kimivl_local.ops import moe_block_reference
from kimivl_local.quant.cpu_layout import dequantize as cpu_dequantize
from kimivl_local.quant.packing import PackedWeight, QuantScheme, dequantize

from test_quant_interop import (_args, _assert_loads_as_they_dequantize, _our_schemes,
                               _shards, _skeleton, _tensors,
                               _write_with_their_compressor)

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer  # noqa: E402
from compressed_tensors.quantization import (QuantizationConfig,  # noqa: E402
                                             QuantizationScheme, apply_quantization_config)

# Every width beside 4 and 8, grouped, per-channel, symmetric and not.
RULES = ("mlp\\.experts\\.\\d+\\.(gate|up)_proj=3", "mlp\\.experts\\.\\d+\\.down_proj=2:32:asym",
         "shared_experts=5:64:asym", "self_attn\\.(q_proj|kv_a_proj_with_mqa)=6:channel",
         "layers\\.0\\.mlp\\.=5:channel:asym")


def test_compressed_tensors_decompresses_every_width_exactly(quantized):
    folder = quantized("default", *RULES)
    schemes = _our_schemes(folder)
    assert {s.bits for s in schemes.values()} == {2, 3, 5, 6, 8}
    dequantizer = CompressedTensorsDequantizer(str(folder), dtype=torch.bfloat16)
    seen = set()
    for shard in _shards(folder):
        ours = load_file(shard)
        for name, tensor in dequantizer.validate(dict(ours)).items():
            module = name.removesuffix(".weight")
            if module in schemes:
                packed = PackedWeight.from_state_dict(ours, schemes[module], module + ".")
                assert torch.equal(tensor, dequantize(packed, torch.bfloat16)), module
                seen.add(module)
    assert seen == set(schemes)


def test_runtime_runs_every_width_on_the_cpu_kernels(quantized):
    from kimivl_local.kernels.bridge import kernel
    if kernel("moe_block") is None:
        pytest.skip("kimivl_local._C is not built")
    loaded = kimivl_local.load(quantized("default", *RULES), device="cpu", dtype=torch.float32)
    layer = loaded.model.language_model.model.layers[1]
    assert layer.mlp.experts.on_kernel
    assert (layer.mlp.experts.w13.bits, layer.mlp.experts.w2.bits) == (3, 2)
    assert layer.self_attn.q_proj.on_kernel and layer.self_attn.q_proj.qweight.bits == 6
    assert layer.mlp.shared_experts.up_proj.qweight.bits == 5
    x = torch.randn(2, layer.mlp.experts.w13.in_features)
    w, i = torch.full((2, 2), 0.5), torch.tensor([[0, 1], [2, 3]])
    y = layer.mlp.experts(x, w, i)
    ref = moe_block_reference(x.double(), w, i, layer.mlp.experts.w13, layer.mlp.experts.w2)
    assert (y.double() - ref).norm() <= 3e-2 * ref.norm()  # int8 activations: ~0.5% per GEMM


def test_runtime_loads_every_width_written_by_compressed_tensors(tiny128_checkpoint, tmp_path,
                                                                monkeypatch):
    model, rest = _skeleton(_tensors(tiny128_checkpoint))
    config = QuantizationConfig(config_groups={
        "group_0": QuantizationScheme(targets=["re:.*mlp\\.experts\\.\\d+\\.(gate|up)_proj$"],
                                      weights=_args(3, 32, True)),
        "group_1": QuantizationScheme(targets=["re:.*mlp\\.experts\\.\\d+\\.down_proj$"],
                                      weights=_args(2, 32, False)),
        "group_2": QuantizationScheme(targets=["re:.*shared_experts.*"],
                                      weights=_args(5, 64, False)),
        "group_3": QuantizationScheme(targets=["re:.*self_attn\\.(q_proj|o_proj)$"],
                                      weights=_args(6, None, True)),
    }, ignore=["re:vision_tower.*"])
    apply_quantization_config(model, config)
    quantized_modules = {n: m for n, m in model.named_modules() if hasattr(m, "quantization_scheme")}
    folder = _write_with_their_compressor(model, rest, quantized_modules, tiny128_checkpoint,
                                          tmp_path)
    bits = {g["weights"]["num_bits"] for g in json.loads((folder / "config.json").read_text())
            ["quantization_config"]["config_groups"].values()}
    assert bits == {2, 3, 5, 6}

    _assert_loads_as_they_dequantize(folder, quantized_modules, monkeypatch, all_on_kernels=True)


def test_cuda_kernels_take_every_width(monkeypatch):
    """2 to 8 bits run on the CUDA kernels: the memory planner counts the packed size (where
    the extension has the CUDA kernels; here faked) and the layout takes every width."""
    from kimivl_local.quant import cuda_layout

    monkeypatch.setattr(quant_modules, "kernel", lambda op: op)
    for bits in (2, 3, 5, 6):
        assert cuda_layout.kernel_supports(QuantScheme(bits, 32), 2048)
        scales = torch.zeros(16, 1, dtype=torch.bfloat16)
        cuda_layout.CudaQuantWeight(torch.zeros(16, bits, dtype=torch.int32), scales, None, bits,
                                    32, 16, 32)
    linear = QuantLinear(2048, 64, QuantScheme(3, 64), bias=False)
    assert linear.resident_bytes(torch.device("cuda"), torch.bfloat16) < 64 * 2048 // 2


@pytest.mark.gpu
def test_cuda_runs_every_width_on_the_kernels(quantized, caplog):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from kimivl_local.ops.quant_matmul import cuda_kernels_available
    from kimivl_local.quant import cuda_layout
    if not cuda_kernels_available():
        pytest.skip("this install's _C was built without the CUDA quant kernels")
    path = quantized("default", *RULES)
    with caplog.at_level("WARNING", logger="kimivl_local"):
        gpu = kimivl_local.load(path, device="cuda", dtype=torch.bfloat16)
    assert "dequantized" not in caplog.text
    cpu = kimivl_local.load(path, device="cpu", dtype=torch.float32)
    gl, cl = gpu.model.language_model.model.layers[1], cpu.model.language_model.model.layers[1]
    assert gl.mlp.experts.on_kernel and (gl.mlp.experts.w13.bits, gl.mlp.experts.w2.bits) == (3, 2)
    assert gl.self_attn.q_proj.on_kernel and gl.self_attn.q_proj.qweight.bits == 6
    gs, cs = gl.mlp.shared_experts.up_proj, cl.mlp.shared_experts.up_proj
    for ours, theirs in ((gl.mlp.experts.w13, cl.mlp.experts.w13),
                         (gl.mlp.experts.w2, cl.mlp.experts.w2), (gs.qweight, cs.qweight)):
        assert torch.equal(cuda_layout.dequantize(ours).cpu(), cpu_dequantize(theirs))
    with caplog.at_level("WARNING", logger="kimivl_local"):  # fp32 has no CUDA kernel
        kimivl_local.load(path, device="cuda", dtype=torch.float32)
    assert "2/3/5/6" in caplog.text and "-bit layers on CUDA have no kernel here" in caplog.text


def test_info_names_the_widths_on_the_cuda_kernels(quantized):
    from kimivl_local.cli.info import describe_model, format_info

    model = describe_model(str(quantized("default", *RULES)))
    assert model["quantized_bits"] == [2, 3, 5, 6, 8]
    assert model["cuda_dequantized_bits"] == []
    text = format_info({"kimivl_local": "x", "python": "3", "torch": "2", "torch_threads": 1,
                        "cpu_count": 1, "extension": {"available": False, "error": "none"},
                        "torch_cuda_devices": [], "model": model})
    assert ("quantized: int2, int3, int5, int6, int8; CPU kernels for all; CUDA kernels for "
            "int2, int3, int5, int6, int8\n") in text + "\n"
