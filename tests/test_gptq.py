"""GPTQ (`--method gptq`): the algorithm against RTN, the layer-by-layer run on a tiny
checkpoint (per-expert Hessians, RTN fallback for starved experts), calibration data."""

import json
import logging

import pytest
import torch
from quantize_support import import_quantize
from safetensors.torch import load_file, save_file

import kimivl_local
from kimivl_local.checkpoint.shards import Checkpoint
from kimivl_local.errors import InputError
from kimivl_local.quant.packing import PackedWeight, QuantScheme, dequantize, quantize_rtn

gptq_mod = import_quantize("gptq")
calibration = import_quantize("calibration")
qmain = import_quantize("main")
sequential = import_quantize("sequential")
output_error = import_quantize("output_error")
plan_mod = import_quantize("plan")
recipes = import_quantize("recipes")


def _problem(seed=0, n=96, k=256, rows=512):
    gen = torch.Generator().manual_seed(seed)
    w = (torch.randn(n, k, generator=gen) * 0.05).bfloat16()
    # correlated inputs with a few large channels, like real activations
    x = torch.randn(rows, 32, generator=gen) @ torch.randn(32, k, generator=gen)
    x += 0.1 * torch.randn(rows, k, generator=gen)
    x[:, :4] *= 10
    return w, x.T @ x


@pytest.mark.parametrize("scheme", [QuantScheme(4, 128, True), QuantScheme(4, 32, False),
                                    QuantScheme(8, None, True), QuantScheme(2, 32, True),
                                    QuantScheme(3, 64, False), QuantScheme(5, 128, True),
                                    QuantScheme(6, None, True)])
def test_gptq_beats_rtn_on_its_own_objective(scheme):
    w, h = _problem()
    packed = gptq_mod.gptq(w, h, scheme, torch.bfloat16)
    packed.validate()
    assert packed.weight_scale.dtype == torch.bfloat16
    g_num, den = gptq_mod.relative_error(w.float(), dequantize(packed), h)
    r_num, _ = gptq_mod.relative_error(w.float(), dequantize(quantize_rtn(w, scheme)), h)
    assert g_num < 0.7 * r_num, (g_num / den, r_num / den)  # GPTQ's whole point


@pytest.mark.parametrize("scheme", [QuantScheme(4, 64, True), QuantScheme(4, 32, False),
                                    QuantScheme(8, None, True), QuantScheme(2, 32, False),
                                    QuantScheme(3, 64, True), QuantScheme(6, 128, False)])
def test_gptq_with_a_diagonal_hessian_is_exactly_rtn(scheme):
    # No correlation between inputs: no error to propagate, so every column is plain
    # round-to-nearest with RTN's own group scales.
    w, _ = _problem(seed=1)
    h = torch.diag(torch.rand(w.shape[1], generator=torch.Generator().manual_seed(2)) + 0.5)
    packed = gptq_mod.gptq(w, h, scheme, torch.bfloat16)
    rtn = quantize_rtn(w, scheme)
    for name, tensor in rtn.state_dict().items():
        assert torch.equal(packed.state_dict()[name], tensor), name


def test_dead_inputs_and_a_singular_hessian():
    w, h = _problem()
    h[:, 5] = h[5, :] = 0  # input 5 never fired: its column is zeroed, the rest still solved
    packed = gptq_mod.gptq(w, h, QuantScheme(4, 128, True), torch.bfloat16)
    assert torch.all(dequantize(packed)[:, 5] == 0)
    bad = -torch.eye(w.shape[1])  # negative definite: no damping makes it factor
    assert gptq_mod.gptq(w, bad, QuantScheme(4, 128, True), torch.bfloat16) is None


def _starve_expert(src, expert):
    """A copy of the checkpoint whose router never picks `expert` in any MoE layer."""
    index = json.loads((src / "model.safetensors.index.json").read_text())
    for name, file in index["weight_map"].items():
        if name.endswith("e_score_correction_bias"):
            tensors = load_file(src / file)
            tensors[name][expert] = -1e4  # selection only: the weights stay the unbiased scores
            save_file(tensors, src / file, metadata={"format": "pt"})


@pytest.fixture
def starved_source(tiny128_checkpoint, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for f in tiny128_checkpoint.iterdir():
        (src / f.name).write_bytes(f.read_bytes())
    _starve_expert(src, 7)
    return src


def _gptq(src, dst):
    return qmain.quantize(src, dst, recipe="default", method="gptq", calib_samples=4)


def test_gptq_run_layer_by_layer_with_rtn_fallback(starved_source, tmp_path, caplog):
    dst = tmp_path / "q"
    with caplog.at_level(logging.INFO, logger="kimivl_local.quantize"):
        report = _gptq(starved_source, dst)
    assert "experts 7 saw fewer than" in caplog.text  # the fallback says so, per layer
    layers = report["gptq_layers"]
    assert set(layers) == {"layer-000", "layer-001", "layer-002", "lm_head"}
    for name, layer in layers.items():
        assert layer["gptq"] < layer["rtn"], name  # on the calibration inputs
    assert "mlp.experts.7.down_proj" in layers["layer-001"]["rtn_fallback"]
    # the report's per-group output error: GPTQ's weights against RTN's, same samples
    plan = plan_mod.make_plan(starved_source, recipes.recipe_rules("default"), [], 2 << 30)
    rtn = output_error.measure(plan, None, output_error.SAMPLES, "cpu")["groups"]
    got = report["calibration_errors"]["groups"]
    for group in ("attention", "routed experts", "lm_head"):
        assert got[group] < rtn[group], group
    out, source = Checkpoint.open(dst), Checkpoint.open(starved_source)
    int4 = QuantScheme(4, 128, True)
    for expert, same in ((7, True), (2, False)):
        module = f"language_model.model.layers.1.mlp.experts.{expert}.up_proj"
        rtn = quantize_rtn(source.load(f"{module}.weight"), int4)
        got = PackedWeight.from_state_dict({n: out.load(n) for n in rtn.state_dict(module + ".")},
                                           int4, module + ".")
        assert torch.equal(got.weight_packed, rtn.weight_packed) == same, expert
    model = kimivl_local.load(dst, device="cpu")  # the runtime takes GPTQ output as is
    assert model.logits(torch.tensor([1, 2, 3])).isfinite().all()
    assert not (tmp_path / "q.partial").exists()


@pytest.mark.slow
def test_interrupted_gptq_resumes_from_the_saved_layers(starved_source, tmp_path, caplog,
                                                       monkeypatch):
    solve, calls = sequential._solve, []

    def interrupt(*args):  # Ctrl-C while layer 1 is being solved
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return solve(*args)

    monkeypatch.setattr(sequential, "_solve", interrupt)
    with pytest.raises(KeyboardInterrupt):
        _gptq(starved_source, tmp_path / "r")
    monkeypatch.setattr(sequential, "_solve", solve)
    with caplog.at_level(logging.INFO, logger="kimivl_local.quantize"):
        _gptq(starved_source, tmp_path / "r")
    assert "layer-000: GPTQ result from an earlier run" in caplog.text
    _gptq(starved_source, tmp_path / "fresh")
    for f in (tmp_path / "fresh").iterdir():
        assert (tmp_path / "r" / f.name).read_bytes() == f.read_bytes(), f.name


def test_default_calibration_set_has_text_and_images():
    samples = calibration.default_samples(8)
    assert len(samples) == 8 and sum(s.image is not None for s in samples) == 2
    assert all(len(s.text) > 100 for s in samples)
    assert samples[3].image.size in ((224, 224), (280, 168))
    assert [s.text for s in calibration.default_samples(8)] == [s.text for s in samples]


def test_calibration_folder_and_jsonl(tmp_path):
    from PIL import Image

    folder = tmp_path / "calib"
    folder.mkdir()
    Image.new("RGB", (56, 56), (200, 10, 10)).save(folder / "red.png")
    (folder / "red.txt").write_text("What color is this?")
    (folder / "notes.txt").write_text("plain text sample")
    got = calibration.load_samples(folder, 10)
    assert [(s.text, s.image is not None) for s in got] == [
        ("plain text sample", False), ("What color is this?", True)]
    jsonl = tmp_path / "calib.jsonl"
    jsonl.write_text('{"text": "a"}\n\n{"text": "b", "image": "calib/red.png"}\n')
    got = calibration.load_samples(jsonl, 10)
    assert got[1].image == str(folder / "red.png") and got[0].text == "a"
    for content, message in [('{"text": "a"}\n{oops\n', "calib.jsonl:2: not valid JSON"),
                             ('{"image": "x.png"}\n', 'calib.jsonl:1: expected an object'),
                             ('{"text": "a", "image": "missing.png"}\n', "missing.png not found")]:
        jsonl.write_text(content)
        with pytest.raises(InputError, match=message):
            calibration.load_samples(jsonl, 10)
    with pytest.raises(InputError, match="no such file or folder"):
        calibration.load_samples(tmp_path / "nope", 10)
