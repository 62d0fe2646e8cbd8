"""The fused CPU decode step (model/fused_decode.py, csrc/cpu/decode_layer.cpp) against the
torch
path it replaces: the same logits over several steps for every recipe, dense and MoE layers, bf16
and fp32 models, positions up to the cache's last row, every ISA path; the router's top-k
against model/moe.py's Router, with its rule for exact ties; and the choice of path."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import CLI_CWD
from kernel_support import ISAS, force_isa

import kimivl_local
from kimivl_local.kernels.bridge import kernel, set_backend
from kimivl_local.model import fused_decode as decode_layer
from kimivl_local.model.fused_decode import router_topk
from kimivl_local.model.moe import Router

# Mixed widths: 2, 3, 5, 6 bits, asymmetric zeros, per-channel and grouped (test_quant_bits.py).
MIXED = ("mlp\\.experts\\.\\d+\\.(gate|up)_proj=3", "mlp\\.experts\\.\\d+\\.down_proj=2:32:asym",
         "shared_experts=5:64:asym", "self_attn\\.(q_proj|kv_a_proj_with_mqa)=6:channel",
         "layers\\.0\\.mlp\\.=5:channel:asym")

needs_kernel = pytest.mark.skipif(kernel("decode_layers") is None,
                                  reason="no compiled decode_layers in this install")


def _rel(a, b) -> float:
    return float((a - b).norm() / b.norm())


def _decode_both_ways(api, prompt_len: int, steps: int) -> tuple[list, list]:
    """(logits, latent rows written) of `steps` greedy decode steps after a `prompt_len`-token
    prompt, fused and through torch, each step taken both ways from the same cache (the torch
    path's), so a difference at one step does not carry into the next."""
    engine, lm = api.engine, api.model.language_model
    ids = [(7 * i + 3) % 1000 + 1 for i in range(prompt_len)]
    engine.cache.reset()
    token = int(engine.prefill(ids)[0].argmax())
    fused = lm.fused_decode()
    assert fused is not None
    got, want = [], []
    for _ in range(steps):
        position = len(engine.cache.tokens)
        saved_kv, saved_tokens = engine.cache.kv.clone(), list(engine.cache.tokens)
        got.append(engine.decode_step(token).clone())
        fused_rows = engine.cache.kv[:, position].clone()
        engine.cache.kv.copy_(saved_kv)
        engine.cache.set_tokens(saved_tokens)
        fused.enabled = False
        want.append(engine.decode_step(token).clone())
        fused.enabled = True
        got[-1] = (got[-1], fused_rows.float())
        want[-1] = (want[-1], engine.cache.kv[:, position].float())
        token = int(want[-1][0].argmax())
    return got, want


def _assert_same_logits(got: list, want: list) -> None:
    """The same logits and latent rows at every step. Bound: 1e-4 relative per step, the kernel-path tests' bound for fp32 summation order (the
    fused layer rounds where torch does: measured 0.0, bit for bit, on every bf16 model here).
    One step may differ by more, up to 5e-2: in an fp32 model a difference of one ulp can move
    an activation across a rounding boundary of the kernels' int8 activation quantizer, a step
    of 1/127 of its block's maximum (measured once: 1.25e-2 at one step of 4 on the mixed fp32
    model, its router margins all >= 5e-3), as test_language_model allows one router near-tie."""
    errors = [max(_rel(g, w), _rel(g_rows, w_rows))
              for (g, g_rows), (w, w_rows) in zip(got, want)]
    assert sum(e >= 1e-4 for e in errors) <= 1 and max(errors) < 5e-2, errors
    assert sum(int(g.argmax()) != int(w.argmax()) for (g, _), (w, _) in zip(got, want)) <= 1


@needs_kernel
@pytest.mark.parametrize("recipe, rules", [("int4", ()), ("default", ()), ("default", MIXED)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_decode_equals_torch_path(quantized, recipe, rules, dtype):
    api = kimivl_local.load(quantized(recipe, *rules), device="cpu", dtype=dtype)
    assert [s[0] for s in api.model.language_model.fused_decode().segments] == ["fused"]
    _assert_same_logits(*_decode_both_ways(api, prompt_len=9, steps=6))


@needs_kernel
def test_a_layer_the_fused_path_cannot_take_keeps_the_torch_path(quantized, monkeypatch):
    api = kimivl_local.load(quantized("default"), device="cpu")
    layers = list(api.model.language_model.model.layers)
    plain = decode_layer.layer_spec
    # as for a layer with a bf16 o_proj (layer_spec's own refusals: the test below)
    monkeypatch.setattr(decode_layer, "layer_spec", lambda layer, cfg, dtype: (
        "test" if layer is layers[1] else plain(layer, cfg, dtype)))
    segments = api.model.language_model.fused_decode().segments
    assert [s[:2] for s in segments] == [("fused", 0), ("torch", 1), ("fused", 2)]
    _assert_same_logits(*_decode_both_ways(api, prompt_len=9, steps=4))


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_fused_decode_on_every_isa_up_to_the_last_cache_row(quantized, monkeypatch, isa):
    force_isa(monkeypatch, isa, "decode_layers")
    api = kimivl_local.load(quantized("default"), device="cpu", max_context=40)
    capacity = api.engine.cache.capacity
    got, want = _decode_both_ways(api, prompt_len=capacity - 3, steps=3)
    assert len(api.engine.cache.tokens) == capacity  # the last step wrote the last row
    _assert_same_logits(got, want)


# Weights the fused step runs in one parallel region (q_proj with kv_a_proj, gate with up) at
# different widths from each other, so one region mixes the kernels of two bit widths.
PAIRED_MIXED = ("self_attn\\.kv_a_proj_with_mqa=3:64:asym", "shared_experts\\.up_proj=2:32:asym",
                "layers\\.0\\.mlp\\.gate_proj=5:channel")


@needs_kernel
@pytest.mark.parametrize("isa", ISAS)
def test_paired_projections_are_bit_identical_on_every_isa(quantized, monkeypatch, isa):
    """A bf16 model's fused step rounds where torch does, so its logits and latent rows are the
    torch path's bit for bit, also where two projections of one input share a parallel region."""
    force_isa(monkeypatch, isa, "decode_layers")
    api = kimivl_local.load(quantized("default", *PAIRED_MIXED), device="cpu",
                            dtype=torch.bfloat16)
    for (g, g_rows), (w, w_rows) in zip(*_decode_both_ways(api, prompt_len=9, steps=3)):
        assert torch.equal(g, w) and torch.equal(g_rows, w_rows)


_GREEDY_LOGITS = """
import sys, torch, kimivl_local
engine = kimivl_local.load(sys.argv[1], device="cpu").engine
token, logits = int(engine.prefill([5, 9, 13])[0].argmax()), []
for _ in range(3):
    logits.append(engine.decode_step(token).clone())
    token = int(logits[-1].argmax())
torch.save(torch.stack(logits), sys.argv[2])
"""


@pytest.mark.slow
@needs_kernel
def test_pool_without_polling_gives_the_same_step(quantized, tmp_path):
    """KIMIVL_SPIN_US=0 (the pool's threads sleep between jobs at once, read at start-up) runs
    the fused step to the same logits as the default polling pool."""
    path = quantized("int4")
    for name, spin in (("polling", "100"), ("sleeping", "0")):
        env = {**os.environ, "KIMIVL_SPIN_US": spin}
        subprocess.run([sys.executable, "-c", _GREEDY_LOGITS, str(path), str(tmp_path / name)],
                       check=True, timeout=120, cwd=CLI_CWD, env=env)
    assert torch.equal(torch.load(tmp_path / "polling"), torch.load(tmp_path / "sleeping"))


@needs_kernel
def test_position_outside_the_cache_is_a_clear_error(quantized):
    api = kimivl_local.load(quantized("int4"), device="cpu", max_context=16)
    lm = api.model.language_model
    fused = lm.fused_decode()
    kv = api.engine.cache.kv
    x = lm.embed(torch.tensor([5]))
    with pytest.raises(ValueError, match="position 16 outside the cache capacity 16"):
        fused.run(lm, x, torch.tensor([kv.shape[1]]), kv)
    with pytest.raises(ValueError, match="row-contiguous"):
        fused.run(lm, x, torch.tensor([0]), kv.transpose(1, 2))


@needs_kernel
def test_inconsistent_layer_spec_names_the_field(quantized):
    api = kimivl_local.load(quantized("int4"), device="cpu")
    lm = api.model.language_model
    spec, _tensors = decode_layer.layer_spec(lm.model.layers[1], lm.config, lm.dtype)
    spec["heads"] += 1
    with pytest.raises(ValueError, match="q_proj must be a quantized"):
        kernel("DecodeLayer")(spec)
    del spec["heads"]
    with pytest.raises(ValueError, match="missing heads"):
        kernel("DecodeLayer")(spec)


@pytest.fixture
def restore_backend():
    yield
    set_backend("auto")


@needs_kernel
def test_reference_backend_chosen_after_the_plan_takes_the_torch_path(quantized,
                                                                     restore_backend):
    api = kimivl_local.load(quantized("int4"), device="cpu")
    fused = api.model.language_model.fused_decode()
    assert fused.active
    set_backend("reference")
    assert not fused.active


def test_torch_path_where_nothing_can_be_fused(tiny_checkpoint, quantized, monkeypatch):
    dense = kimivl_local.load(tiny_checkpoint, device="cpu")  # bf16 weights: nothing quantized
    assert dense.model.language_model.fused_decode() is None
    lm = dense.model.language_model
    assert "not quantized" in decode_layer.layer_spec(lm.model.layers[1], lm.config, lm.dtype)
    monkeypatch.setenv("KIMIVL_FUSED_DECODE", "0")
    api = kimivl_local.load(quantized("int4"), device="cpu")
    assert api.model.language_model.fused_decode() is None
    monkeypatch.setenv("KIMIVL_FUSED_DECODE", "maybe")
    api = kimivl_local.load(quantized("int4"), device="cpu")
    with pytest.raises(ValueError, match="KIMIVL_FUSED_DECODE must be 0 or 1"):
        api.model.language_model.fused_decode()


def _router(experts, top_k, n_group, topk_group, hidden=48, seed=0) -> Router:
    cfg = SimpleNamespace(num_experts_per_tok=top_k, n_group=n_group, topk_group=topk_group,
                          norm_topk_prob=True, routed_scaling_factor=2.5,
                          n_routed_experts=experts, hidden_size=hidden)
    router = Router(cfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(experts, hidden, generator=g) * 0.2)
        router.e_score_correction_bias.copy_(torch.randn(experts, generator=g) * 0.1)
    return router


@needs_kernel
@pytest.mark.parametrize("experts, top_k, n_group, topk_group",
                         [(64, 6, 1, 1), (8, 1, 1, 1), (8, 8, 1, 1), (64, 8, 8, 4), (16, 3, 4, 1)])
def test_router_matches_torch_router(experts, top_k, n_group, topk_group):
    router = _router(experts, top_k, n_group, topk_group)
    g = torch.Generator().manual_seed(1)
    for _ in range(20):
        x = torch.randn(1, router.weight.shape[1], generator=g)
        want_w, want_ids = router(x)
        got_w, got_ids = router_topk(router, x)
        # the same experts (torch's order within the top-k is its own), the same weights
        order = want_ids[0].argsort()
        assert got_ids.sort().values.tolist() == want_ids[0][order].tolist()
        torch.testing.assert_close(got_w[got_ids.argsort()], want_w[0][order], rtol=1e-5,
                                   atol=1e-7)
        # fp64 oracle of the weights of the chosen experts: a few fp32 roundings (1e-6)
        scores = (x.double() @ router.weight.double().T).sigmoid()[0, got_ids]
        oracle = scores / scores.sum() * router.scaling if top_k > 1 else scores * router.scaling
        torch.testing.assert_close(got_w.double(), oracle, rtol=1e-6, atol=0)


@needs_kernel
def test_router_ties_go_to_the_lower_expert_id():
    # Zero router weight and bias: every expert scores sigmoid(0) = 0.5, all tied.
    router = _router(16, 3, 1, 1)
    with torch.no_grad():
        router.weight.zero_()
        router.e_score_correction_bias.zero_()
        router.e_score_correction_bias[[9, 12]] = 0.25  # two clear winners, then 14 ties
    weights, ids = router_topk(router, torch.randn(1, 48))
    assert ids.tolist() == [9, 12, 0]
    torch.testing.assert_close(weights, torch.full((3,), 2.5 / 3))
    # Groups: masked groups read 0.0, so with negative biased scores they outrank the kept
    # group's weaker experts, and the lowest masked id wins their tie.
    router = _router(16, 3, 4, 1)
    with torch.no_grad():
        router.weight.zero_()
        router.e_score_correction_bias.fill_(-1.0)
        router.e_score_correction_bias[[13, 14]] = 0.0  # group 3 wins (score -0.5 + -0.5)
    weights, ids = router_topk(router, torch.randn(1, 48))
    assert ids.tolist() == [13, 14, 0]  # 0.5, 0.5, then 0.0 (masked) over -0.5 (kept)
    _, want_ids = router(torch.randn(1, 48))  # torch: 13, 14 and some masked expert
    assert sorted(want_ids[0].tolist())[-2:] == [13, 14] and want_ids[0].min() < 12
