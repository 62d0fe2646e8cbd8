"""Interop with the compressed-tensors library (the independent oracle for the on-disk format),
both ways: it decompresses our output to exactly our dequantized weights and resolves every
module to our scheme; our runtime loads a checkpoint its own compressor wrote."""

import json
import shutil
from collections import OrderedDict

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import kimivl_local
from kimivl_local.model import quantized as quant_modules
from kimivl_local.model.quantized import QuantExperts, QuantLinear
from kimivl_local.quant.cpu_layout import dequantize as cpu_dequantize
from kimivl_local.quant.packing import PackedWeight, QuantScheme, dequantize
from kimivl_local.quant.qconfig import QuantizationConfig as OurConfig

ct = pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import ModelCompressor  # noqa: E402
from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer  # noqa: E402
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,  # noqa: E402
                                             QuantizationScheme, apply_quantization_config)
from compressed_tensors.quantization.utils import calculate_qparams  # noqa: E402
from compressed_tensors.utils.match import match_name, match_targets  # noqa: E402

# Overlapping the recipe's rules on purpose: asymmetric zero points, g64, g32 and per-channel.
RULES = ("shared_experts\\.(gate|up)_proj=4:64:asym", "kv_a_proj_with_mqa=8:32:asym")


def _shards(folder):
    return sorted(folder.glob("*.safetensors"))


def _tensors(folder) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint folder, from all of its shards."""
    return {name: t for s in _shards(folder) for name, t in load_file(s).items()}


def _our_schemes(folder) -> dict[str, QuantScheme]:
    cfg = OurConfig.from_model_config(json.loads((folder / "config.json").read_text()))
    names = {n.rsplit(".", 1)[0] for s in _shards(folder) for n in safe_open(str(s), "pt").keys()
             if n.endswith(".weight_packed")}
    return {n: cfg.scheme_for(n) for n in names}


def test_compressed_tensors_decompresses_our_output_exactly(quantized, tiny128_checkpoint):
    folder = quantized("default", *RULES)
    config = QuantizationConfig.model_validate(json.loads((folder / "config.json").read_text())
                                               ["quantization_config"])
    assert config.format == "pack-quantized" and config.quantization_status == "compressed"
    schemes = _our_schemes(folder)
    assert {(s.bits, s.group_size, s.symmetric) for s in schemes.values()} == {
        (4, 128, True), (8, None, True), (4, 64, False), (8, 32, False)}
    source = _tensors(tiny128_checkpoint)
    dequantizer = CompressedTensorsDequantizer(str(folder), dtype=torch.bfloat16)
    seen = set()
    for shard in _shards(folder):
        ours = load_file(shard)
        theirs = dequantizer.validate(dict(ours))  # raises on qparams it could not place
        for name, tensor in theirs.items():
            module = name.removesuffix(".weight")
            if module in schemes:
                packed = PackedWeight.from_state_dict(ours, schemes[module], module + ".")
                assert torch.equal(tensor, dequantize(packed, torch.bfloat16)), module
                seen.add(module)
            else:  # copied tensors are untouched
                assert torch.equal(tensor, source[name]), name
    assert seen == set(schemes)


def test_compressed_tensors_resolves_every_module_to_our_scheme(quantized, tiny128_checkpoint):
    # The library's model-loading matcher (exact names, then regexes, then classes) on every
    # linear layer of the checkpoint, against the plan: the lookahead-guarded targets must give
    # each module exactly the scheme `quantize` packed it with.
    folder = quantized("default", *RULES)
    qc = json.loads((folder / "config.json").read_text())["quantization_config"]
    target_to_scheme = OrderedDict()
    for group in qc["config_groups"].values():
        for t in group["targets"]:
            target_to_scheme[t] = group["weights"]
    ours = _our_schemes(folder)
    linears = {n.removesuffix(".weight") for s in _shards(tiny128_checkpoint)
               for n in safe_open(str(s), "pt").keys()
               if n.endswith(".weight") and "norm" not in n and "embed" not in n}
    for name in sorted(linears):
        matched = [] if any(match_name(name, i) for i in qc["ignore"]) else \
            match_targets(name, nn.Linear(1, 1), target_to_scheme)
        assert len(matched) <= 1, (name, matched)  # disjoint, so every reader agrees
        got = target_to_scheme[matched[0]] if matched else None
        want = ours.get(name)
        assert (got is None) == (want is None), name
        if want is not None:
            assert (got["num_bits"], got["group_size"], got["symmetric"]) == \
                (want.bits, want.group_size, want.symmetric), name


def _skeleton(tensors: dict[str, torch.Tensor]) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The checkpoint's linear layers as nn.Linear modules under their HF names (what
    compressed-tensors quantizes), and every other tensor as is."""
    linears = {n.removesuffix(".weight") for n, t in tensors.items()
               if n.endswith(".weight") and t.dim() == 2 and "embed" not in n
               and not n.endswith("mlp.gate.weight")}
    root = nn.Module()
    rest = {n: t for n, t in tensors.items() if n.rpartition(".")[0] not in linears}
    for module in sorted(linears):
        parent = root
        for part in module.split(".")[:-1]:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        weight, bias = tensors[f"{module}.weight"], tensors.get(f"{module}.bias")
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, dtype=weight.dtype)
        linear.weight.data.copy_(weight)
        if bias is not None:
            linear.bias.data.copy_(bias)
        parent.add_module(module.split(".")[-1], linear)
    return root.requires_grad_(False), rest


def _write_with_their_compressor(model: nn.Module, rest: dict, quantized_modules: dict,
                                 checkpoint, tmp_path):
    """A checkpoint folder written by compressed-tensors itself: the min-max observer step with
    their helper, their pack-quantized compressor, and our tiny checkpoint's other files."""
    for module in quantized_modules.values():
        args = module.quantization_scheme.weights
        w = module.weight.float()
        w = w.unflatten(-1, (-1, args.group_size)) if args.group_size else w[:, None, :]
        scale, zero = calculate_qparams(w.amin(-1), w.amax(-1), args)
        module.weight_scale.data.copy_(scale)
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.copy_(zero)
    compressor = ModelCompressor.from_pretrained_model(model, "pack-quantized")
    compressor.compress_model(model)
    folder = tmp_path / "ct"
    folder.mkdir()
    save_file({**model.state_dict(), **rest}, folder / "model.safetensors", metadata={"format": "pt"})
    for f in checkpoint.iterdir():
        if not f.name.endswith(".safetensors") and f.name != "model.safetensors.index.json":
            shutil.copy(f, folder / f.name)
    compressor.update_config(str(folder))
    return folder


def _assert_loads_as_they_dequantize(folder, quantized_modules: dict, monkeypatch, *,
                                     all_on_kernels: bool) -> nn.Module:
    """Load `folder` with our runtime (repacked to the CPU kernels' layout even without the
    compiled extension) and check every quantized weight equals compressed-tensors' own
    dequantization; all_on_kernels: no layer may fall back to a dense weight."""
    monkeypatch.setattr(quant_modules, "kernel", lambda op: op)
    loaded = kimivl_local.load(folder, device="cpu", dtype=torch.float32).model
    theirs = CompressedTensorsDequantizer(str(folder), dtype=torch.bfloat16).process(
        load_file(folder / "model.safetensors"))
    checked = 0
    for name, module in loaded.named_modules():
        if isinstance(module, QuantLinear):
            assert not all_on_kernels or module.qweight is not None, name
            w = module.weight if module.qweight is None else cpu_dequantize(module.qweight)
            assert torch.equal(w.bfloat16(), theirs[f"{name}.weight"]), name
            checked += 1
        elif isinstance(module, QuantExperts):
            inter = module.shapes["gate_proj"][0]
            w13, w2 = cpu_dequantize(module.w13).bfloat16(), cpu_dequantize(module.w2).bfloat16()
            for e in range(module.num_experts):
                for proj, w in (("gate_proj", w13[e, :inter]), ("up_proj", w13[e, inter:]),
                                ("down_proj", w2[e])):
                    assert torch.equal(w, theirs[f"{name}.{e}.{proj}.weight"]), (name, e, proj)
                    checked += 1
    assert checked == len(quantized_modules)
    return loaded


def _args(bits, group, symmetric):
    return QuantizationArgs(num_bits=bits, strategy="channel" if group is None else "group",
                            group_size=group, symmetric=symmetric)


def test_runtime_loads_a_checkpoint_written_by_compressed_tensors(tiny128_checkpoint, tmp_path,
                                                                 monkeypatch):
    tensors = _tensors(tiny128_checkpoint)
    model, rest = _skeleton(tensors)
    config = QuantizationConfig(config_groups={
        # kernel path with zero points; per-channel INT8; group 16 (not a CPU-kernel group: the
        # runtime dequantizes it at load); a vision-side layer with a bias, asymmetric INT8
        "group_0": QuantizationScheme(targets=["re:.*mlp\\.experts\\.\\d+\\.(gate|up|down)_proj$"],
                                      weights=_args(4, 32, False)),
        "group_1": QuantizationScheme(targets=["re:.*self_attn\\.(q_proj|kv_a_proj_with_mqa|kv_b_proj)$",
                                               "re:.*shared_experts.*",
                                               "re:.*layers\\.0\\.mlp\\..*", "language_model.lm_head"],
                                      weights=_args(8, None, True)),
        "group_2": QuantizationScheme(targets=["re:.*o_proj$"], weights=_args(4, 16, True)),
        "group_3": QuantizationScheme(targets=["multi_modal_projector.linear_1"],
                                      weights=_args(8, None, False)),
    }, ignore=["re:vision_tower.*"])
    apply_quantization_config(model, config)
    quantized_modules = {n: m for n, m in model.named_modules() if hasattr(m, "quantization_scheme")}
    # experts 2x8x3, q/kv_a/kv_b 3x3, shared 2x3, dense 3, lm_head, o_proj 3, projector
    assert len(quantized_modules) == 48 + 9 + 6 + 3 + 1 + 3 + 1
    folder = _write_with_their_compressor(model, rest, quantized_modules, tiny128_checkpoint,
                                          tmp_path)
    loaded = _assert_loads_as_they_dequantize(folder, quantized_modules, monkeypatch,
                                              all_on_kernels=False)
    o_proj = loaded.language_model.model.layers[0].self_attn.o_proj
    assert o_proj.qweight is None and o_proj.weight is not None  # group 16: dequantized at load
    assert loaded.multi_modal_projector.linear_1.qweight.zeros is not None
    assert torch.equal(loaded.multi_modal_projector.linear_1.bias.bfloat16(),
                       tensors["multi_modal_projector.linear_1.bias"])
